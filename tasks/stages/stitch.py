"""Stage 7, stitch: masks and stitching tuning of every frame (paper section 3.4), chunk by chunk.

A chunk (:class:`StitchChunk`) is the unit that is stored, skipped when already stored, and fanned out
to GPU workers. The stage runs in three steps that the flow wires: :func:`plan_stitch` (the stored stage,
or its chunks), the missing chunks stitched here (:func:`stitch_chunks`) or by the ``stitch-chunk`` flow
on workers (:func:`stitch_chunk`), then :func:`gather_stitch`, which records the stage.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from stitchtime_core import masks
from stitchtime_core.config import StitchingConfig, to_dict
from stitchtime_core.errors import StitchtimeError
from stitchtime_core.models.bisenet import INPUT_SIZE, face_mask_from_labels, parse_faces
from stitchtime_core.models.profiles import Networks
from stitchtime_core.models.stylegan2 import Generator
from stitchtime_core.report import choose_keyframes
from stitchtime_core.stitching import render_edits, stitch_frames
from stitchtime_core.tensors import images_to_tensor, tensor_to_images
from tasks.progress import stage_progress
from tasks.stages.networks import Runtime
from tasks.stages.base import Ingredients, Stage, StageRef, retrying, short_key, stage_task
from tasks.stages.formats import CHUNK_NUMBERS, CropRows, edited_rows, pti_generator
from tasks.store import ArtifactStore, open_store

STAGE = Stage("stitch", version=4)  # 4: masks stored as 8-bit images (0-255), soft-edged when "square"


def ingredients(align: StageRef, pti: StageRef, edit: StageRef, config: StitchingConfig, runtime: Runtime,
                chunk_size: int) -> Ingredients:
    # With warm starts a frame goes on from its neighbour's weights within its chunk: the chunks shape the result.
    chunking = [f"chunk_size={chunk_size}"] if config.warm_start else []
    return [align.key, pti.key, edit.key, runtime.networks.parser_identity, *chunking], config


@dataclass(frozen=True)
class StitchChunk:
    """One chunk of the stitch stage: rows ``[start, stop)`` of the edited frames, and where its inputs are.

    Everything a worker on another machine needs to stitch it; :meth:`to_parameters` turns it into
    plain JSON for a flow run and :meth:`from_parameters` back.
    """

    store_uri: str
    key: str
    """The stitch stage's key: the chunk is stored under it."""
    start: int
    stop: int
    chunk_size: int
    """The stage's chunk size (the last chunk may be shorter): with warm starts, part of its key."""
    align: StageRef
    pti: StageRef
    edit: StageRef
    config: StitchingConfig
    profile: str
    models_dir: str | None

    def runtime(self, device: str) -> Runtime:
        """Where the chunk computes: its run's profile and models folder, on ``device``."""
        return Runtime(self.profile, self.models_dir, device)

    @property
    def artifact(self) -> str:
        """The chunk's stored stitched crops, masks and numbers (stop is in the name: chunk sizes may change)."""
        return f"{self.key}/chunk-{self.start:06d}-{self.stop:06d}.safetensors"

    def to_parameters(self) -> dict[str, Any]:
        """The chunk as plain JSON values (stage references and the config as dicts; the store's absolute URI)."""
        return {"store": open_store(self.store_uri).uri, "key": self.key, "start": self.start, "stop": self.stop,
                "chunk_size": self.chunk_size, "align": dataclasses.asdict(self.align),
                "pti": dataclasses.asdict(self.pti), "edit": dataclasses.asdict(self.edit),
                "stitching": to_dict(self.config), "profile": self.profile,
                "models_dir": self.models_dir}

    @classmethod
    def from_parameters(cls, store: str, key: str, start: int, stop: int, chunk_size: int, align: dict[str, Any],
                        pti: dict[str, Any], edit: dict[str, Any], stitching: dict[str, Any], profile: str,
                        models_dir: str | None) -> StitchChunk:
        """Rebuild a chunk from :meth:`to_parameters`."""
        return cls(store, key, int(start), int(stop), int(chunk_size), StageRef(**align), StageRef(**pti),
                   StageRef(**edit), StitchingConfig(**stitching), profile, models_dir)


ChunkRunner = Callable[[list[StitchChunk], Callable[[int], None]], dict[str, Any]]
"""Stitches chunks somewhere else (e.g. as flow runs of a deployment on GPU workers) and returns once
each is stored or has failed for good, calling its second argument with the number of chunks just
done as they finish; returns small facts for the stage's info."""


def default_device() -> str:
    """The device a stitch worker uses when told none: its first visible GPU, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class StitchPlan:
    """What a stitch stage that is not stored yet has to do: every chunk, the chunks not stored yet (a run
    that stopped keeps its finished chunks), and what :func:`gather_stitch` records when they are done."""

    key: str
    ingredients: Ingredients
    chunks: tuple[StitchChunk, ...]
    missing: tuple[StitchChunk, ...]
    masks: str
    """Where the masks come from: "bisenet" (face parsing, landmarks where it finds no face) or "landmarks"."""
    started: float
    """When the plan was made (``time.time()``): the stage's seconds count from there."""


@stage_task("stitch")
def plan_stitch(store_uri: str, align: StageRef, pti: StageRef, edit: StageRef, config: StitchingConfig,
                runtime: Runtime, chunk_size: int = 16) -> StageRef | StitchPlan:
    """The stored stitch stage, or the plan of its chunks: masks and stitching tuning of every frame.

    Masks come from BiSeNet run on the edited images (the paper) or the original crops (the reference code:
    ``config.segment``) when the profile has face-parsing weights; from the landmarks otherwise (and for
    frames where parsing finds no face).
    The flow stitches the plan's missing chunks here (:func:`stitch_chunks`) or on GPU workers (the
    ``stitch-chunk`` flow, :func:`stitch_chunk`), then :func:`gather_stitch` records the stage.

    Args:
        chunk_size: frames per chunk, the unit that is stored, skipped when already stored, and fanned out.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    started = time.time()
    store = open_store(store_uri)
    made_of = ingredients(align, pti, edit, config, runtime, chunk_size)
    key = STAGE.key(made_of)
    done = STAGE.reused(store, key)
    if done is not None:
        return done
    frames = int(align.info["edited_frames"])
    chunks = tuple(StitchChunk(store_uri, key, start, min(start + chunk_size, frames), chunk_size, align, pti, edit,
                               config, runtime.profile, runtime.models_dir) for start in range(0, frames, chunk_size))
    parsing = runtime.networks.parser_identity != "landmarks"
    return StitchPlan(key, made_of, chunks, tuple(chunk for chunk in chunks if not store.exists(chunk.artifact)),
                      "bisenet" if parsing else "landmarks", started)


@retrying(name="stitch-chunks")
def stitch_chunks(chunks: list[StitchChunk], device: str) -> None:
    """Stitch chunks of one stitch stage here, one after another, with θ_p loaded once; a chunk stored
    already (by an earlier try) is skipped."""
    first = chunks[0]
    store = open_store(first.store_uri)
    inputs = _StitchInputs(store, first.align, first.pti, first.edit, first.runtime(device).networks, device)
    with stage_progress("stitch", total=sum(c.stop - c.start for c in chunks), unit="frame",
                        label=short_key(first.key)) as advance:
        for chunk in chunks:
            if store.exists(chunk.artifact):
                advance(chunk.stop - chunk.start)
                continue
            store.put_tensors(chunk.artifact, inputs.stitch(chunk.start, chunk.stop, chunk.config, progress=advance))


def fan_out(plan: StitchPlan, run_chunks: ChunkRunner) -> dict[str, Any]:
    """Hand the plan's missing chunks to ``run_chunks`` (GPU workers), with a progress bar counting chunks;
    what it reports."""
    with stage_progress("stitch", total=len(plan.missing), unit="chunk", label=short_key(plan.key)) as advance:
        return run_chunks(list(plan.missing), advance)


@retrying(name="stitch-gather")
def gather_stitch(store_uri: str, plan: StitchPlan, fanned: dict[str, Any] | None = None) -> StageRef:
    """Record a stitch stage whose chunks are all stored: its per-frame numbers summed up, then its marker.

    Args:
        fanned: what :func:`fan_out` reported, when GPU workers stitched the chunks.

    Raises:
        StitchtimeError: some chunk is not stored.
    """
    store = open_store(store_uri)
    still = [f"{c.start}-{c.stop}" for c in plan.chunks if not store.exists(c.artifact)]
    if still:
        raise StitchtimeError(f"stitch chunks of rows {', '.join(still)} were not stored by their runs")
    numbers: dict[str, list[torch.Tensor]] = {name: [] for name in CHUNK_NUMBERS}
    for chunk in plan.chunks:  # keep only the per-frame numbers: the crops of a long clip do not fit in memory
        stored = store.get_tensors(chunk.artifact)
        for name in CHUNK_NUMBERS:
            numbers[name].append(stored[name])
    cat = lambda name: torch.cat(numbers[name])  # noqa: E731
    info = {"chunks": [chunk.artifact for chunk in plan.chunks], "method": plan.ingredients[1].method,
            "masks": plan.masks, "landmark_mask_frames": int(cat("landmark_masks").sum()),
            "boundary_error_before": float(cat("boundary_error_before").mean()),
            "boundary_error_after": float(cat("boundary_error_after").mean()),
            "steps_per_frame": float(cat("steps").float().mean()), "fan_out": fanned}
    return STAGE.finish(store, plan.key, plan.ingredients, info, time.time() - plan.started)


def stitch_chunk(chunk: StitchChunk, *, device: str) -> dict[str, Any]:
    """Stitch one chunk and store it atomically, unless it is stored already; θ_p is loaded once per call.

    What a stitch worker runs. The chunk's key is derived again from this process's models and code:
    a worker whose model files or stitchtime version differ from the flow's refuses the chunk rather
    than store results under a key that does not describe them.

    Returns:
        ``{"chunk": artifact key, "computed": False when it was already stored, "frames", "seconds"}``.

    Raises:
        StitchtimeError: the chunk's key does not match this worker's models or code.
    """
    started = time.perf_counter()
    store = open_store(chunk.store_uri)
    result = {"chunk": chunk.artifact, "computed": False, "frames": chunk.stop - chunk.start}
    if not store.exists(chunk.artifact):
        runtime = chunk.runtime(device)
        models = runtime.networks
        key = STAGE.key(ingredients(chunk.align, chunk.pti, chunk.edit, chunk.config, runtime, chunk.chunk_size))
        if key != chunk.key:
            raise StitchtimeError(f"stitch chunk {chunk.artifact}: this worker's models or stitchtime version give "
                                  f"the key {key}; it must run the same stitchtime and model files as the flow")
        inputs = _StitchInputs(store, chunk.align, chunk.pti, chunk.edit, models, device)
        with stage_progress("stitch", total=chunk.stop - chunk.start, unit="frame",
                            label=f"{short_key(chunk.key)} rows {chunk.start}-{chunk.stop}") as advance:
            store.put_tensors(chunk.artifact, inputs.stitch(chunk.start, chunk.stop, chunk.config, progress=advance))
        result["computed"] = True
    return {**result, "seconds": time.perf_counter() - started}


class _StitchInputs:
    """What every chunk of one stitch stage reads: θ_p, the edited latents, the crops and their landmarks."""

    def __init__(self, store: ArtifactStore, align: StageRef, pti: StageRef, edit: StageRef, models: Networks,
                 device: str):
        self.G, self.parser, self.device = pti_generator(store, pti, models, device), models.parser, device
        self.crop_points = edited_rows(store, align)["crop_landmarks"]
        self.latents = store.get_tensors(f"{edit.key}/latents.safetensors", device=device)["latents"]
        self.crops = CropRows(store, align)

    def stitch(self, start: int, stop: int, config: StitchingConfig, *,
               progress: Callable[[int], None]) -> dict[str, torch.Tensor]:
        """Rows ``[start, stop)`` stitched, ready to store (see :func:`_stitch_chunk`)."""
        if not 0 <= start < stop <= len(self.latents):
            raise ValueError(f"rows {start}-{stop} are outside the {len(self.latents)} edited frames")
        keyframes = [row - start for row in choose_keyframes(len(self.latents)) if start <= row < stop]
        stored = _stitch_chunk(self.G, self.parser, self.latents[start:stop], self.crops.rows(start, stop),
                               self.crop_points[start:stop], config=config, device=self.device, progress=progress,
                               keyframes=keyframes)
        stored["raw_edit_rows"] = torch.tensor([start + row for row in keyframes], dtype=torch.int64)
        return stored


def _stitch_chunk(G: Generator, parser: torch.nn.Module | None, latents: torch.Tensor, crops: np.ndarray,
                  crop_points: np.ndarray, *, config: StitchingConfig, device: str,
                  progress: Callable[[int], None], keyframes: list[int]) -> dict[str, torch.Tensor]:
    """One chunk's stitched crops, masks m and paste masks m^d (8-bit, 255 = inside), its numbers, and the raw
    edits of its ``keyframes`` (rows within the chunk), ready to store; ``progress`` is called with the frames
    just stitched."""
    x = images_to_tensor(crops, device)
    edits = render_edits(G, latents, batch_size=config.batch_size)
    m, content, b, paste, from_landmarks = stitch_masks(parser, edits if config.segment == "edit" else x,
                                                        crop_points, config)
    result = stitch_frames(G, latents, x, content, b, config=config, edits=edits, progress=progress)
    as_image = lambda t: t[:, 0].mul(255).round().to(torch.uint8).cpu()  # noqa: E731
    return {"stitched": torch.from_numpy(tensor_to_images(result.stitched)),
            "masks": as_image(m),
            "paste_masks": as_image(paste),
            "landmark_masks": torch.from_numpy(from_landmarks),
            "raw_edits": torch.from_numpy(tensor_to_images(edits[keyframes])),
            "steps": result.steps.cpu(),
            "boundary_error_before": result.boundary_error_before.cpu(),
            "boundary_error_after": result.boundary_error_after.cpu()}


def stitch_masks(parser: torch.nn.Module | None, images: torch.Tensor, crop_points: np.ndarray,
           config: StitchingConfig) -> tuple[torch.Tensor, ...]:
    """The face m, content mask, boundary b and paste mask m^d of each of ``images`` (each [N, 1, S, S] on their
    device, in [0, 1]) as ``config.mask_shape`` makes them, and bool [N], True where m came from the landmarks."""
    size = images.shape[-1]
    if config.mask_shape == "square":  # made on BiSeNet's 512 px labels, as the reference code
        size, points = INPUT_SIZE, crop_points * (INPUT_SIZE / images.shape[-1])
    else:
        points = crop_points
    parsed = None if parser is None else face_mask_from_labels(
        parse_faces(parser, images, resize=config.parse_resize, size=size)).cpu().numpy()
    faces, from_landmarks = masks.face_masks(points, size, parsed=parsed)
    faces = torch.from_numpy(faces).to(images.device)
    if config.mask_shape == "square":
        m, content, b, paste = masks.square_masks(faces, images.shape[-1], border_px_1024=config.border_px)
        return m, content, b, paste, from_landmarks
    m = faces[:, None]
    b = torch.from_numpy(masks.boundaries_of(faces.cpu().numpy(), border_px_1024=config.border_px))[:, None]
    b = b.to(images.device)
    return m, m, b, m + b, from_landmarks
