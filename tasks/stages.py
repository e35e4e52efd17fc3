"""Prefect tasks, one per pipeline stage.

Each task is a thin adapter: it derives its artifact key from its inputs' keys, its stage config
and the stage's code version; if the store already holds that stage's output it returns at once;
otherwise it reads its inputs from the store, calls the core, writes its outputs and, last, a
``done.json`` marker (so a half-finished stage is never taken as done). Tasks return a
:class:`StageRef`, a small reference, never tensors.

The same key is the task's Prefect cache key, and Prefect's record of the result lives in the store
beside the artifacts (:mod:`tasks.caching`): a re-run's task runs end ``Cached`` without running.
Run stage tasks with :func:`run`, which reports a cache hit as a reused stage.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

import stitchtime_core
from stitchtime_core import alignment, faces, masks, video
from stitchtime_core.artifacts import derive_key, file_hash
from stitchtime_core.config import (AlignmentConfig, BlendingConfig, EditingConfig, EncodingConfig, OutputConfig,
                                    PTIConfig, StitchingConfig, to_dict)
from stitchtime_core.editing import edit_latents, resolve_direction
from stitchtime_core.errors import InputError, NoFaceError, StitchtimeError, StoreError
from stitchtime_core.losses import build_lpips
from stitchtime_core.models.bisenet import face_mask_from_labels, parse_faces
from stitchtime_core.models.e4e import encode
from stitchtime_core.models.profiles import Models, build_generator, generator_config, load_models
from stitchtime_core.models.stylegan2 import Generator
from stitchtime_core.projector import LOSS_RESOLUTION, project_pivots, projection_plan
from stitchtime_core.pti import PTICheckpoint, pti_steps, reconstruction_lpips, tune_generator
from stitchtime_core.render import CropPaste, render_video
from stitchtime_core.report import choose_keyframes
from stitchtime_core.stitching import render_edits, stitch_frames
from stitchtime_core.tensors import images_to_tensor, tensor_to_images
from tasks.caching import MARKER, STAGE_RESULTS, StageRef, StageRefSerializer, cache_key_fn
from tasks.progress import stage_progress
from tasks.store import ArtifactStore, open_store

# Bump a stage's version when its code changes what it writes: its key, and every key downstream, change.
STAGE_VERSIONS = {"probe": 1, "landmarks": 2, "align": 2, "encode": 2, "pti": 2, "edit": 1, "stitch": 2,
                  "render": 2, "measure": 2}


def _retry_unless_bad_input(task, task_run, state) -> bool:  # noqa: ANN001 - Prefect's hook signature
    """Retry failures that may pass (a store that is down, the network); never a bad input, a missing
    bucket or refused credentials, which fail the same way again."""
    try:
        state.result()
    except StitchtimeError as exc:
        return isinstance(exc, StoreError) and exc.transient
    except Exception:  # noqa: BLE001 - anything else may be transient
        return True
    return False


Ingredients = tuple[list[str], Any]
"""What a stage's key is made of: its inputs' keys or content hashes, in order, and its settings."""

_retrying = functools.partial(task, retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=_retry_unless_bad_input)


def stage_key(stage: str, ingredients: Ingredients) -> str:
    """The artifact key of a stage with these ingredients in this code version."""
    inputs, config = ingredients
    return derive_key(stage, inputs=inputs, config=config, code_version=_code_version(stage))


def _code_version(stage: str) -> str:
    return f"{stitchtime_core.__version__}/{STAGE_VERSIONS[stage]}"


def stage_task(stage: str, ingredients: Callable[..., Ingredients]) -> Callable[[Callable], Any]:
    """The Prefect task of a stage whose key is made of ``ingredients(**parameters)``.

    That key is also its Prefect cache key; the result (a :class:`StageRef`) is recorded as JSON in
    the store beside the stage's artifacts. Failures are retried unless the input is bad.
    """
    return _retrying(name=stage, cache_key_fn=cache_key_fn(lambda **params: stage_key(stage, ingredients(**params))),
                     result_storage=STAGE_RESULTS, result_serializer=StageRefSerializer(), persist_result=True,
                     cache_result_in_memory=False)


def run(stage: Callable[..., StageRef], *args: Any, **kwargs: Any) -> StageRef:
    """Run a stage task and return its :class:`StageRef`; a Prefect cache hit comes back as reused.

    Raises:
        whatever the task raised on its last try.
    """
    started = time.perf_counter()
    state = stage(*args, return_state=True, **kwargs)
    ref = state.result()
    if state.name == "Cached":  # the record is the ref the stage returned when it was made
        return dataclasses.replace(ref, reused=True, seconds=time.perf_counter() - started, made_seconds=ref.seconds)
    return ref


def make_stage(store: ArtifactStore, stage: str, ingredients: Ingredients,
               produce: Callable[[str], dict[str, Any]]) -> StageRef:
    """A stage task's body: the stored stage when its ``done.json`` exists, else ``produce(key)`` then the marker.

    ``produce`` writes the stage's artifacts under ``key`` and returns the stage's small facts.
    """
    key = stage_key(stage, ingredients)
    marker = f"{key}/{MARKER}"
    start = time.perf_counter()
    if store.exists(marker):
        done = store.get_json(marker)
        return StageRef(stage, key, True, time.perf_counter() - start, done.get("info", {}), done.get("seconds", 0.0))
    info = produce(key)
    inputs, config = ingredients
    seconds = time.perf_counter() - start
    store.put_json(marker, {"stage": stage, "inputs": inputs, "code_version": _code_version(stage),
                            "config": None if config is None else to_dict(config), "info": info, "seconds": seconds})
    return StageRef(stage, key, False, seconds, info, seconds)


@functools.lru_cache(maxsize=64)
def _content_hash(path: str, size: int, mtime_ns: int) -> str:
    return file_hash(path)


def _file_hash(path: str) -> str:
    """A file's content hash, computed once per version of the file (the cache key and the task both need it)."""
    stat = os.stat(path)
    return _content_hash(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def stage_models(profile: str, models_dir: str | None, device: str) -> Models:
    """A profile's networks, loaded once per process (every stage of every run shares them)."""
    return load_models(profile, models_dir=models_dir, device=device)


@functools.lru_cache(maxsize=2)
def _lpips(profile: str, models_dir: str | None, device: str) -> torch.nn.Module:
    return build_lpips(backbone_path=stage_models(profile, models_dir, device).lpips_backbone).to(device)


def _probe_ingredients(source: str, **_: Any) -> Ingredients:
    return [_file_hash(source)], None


@stage_task("probe", _probe_ingredients)
def probe_video(store_uri: str, source: str) -> StageRef:
    """Probe the source video; keyed by the file's content hash."""
    info = video.probe(source)
    store = open_store(store_uri)

    def produce(key: str) -> dict[str, Any]:
        store.put_json(f"{key}/probe.json", info.to_dict())
        return {"video": info.to_dict()}

    return make_stage(store, "probe", _probe_ingredients(source), produce)


def _landmarks_ingredients(probe: StageRef, config: AlignmentConfig, **_: Any) -> Ingredients:
    # Only detection settings change landmarks; smoothing and gaps belong to the align stage.
    return [probe.key], {"detector": config.detector, "upsample": config.detector_upsample,
                         "max_side": config.detect_max_side, "face": config.face}


@stage_task("landmarks", _landmarks_ingredients)
def detect_landmarks(store_uri: str, source: str, probe: StageRef, config: AlignmentConfig) -> StageRef:
    """dlib 68-point landmarks of one face track in every frame (NaN where the track has no face)."""
    store = open_store(store_uri)

    def produce(key: str) -> dict[str, Any]:
        landmarker = faces.load_landmarker(detector=config.detector, upsample=config.detector_upsample,
                                           max_side=config.detect_max_side)
        info = video.VideoInfo.from_dict(probe.info["video"])
        try:
            with stage_progress("landmarks", total=info.frame_count, unit="frame",
                                label=os.path.basename(source)) as advance:
                track = faces.landmarks_for_video(video.iter_frames(source, info), landmarker, choose=config.face,
                                                  progress=advance)
        except ValueError as exc:  # e.g. --face 2 when the first frame with faces has only two
            raise InputError(source, str(exc)) from None
        if not track.found.any():
            raise NoFaceError(source, f"no face found in any of its {len(track.found)} frames")
        store.put_table(f"{key}/landmarks.parquet", {
            "frame": np.arange(len(track.found)), "found": track.found, "landmarks": track.landmarks,
            "box": track.boxes, "faces": track.faces_per_frame})
        return {"frames": int(len(track.found)), "frames_with_face": int(track.found.sum())}

    return make_stage(store, "landmarks", _landmarks_ingredients(probe, config), produce)


def _align_ingredients(landmarks: StageRef, config: AlignmentConfig, resolution: int, **_: Any) -> Ingredients:
    return [landmarks.key, str(resolution)], config


@stage_task("align", _align_ingredients)
def align_faces(store_uri: str, source: str, probe: StageRef, landmarks: StageRef, config: AlignmentConfig,
                resolution: int) -> StageRef:
    """Gap plan, temporally smoothed FFHQ quads, and the aligned crops of the frames to edit.

    Crops are written in chunks of :data:`CROP_CHUNK` frames as the video streams past, so memory
    does not grow with the clip's length.
    """
    store = open_store(store_uri)
    info = video.VideoInfo.from_dict(probe.info["video"])

    def produce(key: str) -> dict[str, Any]:
        table = store.get_table(f"{landmarks.key}/landmarks.parquet")
        points, found = table["landmarks"], table["found"]
        quads, interpolated, passthrough = alignment.track_quads(points, found, config=config, fps=float(info.fps))
        edited = ~passthrough
        filled = alignment.interpolate_gaps(points, found, valid=edited)
        crop_points = np.full_like(points, np.nan)
        for i in np.flatnonzero(edited):
            crop_points[i] = alignment.landmarks_to_crop(filled[i], quads[i], resolution)
        chunks, pending = [], []
        with stage_progress("align", total=info.frame_count, unit="frame", label=os.path.basename(source)) as advance:
            for i, frame in enumerate(video.iter_frames(source, info)):
                if i < len(edited) and edited[i]:
                    pending.append(alignment.crop(frame, quads[i], resolution))
                if len(pending) == CROP_CHUNK:
                    chunks.append(_put_crops(store, key, len(chunks), pending))
                    pending = []
                advance(1)
        if pending:
            chunks.append(_put_crops(store, key, len(chunks), pending))
        status = np.where(found, "found", np.where(interpolated, "interpolated", "passthrough"))
        store.put_table(f"{key}/frames.parquet", {"frame": np.arange(len(found)), "status": status,
                                                  "quad": quads, "crop_landmarks": crop_points})
        return {"frames": int(len(found)), "edited_frames": int(edited.sum()), "resolution": resolution,
                "crop_chunks": chunks, "interpolated": np.flatnonzero(interpolated).tolist(),
                "passed_through": np.flatnonzero(passthrough).tolist()}

    return make_stage(store, "align", _align_ingredients(landmarks, config, resolution), produce)


CROP_CHUNK = 64
"""Aligned crops per stored chunk."""


def _put_crops(store: ArtifactStore, key: str, index: int, crops: list[np.ndarray]) -> str:
    chunk_key = f"{key}/crops-{index:05d}.safetensors"
    store.put_tensors(chunk_key, {"crops": torch.from_numpy(np.stack(crops))})
    return chunk_key


def _iter_crops(store: ArtifactStore, align: StageRef) -> Iterator[np.ndarray]:
    """The aligned crops of the edited frames, uint8 [n, S, S, 3] one stored chunk at a time."""
    for chunk_key in align.info["crop_chunks"]:
        yield store.get_tensors(chunk_key)["crops"].numpy()


def _edited_rows(store: ArtifactStore, align: StageRef) -> dict[str, np.ndarray]:
    """The align stage's per-frame table, restricted to the frames that are edited."""
    table = store.get_table(f"{align.key}/frames.parquet")
    keep = table["status"] != "passthrough"
    return {name: column[keep] for name, column in table.items()}


def _crops_chw(store: ArtifactStore, align: StageRef) -> torch.Tensor:
    """Every edited frame's aligned crop as uint8 [n, 3, S, S] (a quarter of the float size)."""
    return torch.cat([torch.from_numpy(c).permute(0, 3, 1, 2) for c in _iter_crops(store, align)]).contiguous()


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


def _encode_ingredients(align: StageRef, config: EncodingConfig, profile: str, models_dir: str | None, device: str,
                        **_: Any) -> Ingredients:
    # The projector's settings do not touch e4e pivots: leave them out of the key when e4e encodes.
    keyed = config if config.method == "optimization" else EncodingConfig(batch_size=config.batch_size)
    return [align.key, stage_models(profile, models_dir, device).identity], keyed


@stage_task("encode", _encode_ingredients)
def encode_pivots(store_uri: str, align: StageRef, config: EncodingConfig, profile: str, models_dir: str | None,
                  device: str) -> StageRef:
    """W+ pivots of every aligned crop: e4e, or per-frame optimisation (the "w/o e4e" ablation)."""
    store = open_store(store_uri)
    models = stage_models(profile, models_dir, device)

    def produce(key: str) -> dict[str, Any]:
        pivots = []
        frames, projecting = int(align.info["edited_frames"]), config.method == "optimization"
        with stage_progress("encode", total=_projection_steps(frames, config) if projecting else frames,
                            unit="step" if projecting else "frame", label=_short_key(key)) as advance:
            for crops in _iter_crops(store, align):
                if projecting:  # seeded by the chunk's first row, so every frame has its own noise
                    start = pivots[-1][-1, 0].to(device) if pivots and config.warm_start_steps else None
                    pivots.append(project_pivots(models.generator, images_to_tensor(crops, device), config=config,
                                                 lpips_fn=_lpips(profile, models_dir, device),
                                                 seed=sum(len(p) for p in pivots), start=start,
                                                 progress=lambda step, steps: advance(1)).cpu())
                    continue
                for start in range(0, len(crops), config.batch_size):
                    with torch.no_grad():
                        batch = images_to_tensor(crops[start:start + config.batch_size], device)
                        pivots.append(encode(models.encoder, batch, models.latent_avg).cpu())
                    advance(len(batch))
        store.put_tensors(f"{key}/pivots.safetensors", {"pivots": torch.cat(pivots)})
        return {"frames": sum(len(p) for p in pivots), "method": config.method}

    return make_stage(store, "encode", _encode_ingredients(align, config, profile, models_dir, device), produce)


def _projection_steps(frames: int, config: EncodingConfig) -> int:
    """Optimisation steps the projector takes for ``frames`` crops, stored chunk by stored chunk (with warm
    starts, each chunk's first frame starts from the chunk before)."""
    return sum(steps for start in range(0, frames, CROP_CHUNK)
               for _, steps in projection_plan(min(CROP_CHUNK, frames - start), config, warm=start > 0))


def _short_key(key: str) -> str:
    """A stage key's first hash digits: the progress label of stages that do not know the video's name."""
    return key.rsplit("/", 1)[-1][:8]


def _pti_ingredients(align: StageRef, pivots: StageRef, config: PTIConfig, profile: str, models_dir: str | None,
                     device: str, **_: Any) -> Ingredients:
    # The checkpoint interval does not change the result, so it is not part of the key.
    return ([align.key, pivots.key, stage_models(profile, models_dir, device).identity],
            dataclasses.replace(config, checkpoint_every=0))


@stage_task("pti", _pti_ingredients)
def tune_pti(store_uri: str, align: StageRef, pivots: StageRef, config: PTIConfig, profile: str,
             models_dir: str | None, device: str) -> StageRef:
    """One generator tuned around the pivots of all frames (paper eq. 1), checkpointed as it goes.

    A run stopped part way resumes from ``checkpoint.safetensors``; it is deleted once the stage is
    done (its ``done.json`` written). With ``method`` "none" nothing is tuned (the "w/o PTI" ablation)
    and later stages use the original generator. The stage's info holds the first and last loss and
    how well the pivots reconstruct the crops: the tuned generator's MSE over all frames, and the
    LPIPS of the original and of the tuned generator on at most :data:`PTI_RECONSTRUCTION_FRAMES`
    frames (``reconstruction_lpips_before`` / ``_after``, ``reconstruction_frames``).
    """
    store = open_store(store_uri)
    models = stage_models(profile, models_dir, device)

    def produce(key: str) -> dict[str, Any]:
        if config.method == "none":
            return {"method": "none", "steps": 0}
        crops = _crops_chw(store, align)
        w = store.get_tensors(f"{pivots.key}/pivots.safetensors", device=device)["pivots"]
        checkpoint_key = f"{key}/checkpoint.safetensors"
        resume = _read_pti_checkpoint(store, checkpoint_key) if store.exists(checkpoint_key) else None
        with stage_progress("pti", total=pti_steps(len(w), config), unit="step", label=_short_key(key),
                            initial=resume.step if resume else 0) as advance:
            result = tune_generator(models.generator, w, crops, config=config,
                                    lpips_fn=_lpips(profile, models_dir, device),
                                    progress=lambda step, steps, loss: advance(1), resume=resume,
                                    checkpoint=lambda c: _write_pti_checkpoint(store, checkpoint_key, c))
        mse = 0.0
        with torch.no_grad():
            for part in range(0, len(w), config.batch_size):
                images = crops[part:part + config.batch_size].to(device).float().div(127.5).sub(1)
                mse += float(torch.nn.functional.mse_loss(result.generator.synthesis(w[part:part + config.batch_size]),
                                                          images, reduction="sum"))
        # LPIPS at 256 px (area-downsampled, as the projector measures it) on at most
        # PTI_RECONSTRUCTION_FRAMES frames spread evenly over the clip: each costs two generator passes.
        rows = choose_keyframes(len(w), PTI_RECONSTRUCTION_FRAMES)
        before, after = reconstruction_lpips(models.generator, result.generator, w, crops, frames=rows,
                                             lpips_fn=_lpips(profile, models_dir, device),
                                             resolution=LOSS_RESOLUTION)
        store.put_tensors(f"{key}/generator.safetensors", result.generator.state_dict())
        store.put_json(f"{key}/generator.json", generator_config(result.generator))
        return {"method": "pti", "steps": result.steps, "resumed_from_step": resume.step if resume else 0,
                "first_loss": result.losses[0], "last_loss": result.losses[-1],
                "reconstruction_mse": mse / crops.numel(),
                # Mean LPIPS to the crops of G(pivot) (the pivots' own reconstruction) and of the tuned G.
                "reconstruction_lpips_before": before, "reconstruction_lpips_after": after,
                "reconstruction_frames": _edited_rows(store, align)["frame"][rows].tolist()}

    ref = make_stage(store, "pti", _pti_ingredients(align, pivots, config, profile, models_dir, device), produce)
    # Deleted once done.json is written, not before: a run stopped in between goes on from the checkpoint.
    if store.exists(f"{ref.key}/checkpoint.safetensors"):
        store.delete(f"{ref.key}/checkpoint.safetensors")
    return ref


PTI_RECONSTRUCTION_FRAMES = 16
"""The PTI stage measures its reconstruction LPIPS on at most this many frames, spread evenly over the clip
(``reconstruction_frames`` in its info: their indices in the video)."""


def _write_pti_checkpoint(store: ArtifactStore, key: str, checkpoint: PTICheckpoint) -> None:
    tensors = {f"synthesis.{k}": v for k, v in checkpoint.synthesis.items()}
    tensors.update({f"optimizer.{k}": v for k, v in checkpoint.optimizer.items()})
    tensors["losses"] = torch.tensor(checkpoint.losses, dtype=torch.float64)
    tensors["step"] = torch.tensor(checkpoint.step)
    store.put_tensors(key, tensors)  # one atomic write: a reader never sees half a checkpoint


def _read_pti_checkpoint(store: ArtifactStore, key: str) -> PTICheckpoint:
    tensors = store.get_tensors(key)
    part = lambda prefix: {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
    return PTICheckpoint(int(tensors["step"]), part("synthesis."), part("optimizer."), tensors["losses"].tolist())


def pti_generator(store: ArtifactStore, pti: StageRef, models: Models, device: str) -> Generator:
    """θ_p: the tuned generator, or the original one when PTI was skipped."""
    if pti.info.get("method") == "none":
        return models.generator
    G = build_generator(store.get_json(f"{pti.key}/generator.json"))
    G.load_state_dict(store.get_tensors(f"{pti.key}/generator.safetensors"))
    return G.to(device).eval().requires_grad_(False)


def _edit_ingredients(pivots: StageRef, config: EditingConfig, profile: str, models_dir: str | None, device: str,
                      **_: Any) -> Ingredients:
    # Direction files enter by their content, so an edited file gives a new key.
    files = [_file_hash(name) for name, _ in config.edits if os.path.isfile(name)]
    return [pivots.key, stage_models(profile, models_dir, device).identity, *files], config


@stage_task("edit", _edit_ingredients)
def edit_pivots(store_uri: str, pivots: StageRef, config: EditingConfig, profile: str, models_dir: str | None,
                device: str) -> StageRef:
    """Edited latents w_i + δw (paper section 3.3)."""
    store = open_store(store_uri)
    models = stage_models(profile, models_dir, device)

    def produce(key: str) -> dict[str, Any]:
        w = store.get_tensors(f"{pivots.key}/pivots.safetensors", device=device)["pivots"]
        try:
            directions = [(resolve_direction(name, G=models.generator, named=models.directions), strength)
                          for name, strength in config.edits]
        except ValueError as exc:
            raise StitchtimeError(str(exc)) from None
        store.put_tensors(f"{key}/latents.safetensors", {"latents": edit_latents(w, directions).cpu()})
        return {"edits": [list(e) for e in config.edits]}

    return make_stage(store, "edit", _edit_ingredients(pivots, config, profile, models_dir, device), produce)


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
    align: StageRef
    pti: StageRef
    edit: StageRef
    config: StitchingConfig
    profile: str
    models_dir: str | None

    @property
    def artifact(self) -> str:
        """The chunk's stored stitched crops, masks and numbers (stop is in the name: chunk sizes may change)."""
        return f"{self.key}/chunk-{self.start:06d}-{self.stop:06d}.safetensors"

    def to_parameters(self) -> dict[str, Any]:
        """The chunk as plain JSON values (stage references and the config as dicts; the store's absolute URI)."""
        return {"store": open_store(self.store_uri).uri, "key": self.key, "start": self.start, "stop": self.stop,
                "align": dataclasses.asdict(self.align), "pti": dataclasses.asdict(self.pti),
                "edit": dataclasses.asdict(self.edit), "stitching": to_dict(self.config), "profile": self.profile,
                "models_dir": self.models_dir}

    @classmethod
    def from_parameters(cls, store: str, key: str, start: int, stop: int, align: dict[str, Any],
                        pti: dict[str, Any], edit: dict[str, Any], stitching: dict[str, Any], profile: str,
                        models_dir: str | None) -> StitchChunk:
        """Rebuild a chunk from :meth:`to_parameters`."""
        return cls(store, key, int(start), int(stop), StageRef(**align), StageRef(**pti), StageRef(**edit),
                   StitchingConfig(**stitching), profile, models_dir)


ChunkRunner = Callable[[list[StitchChunk], Callable[[int], None]], dict[str, Any]]
"""Stitches chunks somewhere else (e.g. as flow runs of a deployment on GPU workers) and returns once
each is stored or has failed for good, calling its second argument with the number of chunks just
done as they finish; returns small facts for the stage's info."""


def default_device() -> str:
    """The device a stitch worker uses when told none: its first visible GPU, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _stitch_ingredients(align: StageRef, pti: StageRef, edit: StageRef, config: StitchingConfig, profile: str,
                        models_dir: str | None, device: str, **_: Any) -> Ingredients:
    return [align.key, pti.key, edit.key, stage_models(profile, models_dir, device).parser_identity], config


@stage_task("stitch", _stitch_ingredients)
def stitch_tune(store_uri: str, align: StageRef, pti: StageRef, edit: StageRef, config: StitchingConfig,
                profile: str, models_dir: str | None, device: str, chunk_size: int = 16,
                run_chunks: ChunkRunner | None = None) -> StageRef:
    """Masks and stitching tuning of every frame, chunk by chunk; finished chunks are kept if the run stops.

    Masks come from BiSeNet run on the edited images, as the reference code does, when the profile
    has face-parsing weights; from the landmarks otherwise (and for frames where parsing finds no face).

    Args:
        chunk_size: frames per chunk, the unit that is stored, skipped when already stored, and fanned out.
        run_chunks: None stitches the missing chunks here, one after another, with θ_p loaded once;
            otherwise it is handed the missing chunks (each as a :class:`StitchChunk`) to stitch elsewhere.

    Raises:
        StitchtimeError: ``run_chunks`` returned with chunks still missing.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    store = open_store(store_uri)
    models = stage_models(profile, models_dir, device)

    def produce(key: str) -> dict[str, Any]:
        frames = int(align.info["edited_frames"])
        chunks = [StitchChunk(store_uri, key, start, min(start + chunk_size, frames), align, pti, edit, config,
                              profile, models_dir) for start in range(0, frames, chunk_size)]
        missing = [chunk for chunk in chunks if not store.exists(chunk.artifact)]
        fan_out = None
        if missing and run_chunks is None:
            inputs = _StitchInputs(store, align, pti, edit, models, device)
            with stage_progress("stitch", total=sum(c.stop - c.start for c in missing), unit="frame",
                                label=_short_key(key)) as advance:
                for chunk in missing:
                    store.put_tensors(chunk.artifact, inputs.stitch(chunk.start, chunk.stop, config, progress=advance))
        elif missing:
            with stage_progress("stitch", total=len(missing), unit="chunk", label=_short_key(key)) as advance:
                fan_out = run_chunks(missing, advance)
            still = [f"{c.start}-{c.stop}" for c in missing if not store.exists(c.artifact)]
            if still:
                raise StitchtimeError(f"stitch chunks of rows {', '.join(still)} were not stored by their runs")
        numbers: dict[str, list[torch.Tensor]] = {name: [] for name in _CHUNK_NUMBERS}
        for chunk in chunks:  # keep only the per-frame numbers: the crops of a long clip do not fit in memory
            stored = store.get_tensors(chunk.artifact)
            for name in _CHUNK_NUMBERS:
                numbers[name].append(stored[name])
        cat = lambda name: torch.cat(numbers[name])  # noqa: E731
        return {"chunks": [chunk.artifact for chunk in chunks], "method": config.method,
                "masks": "landmarks" if models.parser is None else "bisenet",
                "landmark_mask_frames": int(cat("landmark_masks").sum()),
                "boundary_error_before": float(cat("boundary_error_before").mean()),
                "boundary_error_after": float(cat("boundary_error_after").mean()),
                "steps_per_frame": float(cat("steps").float().mean()),
                "fan_out": fan_out}

    return make_stage(store, "stitch", _stitch_ingredients(align, pti, edit, config, profile, models_dir, device),
                      produce)


_CHUNK_NUMBERS = ("landmark_masks", "steps", "boundary_error_before", "boundary_error_after")
"""The per-frame numbers of a stored chunk that the stage's info sums up."""

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
        models = stage_models(chunk.profile, chunk.models_dir, device)
        key = stage_key("stitch", _stitch_ingredients(chunk.align, chunk.pti, chunk.edit, chunk.config, chunk.profile,
                                                      chunk.models_dir, device))
        if key != chunk.key:
            raise StitchtimeError(f"stitch chunk {chunk.artifact}: this worker's models or stitchtime version give "
                                  f"the key {key}; it must run the same stitchtime and model files as the flow")
        inputs = _StitchInputs(store, chunk.align, chunk.pti, chunk.edit, models, device)
        with stage_progress("stitch", total=chunk.stop - chunk.start, unit="frame",
                            label=f"{_short_key(chunk.key)} rows {chunk.start}-{chunk.stop}") as advance:
            store.put_tensors(chunk.artifact, inputs.stitch(chunk.start, chunk.stop, chunk.config, progress=advance))
        result["computed"] = True
    return {**result, "seconds": time.perf_counter() - started}


class _StitchInputs:
    """What every chunk of one stitch stage reads: θ_p, the edited latents, the crops and their landmarks."""

    def __init__(self, store: ArtifactStore, align: StageRef, pti: StageRef, edit: StageRef, models: Models,
                 device: str):
        self.G, self.parser, self.device = pti_generator(store, pti, models, device), models.parser, device
        self.crop_points = _edited_rows(store, align)["crop_landmarks"]
        self.latents = store.get_tensors(f"{edit.key}/latents.safetensors", device=device)["latents"]
        self.crops = CropRows(store, align)

    def stitch(self, start: int, stop: int, config: StitchingConfig, *,
               progress: Callable[[int], None]) -> dict[str, torch.Tensor]:
        """Rows ``[start, stop)`` stitched, ready to store (see :func:`_stitch_chunk`)."""
        if not 0 <= start < stop <= len(self.latents):
            raise ValueError(f"rows {start}-{stop} are outside the {len(self.latents)} edited frames")
        return _stitch_chunk(self.G, self.parser, self.latents[start:stop], self.crops.rows(start, stop),
                             self.crop_points[start:stop], config=config, device=self.device, progress=progress)


def _stitch_chunk(G: Generator, parser: torch.nn.Module | None, latents: torch.Tensor, crops: np.ndarray,
                  crop_points: np.ndarray, *, config: StitchingConfig, device: str,
                  progress: Callable[[int], None]) -> dict[str, torch.Tensor]:
    """One chunk's stitched crops, masks m and paste masks m^d, and its numbers, ready to store;
    ``progress`` is called with the frames just stitched."""
    x = images_to_tensor(crops, device)
    edits = render_edits(G, latents, batch_size=config.batch_size)
    parsed = None if parser is None else face_mask_from_labels(parse_faces(parser, edits)).cpu().numpy()
    m, b, from_landmarks = masks.stitching_masks(crop_points, x.shape[-1], border_px_1024=config.border_px,
                                                 parsed=parsed)
    as_tensor = lambda a: torch.from_numpy(a).unsqueeze(1).to(device)  # noqa: E731
    result = stitch_frames(G, latents, x, as_tensor(m), as_tensor(b), config=config, edits=edits, progress=progress)
    return {"stitched": torch.from_numpy(tensor_to_images(result.stitched)),
            "masks": torch.from_numpy(m).to(torch.uint8),
            "paste_masks": torch.from_numpy(m + b).to(torch.uint8),
            "landmark_masks": torch.from_numpy(from_landmarks),
            "steps": result.steps.cpu(),
            "boundary_error_before": result.boundary_error_before.cpu(),
            "boundary_error_after": result.boundary_error_after.cpu()}


def _render_ingredients(probe: StageRef, align: StageRef, stitch: StageRef, blending: BlendingConfig,
                        output: OutputConfig, out: str, **_: Any) -> Ingredients:
    # Where the output goes is not part of the key; its container (the suffix) is.
    return [probe.key, align.key, stitch.key, _suffix(out)], {"blending": blending, "output": output}


def _suffix(out: str) -> str:
    return os.path.splitext(out)[1] or ".mp4"


@stage_task("render", _render_ingredients)
def render_output(store_uri: str, source: str, probe: StageRef, align: StageRef, stitch: StageRef,
                  blending: BlendingConfig, output: OutputConfig, out: str) -> StageRef:
    """Paste the stitched crops back, encode with the source's audio to ``out`` (atomically), and store a copy.

    When the stage is reused nothing is written to ``out``: :func:`deliver_output` copies the stored one.
    """
    store = open_store(store_uri)
    info = video.VideoInfo.from_dict(probe.info["video"])
    suffix = _suffix(out)

    def produce(key: str) -> dict[str, Any]:
        table = store.get_table(f"{align.key}/frames.parquet")
        edited = table["status"] != "passthrough"
        row = np.cumsum(edited) - 1  # frame index -> row among the edited frames
        chunks = StitchedChunks(store, stitch.info["chunks"])
        with stage_progress("render", total=info.frame_count, unit="frame", label=os.path.basename(source)) as advance:
            frames = render_video(source, out, info=info, quads=table["quad"],
                                  crops=lambda i: chunks.row(row[i]) if edited[i] else None,
                                  blending=blending, output=output, progress=advance)
        store.put_file(f"{key}/output{suffix}", out)
        return {"frames": frames, "output": f"{key}/output{suffix}"}

    return make_stage(store, "render", _render_ingredients(probe, align, stitch, blending, output, out), produce)


class StitchedChunks:
    """Stitched crops and masks by row, loading one stored chunk at a time (rows come in order)."""

    def __init__(self, store: ArtifactStore, keys: list[str]):
        self.store, self.keys = store, keys
        self.start, self.stop, self.chunk = 0, 0, None
        self.next_index = 0

    def row(self, index: int) -> CropPaste:
        while not self.start <= index < self.stop:
            if self.next_index >= len(self.keys):
                raise IndexError(f"row {index} is past the stitched chunks")
            data = self.store.get_tensors(self.keys[self.next_index])
            self.chunk = (data["stitched"].numpy(), data["masks"].numpy().astype(np.float32),
                          data["paste_masks"].numpy().astype(np.float32))
            self.start, self.stop = self.stop, self.stop + len(self.chunk[0])
            self.next_index += 1
        crop, mask, paste_mask = (part[index - self.start] for part in self.chunk)
        return CropPaste(crop, mask, paste_mask)


@_retrying(name="deliver", cache_policy=NO_CACHE, persist_result=False)
def deliver_output(store_uri: str, render: StageRef, out: str) -> None:
    """Copy a reused render stage's stored output to ``out`` through a temporary name, so ``out`` is never
    half-written.

    Raises:
        InputError: ``out`` cannot be written (a full disk, say): not retried, it would fail the same way.
    """
    folder, name = os.path.split(os.path.abspath(out))
    temp = os.path.join(folder, f".{name}.tmp-{os.getpid()}")
    try:
        open_store(store_uri).get_file(render.info["output"], temp)
        os.replace(temp, out)
    except OSError as exc:  # the store's own errors are StoreErrors: this one is about writing `out`
        raise InputError(out, f"cannot be written ({exc.strerror or exc})") from None
    finally:
        if os.path.exists(temp):
            os.remove(temp)


def model_resolution(profile: str, models_dir: str | None, device: str) -> int:
    """The crop size a profile's generator works at."""
    return stage_models(profile, models_dir, device).resolution


def check_edits(profile: str, models_dir: str | None, device: str, edits: tuple[tuple[str, float], ...]) -> None:
    """Resolve every edit's direction now, so a typo fails before hours of tuning, not after.

    Raises:
        ValueError: an unknown direction name or a bad ``sefa:K``.
        InputError: a direction file that is missing or unreadable.
    """
    models = stage_models(profile, models_dir, device)
    for name, _ in edits:
        resolve_direction(name, G=models.generator, named=models.directions)
