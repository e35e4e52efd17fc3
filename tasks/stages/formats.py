"""The formats stages hand each other through the store, and the readers of them.

- aligned crops: ``{align key}/crops-NNNNN.safetensors``, :data:`CROP_CHUNK` frames each, in the order of
  the edited frames; ``{align key}/frames.parquet``: every frame's status, quad and crop landmarks;
- the PTI generator: ``{pti key}/generator.safetensors`` and ``generator.json`` (its architecture), and
  while PTI runs, ``checkpoint.safetensors``; ``keyframes.safetensors``: the inversions G(pivot) of the
  report's keyframes (:func:`~stitchtime_core.report.choose_keyframes` of the edited frames), by θ_p;
- stitched chunks: ``{stitch key}/chunk-SSSSSS-EEEEEE.safetensors``, rows ``[S, E)`` of the edited frames:
  stitched crops, masks m and paste masks m^d, per-frame numbers (:data:`CHUNK_NUMBERS`), and the raw
  edits of the report's keyframes among its rows (``raw_edit_rows``, ``raw_edits``).

The report reads these; it never runs a network.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterator

import numpy as np
import torch

from stitchtime_core.errors import StitchtimeError
from stitchtime_core.models.profiles import Networks, build_generator
from stitchtime_core.models.stylegan2 import Generator
from stitchtime_core.pti import PTICheckpoint
from stitchtime_core.render import CropPaste
from tasks.stages.base import StageRef
from tasks.store import ArtifactStore

CROP_CHUNK = 64
"""Aligned crops per stored chunk."""

CHUNK_NUMBERS = ("landmark_masks", "steps", "boundary_error_before", "boundary_error_after")
"""The per-frame numbers of a stored stitch chunk that the stitch stage's info sums up."""


def put_crops(store: ArtifactStore, key: str, index: int, crops: list[np.ndarray]) -> str:
    """Store chunk ``index`` of an align stage's crops; returns its key."""
    chunk_key = f"{key}/crops-{index:05d}.safetensors"
    store.put_tensors(chunk_key, {"crops": torch.from_numpy(np.stack(crops))})
    return chunk_key


def iter_crops(store: ArtifactStore, align: StageRef) -> Iterator[np.ndarray]:
    """The aligned crops of the edited frames, uint8 [n, S, S, 3] one stored chunk at a time."""
    for chunk_key in align.info["crop_chunks"]:
        yield store.get_tensors(chunk_key)["crops"].numpy()


def crops_chw(store: ArtifactStore, align: StageRef) -> torch.Tensor:
    """Every edited frame's aligned crop as uint8 [n, 3, S, S], in a temporary file mapped into memory.

    PTI reads a batch of frames at a time in any order; held in memory the crops would cost 3 MB a frame at
    1024 px (5.4 GB for a minute at 30 fps). Mapped, they are read from the file as needed and their pages
    are the OS's to drop, so the process's memory does not grow with the clip. The file is written with plain
    writes (a full disk is an error here, not a crash when a page is first touched), lies in the temporary
    folder (``$TMPDIR``), has no name on Linux, and goes when the returned tensor does.

    Raises:
        StitchtimeError: the temporary folder cannot hold the crops (a full disk: names the folder and the size).
    """
    folder, frames, shape = tempfile.gettempdir(), 0, (3, align.info["resolution"], align.info["resolution"])
    try:
        file = tempfile.TemporaryFile(dir=folder, prefix="stitchtime-crops-")
        with file:
            for chunk in iter_crops(store, align):
                chw = np.ascontiguousarray(chunk.transpose(0, 3, 1, 2))
                frames += len(chw)
                file.write(memoryview(chw).cast("B"))
            file.flush()
            if not frames:
                raise ValueError(f"{align.key}: the align stage stored no crops")
            # Copy-on-write: the tensor may be written to in memory (torch wants that), never the file.
            return torch.from_numpy(np.memmap(file, dtype=np.uint8, mode="c", shape=(frames, *shape)))
    except OSError as exc:
        size = align.info["edited_frames"] * math.prod(shape) / 2**20
        raise StitchtimeError(f"{folder}: cannot hold the aligned crops PTI reads ({size:.1f} MB): "
                              f"{exc.strerror or exc}; set TMPDIR to a folder with room") from None


def edited_rows(store: ArtifactStore, align: StageRef) -> dict[str, np.ndarray]:
    """The align stage's per-frame table, restricted to the frames that are edited."""
    table = store.get_table(f"{align.key}/frames.parquet")
    keep = table["status"] != "passthrough"
    return {name: column[keep] for name, column in table.items()}


class CropRows:
    """Aligned crops by row among the edited frames, reading one stored chunk at a time."""

    def __init__(self, store: ArtifactStore, align: StageRef):
        self.store, self.keys = store, align.info["crop_chunks"]
        self.index, self.chunk = -1, None

    def rows(self, start: int, stop: int) -> np.ndarray:
        """uint8 [stop - start, S, S, 3]."""
        parts = []
        for row in range(start, stop):
            index = row // CROP_CHUNK
            if index != self.index:
                self.chunk, self.index = self.store.get_tensors(self.keys[index])["crops"].numpy(), index
            parts.append(self.chunk[row % CROP_CHUNK])
        return np.stack(parts)


def write_pti_checkpoint(store: ArtifactStore, key: str, checkpoint: PTICheckpoint) -> None:
    """Store a PTI checkpoint in one atomic write: a reader never sees half of one."""
    tensors = {f"synthesis.{k}": v for k, v in checkpoint.synthesis.items()}
    tensors.update({f"optimizer.{k}": v for k, v in checkpoint.optimizer.items()})
    tensors["losses"] = torch.tensor(checkpoint.losses, dtype=torch.float64)
    tensors["step"] = torch.tensor(checkpoint.step)
    store.put_tensors(key, tensors)


def read_pti_checkpoint(store: ArtifactStore, key: str) -> PTICheckpoint:
    tensors = store.get_tensors(key)
    part = lambda prefix: {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
    return PTICheckpoint(int(tensors["step"]), part("synthesis."), part("optimizer."), tensors["losses"].tolist())


def write_keyframe_inversions(store: ArtifactStore, key: str, rows: list[int], images: np.ndarray) -> None:
    store.put_tensors(f"{key}/keyframes.safetensors", {"rows": torch.tensor(rows, dtype=torch.int64),
                                                      "inversions": torch.from_numpy(images)})


def read_keyframe_inversions(store: ArtifactStore, pti_key: str) -> tuple[list[int], np.ndarray]:
    """The report's keyframe rows among the edited frames, and their inversions (uint8 [k, S, S, 3])."""
    stored = store.get_tensors(f"{pti_key}/keyframes.safetensors")
    return stored["rows"].tolist(), stored["inversions"].numpy()


def pti_generator(store: ArtifactStore, pti: StageRef, models: Networks, device: str) -> Generator:
    """θ_p: the tuned generator, or the original one when PTI was skipped."""
    if pti.info.get("method") == "none":
        return models.generator
    G = build_generator(store.get_json(f"{pti.key}/generator.json"))
    G.load_state_dict(store.get_tensors(f"{pti.key}/generator.safetensors"))
    return G.to(device).eval().requires_grad_(False)


class StitchedChunks:
    """Stitched crops and masks by row, loading one stored chunk at a time (rows come in order)."""

    def __init__(self, store: ArtifactStore, keys: list[str]):
        self.store, self.keys = store, keys
        self.start, self.stop, self.chunk = 0, 0, None
        self.raw_edits: dict[int, np.ndarray] = {}
        self.next_index = 0

    def row(self, index: int) -> CropPaste:
        while not self.start <= index < self.stop:
            if self.next_index >= len(self.keys):
                raise IndexError(f"row {index} is past the stitched chunks")
            data = self.store.get_tensors(self.keys[self.next_index])
            # Masks are stored as 8-bit images, 255 inside.
            self.chunk = (data["stitched"].numpy(), data["masks"].numpy().astype(np.float32) / 255,
                          data["paste_masks"].numpy().astype(np.float32) / 255)
            self.raw_edits = dict(zip(data["raw_edit_rows"].tolist(), data["raw_edits"].numpy()))
            self.start, self.stop = self.stop, self.stop + len(self.chunk[0])
            self.next_index += 1
        crop, mask, paste_mask = (part[index - self.start] for part in self.chunk)
        return CropPaste(crop, mask, paste_mask)

    def raw_edit(self, index: int) -> np.ndarray:
        """The raw edit of row ``index``, a report keyframe, uint8 [S, S, 3] (after :meth:`row` of the same row).

        Raises:
            KeyError: the row is not a keyframe its chunk kept.
        """
        self.row(index)
        return self.raw_edits[index]
