"""What a run tells its user about each output: identity metrics (a cached stage) and the HTML report.

``measure`` computes TL-ID and TG-ID of an output against its source (paper section 4.2) and its
identity similarity to the source frame by frame, both videos cropped with the align stage's quads.
``write_report`` builds the report of one output of a run from the run's summary and the stored
artifacts, and writes it beside the output; it runs every time (the report shows this run's seconds),
and ``stitchtime report`` calls it again for an earlier run.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext, TaskRunContext

from stitchtime_core.errors import InputError
from stitchtime_core.identity import IdentityNet, load_arcface_identity, load_dlib_identity
from stitchtime_core.models.registry import default_models_dir
from stitchtime_core.report import Keyframe, ReportData, choose_keyframes, render_report
from stitchtime_core.tensors import tensor_to_images
from tasks import stages
from tasks.caching import MARKER, StageRef
from tasks.metrics import measure_videos
from tasks.progress import artifact_key
from tasks.stages import Ingredients, open_store, stage_task

ARCFACE_FILE = "model_ir_se50.pth"
"""With the ffhq profile, identity is measured with ArcFace when this file is in the models folder."""


@functools.lru_cache(maxsize=2)
def identity_network(profile: str, models_dir: str | None, device: str) -> IdentityNet:
    """ArcFace IR-SE50 when the ffhq profile's models folder holds :data:`ARCFACE_FILE`; dlib's ResNet otherwise."""
    arcface = Path(models_dir or default_models_dir(), ARCFACE_FILE)
    if profile == "ffhq" and arcface.is_file():
        return load_arcface_identity(arcface, device=device)
    return load_dlib_identity()


def _measure_ingredients(align: StageRef, render: StageRef, profile: str, models_dir: str | None, device: str,
                         **_: Any) -> Ingredients:
    return [align.key, render.key, identity_network(profile, models_dir, device).name], None


@stage_task("measure", _measure_ingredients)
def measure(store_uri: str, source: str, out: str, align: StageRef, render: StageRef, profile: str,
            models_dir: str | None, device: str) -> StageRef:
    """TL-ID, TG-ID and the mean identity similarity to the source of the output ``out`` (the render stage's
    video) against ``source``.

    Stores the per-frame similarities as ``metrics.parquet``; the stage's info holds the scores
    (``tl_id``, ``tg_id``, ``source_similarity``, the identity network and the counts).
    """
    store = open_store(store_uri)

    def produce(key: str) -> dict[str, Any]:
        quads = store.get_table(f"{align.key}/frames.parquet")["quad"]  # NaN where frames pass through
        result = measure_videos(out, source, quads=np.stack(quads), identity=identity_network(profile, models_dir,
                                                                                             device))
        store.put_table(f"{key}/metrics.parquet", {"frame": np.arange(result.frames), "to_source": result.to_source,
                                                   "adjacent": np.append(result.adjacent, np.nan)})
        return {name: value for name, value in result.to_dict().items() if name not in ("adjacent", "to_source")}

    return stages.make_stage(store, "measure", _measure_ingredients(align, render, profile, models_dir, device),
                             produce)


def identity_section(store_uri: str, measure_ref: StageRef) -> dict[str, Any]:
    """The report's identity section: the scores and the per-frame similarities (None where not measured)."""
    table = open_store(store_uri).get_table(f"{measure_ref.key}/metrics.parquet")
    series = lambda values: [None if not np.isfinite(v) else float(v) for v in values]  # noqa: E731
    return {**measure_ref.info, "to_source": series(table["to_source"]), "adjacent": series(table["adjacent"][:-1])}


def report_path(out: str | os.PathLike) -> Path:
    """Where the report of the output ``out`` goes: ``<out stem>.report.html`` beside it."""
    out = Path(out)
    return out.with_name(f"{out.stem}.report.html")


@task(name="report", cache_policy=NO_CACHE, persist_result=False)
def write_report(summary_path: str, index: int, *, models_dir: str | None = None,
                 ablations: list[dict[str, Any]] | None = None, keyframes: int = 4) -> str:
    """Write the HTML report of output ``index`` of a run beside it, and a Prefect markdown artifact.

    Args:
        summary_path: the run's summary (``<out stem>.summary.json``); it names the run's config file.
        index: which of the summary's ``outputs``.
        models_dir: the ffhq profile's models folder, as the run's.
        ablations: rows of the ablation table (variant, tl_id, tg_id, boundary_error, seconds), if any.
        keyframes: how many frames to show side by side.

    Returns:
        the report's path.

    Raises:
        OSError: the summary or config cannot be read; json.JSONDecodeError, KeyError: they are not a run's.
        InputError: the report cannot be written (a full disk, say); no temporary file is left.
    """
    summary = json.loads(Path(summary_path).read_text())
    config = json.loads(Path(summary["config"]).read_text())
    output = summary["outputs"][index]
    path = report_path(output["output"])
    html = render_report(report_data(summary, index, config, models_dir=models_dir, ablations=ablations,
                                     keyframes=keyframes))
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        temp.write_text(html)
        os.replace(temp, path)
    except OSError as exc:
        raise InputError(path, f"cannot be written ({exc.strerror or exc})") from None
    finally:
        temp.unlink(missing_ok=True)
    if TaskRunContext.get() or FlowRunContext.get():  # outside a run (stitchtime report) there is none to make
        create_markdown_artifact(markdown=_markdown(summary, output, path),
                                 key=artifact_key(f"report {output['label']}"),
                                 description=f"stitchtime report of {os.path.basename(summary['input'])}")
    return str(path)


def report_data(summary: dict[str, Any], index: int, config: dict[str, Any], *, models_dir: str | None = None,
                ablations: list[dict[str, Any]] | None = None, keyframes: int = 4) -> ReportData:
    """Everything the report of output ``index`` shows, read from the summary and the store."""
    output = summary["outputs"][index]
    store_uri, device = summary["store"], summary["device"]
    store = open_store(store_uri)
    artifacts = {**summary["artifacts"], **output["artifacts"]}
    ref = lambda stage, info=None: StageRef(stage, artifacts[stage], True, 0.0, info or {})  # noqa: E731
    align = ref("align", _stored_info(store, artifacts["align"]))
    rows = np.flatnonzero(np.asarray(store.get_table(f"{artifacts['align']}/frames.parquet")["status"])
                          != "passthrough")
    chosen = choose_keyframes(len(rows), keyframes)
    models = stages.stage_models(summary["profile"], models_dir, device)
    G = stages.pti_generator(store, ref("pti", summary["pti"]), models, device)
    pivots = store.get_tensors(f"{artifacts['encode']}/pivots.safetensors", device=device)["pivots"][chosen]
    latents = store.get_tensors(f"{artifacts['edit']}/latents.safetensors", device=device)["latents"][chosen]
    with torch.no_grad():
        inversions, raw_edits = (tensor_to_images(G.synthesis(w)) for w in (pivots, latents))
    crops = stages.CropRows(store, align)
    stitched = stages.StitchedChunks(store, _stored_info(store, artifacts["stitch"])["chunks"])
    frames = []
    for n, row in enumerate(chosen):
        paste = stitched.row(row)
        frames.append(Keyframe(frame=int(rows[row]), source=crops.rows(row, row + 1)[0], inversion=inversions[n],
                               raw_edit=raw_edits[n], stitched=paste.crop, mask=paste.mask,
                               boundary=np.clip(paste.paste_mask - paste.mask, 0, 1)))
    identity = identity_section(store_uri, ref("measure", output["identity"])) if "measure" in artifacts else None
    name = os.path.basename(summary["input"])
    return ReportData(
        title=f"{name}: {output['label']}",
        inputs={"source": summary["input"], "output": output["output"], "edits": _edits(output["edits"]),
                "profile": summary["profile"], "device": device, "store": store_uri,
                "ablations": ", ".join(summary["ablations"]) or "none", "frames": str(summary["frames"]),
                "edited frames": str(summary["edited_frames"])},
        settings={stage: values for stage, values in config.items() if isinstance(values, dict)},
        seconds=_in_pipeline_order({**summary["seconds"], **output["seconds"]}),
        keyframes=frames, identity=identity,
        stitching={name: output["stitching"][name] for name in ("boundary_error_before", "boundary_error_after")},
        pti=summary["pti"], ablations=ablations, fps=_fps(summary["fps"]))


def _in_pipeline_order(seconds: dict[str, float]) -> dict[str, float]:
    """Stages as the pipeline runs them (a summary read back from JSON has its keys sorted)."""
    return {stage: seconds[stage] for stage in stages.STAGE_VERSIONS if stage in seconds}


def _stored_info(store: Any, key: str) -> dict[str, Any]:
    """A finished stage's info as its ``done.json`` keeps it (the summary leaves out its lists of chunks)."""
    return store.get_json(f"{key}/{MARKER}")["info"]


def _fps(value: Any) -> float:
    if isinstance(value, str) and "/" in value:
        numerator, denominator = value.split("/")
        return float(numerator) / float(denominator)
    return float(value)


def _edits(edits: list[dict[str, Any]]) -> str:
    return " + ".join(f"{edit['direction']} {edit['strength']:+g}" for edit in edits)


def _markdown(summary: dict[str, Any], output: dict[str, Any], path: Path) -> str:
    identity, pti = output.get("identity") or {}, summary.get("pti") or {}
    score = lambda value: "n/a" if value is None else f"{value:.4f}"  # noqa: E731
    lines = [f"# {os.path.basename(summary['input'])}: {output['label']}", "",
             f"Output: `{output['output']}`  ", f"Report: `{path}`", "",
             "| measure | value |", "| --- | --- |",
             f"| TL-ID | {score(identity.get('tl_id'))} |", f"| TG-ID | {score(identity.get('tg_id'))} |",
             f"| identity similarity to the source | {score(identity.get('source_similarity'))} |",
             f"| boundary error before stitching | {output['stitching']['boundary_error_before']:.4f} |",
             f"| boundary error after stitching | {output['stitching']['boundary_error_after']:.4f} |",
             f"| PTI reconstruction LPIPS before (pivots) | {score(pti.get('reconstruction_lpips_before'))} |",
             f"| PTI reconstruction LPIPS after | {score(pti.get('reconstruction_lpips_after'))} |",
             "", "| stage | seconds |", "| --- | --- |"]
    lines += [f"| {stage} | {seconds:.1f} |"
              for stage, seconds in _in_pipeline_order({**summary["seconds"], **output["seconds"]}).items()]
    return "\n".join(lines) + "\n"

