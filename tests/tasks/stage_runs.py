"""The stitch stage run in this process without Prefect, wired as the ``edit_video`` flow wires it."""

from __future__ import annotations

from stitchtime_core.config import StitchingConfig
from tasks import stages


def stitch_here(store_uri: str, align: stages.StageRef, pti: stages.StageRef, edit: stages.StageRef,
                config: StitchingConfig, runtime: stages.Runtime, *, chunk_size: int = 16,
                run_chunks: stages.ChunkRunner | None = None) -> stages.StageRef:
    """The stored stage, or its plan's missing chunks stitched here (or handed to ``run_chunks``), then
    ``gather_stitch``."""
    planned = stages.call(stages.plan_stitch, store_uri, align, pti, edit, config, runtime, chunk_size)
    if isinstance(planned, stages.StageRef):
        return planned
    fanned = None
    if planned.missing and run_chunks is None:
        stages.stitch_chunks.fn(list(planned.missing), runtime.device)
    elif planned.missing:
        fanned = stages.fan_out(planned, run_chunks)
    return stages.call(stages.gather_stitch, store_uri, planned, fanned)
