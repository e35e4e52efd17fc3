"""What a run tells its user about each output: the HTML report.

``write_report`` builds the report of one output of a run from the run's summary and the stored
artifacts, and writes it beside the output; it runs every time (the report shows this run's seconds),
and ``stitchtime report`` calls it again for an earlier run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext, TaskRunContext

from stitchtime_core.files import write_output
from stitchtime_core.report import Keyframe, ReportData, render_report
from tasks import stages
from tasks.progress import artifact_key
from tasks.stages import MARKER, StageRef
from tasks.outputs import Edit, OutputSummary, RunSummary, report_path
from tasks.stages.formats import CropRows, StitchedChunks, read_keyframe_inversions
from tasks.store import open_store

def identity_section(store_uri: str, measure_ref: StageRef) -> dict[str, Any]:
    """The report's identity section: the scores and the per-frame similarities (None where not measured)."""
    table = open_store(store_uri).get_table(f"{measure_ref.key}/metrics.parquet")
    series = lambda values: [None if not np.isfinite(v) else float(v) for v in values]  # noqa: E731
    return {**measure_ref.info, "to_source": series(table["to_source"]), "adjacent": series(table["adjacent"][:-1])}


@task(name="report", cache_policy=NO_CACHE, persist_result=False)
def write_report(summary_path: str, index: int, *, ablations: list[dict[str, Any]] | None = None,
                 pending: dict[str, str] | None = None) -> str:
    """Write the HTML report of output ``index`` of a run beside it, and a Prefect markdown artifact.

    Args:
        summary_path: the run's summary (``<out stem>.summary.json``); it names the run's config file.
        index: which of the summary's ``outputs``.
        ablations: rows of the ablation table (variant, tl_id, tg_id, boundary_error, seconds), if any.
        pending: final path -> where that file is until the run's outputs are renamed together
            (:attr:`tasks.outputs.PendingOutputs.temps`): the summary and config are read there, the report
            written there.

    Returns:
        the report's path.

    Raises:
        OSError: the summary or config cannot be read; ValueError: they are not a run's.
        InputError: the report cannot be written (a full disk, say); no temporary file is left.
    """
    where = lambda path: Path((pending or {}).get(os.path.realpath(path), path))  # noqa: E731
    summary = RunSummary.read(where(summary_path))
    config = json.loads(where(summary.config).read_text())
    output = summary.outputs[index]
    path = report_path(output.output)
    html = render_report(report_data(summary, index, config, ablations=ablations))
    write_output(where(path), html)
    if TaskRunContext.get() or FlowRunContext.get():  # outside a run (stitchtime report) there is none to make
        create_markdown_artifact(markdown=_markdown(summary, output, path),
                                 key=artifact_key(f"report {output.label}"),
                                 description=f"stitchtime report of {os.path.basename(summary.input)}")
    return str(path)


def report_data(summary: RunSummary, index: int, config: dict[str, Any], *,
                ablations: list[dict[str, Any]] | None = None) -> ReportData:
    """Everything the report of output ``index`` shows, read from the summary and the store's artifacts
    (the keyframes' inversions are the PTI stage's, their raw edits the stitch stage's: no network runs)."""
    output = summary.outputs[index]
    store_uri, device = summary.store, summary.device
    store = open_store(store_uri)
    artifacts = {**summary.artifacts, **output.artifacts}
    ref = lambda stage, info=None: StageRef(stage, artifacts[stage], True, 0.0, info or {})  # noqa: E731
    align = ref("align", _stored_info(store, artifacts["align"]))
    rows = np.flatnonzero(np.asarray(store.get_table(f"{artifacts['align']}/frames.parquet")["status"])
                          != "passthrough")
    chosen, inversions = read_keyframe_inversions(store, artifacts["pti"])
    crops = CropRows(store, align)
    stitched = StitchedChunks(store, _stored_info(store, artifacts["stitch"])["chunks"])
    frames = []
    for n, row in enumerate(chosen):
        paste = stitched.row(row)
        frames.append(Keyframe(frame=int(rows[row]), source=crops.rows(row, row + 1)[0], inversion=inversions[n],
                               raw_edit=stitched.raw_edit(row), stitched=paste.crop, mask=paste.mask,
                               boundary=np.clip(paste.paste_mask - paste.mask, 0, 1)))
    identity = identity_section(store_uri, ref("measure", output.identity)) if "measure" in artifacts else None
    name = os.path.basename(summary.input)
    return ReportData(
        title=f"{name}: {output.label}",
        inputs={"source": summary.input, "output": output.output, "edits": _edits(output.edits),
                "profile": summary.profile, "device": device, "store": store_uri,
                "ablations": ", ".join(summary.ablations) or "none", "frames": str(summary.frames),
                "edited frames": str(summary.edited_frames)},
        settings={stage: values for stage, values in config.items() if isinstance(values, dict)},
        seconds=_in_pipeline_order({**summary.seconds, **output.seconds}),
        keyframes=frames, identity=identity,
        stitching={name: output.stitching[name] for name in ("boundary_error_before", "boundary_error_after")},
        pti=summary.pti, ablations=ablations, fps=_fps(summary.fps))


def _in_pipeline_order(seconds: dict[str, float]) -> dict[str, float]:
    """Stages as the pipeline runs them (a summary read back from JSON has its keys sorted)."""
    return {stage: seconds[stage] for stage in stages.ORDER if stage in seconds}


def _stored_info(store: Any, key: str) -> dict[str, Any]:
    """A finished stage's info as its ``done.json`` keeps it (the summary leaves out its lists of chunks)."""
    return store.get_json(f"{key}/{MARKER}")["info"]


def _fps(value: Any) -> float:
    if isinstance(value, str) and "/" in value:
        numerator, denominator = value.split("/")
        return float(numerator) / float(denominator)
    return float(value)


def _edits(edits: list[Edit]) -> str:
    return " + ".join(f"{edit.direction} {edit.strength:+g}" for edit in edits)


def _markdown(summary: RunSummary, output: OutputSummary, path: Path) -> str:
    identity, pti = output.identity, summary.pti
    score = lambda value: "n/a" if value is None else f"{value:.4f}"  # noqa: E731
    lines = [f"# {os.path.basename(summary.input)}: {output.label}", "",
             f"Output: `{output.output}`  ", f"Report: `{path}`", "",
             "| measure | value |", "| --- | --- |",
             f"| TL-ID | {score(identity.get('tl_id'))} |", f"| TG-ID | {score(identity.get('tg_id'))} |",
             f"| identity similarity to the source | {score(identity.get('source_similarity'))} |",
             f"| boundary error before stitching | {output.stitching['boundary_error_before']:.4f} |",
             f"| boundary error after stitching | {output.stitching['boundary_error_after']:.4f} |",
             f"| PTI reconstruction LPIPS before (pivots) | {score(pti.get('reconstruction_lpips_before'))} |",
             f"| PTI reconstruction LPIPS after | {score(pti.get('reconstruction_lpips_after'))} |",
             "", "| stage | seconds |", "| --- | --- |"]
    lines += [f"| {stage} | {seconds:.1f} |"
              for stage, seconds in _in_pipeline_order({**summary.seconds, **output.seconds}).items()]
    return "\n".join(lines) + "\n"

