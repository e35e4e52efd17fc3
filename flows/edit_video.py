"""The ``edit_video`` flow: one video through every stage, then the summary beside the output.

A run writes one output per edit set: the stages up to PTI run once and are shared; the edit,
stitching and render stages run once per output.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from flows.edit_spec import parse_placement
from flows.run_stage import PLACEMENT_ENV, check_placement, place, placed_ref
from flows.stitch_chunk import FAN_OUT_ENV, deployment_runner
from stitchtime_core.config import PROFILES, StitchingConfig, default_quality, run_config
from tasks import outputs, report, stages
from tasks.store import default_store_uri

log = logging.getLogger("stitchtime")


@flow(name="edit_video")
def edit_video(source: str, out: str, edits: list[list[tuple[str, float]]], profile: str = "tiny",
               store: str | None = None, device: str = "cpu", models_dir: str | None = None,
               overrides: dict[str, dict[str, Any]] | None = None, chunk_size: int = 16,
               fan_out: str | None = None, quality: str | None = None,
               placement: dict[str, str] | None = None, preset: str = "paper") -> dict[str, Any]:
    """Edit the face in ``source`` once per edit set, each output with the source's frames, rate and audio.

    Args:
        source: the input video file.
        out: the output video file for one edit set; for several, each output is
            ``<out stem>.<label><suffix>`` beside it (see :func:`tasks.outputs.output_paths`). Written atomically;
            never the source.
        edits: edit sets, one per output, each a list of (direction, strength) pairs applied together:
            a profile direction name, ``sefa:K`` or a direction file.
        profile: "tiny" (built-in, random weights, for tests), "mobile" (real networks from the package
            index, in ``models_dir``) or "ffhq" (official model files from ``models_dir``).
        store: artifact store URI (``file://…`` or ``s3://bucket/prefix``); default ./stitchtime-data.
        device: "cpu" or "cuda".
        models_dir: folder of model files for the mobile and ffhq profiles.
        overrides: ``{stage: {setting: value}}`` on top of the preset and the profile's defaults at ``quality``.
        chunk_size: frames per stitch-tuning chunk.
        fan_out: the stitch-chunk deployment (``stitch-chunk/gpu``) that runs each chunk as a flow run on
            GPU workers; default ``$STITCHTIME_STITCH_DEPLOYMENT``; unset or empty stitches in this process.
        quality: "paper" (section 3.5's settings) or "preview" (fewer steps, for CPUs); default
            "paper" on CUDA, "preview" on a CPU.
        placement: stages to run elsewhere, whole, as flow runs of a ``run-stage`` deployment on another
            work pool: ``{"encode": "run-stage/gpu", "pti": "run-stage/gpu"}``; default
            ``$STITCHTIME_PLACEMENT`` (``encode=run-stage/gpu,pti=run-stage/gpu``); unset or empty runs
            them here (see :mod:`flows.run_stage`).
        preset: whose behaviour the run follows: "paper" or "stit-code" (the reference code's); see
            ``stitchtime_core.config.PRESETS``.

    Returns:
        the run summary (also written to ``<out stem>.summary.json``).
    """
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    edit_sets = [[(str(name), float(strength)) for name, strength in edit_set] for edit_set in edits]
    paths = outputs.check_outputs(source, out, edit_sets)
    started = time.perf_counter()
    quality = quality or default_quality(device)
    fan_out = fan_out or os.environ.get(FAN_OUT_ENV) or None
    # Chunks fanned out are stitched on the workers' GPUs: the defaults of this run's device are theirs only
    # where the flow stitches itself.
    config = run_config(profile, quality, overrides, preset=preset, device=None if fan_out else device)
    # Whether ffmpeg can write the output is asked now, not after an hour of PTI.
    outputs.check_encoding(out, config.output, source)
    store = store or default_store_uri()
    run_chunks = deployment_runner(fan_out) if fan_out else None  # a wrong name fails now, not after PTI
    if placement is None:
        try:
            placement = parse_placement(os.environ.get(PLACEMENT_ENV))
        except ValueError as exc:
            raise ValueError(f"${PLACEMENT_ENV}: {exc}") from None
    check_placement(placement)
    # A missing or broken model file fails now, before any stage: the networks this process will run load here.
    runtime = stages.Runtime(profile, models_dir, device)
    resolution = runtime.networks.resolution
    if config.encoding.method == "e4e" and "encode" not in placement:
        runtime.networks.encoder  # noqa: B018
    stages.resolve_edits(runtime, tuple(edit for edit_set in edit_sets for edit in edit_set))
    runtime.identity_network  # noqa: B018

    def record(refs: list[stages.StageRef], ref: stages.StageRef, label: str | None = None) -> stages.StageRef:
        refs.append(ref)
        name = ref.stage if label is None else f"{ref.stage}[{label}]"
        # The source's name tells apart the lines of videos that a batch runs at the same time.
        log.info("%-9s %s in %.1f s  (%s)", name, "reused" if ref.reused else "done", ref.seconds,
                 os.path.basename(source))
        return ref

    summary_path, config_path = outputs.sidecar_paths(out)
    finals = [*(path for _, path in paths), *(outputs.report_path(path) for _, path in paths), config_path,
              summary_path]
    # Every output is written under a temporary name and renamed when all are complete: a failure leaves none.
    with outputs.PendingOutputs(finals) as pending:
        shared: list[stages.StageRef] = []
        run = stages.run
        probe = record(shared, run(stages.probe_video, store, source))
        landmarks = record(shared, run(stages.detect_landmarks, store, source, probe, config.alignment))
        align = record(shared, run(stages.align_faces, store, source, probe, landmarks, config.alignment,
                                   resolution))
        pivots = record(shared, _placed(placement, "encode", store_uri=store, align=align,
                                        config=config.encoding, runtime=runtime))
        pti = record(shared, _placed(placement, "pti", store_uri=store, align=align, pivots=pivots,
                                     config=config.pti, runtime=runtime))

        results, editing = [], []
        for edit_set, (label, path) in zip(edit_sets, paths):
            settings = dataclasses.replace(config,
                                           editing=dataclasses.replace(config.editing, edits=tuple(edit_set)))
            refs: list[stages.StageRef] = []
            edit = record(refs, run(stages.edit_pivots, store, pivots, settings.editing, runtime), label)
            stitch = record(refs, _stitch(store, align, pti, edit, settings.stitching, runtime, chunk_size,
                                          run_chunks), label)
            written = str(pending.path(path))
            render = record(refs, run(stages.render_output, store, source, probe, align, stitch,
                                      settings.blending, settings.output, written,
                                      sampler=settings.alignment.sampler), label)
            if render.reused:
                stages.deliver_output(store, render, written)
            record(refs, run(stages.measure_output, store, source, written, align, render, runtime), label)
            editing.append(settings.editing)
            results.append(outputs.output_summary(edit_set, label, path, shared, refs))

        outputs.write_config(pending.path(config_path), profile, quality, preset, config, editing)
        summary = outputs.run_summary(source, config_path, profile=profile, quality=quality, preset=preset,
                                      device=device, store=store,
                                      config=config, shared=shared, results=results,
                                      total_seconds=time.perf_counter() - started,
                                      flow_run_id=str(flow_run.id) if flow_run.id else None)
        outputs.write_json(pending.path(summary_path), summary.as_json())
        for index in range(len(results)):
            report.write_report(str(summary_path), index, pending=pending.temps)
        pending.commit()
    return summary.as_json()


def _stitch(store: str, align: stages.StageRef, pti: stages.StageRef, edit: stages.StageRef,
            config: StitchingConfig, runtime: stages.Runtime, chunk_size: int,
            run_chunks: stages.ChunkRunner | None) -> stages.StageRef:
    """The stitch stage: its plan, the missing chunks stitched here or fanned out to ``run_chunks``, the record."""
    planned = stages.run(stages.plan_stitch, store, align, pti, edit, config, runtime, chunk_size)
    if isinstance(planned, stages.StageRef):
        return planned
    fanned = None
    if planned.missing and run_chunks is None:
        stages.stitch_chunks(list(planned.missing), runtime.device)
    elif planned.missing:
        fanned = stages.fan_out(planned, run_chunks)
    return stages.run(stages.gather_stitch, store, planned, fanned)


def _placed(placement: dict[str, str], stage: str, **arguments: Any) -> stages.StageRef:
    """A placeable stage: here, or, when ``placement`` names a deployment for it and it is not stored yet,
    as a flow run there (then found here by its key)."""
    task = stages.PLACEABLE[stage].TASK
    deployment = placement.get(stage)
    if deployment is None or stages.stored(stage, **arguments) is not None:
        return stages.run(task, **arguments)
    placed = place(deployment, stage, arguments)
    return placed_ref(stages.run(task, **arguments), placed)
