"""Placing whole stages on another work pool: the ``run-stage`` flow a (GPU) worker runs for one stage of
an edit, and :func:`place`, which the ``edit_video`` flow uses to run a stage that way.

A run's placement maps stages to ``run-stage`` deployments: ``{"encode": "run-stage/gpu", "pti":
"run-stage/gpu"}`` (``--place STAGE=DEPLOYMENT``, or ``$STITCHTIME_PLACEMENT`` as
``encode=run-stage/gpu,pti=run-stage/gpu``). The stage runs as a flow run of that deployment, reading
its inputs from the shared artifact store and writing its artifacts there; the edit flow then finds the
stage done by its key, as it finds any finished stage. Stitching goes to GPU workers chunk by chunk
(:mod:`flows.stitch_chunk`); the stages before and after are light and stay with the edit flow.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.deployments import run_deployment

from flows.edit_spec import parse_placement
from flows.prefect_server import check_deployment
from stitchtime_core.errors import StitchtimeError
from tasks import stages

PLACEMENT_ENV = "STITCHTIME_PLACEMENT"
"""Environment variable: the placement ``edit_video`` uses when its ``placement`` parameter is not given,
as ``STAGE=DEPLOYMENT[,STAGE=DEPLOYMENT...]``; unset or empty runs every stage in the edit flow."""

RESUBMITS = 2
"""How many times a stage whose run crashed (its process died) is submitted again."""


@flow(name="run-stage", retries=2, retry_delay_seconds=10, persist_result=False)
def run_stage(stage: str, arguments: dict[str, Any], device: str | None = None) -> dict[str, Any]:
    """One stage of an edit (``encode`` or ``pti``) on this worker; its artifacts go to the shared store.

    The edit flow fills in ``stage`` and ``arguments`` (the stage task's arguments, as
    :func:`tasks.stages.to_parameters` gives them).

    Args:
        stage: a key of :data:`tasks.stages.PLACEABLE`.
        arguments: the stage task's keyword arguments; the device of their ``runtime`` is this worker's.
        device: "cuda" or "cpu"; default the worker's GPU (the first one ``CUDA_VISIBLE_DEVICES`` shows),
            else its CPU.

    Returns:
        ``{"stage", "key", "reused", "seconds", "device", "visible_devices", "host"}``.
    """
    if stage not in stages.PLACEABLE:
        raise ValueError(f"stage {stage!r} cannot be placed; choose one of {', '.join(stages.PLACEABLE)}")
    device = device or stages.default_device()
    where = {"device": device, "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
             "host": socket.gethostname()}
    get_run_logger().info("%s on %s (CUDA_VISIBLE_DEVICES=%s, host %s)", stage, device, where["visible_devices"],
                          where["host"])
    task = stages.PLACEABLE[stage].TASK
    arguments = stages.from_parameters(task, arguments)
    arguments["runtime"] = dataclasses.replace(arguments["runtime"], device=device)  # this worker's
    ref = stages.run(task, **arguments)
    return {"stage": stage, "key": ref.key, "reused": ref.reused, "seconds": ref.seconds, **where}


def check_placement(placement: dict[str, str]) -> None:
    """Fail before any work when a placed stage cannot be placed or its deployment is not on the server.

    Raises:
        ValueError: a stage that cannot be placed. StitchtimeError: a deployment that does not exist.
    """
    parse_placement(",".join(f"{stage}={deployment}" for stage, deployment in placement.items()))
    if not placement:
        return
    for deployment in sorted(set(placement.values())):
        check_deployment(deployment, otherwise="run the stage in the edit flow")


def place(deployment: str, stage: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """Run ``stage`` with ``arguments`` (its task's keyword arguments) as a flow run of
    ``deployment``, and wait for it; a run that crashed is submitted again up to :data:`RESUBMITS` times.

    Returns:
        ``{"deployment", "flow_run", "seconds", "resubmitted"}``.

    Raises:
        StitchtimeError: the stage's run failed (its message names the run).
    """
    started = time.perf_counter()
    parameters = {"stage": stage, "arguments": stages.to_parameters(arguments)}
    for attempt in range(RESUBMITS + 1):
        again = f" (again, {attempt})" if attempt else ""
        flow_run = run_deployment(deployment, parameters=parameters, timeout=None, poll_interval=2,
                                  tags=["stitchtime", stage],
                                  flow_run_name=f"{stage} {arguments['align'].key.rsplit('/', 1)[-1][:8]}{again}")
        state = flow_run.state
        if state is not None and state.is_completed():
            return {"deployment": deployment, "flow_run": flow_run.name, "seconds": time.perf_counter() - started,
                    "resubmitted": attempt}
        if state is None or not state.is_crashed():
            break
    name = state.name if state is not None else "no state"
    message = state.message if state is not None else ""
    raise StitchtimeError(f"stage {stage} failed on {deployment}: flow run {flow_run.name} ({flow_run.id}) "
                          f"{name}: {message}")


def placed_ref(ref: stages.StageRef, placed: dict[str, Any]) -> stages.StageRef:
    """The edit flow's reference to a stage a ``run-stage`` run made: made in this run, in the run's time."""
    return dataclasses.replace(ref, reused=False, seconds=placed["seconds"],
                               info={**ref.info, "placed": {k: placed[k] for k in ("deployment", "flow_run")}})
