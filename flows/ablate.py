"""The ``ablate_video`` flow: the full method and each of the paper's ablations on one clip, side by side.

Every variant is an ``edit_video`` subflow; the stages a variant shares with another (probe to PTI
for most of them) are made once and reused. The table (TL-ID, TG-ID, boundary error, seconds) goes to
``<stem>.ablation.json`` and into the full method's report.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import flow

from flows.edit_video import edit_video
from stitchtime_core.config import ABLATIONS
from tasks import report
from tasks.outputs import AblationRow, RunSummary, check_outputs, sidecar_paths, write_json

FULL = "full"
VARIANTS = (FULL, *ABLATIONS)
"""What ``ablate_video`` runs: the full method, then each ablation of :data:`ABLATIONS`."""


def variant_outputs(source: str, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Each variant's output: ``<out_dir>/<source stem>.<variant><source suffix>``."""
    name = Path(source)
    return {variant: Path(out_dir, f"{name.stem}.{variant}{name.suffix or '.mp4'}") for variant in VARIANTS}


def table_path(source: str, out_dir: str | os.PathLike) -> Path:
    """Where the ablation table goes: ``<out_dir>/<source stem>.ablation.json``."""
    return Path(out_dir, f"{Path(source).stem}.ablation.json")


@flow(name="ablate_video")
def ablate_video(source: str, out_dir: str, edit: list[tuple[str, float]], profile: str = "tiny",
                 store: str | None = None, device: str = "cpu", models_dir: str | None = None,
                 overrides: dict[str, dict[str, Any]] | None = None, chunk_size: int = 16,
                 fan_out: str | None = None, quality: str | None = None,
                 placement: dict[str, str] | None = None, preset: str = "paper") -> dict[str, Any]:
    """Run one edit with the full method and with every ablation, and tabulate them.

    Args:
        source: the input video.
        out_dir: an existing folder for the outputs, their summaries and reports, and the table.
        edit: one edit set, the (direction, strength) pairs applied together.
        overrides: settings on top of every variant's (an ablation's own settings are applied first).
        profile, store, device, models_dir, chunk_size, fan_out, quality, placement, preset: as for ``edit_video``.

    Returns:
        ``{"source", "edit", "rows": [{"variant", "tl_id", "tg_id", "boundary_error", "seconds",
        "output", "report", "summary"}], "table"}``; also written to :func:`table_path`.
    """
    outputs = variant_outputs(source, out_dir)
    for out in outputs.values():
        check_outputs(source, out, [edit])
    rows = []
    for variant, out in outputs.items():
        settings = {stage: dict(fields) for stage, fields in ABLATIONS.get(variant, {}).items()}
        for stage, fields in (overrides or {}).items():
            settings.setdefault(stage, {}).update(fields)
        summary = edit_video(source, str(out), [edit], profile=profile, store=store, device=device,
                             models_dir=models_dir, overrides=settings, chunk_size=chunk_size, fan_out=fan_out,
                             placement=placement, quality=quality, preset=preset)
        [output] = RunSummary.model_validate(summary).outputs
        rows.append(AblationRow(variant=variant, tl_id=output.identity["tl_id"], tg_id=output.identity["tg_id"],
                                boundary_error=output.stitching["boundary_error_after"], seconds=output.made_seconds,
                                output=output.output, report=output.report,
                                summary=str(sidecar_paths(out)[0].resolve())).model_dump())
    report.write_report(rows[0]["summary"], 0, ablations=rows)
    table = {"source": os.path.abspath(source), "edit": [list(pair) for pair in edit], "rows": rows,
             "table": str(table_path(source, out_dir).resolve())}
    write_json(table_path(source, out_dir), table)
    return table
