"""The ``edit_video`` flow: one video through every stage, then the summary beside the output."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from prefect import flow

from stitchtime_core.config import EditingConfig, RunConfig, to_dict, with_overrides
from stitchtime_core.errors import InputError
from stitchtime_core.models.profiles import PROFILES, profile_defaults
from tasks import stages
from tasks.store import default_store_uri

log = logging.getLogger("stitchtime")


def resolve_config(profile: str, edits: list[tuple[str, float]],
                   overrides: dict[str, dict[str, Any]] | None = None) -> RunConfig:
    """The profile's defaults, the user's overrides, and the edits."""
    config = with_overrides(profile_defaults(profile), overrides or {})
    edits = tuple((str(name), float(strength)) for name, strength in edits)
    return dataclasses.replace(config, editing=EditingConfig(edits=edits))


def sidecar_paths(out: str | os.PathLike) -> tuple[Path, Path]:
    """Where a run writes its summary and its resolved config: beside the output."""
    out = Path(out)
    return out.with_name(f"{out.stem}.summary.json"), out.with_name(f"{out.stem}.config.json")


def _write_json(path: Path, data: Any) -> None:
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(temp, path)


def check_paths(source: str, out: str) -> None:
    """Fail before any work when the input is missing or the output cannot be written."""
    if not os.path.isfile(source):
        raise InputError(source, "no such file" if not os.path.exists(source) else "not a file")
    if not os.access(source, os.R_OK):
        raise InputError(source, "not readable")
    out_path, src_path = Path(out).resolve(), Path(source).resolve()
    if out_path == src_path or (out_path.exists() and os.path.samefile(out_path, src_path)):
        raise InputError(out, "output would overwrite its source")
    if not out_path.parent.is_dir():
        raise InputError(out_path.parent, "output folder does not exist")
    if not out_path.suffix:
        raise InputError(out, "output needs a file extension (e.g. .mp4)")


@flow(name="edit_video")
def edit_video(source: str, out: str, edits: list[tuple[str, float]], profile: str = "tiny",
               store: str | None = None, device: str = "cpu", models_dir: str | None = None,
               overrides: dict[str, dict[str, Any]] | None = None, chunk_size: int = 16) -> dict[str, Any]:
    """Edit the face in ``source`` and write ``out`` with the source's frames, rate and audio.

    Args:
        source: the input video file.
        out: the output video file (written atomically; never the source).
        edits: (direction, strength) pairs: a profile direction name, ``sefa:K`` or a direction file.
        profile: "tiny" (built-in, CPU) or "ffhq" (official model files from ``models_dir``).
        store: artifact store URI (``file://…`` or ``s3://bucket/prefix``); default ./stitchtime-data.
        device: "cpu" or "cuda".
        models_dir: folder of model files for the ffhq profile.
        overrides: ``{stage: {setting: value}}`` on top of the profile's defaults.
        chunk_size: frames per stitch-tuning chunk.

    Returns:
        the run summary (also written to ``<out stem>.summary.json``).
    """
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    if not edits:
        raise ValueError("give at least one edit (NAME=STRENGTH)")
    check_paths(source, out)
    started = time.perf_counter()
    config = resolve_config(profile, edits, overrides)
    store = store or default_store_uri()
    resolution = stages.model_resolution(profile, models_dir, device)
    stages.check_edits(profile, models_dir, device, config.editing.edits)

    refs: list[stages.StageRef] = []

    def record(ref: stages.StageRef) -> stages.StageRef:
        refs.append(ref)
        log.info("%-9s %s in %.1f s", ref.stage, "reused" if ref.reused else "done", ref.seconds)
        return ref

    probe = record(stages.probe_video(store, source))
    landmarks = record(stages.detect_landmarks(store, source, probe, config.alignment))
    align = record(stages.align_faces(store, source, probe, landmarks, config.alignment, resolution))
    pivots = record(stages.encode_pivots(store, align, config.encoding, profile, models_dir, device))
    pti = record(stages.tune_pti(store, align, pivots, config.pti, profile, models_dir, device))
    edit = record(stages.edit_pivots(store, pivots, config.editing, profile, models_dir, device))
    stitch = record(stages.stitch_tune(store, align, pti, edit, config.stitching, profile, models_dir, device, chunk_size))
    render = record(stages.render_output(store, source, probe, align, stitch, config.blending, config.output, out))

    summary_path, config_path = sidecar_paths(out)
    _write_json(config_path, {"profile": profile, **to_dict(config)})
    video = probe.info["video"]
    summary = {
        "input": os.path.abspath(source),
        "output": os.path.abspath(out),
        "config": str(config_path.resolve()),
        "edits": [{"direction": name, "strength": strength} for name, strength in config.editing.edits],
        "profile": profile,
        "device": device,
        "store": store,
        "frames": video["frame_count"],
        "fps": video["fps"],
        "size": [video["width"], video["height"]],
        "has_audio": video["has_audio"],
        "variable_frame_rate": video["variable_frame_rate"],
        "rotation": video["rotation"],
        "edited_frames": align.info["edited_frames"],
        "interpolated_frames": align.info["interpolated"],
        "passed_through_frames": align.info["passed_through"],
        "seconds": {ref.stage: round(ref.seconds, 3) for ref in refs},
        "total_seconds": round(time.perf_counter() - started, 3),
        "reused_stages": [ref.stage for ref in refs if ref.reused],
        "artifacts": {ref.stage: ref.key for ref in refs},
        "pti": pti.info,
        "stitching": {k: v for k, v in stitch.info.items() if k != "chunks"},
    }
    _write_json(summary_path, summary)
    return summary
