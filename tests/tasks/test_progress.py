"""Stage progress: a bar only on a terminal (or when asked), a throttled Prefect progress artifact inside a
run, and every long stage's count reaching its total."""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import sys
import threading
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect import flow, task
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.actions import ArtifactCreate
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.context import FlowRunContext
from prefect.settings import PREFECT_API_URL, temporary_settings

from stitchtime_core.config import EditingConfig, with_overrides
from stitchtime_core.config import profile_defaults
from stitchtime_core.sample_clip import make_sample_clip
from stage_runs import stitch_here
from tasks import progress, stages
from tasks.progress import PROGRESS_ENV, artifact_key, stage_progress


class Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def _count(total: int, **labels: Any) -> None:
    with stage_progress("align", total=total, unit="frame", **labels) as advance:
        for _ in range(total):
            advance(1)


def test_no_bar_when_stderr_is_not_a_terminal(capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    _count(5, label="clip.mp4")
    assert capsys.readouterr() == ("", "")


def test_a_bar_on_a_terminal_unless_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    monkeypatch.setattr(sys, "stderr", Terminal())
    _count(5, label="clip.mp4")
    assert re.search(r"align clip\.mp4: 100%.*5/5", sys.stderr.getvalue())
    monkeypatch.setenv(PROGRESS_ENV, "0")
    monkeypatch.setattr(sys, "stderr", Terminal())
    _count(5, label="clip.mp4")
    assert sys.stderr.getvalue() == ""


def test_the_environment_variable_draws_a_bar_off_a_terminal(capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PROGRESS_ENV, "1")
    with stage_progress("pti", total=10, unit="step", label="3fa2b1c4", initial=4) as advance:
        advance(6)
    out, err = capsys.readouterr()
    assert out == "" and re.search(r"pti 3fa2b1c4: 100%.*10/10", err)


def test_stages_running_at_once_get_a_bar_each(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PROGRESS_ENV, "1")
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    both_open = threading.Barrier(2)

    def video(name: str) -> None:
        with stage_progress("landmarks", total=3, unit="frame", label=name) as advance:
            both_open.wait(timeout=10)
            advance(3)

    threads = [threading.Thread(target=video, args=(name,)) for name in ("a.mp4", "b.mp4")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    drawn = sys.stderr.getvalue()
    assert re.search(r"landmarks a\.mp4: 100%.*3/3", drawn) and re.search(r"landmarks b\.mp4: 100%.*3/3", drawn)


@pytest.mark.parametrize("name", ["landmarks Clip One.MP4", "pti 3fa2b1c4", "stitch 3fa2b1c4 rows 0-16",
                                  "render été/2024 (1).mov"])
def test_artifact_keys_are_what_prefect_accepts(name: str) -> None:
    key = artifact_key(name)
    assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", key)
    ArtifactCreate(key=key, type="progress", data=0.0)  # Prefect's own check of a key


def test_outside_a_prefect_run_there_is_no_artifact(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []
    monkeypatch.setattr(progress, "create_progress_artifact", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(progress, "update_progress_artifact", lambda *a, **k: calls.append(a))
    _count(3)
    assert calls == []


@pytest.fixture
def prefect_api(prefect_server: str) -> Iterator[str]:
    with temporary_settings({PREFECT_API_URL: prefect_server}):
        yield prefect_server


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The percentages that progress artifacts are updated to (the updates still go to the server)."""
    percentages: list[float] = []

    def update(artifact_id: UUID, percent: float) -> UUID:
        percentages.append(percent)
        return update_artifact(artifact_id, percent)

    update_artifact = progress.update_progress_artifact
    monkeypatch.setattr(progress, "update_progress_artifact", update)
    return percentages


@task(persist_result=False)
def count_frames(total: int) -> None:
    with stage_progress("render", total=total, unit="frame", label="Clip One.mp4") as advance:
        for _ in range(total):
            advance(1)


@flow(persist_result=False)
def counting(total: int) -> UUID:
    count_frames(total)
    return FlowRunContext.get().flow_run.id


def _artifacts(api: str, flow_run_id: UUID) -> list[Any]:
    with SyncPrefectClient(api) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[flow_run_id])))


def test_a_task_run_keeps_a_progress_artifact_with_few_updates(prefect_api: str, sent: list[float]) -> None:
    flow_run_id = counting(1000)
    [artifact] = _artifacts(prefect_api, flow_run_id)
    assert (artifact.type, artifact.key, artifact.data) == ("progress", "render-clip-one-mp4", 100.0)
    assert artifact.task_run_id is not None and artifact.description == "render Clip One.mp4: 1000 frames"
    assert sent[-1] == 100.0 and len(sent) <= 3  # 1000 advances in well under a second: throttled


def test_updates_follow_the_count_when_time_allows(prefect_api: str, sent: list[float],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "ARTIFACT_INTERVAL", 0.0)
    [artifact] = _artifacts(prefect_api, counting(4))
    assert sent == [25.0, 50.0, 75.0, 100.0] and artifact.data == 100.0


def test_an_api_that_fails_does_not_fail_the_stage(prefect_api: str, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    calls: list[float] = []

    def broken(artifact_id: UUID, percent: float) -> UUID:
        calls.append(percent)
        raise RuntimeError("server went away")

    monkeypatch.setattr(progress, "ARTIFACT_INTERVAL", 0.0)
    monkeypatch.setattr(progress, "update_progress_artifact", broken)
    [artifact] = _artifacts(prefect_api, counting(4))
    assert calls == [25.0] and artifact.data == 0.0  # one failure, then no more tries
    assert "server went away" in caplog.text


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every progress the stages open: stage, unit, label, total and the units advanced (from ``initial``)."""
    seen: list[dict[str, Any]] = []

    @contextlib.contextmanager
    def record(stage: str, *, total: int, unit: str, label: str | None = None,
               initial: int = 0) -> Iterator[Callable[[int], None]]:
        entry = {"stage": stage, "unit": unit, "label": label, "total": total, "done": initial}
        seen.append(entry)

        def advance(n: int = 1) -> None:
            entry["done"] += n

        yield advance

    for stage in ("landmarks", "align", "encode", "pti", "stitch", "render"):
        monkeypatch.setattr(importlib.import_module(f"tasks.stages.{stage}"), "stage_progress", record)
    return seen


TINY = stages.Runtime("tiny")
"""The tiny profile on the CPU."""


def test_every_long_stage_counts_up_to_its_total(tmp_path: Path, recorded: list[dict[str, Any]]) -> None:
    source = str(tmp_path / "clip.mp4")
    make_sample_clip(source, seconds=0.2, fps=Fraction(25), size=(192, 192))  # 5 frames
    config = with_overrides(profile_defaults("tiny"), {"pti": {"observations_per_frame": "1", "batch_size": "8"},
                                                       "stitching": {"steps": "1", "batch_size": "3"}})
    store = str(tmp_path / "store")
    probe = stages.call(stages.probe_video, store, source)
    landmarks = stages.call(stages.detect_landmarks, store, source, probe, config.alignment)
    align = stages.call(stages.align_faces, store, source, probe, landmarks, config.alignment, 64)
    pivots = stages.call(stages.encode_pivots, store, align, config.encoding, TINY)
    pti = stages.call(stages.tune_pti, store, align, pivots, config.pti, TINY)
    edit = stages.call(stages.edit_pivots, store, pivots, EditingConfig(edits=(("age", 2.0),)), TINY)
    stitch = stitch_here(store, align, pti, edit, config.stitching, TINY, chunk_size=2)
    stages.call(stages.render_output, store, source, probe, align, stitch, config.blending, config.output,
                str(tmp_path / "out.mp4"), sampler=config.alignment.sampler)
    # Fanned out: a runner that stitches the chunks here, as the workers would, and reports each one done.
    def run_chunks(chunks: list[stages.StitchChunk], done: Callable[[int], None]) -> dict[str, Any]:
        results = []
        for chunk in chunks:
            results.append(stages.stitch_chunk(chunk, device="cpu"))
            done(1)
        return {"chunks": results}

    other = with_overrides(config, {"stitching": {"batch_size": "2"}}).stitching
    stitch_here(store, align, pti, edit, other, TINY, chunk_size=2, run_chunks=run_chunks)

    assert all(entry["done"] == entry["total"] for entry in recorded), recorded
    short = lambda ref: ref.key.rsplit("/", 1)[-1][:8]  # noqa: E731
    [fanned] = [entry for entry in recorded if entry["unit"] == "chunk"]
    assert (fanned["stage"], fanned["total"]) == ("stitch", 3)
    assert [(e["stage"], e["unit"], e["label"], e["total"]) for e in recorded if e is not fanned] == [
        ("landmarks", "frame", "clip.mp4", 5), ("align", "frame", "clip.mp4", 5),
        ("encode", "frame", short(pivots), 5), ("pti", "step", short(pti), 1),
        ("stitch", "frame", short(stitch), 5), ("render", "frame", "clip.mp4", 5),
        ("stitch", "frame", f"{fanned['label']} rows 0-2", 2), ("stitch", "frame", f"{fanned['label']} rows 2-4", 2),
        ("stitch", "frame", f"{fanned['label']} rows 4-5", 1)]
