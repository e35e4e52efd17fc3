"""A run killed part way resumes where it stopped: after the last finished stage, inside PTI from its
last checkpoint, inside stitching tuning after the last finished chunk (real processes, SIGKILL)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stitchtime_core.sample_clip import make_sample_clip
from cli_runner import run_cli

SETTINGS = ["--set", "pti.observations_per_frame=12", "--set", "pti.batch_size=4", "--set", "pti.checkpoint_every=5",
            "--set", "stitching.steps=12"]
"""25 frames: 75 PTI steps checkpointed every 5, then two stitching chunks (16 + 9 frames)."""


def _start(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _kill_when(proc: subprocess.Popen, found, timeout: float = 300) -> None:
    """SIGKILL the whole process group as soon as ``found()`` is true (as a crashed machine would stop)."""
    deadline = time.monotonic() + timeout
    while not found():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it could be killed:\n{proc.stderr.read()}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("timed out waiting for the moment to kill the run")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_a_killed_run_resumes_inside_pti_and_inside_stitching(prefect_server: str, tmp_path: Path) -> None:
    clip = tmp_path / "clip.mp4"
    make_sample_clip(clip, seconds=1.0, size=(160, 160))
    store = tmp_path / "data"
    env = {**os.environ, "PREFECT_API_URL": prefect_server,
           "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp_path / "prefect-results")}
    args = ["edit", str(clip), "--edit", "age=2", "--out", str(tmp_path / "out.mp4"), "--store", str(store),
            "--json", *SETTINGS]

    # 1. Killed in the middle of PTI, just after a checkpoint was written.
    _kill_when(_start(args, env, tmp_path), lambda: any(store.glob("pti/*/checkpoint.safetensors")))

    # 2. Started again: the stages before PTI are reused, PTI goes on from its checkpoint; killed again
    #    once the first stitching chunk is written.
    chunks = lambda: sorted(store.glob("stitch/*/chunk-*.safetensors"))  # noqa: E731
    second = _start(args, env, tmp_path)
    _kill_when(second, lambda: len(chunks()) >= 1)
    [first_chunk] = chunks()
    written = first_chunk.stat().st_mtime_ns
    assert not any(store.glob("pti/*/checkpoint.safetensors"))  # PTI finished and removed its checkpoint
    assert not any(store.glob("stitch/*/done.json")) and not (tmp_path / "out.mp4").exists()

    # 3. Started a third time: everything up to stitching is reused, the finished chunk is kept.
    third = run_cli(args, env, tmp_path)
    assert third.returncode == 0, third.stderr
    summary = json.loads(third.stdout)
    assert summary["reused_stages"] == ["probe", "landmarks", "align", "encode", "pti", "edit[age+2]"]
    checkpoint_step = json.loads(next(store.glob("pti/*/done.json")).read_text())["info"]["resumed_from_step"]
    assert checkpoint_step > 0 and checkpoint_step % 5 == 0 and checkpoint_step < 75
    assert first_chunk.stat().st_mtime_ns == written  # not recomputed
    assert len(chunks()) == 2 and (tmp_path / "out.mp4").is_file()
