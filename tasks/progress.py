"""Progress of the long stages: a bar on the terminal and a progress artifact in Prefect.

A stage wraps its long loop in :func:`stage_progress` and calls the function it yields with the
units of work just done (frames, optimisation steps, chunks)::

    with stage_progress("pti", total=steps, unit="step", label="clip.mp4") as advance:
        tune_generator(..., progress=lambda step, total, loss: advance(1))

- The bar (tqdm) is drawn on stderr only when stderr is a terminal, so logs, pipes and CI output
  stay clean. The environment variable :data:`PROGRESS_ENV` overrides that:
  ``STITCHTIME_PROGRESS=1`` draws bars anyway, ``STITCHTIME_PROGRESS=0`` never draws them.
  Stages that run at once (several videos of a batch) each get a line of their own.
- Inside a Prefect flow or task run, a progress artifact (0-100 %) follows the same count on the
  server, keyed ``<stage>-<label>`` (e.g. ``landmarks-clip-mp4``). It is updated at most once every
  :data:`ARTIFACT_INTERVAL` seconds, when the count reaches the total and when the stage ends, so
  thousands of frames make a handful of API calls. Outside a run there is no artifact; an API that
  fails is logged and progress goes on without it (it is only for show).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from uuid import UUID

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import FlowRunContext, TaskRunContext
from tqdm import tqdm

PROGRESS_ENV = "STITCHTIME_PROGRESS"
"""Environment variable: "1" draws progress bars even when stderr is not a terminal, "0" never draws them."""

ARTIFACT_INTERVAL = 1.0
"""Least seconds between two updates of a progress artifact (the last update is always sent)."""

log = logging.getLogger("stitchtime")


@contextmanager
def stage_progress(stage: str, *, total: int, unit: str, label: str | None = None,
                   initial: int = 0) -> Iterator[Callable[[int], None]]:
    """Show a stage's progress while the block runs; yields ``advance(n)``, to call with units just done.

    Args:
        stage: the stage's name, e.g. ``"pti"``.
        total: units the stage does in all.
        unit: what one unit is, e.g. ``"frame"`` or ``"step"``.
        label: what the stage works on, e.g. the video's file name; shown beside the stage's name.
        initial: units already done before the block (a run resumed from a checkpoint).

    Yields:
        ``advance(n)``; call it from one thread at a time.
    """
    name = stage if label is None else f"{stage} {label}"
    bar = tqdm(total=total, initial=initial, unit=unit, desc=name, file=sys.stderr, disable=not _draw_bars(),
               dynamic_ncols=True)
    in_run = TaskRunContext.get() is not None or FlowRunContext.get() is not None
    artifact = _ProgressArtifact(name, total=total, done=initial, unit=unit) if in_run else None

    def advance(n: int = 1) -> None:
        bar.update(n)
        if artifact is not None:
            artifact.advance(n)

    try:
        yield advance
    finally:
        bar.close()
        if artifact is not None:
            artifact.send()


def _draw_bars() -> bool:
    setting = os.environ.get(PROGRESS_ENV, "")
    if setting in ("0", "1"):
        return setting == "1"
    return sys.stderr is not None and sys.stderr.isatty()


def artifact_key(name: str) -> str:
    """A Prefect artifact key for a progress name: lowercase letters, digits and single dashes only.

    >>> artifact_key("landmarks My Clip.MP4")
    'landmarks-my-clip-mp4'
    """
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


class _ProgressArtifact:
    """A Prefect progress artifact following a count, updated at most every :data:`ARTIFACT_INTERVAL` seconds."""

    def __init__(self, name: str, *, total: int, done: int, unit: str):
        self.total, self.done = total, done
        self.sent = self._percent()
        self.sent_at = time.monotonic()
        self.id: UUID | None = _call_api(create_progress_artifact, progress=self.sent, key=artifact_key(name),
                                         description=f"{name}: {total} {unit}s")

    def advance(self, n: int) -> None:
        """Count ``n`` more units; update the artifact if it is time to."""
        self.done += n
        if self.done >= self.total or time.monotonic() - self.sent_at >= ARTIFACT_INTERVAL:
            self.send()

    def send(self) -> None:
        """Update the artifact now, unless it already shows the current percentage."""
        percent = self._percent()
        if self.id is None or percent == self.sent:
            return
        if _call_api(update_progress_artifact, self.id, percent) is None:
            self.id = None  # the API failed: stop trying for this stage
        self.sent, self.sent_at = percent, time.monotonic()

    def _percent(self) -> float:
        return 100.0 if self.total <= 0 else min(100.0, round(100 * self.done / self.total, 1))


def _call_api(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``call(*args, **kwargs)``, or None after logging a failure: progress must never fail a stage."""
    try:
        return call(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any API or network error
        log.warning("progress artifact not updated: %s", exc)
        return None
