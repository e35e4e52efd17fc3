"""GPU fan-out of stitching tuning: the ``stitch-chunk`` flow a GPU worker runs for one chunk of frames,
and :func:`deployment_runner`, which the ``edit_video`` flow uses to run a stage's chunks that way.

Each chunk is one flow run of a ``stitch-chunk`` deployment on a work pool of GPU workers, one worker
per GPU (pinned with ``CUDA_VISIBLE_DEVICES`` in the worker's environment, ``--limit 1``). A chunk
reads its inputs from the shared artifact store and writes its stitched crops back. A chunk whose
flow fails is retried by the flow's own retries; a chunk whose process dies (the run ends Crashed,
which flow retries do not cover) is submitted again by the edit flow, and so is a chunk whose run has
been Running for longer than the chunk timeout (its machine is presumed lost: nothing is left to report
its end), after the edit flow marks it Crashed. Chunks already stored are never stitched again: the
edit flow submits only missing chunks, and a chunk run finds its artifact first.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
import uuid
from datetime import datetime, timezone
from collections.abc import Callable
from typing import Any

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.states import Crashed

from flows.prefect_server import check_deployment
from stitchtime_core.errors import StitchtimeError
from tasks import stages

log = logging.getLogger("stitchtime")

FAN_OUT_ENV = "STITCHTIME_STITCH_DEPLOYMENT"
"""Environment variable naming the stitch-chunk deployment (``stitch-chunk/gpu``) that ``edit_video``
fans stitching out to when its ``fan_out`` parameter is not given; unset or empty stitches in-process."""

CHUNK_TIMEOUT_ENV = "STITCHTIME_CHUNK_TIMEOUT"
"""Environment variable: seconds a chunk run may stay Running before the edit flow presumes its machine
lost, marks it Crashed and submits the chunk again (default :data:`CHUNK_TIMEOUT`; 0 waits for ever)."""

CHUNK_TIMEOUT = 3600.0
"""Far above a chunk's normal time (16 frames of 1024 px stitching tuning take minutes on one GPU)."""


@flow(name="stitch-chunk", retries=2, retry_delay_seconds=10, persist_result=False)
def stitch_chunk(store: str, key: str, start: int, stop: int, chunk_size: int, align: dict[str, Any],
                 pti: dict[str, Any], edit: dict[str, Any], stitching: dict[str, Any], profile: str = "tiny",
                 models_dir: str | None = None, device: str | None = None) -> dict[str, Any]:
    """Stitching tuning of rows ``[start, stop)`` of one video's edited frames, stored in the artifact store.

    The edit flow fills in every parameter but ``device`` for each chunk (see
    :meth:`tasks.stages.StitchChunk.to_parameters`); a chunk already stored is not stitched again.

    Args:
        store: the artifact store URI that the flow and every worker share (``s3://bucket/prefix``, or a
            folder every worker mounts at the same path).
        key: the stitch stage's key; the chunk is written to ``<key>/chunk-<start>-<stop>.safetensors``.
        start: first row (among the edited frames) of the chunk.
        stop: one past the chunk's last row.
        chunk_size: the stage's chunk size (with warm starts, part of the stage's key).
        align: the align stage's reference (a ``StageRef`` as a dict).
        pti: the PTI stage's reference.
        edit: the edit stage's reference.
        stitching: the stitching settings (``StitchingConfig`` as a dict).
        profile: "tiny" or "ffhq", as the edit flow's.
        models_dir: the folder of ffhq model files on the worker (default ``$STITCHTIME_MODELS`` or ./models).
        device: "cuda" or "cpu"; default the worker's GPU (the first one ``CUDA_VISIBLE_DEVICES`` shows),
            else its CPU.

    Returns:
        ``{"chunk", "computed", "frames", "seconds", "device", "visible_devices", "host"}``.
    """
    logger = get_run_logger()
    chunk = stages.StitchChunk.from_parameters(store, key, start, stop, chunk_size, align, pti, edit, stitching,
                                               profile, models_dir)
    device = device or stages.default_device()
    where = {"device": device, "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
             "host": socket.gethostname()}
    logger.info("stitching rows %d-%d on %s (CUDA_VISIBLE_DEVICES=%s, host %s)", start, stop, device,
                where["visible_devices"], where["host"])
    result = {**stages.stitch_chunk(chunk, device=device), **where}
    logger.info("rows %d-%d %s in %.1f s", start, stop, "stitched" if result["computed"] else "already stored",
                result["seconds"])
    return result


def deployment_runner(name: str, *, resubmits: int = 2, poll_seconds: float = 2.0,
                      chunk_timeout: float | None = None) -> stages.ChunkRunner:
    """A :data:`~tasks.stages.ChunkRunner` that runs each chunk as a flow run of the deployment ``name``.

    The deployment is looked up now, so a wrong name fails before any work. The runner submits every
    chunk at once (as subflows of the calling flow), waits for all of them, submits again a chunk
    whose run crashed (its process died: flow retries do not cover that) up to ``resubmits`` times,
    and raises once all have ended if any did not complete. A run still Running ``chunk_timeout``
    seconds after it started is marked Crashed and counts as a crash: a machine that is lost leaves
    its run Running, since nothing is left to report its end.

    Args:
        name: ``"<flow name>/<deployment name>"``, e.g. ``"stitch-chunk/gpu"``.
        resubmits: how many times one chunk is submitted again after a crash.
        poll_seconds: how often the runs' states are read.
        chunk_timeout: seconds; default ``$STITCHTIME_CHUNK_TIMEOUT``, else :data:`CHUNK_TIMEOUT`; 0 for none.

    Raises:
        StitchtimeError: no such deployment on the Prefect server, or a chunk timeout that is not seconds >= 0.
    """
    if chunk_timeout is None:
        try:
            chunk_timeout = float(os.environ.get(CHUNK_TIMEOUT_ENV) or CHUNK_TIMEOUT)
        except ValueError:
            chunk_timeout = math.nan
        if not chunk_timeout >= 0:
            raise StitchtimeError(f"{CHUNK_TIMEOUT_ENV}={os.environ[CHUNK_TIMEOUT_ENV]!r}: expected seconds, "
                                  "0 for no timeout")
    check_deployment(name, otherwise="stitch in-process")  # its form (FLOW/DEPLOYMENT) first

    def run(chunks: list[stages.StitchChunk], progress: Callable[[int], None]) -> dict[str, Any]:
        return _run_on_deployment(name, chunks, progress, resubmits=resubmits, poll_seconds=poll_seconds,
                                  chunk_timeout=chunk_timeout)

    return run


def _run_on_deployment(name: str, chunks: list[stages.StitchChunk], progress: Callable[[int], None], *,
                       resubmits: int, poll_seconds: float, chunk_timeout: float) -> dict[str, Any]:
    batch = uuid.uuid4().hex[:8]  # tells this stage's runs apart from another run's of the same chunks
    waiting: dict[uuid.UUID, tuple[stages.StitchChunk, int]] = {}

    def submit(chunk: stages.StitchChunk, attempt: int) -> None:
        again = f" (again, {attempt})" if attempt else ""
        flow_run = run_deployment(name, parameters=chunk.to_parameters(), timeout=0,
                                  flow_run_name=f"{chunk.key.rsplit('/', 1)[-1][:8]} rows {chunk.start}-{chunk.stop}"
                                                f"{again}",
                                  tags=["stitchtime", f"stitch-{batch}"])
        waiting[flow_run.id] = (chunk, attempt)

    for chunk in chunks:
        submit(chunk, 0)
    log.info("stitch    %d chunks submitted to %s", len(chunks), name)
    failed: list[tuple[stages.StitchChunk, FlowRun]] = []
    resubmitted = 0
    with get_client(sync_client=True) as client:
        while waiting:
            time.sleep(poll_seconds)
            for flow_run in _read_flow_runs(client, list(waiting)):
                if _overdue(flow_run, chunk_timeout):
                    message = (f"still running {chunk_timeout:g} s after it started ({CHUNK_TIMEOUT_ENV}); its "
                               "worker is presumed lost")
                    client.set_flow_run_state(flow_run.id, Crashed(message=message), force=True)
                    flow_run.state = Crashed(message=message)
                if flow_run.state is None or not flow_run.state.is_final():
                    continue
                chunk, attempt = waiting.pop(flow_run.id)
                rows = f"rows {chunk.start}-{chunk.stop}"
                if flow_run.state.is_completed():
                    log.info("stitch    %s done by flow run %s", rows, flow_run.name)
                    progress(1)
                elif flow_run.state.is_crashed() and attempt < resubmits:
                    log.warning("stitch    %s: flow run %s crashed (%s); submitting it again", rows, flow_run.name,
                                flow_run.state.message)
                    submit(chunk, attempt + 1)
                    resubmitted += 1
                else:
                    failed.append((chunk, flow_run))
    if failed:
        details = "; ".join(f"rows {chunk.start}-{chunk.stop}: flow run {run.name} ({run.id}) "
                            f"{run.state.name}: {run.state.message}" for chunk, run in failed)
        raise StitchtimeError(f"{len(failed)} stitch chunk(s) failed on {name}: {details}")
    return {"deployment": name, "chunk_runs": len(chunks) + resubmitted, "resubmitted": resubmitted}


def _overdue(flow_run: FlowRun, timeout: float) -> bool:
    if not timeout or flow_run.state is None or not flow_run.state.is_running() or flow_run.start_time is None:
        return False
    return (datetime.now(timezone.utc) - flow_run.start_time).total_seconds() > timeout


def _read_flow_runs(client: Any, ids: list[uuid.UUID]) -> list[FlowRun]:
    """The flow runs with these ids, a page at a time (the server caps how many one read returns)."""
    runs: list[FlowRun] = []
    for start in range(0, len(ids), 200):
        page = ids[start:start + 200]
        runs += client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=page)), limit=len(page))
    return runs
