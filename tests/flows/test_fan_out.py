"""GPU fan-out of stitching tuning, end to end: a real Prefect server, a `gpu` process work pool served
by two real worker processes on this machine (pinned as GPUs 0 and 1; there is no GPU here, so the
chunks run on the CPU), the stitch-chunk deployment from deployments/prefect.yaml, and the edit flow
fanning a clip's chunks out to it. Also the one command that deploys everything."""

from __future__ import annotations

import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, LogFilter, LogFilterFlowRunId
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.responses import SetStateStatus
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Completed, Pending, Running
from safetensors.torch import load_file

from stitchtime_core.config import StitchingConfig
from stitchtime_core.sample_clip import make_sample_clip
from stitchtime_core.video import iter_frames
from flows.stitch_chunk import CHUNK_TIMEOUT_ENV, deployment_runner
from stitchtime_core.errors import StitchtimeError
from tasks import stages
from tasks.store import open_store

ROOT = Path(__file__).resolve().parents[2]
DEPLOYMENT = "stitch-chunk/gpu"
CHUNKS = [(0, 3), (3, 6), (6, 9), (9, 10)]
"""The 10 frames of the clip in chunks of 3 rows."""
SHARED = ["probe", "landmarks", "align", "encode", "pti", "edit"]
"""Stage folders the fan-out runs copy from the in-process run, so that only stitching and rendering run."""
STEPS_WHEN_KILLED = 100
"""Enough for a chunk to take seconds, so that the test catches one running."""

_EDIT = """
import json, sys
from flows.edit_video import edit_video
edit_video(**json.loads(sys.argv[1]))
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fan-out")


@pytest.fixture(scope="module")
def env(prefect_server: str, workdir: Path) -> dict[str, str]:
    """The environment of every process here: the test server, a Prefect home of our own, fast polling.

    Each process computes on one thread: two workers and the flow share this machine's few cores, and
    the in-process run must compute exactly as the workers do.
    """
    return {**os.environ, "PREFECT_API_URL": prefect_server, "PREFECT_HOME": str(workdir / "prefect-home"),
            "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(workdir / "prefect-results"),
            "PREFECT_WORKER_QUERY_SECONDS": "1", "STITCHTIME_ROOT": str(ROOT), "OMP_NUM_THREADS": "1"}


def prefect(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """The prefect command line; STITCHTIME_ROOT is left to the workers, as deployments/deploy.py does."""
    env = {name: value for name, value in env.items() if name != "STITCHTIME_ROOT"}
    result = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, f"prefect {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result


def edit(env: dict[str, str], workdir: Path, clip: Path, store: Path, name: str, *, steps: int = 2,
         fan_out: str | None = None, placement: dict[str, str] | None = None,
         background: bool = False) -> subprocess.Popen | dict:
    """Run the edit_video flow in a process of its own; its summary, or the process when in the background."""
    args = {"source": str(clip), "out": str(workdir / f"{name}.mp4"), "edits": [[["age", 2.0]]],
            "store": str(store), "chunk_size": 3, "fan_out": fan_out, "placement": placement,
            "overrides": {"pti": {"observations_per_frame": 2}, "stitching": {"steps": steps}}}
    with open(workdir / f"{name}.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", _EDIT, json.dumps(args)], cwd=workdir, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    if background:
        return proc
    return finished(proc, workdir, name)


def finished(proc: subprocess.Popen, workdir: Path, name: str, timeout: float = 300) -> dict:
    assert proc.wait(timeout=timeout) == 0, (workdir / f"{name}.log").read_text()[-6000:]
    return json.loads((workdir / f"{name}.summary.json").read_text())


def copy_shared_stages(source: Path, dest: Path) -> None:
    for stage in SHARED:
        shutil.copytree(source / stage, dest / stage)


def chunk_runs(env: dict[str, str], deployment: str, key: str) -> list[tuple[FlowRun, list[str]]]:
    """Every flow run of ``deployment`` for the stitch stage ``key``, with its log lines."""
    with SyncPrefectClient(env["PREFECT_API_URL"]) as client:
        deployment_id = client.read_deployment_by_name(deployment).id
        runs = [run for run in client.read_flow_runs(deployment_filter=DeploymentFilter(
            id=DeploymentFilterId(any_=[deployment_id]))) if run.parameters["key"] == key]
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[r.id for r in runs])))
    return [(run, [entry.message for entry in logs if entry.flow_run_id == run.id]) for run in runs]


def test_one_command_deploys_the_library_and_stitch_chunk_deployments(env: dict[str, str]) -> None:
    result = subprocess.run([sys.executable, "deployments/deploy.py"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    deploy = runpy.run_path(str(ROOT / "deployments/deploy.py"))
    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        deploy["create_automations"]()  # a second time adds nothing
    with SyncPrefectClient(env["PREFECT_API_URL"]) as client:
        library = client.read_deployment_by_name("edit_library/nightly")
        stitch = client.read_deployment_by_name(DEPLOYMENT)
        pools = {name: client.read_work_pool(name).type for name in ("cpu", "gpu")}
        [zombies] = client.read_automations_by_name("stitchtime-crash-silent-flow-runs")
    assert zombies.enabled and zombies.trigger.within.total_seconds() == 90
    assert [action.state.value for action in zombies.actions] == ["CRASHED"]
    assert pools == {"cpu": "process", "gpu": "process"}
    assert library.work_pool_name == "cpu" and stitch.work_pool_name == "gpu"
    assert [s.schedule.cron for s in library.schedules] == ["0 2 * * *"] and library.schedules[0].active
    assert library.global_concurrency_limit.limit == 1  # a nightly run that overruns holds the next back
    assert library.concurrency_options.collision_strategy == "ENQUEUE"
    assert library.job_variables["env"]["STITCHTIME_STITCH_DEPLOYMENT"] == DEPLOYMENT
    assert set(library.parameters) <= set(library.parameter_openapi_schema["properties"])  # all the flow's
    assert library.parameters["quality"] == "paper"  # not the cpu device's default: PTI and stitching run on GPUs
    assert not stitch.schedules and stitch.parameters == {}
    for deployment in (library, stitch):
        assert deployment.pull_steps == [{"prefect.deployments.steps.set_working_directory": {
            "directory": "{{ $STITCHTIME_ROOT }}"}}]
    entrypoints = [(d["name"], d["entrypoint"]) for d in yaml.safe_load((ROOT / "deployments/prefect.yaml").read_text())
                   ["deployments"]]
    assert entrypoints == [("nightly", "flows/edit_library.py:edit_library"),
                           ("gpu", "flows/stitch_chunk.py:stitch_chunk"), ("gpu", "flows/run_stage.py:run_stage")]
    run_stage = client_deployment(env, "run-stage/gpu")
    assert run_stage.work_pool_name == "gpu" and not run_stage.schedules and run_stage.parameters == {}
    assert library.job_variables["env"]["STITCHTIME_PLACEMENT"] == "encode=run-stage/gpu,pti=run-stage/gpu"

    # Its concurrency limit at work: while one run holds the slot, a worker that takes a second is told to wait.
    with SyncPrefectClient(env["PREFECT_API_URL"]) as client:
        first, second = (client.create_flow_run_from_deployment(library.id) for _ in range(2))
        try:
            assert client.set_flow_run_state(first.id, Pending()).status == SetStateStatus.ACCEPT
            held = client.set_flow_run_state(second.id, Pending())
            assert held.status == SetStateStatus.REJECT and held.state.name == "AwaitingConcurrencySlot"
            for state in (Running(), Completed()):
                assert client.set_flow_run_state(first.id, state).status == SetStateStatus.ACCEPT
            assert client.set_flow_run_state(second.id, Pending()).status == SetStateStatus.ACCEPT
        finally:
            for run in (first, second):
                client.delete_flow_run(run.id)


def client_deployment(env: dict[str, str], name: str):  # noqa: ANN201 - a Prefect deployment
    with SyncPrefectClient(env["PREFECT_API_URL"]) as client:
        return client.read_deployment_by_name(name)


def test_a_chunk_survives_the_trip_through_flow_run_parameters(tmp_path: Path) -> None:
    ref = stages.StageRef("align", "align/abc", False, 1.5, {"crop_chunks": ["align/abc/crops-00000.safetensors"]})
    chunk = stages.StitchChunk(str(tmp_path / "store"), "stitch/def", 3, 6, 3, ref, ref, ref,
                               StitchingConfig(steps=7, loss="l2"), "tiny", None)
    parameters = json.loads(json.dumps(chunk.to_parameters()))  # what the API stores and a worker gets
    assert parameters["store"] == (tmp_path / "store").as_uri()  # absolute: workers run elsewhere
    assert stages.StitchChunk.from_parameters(**{**parameters, "store": chunk.store_uri}) == chunk
    assert chunk.artifact == "stitch/def/chunk-000003-000006.safetensors"


@pytest.fixture(scope="module")
def pool(env: dict[str, str]) -> str:
    """A `gpu` process work pool of this run's own, and stitch-chunk and run-stage deployments of the same
    name on it.

    Deployed with prefect.yaml's pull step, like the `gpu` deployments; they run on the CPU
    (``device=cpu``), so that results match the in-process run wherever the test runs.
    """
    name = f"gpu-{uuid.uuid4().hex[:8]}"
    prefect(["work-pool", "create", name, "--type", "process"], env)
    for entrypoint in ("flows/stitch_chunk.py:stitch_chunk", "flows/run_stage.py:run_stage"):
        prefect(["deploy", entrypoint, "--name", name, "--pool", name, "--param", "device=cpu",
                 "--prefect-file", "deployments/prefect.yaml"], env)
    return name


@pytest.fixture(scope="module")
def deployment(pool: str) -> str:
    return f"stitch-chunk/{pool}"


@pytest.fixture(scope="module")
def workers(pool: str, env: dict[str, str], workdir: Path) -> Iterator[dict[str, str]]:
    """Two process workers on the pool, one flow run at a time each, pinned as GPUs 0 and 1; name -> GPU."""
    pinned = {f"{pool}-{gpu}": str(gpu) for gpu in range(2)}
    procs = []
    for name, gpu in pinned.items():
        with open(workdir / f"{name}.log", "wb") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process",
                 "--limit", "1", "--name", name], cwd=workdir, env={**env, "CUDA_VISIBLE_DEVICES": gpu},
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    try:
        deadline = time.monotonic() + 60
        while not all("started" in (workdir / f"{name}.log").read_text() for name in pinned):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
                "\n".join((workdir / f"{name}.log").read_text() for name in pinned)
            time.sleep(0.5)
        yield pinned
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="module")
def clip(workdir: Path) -> Path:
    path = workdir / "clip.mp4"
    make_sample_clip(path, seconds=0.4, size=(192, 192))  # 10 frames
    return path


@pytest.fixture(scope="module")
def in_process(env: dict[str, str], workdir: Path, clip: Path) -> dict:
    """The same edit with every chunk stitched in the flow's own process."""
    summary = edit({k: v for k, v in env.items() if k != "STITCHTIME_STITCH_DEPLOYMENT"}, workdir, clip,
                   workdir / "store-in-process", "in-process")
    assert summary["stitching"]["fan_out"] is None
    return summary


def test_an_unknown_deployment_fails_before_any_stage(env: dict[str, str], workdir: Path, clip: Path) -> None:
    proc = edit({**env, "STITCHTIME_STITCH_DEPLOYMENT": "stitch-chunk/nowhere"}, workdir, clip,
                workdir / "store-nowhere", "nowhere", background=True)
    assert proc.wait(timeout=120) != 0
    assert "no deployment 'stitch-chunk/nowhere'" in (workdir / "nowhere.log").read_text()
    assert not (workdir / "store-nowhere" / "probe").exists()


def test_encoding_and_pti_placed_on_the_gpu_pool_run_there_whole(env: dict[str, str], pool: str,
                                                               workers: dict[str, str], workdir: Path, clip: Path,
                                                               in_process: dict) -> None:
    deployment = f"run-stage/{pool}"
    store = workdir / "store-placed"
    summary = edit(env, workdir, clip, store, "placed", placement={"encode": deployment, "pti": deployment})
    # Made in this run, elsewhere: under the same keys as in-process, and not reused.
    assert summary["artifacts"] == in_process["artifacts"] and summary["reused_stages"] == []
    assert summary["pti"]["placed"]["deployment"] == deployment
    with SyncPrefectClient(env["PREFECT_API_URL"]) as client:
        deployment_id = client.read_deployment_by_name(deployment).id
        runs = [run for run in client.read_flow_runs(deployment_filter=DeploymentFilter(
            id=DeploymentFilterId(any_=[deployment_id]))) if run.parameters["arguments"]["store_uri"] == str(store)]
    assert sorted(run.parameters["stage"] for run in runs) == ["encode", "pti"]
    assert all(run.state.is_completed() and run.parent_task_run_id for run in runs)
    np.testing.assert_array_equal(np.stack(list(iter_frames(workdir / "placed.mp4"))),
                                  np.stack(list(iter_frames(workdir / "in-process.mp4"))))


def test_two_gpu_workers_run_the_chunks_of_one_clip(env: dict[str, str], deployment: str, workers: dict[str, str],
                                                    workdir: Path, clip: Path, in_process: dict) -> None:
    store = workdir / "store-fan-out"
    copy_shared_stages(workdir / "store-in-process", store)
    summary = edit({**env, "STITCHTIME_STITCH_DEPLOYMENT": deployment}, workdir, clip, store, "fan-out")
    [output] = summary["outputs"]
    assert output["reused_stages"] == ["edit"] and summary["reused_stages"] == SHARED[:-1] + ["edit[age+2]"]
    assert summary["stitching"]["fan_out"] == {"deployment": deployment, "chunk_runs": 4, "resubmitted": 0}
    key = output["artifacts"]["stitch"]
    assert key == in_process["outputs"][0]["artifacts"]["stitch"]

    # Every chunk was one flow run of the deployment, a subflow of the edit, picked up by a worker.
    runs = chunk_runs(env, deployment, key)
    assert sorted(rows(run) for run, _ in runs) == CHUNKS
    assert all(run.state.is_completed() and run.parent_task_run_id for run, _ in runs)
    picked_by = {}
    for run, logs in runs:  # the chunk flow logs the GPU its worker is pinned to
        [worker] = [name for name, gpu in workers.items()
                    if any(f"(CUDA_VISIBLE_DEVICES={gpu}," in line for line in logs)]
        picked_by[rows(run)] = worker
    # Both workers took chunks: each runs one at a time, and all four were waiting from the start.
    assert set(picked_by.values()) == set(workers), picked_by

    # The same stitched crops and the same video as stitching in-process.
    for start, stop in CHUNKS:
        name = f"{key}/chunk-{start:06d}-{stop:06d}.safetensors"
        fanned, local = load_file(store / name), load_file(workdir / "store-in-process" / name)
        assert fanned.keys() == local.keys() and all(torch.equal(fanned[k], local[k]) for k in fanned)
    assert summary["stitching"] == {**in_process["stitching"], "fan_out": summary["stitching"]["fan_out"]}
    np.testing.assert_array_equal(np.stack(list(iter_frames(workdir / "fan-out.mp4"))),
                                  np.stack(list(iter_frames(workdir / "in-process.mp4"))))


def rows(run: FlowRun) -> tuple[int, int]:
    return run.parameters["start"], run.parameters["stop"]


def chunk_path(store: Path, key: str, run: FlowRun) -> Path:
    start, stop = rows(run)
    return store / key / f"chunk-{start:06d}-{stop:06d}.safetensors"


def test_a_killed_chunk_run_is_run_again_and_finished_chunks_are_not(env: dict[str, str], deployment: str,
                                                                     workers: dict[str, str], workdir: Path,
                                                                     clip: Path, in_process: dict) -> None:
    store = workdir / "store-killed"
    copy_shared_stages(workdir / "store-in-process", store)
    # More steps than the other runs: a stitch key of its own, and chunks slow enough to be caught running.
    proc = edit(env, workdir, clip, store, "killed", steps=STEPS_WHEN_KILLED, fan_out=deployment, background=True)
    try:
        deadline = time.monotonic() + 240

        def still_going() -> None:
            assert time.monotonic() < deadline and proc.poll() is None, (workdir / "killed.log").read_text()[-6000:]

        while not (first := list(store.glob("stitch/*/chunk-*.safetensors"))):
            still_going()
            time.sleep(0.1)
        key = f"stitch/{first[0].parent.name}"
        first_stored = datetime.fromtimestamp(first[0].stat().st_mtime, timezone.utc)
        victim = None
        while victim is None:  # the next chunk a worker started once the first was stored, while it runs
            still_going()
            victim = next((run for run, _ in chunk_runs(env, deployment, key)
                           if run.state.is_running() and run.start_time > first_stored and run.infrastructure_pid
                           and not chunk_path(store, key, run).exists()), None)
            time.sleep(0.1)
        stored = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (store / key).glob("chunk-*")}
        os.kill(int(str(victim.infrastructure_pid).rsplit(":", 1)[-1]), signal.SIGKILL)
        summary = finished(proc, workdir, "killed")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert summary["outputs"][0]["artifacts"]["stitch"] == key
    assert summary["stitching"]["fan_out"] == {"deployment": deployment, "chunk_runs": 5, "resubmitted": 1}
    runs = [run for run, _ in chunk_runs(env, deployment, key)]
    [killed] = [run for run in runs if run.id == victim.id]
    assert killed.state.is_crashed()
    # One completed run per chunk; the killed chunk's rows ran once more, no other chunk did.
    assert sorted(rows(run) for run in runs if run.state.is_completed()) == CHUNKS
    assert Counter(rows(run) for run in runs) == Counter(CHUNKS + [rows(victim)])
    # The chunks stored before the kill were not written again.
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (store / key).glob("chunk-*")}
    assert {name: after[name] for name in stored} == stored and len(after) == len(CHUNKS)
    assert summary["stitching"]["steps_per_frame"] == STEPS_WHEN_KILLED
    assert len(list(iter_frames(workdir / "killed.mp4"))) == 10
    # Nothing partial is visible: every chunk loads whole, and a reader of the store finds nothing else
    # (a chunk the kill cut off while being written would only have left a temp file, which it skips).
    assert all(load_file(store / key / name) for name in after)
    assert open_store(str(store)).list(f"{key}/") == sorted(
        f"{key}/{name}" for name in [*after, "done.json"])


def test_a_chunk_run_whose_machine_is_lost_is_marked_crashed_and_run_again(
        env: dict[str, str], deployment: str, workers: dict[str, str], workdir: Path, clip: Path,
        in_process: dict) -> None:
    # A lost machine cannot report its run's end: here its process is frozen (SIGSTOP) and the run stays
    # Running until the edit flow's chunk timeout marks it Crashed and submits the chunk again.
    store = workdir / "store-lost"
    copy_shared_stages(workdir / "store-in-process", store)
    timeout = 30
    proc = edit({**env, CHUNK_TIMEOUT_ENV: str(timeout)}, workdir, clip, store, "lost", steps=STEPS_WHEN_KILLED + 1,
                fan_out=deployment, background=True)
    frozen = None
    try:
        deadline = time.monotonic() + 240
        while frozen is None:
            assert time.monotonic() < deadline and proc.poll() is None, (workdir / "lost.log").read_text()[-6000:]
            running = [(key, run) for key in [p.name for p in (store / "stitch").glob("*")]
                       for run, _ in chunk_runs(env, deployment, f"stitch/{key}")
                       if run.state.is_running() and run.infrastructure_pid]
            for key, run in running:
                pid = int(str(run.infrastructure_pid).rsplit(":", 1)[-1])
                os.kill(pid, signal.SIGSTOP)
                # Frozen now; keep it only if it had not yet stored its chunk or reported its end.
                [now] = [r for r, _ in chunk_runs(env, deployment, f"stitch/{key}") if r.id == run.id]
                if now.state.is_running() and not chunk_path(store, f"stitch/{key}", run).exists():
                    frozen = run
                    break
                os.kill(pid, signal.SIGCONT)
            time.sleep(0.1)
        summary = finished(proc, workdir, "lost")
    finally:
        if proc.poll() is None:
            proc.kill()
        if frozen is not None:
            os.kill(pid, signal.SIGKILL)  # frees its worker
    key = summary["outputs"][0]["artifacts"]["stitch"]
    runs = [run for run, _ in chunk_runs(env, deployment, key)]
    [lost] = [run for run in runs if run.id == frozen.id]
    assert lost.state.is_crashed() and "presumed lost" in lost.state.message
    assert rows(frozen) in [rows(run) for run in runs if run.state.is_completed()]
    assert summary["stitching"]["fan_out"]["resubmitted"] >= 1
    assert sorted(p.name for p in (store / key).glob("chunk-*")) == [
        f"chunk-{start:06d}-{stop:06d}.safetensors" for start, stop in CHUNKS]
    assert len(list(iter_frames(workdir / "lost.mp4"))) == 10


@pytest.mark.parametrize("name, timeout, problem", [
    ("stitch-chunk/gpu", "-5", "STITCHTIME_CHUNK_TIMEOUT='-5': expected seconds, 0 for no timeout"),
    ("stitch-chunk/gpu", "soon", "STITCHTIME_CHUNK_TIMEOUT='soon': expected seconds, 0 for no timeout"),
    ("stitch-chunk/gpu", "nan", "STITCHTIME_CHUNK_TIMEOUT='nan': expected seconds, 0 for no timeout"),
    ("a/b/c", "60", "a deployment is named FLOW/DEPLOYMENT (e.g. stitch-chunk/gpu), got 'a/b/c'; stitch in-process"),
])
def test_a_bad_chunk_timeout_or_deployment_name_fails_before_asking_the_server(
        name: str, timeout: str, problem: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CHUNK_TIMEOUT_ENV, timeout)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # nothing listens: asking would fail otherwise
    with pytest.raises(StitchtimeError) as raised:
        deployment_runner(name)
    assert str(raised.value) == problem
