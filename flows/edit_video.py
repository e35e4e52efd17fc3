"""The ``edit_video`` flow: one video through every stage, then the summary beside the output.

A run writes one output per edit set: the stages up to PTI run once and are shared; the edit,
stitching and render stages run once per output.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from flows.stitch_chunk import FAN_OUT_ENV, deployment_runner
from stitchtime_core.config import EditingConfig, RunConfig, ablations_of, to_dict, with_overrides
from stitchtime_core.errors import InputError
from stitchtime_core.models.profiles import PROFILES, default_quality, profile_defaults
from stitchtime_core.video import same_file
from tasks import report, stages
from tasks.caching import save_stage_results
from tasks.store import default_store_uri, open_store

log = logging.getLogger("stitchtime")

EditSet = list[tuple[str, float]]
"""The (direction, strength) pairs applied together to make one output."""


def _direction_label(name: str) -> str:
    path = Path(name)
    if path.suffix in (".npy", ".pt") or "/" in name or os.sep in name:
        name = path.stem
    name = re.sub(r"\s+", "-", name.strip())
    return re.sub(r"[^A-Za-z0-9._-]+", "", name).strip(".") or "edit"


def _strength_label(strength: float) -> str:
    strength += 0.0  # -0.0 becomes 0.0
    short = f"{strength:+g}"
    return short if float(short) == strength else f"{strength:+}"


def output_label(edit_set: EditSet) -> str:
    """A short, filesystem-safe name of an edit set: ``age+2``, ``age-4``, ``age+2_smile+1``, ``sefa3+1.5``.

    A direction file is named by its file stem.
    """
    return "_".join(f"{_direction_label(name)}{_strength_label(strength)}" for name, strength in edit_set)


def _same_edit(edit_set: EditSet) -> frozenset[tuple[str, float]]:
    """Edits added together commute: ``age=2+smile=1`` and ``smile=1+age=2`` give the same output."""
    return frozenset((name, float(strength)) for name, strength in edit_set)


def output_paths(out: str | os.PathLike, edit_sets: list[EditSet]) -> list[tuple[str, Path]]:
    """(label, path) of each output: ``out`` itself for one edit set, else ``<stem>.<label><suffix>`` beside it.

    Labels are made unique with ``_v2``, ``_v3``… when two edit sets would get the same one.

    Raises:
        ValueError: no edit set, an empty one, or the same edit set twice.
    """
    if not edit_sets or not all(edit_sets):
        raise ValueError("give at least one edit (NAME=STRENGTH)")
    seen: set[frozenset[tuple[str, float]]] = set()
    for edit_set in edit_sets:
        if _same_edit(edit_set) in seen:
            raise ValueError(f"the edit {output_label(edit_set)} is asked for twice")
        seen.add(_same_edit(edit_set))
    labels: list[str] = []
    for edit_set in edit_sets:
        label = base = output_label(edit_set)
        for n in itertools.count(2):
            if label.lower() not in (taken.lower() for taken in labels):  # case-insensitive filesystems
                break
            label = f"{base}_v{n}"
        labels.append(label)
    out = Path(out)
    if len(edit_sets) == 1:
        return [(labels[0], out)]
    return [(label, out.with_name(f"{out.stem}.{label}{out.suffix}")) for label in labels]


def resolve_config(profile: str, quality: str = "paper",
                   overrides: dict[str, dict[str, Any]] | None = None) -> RunConfig:
    """The profile's defaults at a quality, then the user's overrides; the edits are set per output."""
    return with_overrides(profile_defaults(profile, quality), overrides or {})


def sidecar_paths(out: str | os.PathLike) -> tuple[Path, Path]:
    """Where a run writes its summary and its resolved config: beside ``--out``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.summary.json"), out.with_name(f"{out.stem}.config.json")


def write_json(path: Path, data: Any) -> None:
    """Write JSON through a temporary name, so a reader never sees half a file.

    Raises:
        InputError: ``path`` cannot be written (a full disk, say); no temporary file is left.
    """
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        temp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        os.replace(temp, path)
    except OSError as exc:
        raise InputError(path, f"cannot be written ({exc.strerror or exc})") from None
    finally:
        temp.unlink(missing_ok=True)


def check_paths(source: str, out: str | os.PathLike) -> None:
    """Fail before any work when the input is missing or the output cannot be written."""
    if not os.path.isfile(source):
        raise InputError(source, "no such file" if not os.path.exists(source) else "not a file")
    if not os.access(source, os.R_OK):
        raise InputError(source, "not readable")
    out_path = Path(out).resolve()
    if same_file(out, source):
        raise InputError(out, "output would overwrite its source")
    if not out_path.parent.is_dir():
        raise InputError(out_path.parent, "output folder does not exist")
    try:  # the real test: permissions, a read-only file system, ACLs (os.access misses some)
        tempfile.TemporaryFile(dir=out_path.parent).close()
    except OSError as exc:
        raise InputError(out_path.parent, f"output folder is not writable ({exc.strerror})") from None
    if not out_path.suffix:
        raise InputError(out, "output needs a file extension (e.g. .mp4)")


def check_outputs(source: str, out: str | os.PathLike, edit_sets: list[EditSet]) -> list[tuple[str, Path]]:
    """:func:`check_paths` for every output the edit sets make, before any work; returns :func:`output_paths`.

    With several outputs ``--out`` itself is not written (only its summary), so it may name the source.
    The summary, config and reports written beside the outputs may not name it either.
    """
    if not Path(out).suffix:
        raise InputError(out, "output needs a file extension (e.g. .mp4)")
    outputs = output_paths(out, edit_sets)
    for _, path in outputs:
        check_paths(source, path)
    for path in [*sidecar_paths(out), *(report.report_path(path) for _, path in outputs)]:
        if same_file(path, source):
            raise InputError(path, "the run's summary, config or report would overwrite its source")
    return outputs


@flow(name="edit_video")
def edit_video(source: str, out: str, edits: list[list[tuple[str, float]]], profile: str = "tiny",
               store: str | None = None, device: str = "cpu", models_dir: str | None = None,
               overrides: dict[str, dict[str, Any]] | None = None, chunk_size: int = 16,
               fan_out: str | None = None, quality: str | None = None) -> dict[str, Any]:
    """Edit the face in ``source`` once per edit set, each output with the source's frames, rate and audio.

    Args:
        source: the input video file.
        out: the output video file for one edit set; for several, each output is
            ``<out stem>.<label><suffix>`` beside it (see :func:`output_paths`). Written atomically;
            never the source.
        edits: edit sets, one per output, each a list of (direction, strength) pairs applied together:
            a profile direction name, ``sefa:K`` or a direction file.
        profile: "tiny" (built-in, random weights, for tests), "mobile" (real networks from the package
            index, in ``models_dir``) or "ffhq" (official model files from ``models_dir``).
        store: artifact store URI (``file://…`` or ``s3://bucket/prefix``); default ./stitchtime-data.
        device: "cpu" or "cuda".
        models_dir: folder of model files for the mobile and ffhq profiles.
        overrides: ``{stage: {setting: value}}`` on top of the profile's defaults at ``quality``.
        chunk_size: frames per stitch-tuning chunk.
        fan_out: the stitch-chunk deployment (``stitch-chunk/gpu``) that runs each chunk as a flow run on
            GPU workers; default ``$STITCHTIME_STITCH_DEPLOYMENT``; unset or empty stitches in this process.
        quality: "paper" (section 3.5's settings) or "preview" (fewer steps, for CPUs); default
            "paper" on CUDA, "preview" on a CPU.

    Returns:
        the run summary (also written to ``<out stem>.summary.json``).
    """
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    edit_sets = [[(str(name), float(strength)) for name, strength in edit_set] for edit_set in edits]
    outputs = check_outputs(source, out, edit_sets)
    started = time.perf_counter()
    quality = quality or default_quality(device)
    config = resolve_config(profile, quality, overrides)
    store = store or default_store_uri()
    resolution = stages.model_resolution(profile, models_dir, device)
    stages.check_edits(profile, models_dir, device, tuple(edit for edit_set in edit_sets for edit in edit_set))
    report.identity_network(profile, models_dir, device)  # a broken ArcFace file fails now, not after the edit
    fan_out = fan_out or os.environ.get(FAN_OUT_ENV) or None
    run_chunks = deployment_runner(fan_out) if fan_out else None  # a wrong name fails now, not after PTI

    def record(refs: list[stages.StageRef], ref: stages.StageRef, label: str | None = None) -> stages.StageRef:
        refs.append(ref)
        name = ref.stage if label is None else f"{ref.stage}[{label}]"
        # The source's name tells apart the lines of videos that a batch runs at the same time.
        log.info("%-9s %s in %.1f s  (%s)", name, "reused" if ref.reused else "done", ref.seconds,
                 os.path.basename(source))
        return ref

    shared: list[stages.StageRef] = []
    save_stage_results()  # where Prefect keeps the stage tasks' records: in the store, beside the artifacts
    run = stages.run
    probe = record(shared, run(stages.probe_video, store, source))
    landmarks = record(shared, run(stages.detect_landmarks, store, source, probe, config.alignment))
    align = record(shared, run(stages.align_faces, store, source, probe, landmarks, config.alignment, resolution))
    pivots = record(shared, run(stages.encode_pivots, store, align, config.encoding, profile, models_dir, device))
    pti = record(shared, run(stages.tune_pti, store, align, pivots, config.pti, profile, models_dir, device))

    results, editing = [], []
    for edit_set, (label, path) in zip(edit_sets, outputs):
        settings = dataclasses.replace(config, editing=EditingConfig(edits=tuple(edit_set)))
        refs: list[stages.StageRef] = []
        edit = record(refs, run(stages.edit_pivots, store, pivots, settings.editing, profile, models_dir, device),
                      label)
        stitch = record(refs, run(stages.stitch_tune, store, align, pti, edit, settings.stitching, profile, models_dir,
                                  device, chunk_size, run_chunks), label)
        render = record(refs, run(stages.render_output, store, source, probe, align, stitch, settings.blending,
                                  settings.output, str(path)), label)
        if render.reused:
            stages.deliver_output(store, render, str(path))
        measured = record(refs, run(report.measure, store, source, str(path), align, render, profile, models_dir,
                                    device), label)
        editing.append(to_dict(settings.editing))
        results.append({
            "edits": [{"direction": name, "strength": strength} for name, strength in edit_set],
            "label": label,
            "output": str(path.resolve()),
            "seconds": {ref.stage: round(ref.seconds, 3) for ref in refs},
            "reused_stages": [ref.stage for ref in refs if ref.reused],
            "artifacts": {ref.stage: ref.key for ref in refs},
            "made_seconds": round(sum(ref.made_seconds for ref in shared + refs), 3),
            "stitching": {k: v for k, v in stitch.info.items() if k != "chunks"},
            "identity": measured.info,
            "report": str(report.report_path(path).resolve()),
        })

    summary_path, config_path = sidecar_paths(out)
    # Every stage's settings; "editing" holds one entry per output, in the order of the summary's outputs.
    write_json(config_path, {"profile": profile, "quality": quality, **to_dict(config), "editing": editing})
    video = probe.info["video"]
    summary = {
        "input": os.path.abspath(source),
        "flow_run_id": str(flow_run.id) if flow_run.id else None,
        "config": str(config_path.resolve()),
        "profile": profile,
        "quality": quality,
        "device": device,
        "store": open_store(store).uri,  # absolute: `stitchtime report` may run from another folder
        "ablations": ablations_of(config),
        "methods": {"encoding": config.encoding.method, "pti": config.pti.method,
                    "stitching": config.stitching.method, "blending": config.blending.method},
        "frames": video["frame_count"],
        "fps": video["fps"],
        "size": [video["width"], video["height"]],
        "has_audio": video["has_audio"],
        "variable_frame_rate": video["variable_frame_rate"],
        "rotation": video["rotation"],
        "edited_frames": align.info["edited_frames"],
        "interpolated_frames": align.info["interpolated"],
        "passed_through_frames": align.info["passed_through"],
        "seconds": {ref.stage: round(ref.seconds, 3) for ref in shared},
        "total_seconds": round(time.perf_counter() - started, 3),
        "reused_stages": [ref.stage for ref in shared if ref.reused]
                         + [f"{stage}[{result['label']}]" for result in results for stage in result["reused_stages"]],
        "artifacts": {ref.stage: ref.key for ref in shared},
        "pti": pti.info,
        "outputs": results,
    }
    if len(results) == 1:  # the common case reads as before
        for name in ("output", "stitching", "identity", "report"):
            summary[name] = results[0][name]
    write_json(summary_path, summary)
    for index in range(len(results)):
        report.write_report(str(summary_path), index, models_dir=models_dir)
    return summary
