"""Faults in the middle of a run, with real processes and real servers: the S3 server going down and
coming back, Ctrl-C during PTI, the disk filling up under the output or under the store.

Each run either completes, riding out the fault with its retries, or stops with one clear line and
completes on the next start, reusing what was done; no reader ever sees a partial file. (A worker
killed in the middle of a stitching chunk is in test_fan_out.py, a run killed inside PTI and inside
stitching in test_resume.py.)

To keep the runs short, most tests start from a store that already holds the first stages of an
undisturbed run (its stage folders copied or uploaded), so the fault strikes within seconds.
"""

from __future__ import annotations

import functools
import http.client
import json
import os
import random
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath

import boto3
import click
import numpy as np
import pytest
import safetensors.torch
from click.testing import CliRunner
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.sorting import FlowRunSort

from flows.cli import _Commands
from stitchtime_core import artifacts
from stitchtime_core.sample_clip import make_sample_clip
from stitchtime_core.video import iter_frames
from cli_runner import run_cli

FAST = ["--set", "pti.observations_per_frame=4", "--set", "stitching.steps=3"]
"""Few steps, as in test_edit_video: these tests are about faults, not about the edit."""
CHECKPOINTS = ["--set", "pti.checkpoint_every=5"]
"""PTI's 15 steps (15 frames, 4 observations each, batches of 4) checkpointed at steps 5 and 10, and its
finished state at 15. The interval is not part of the PTI stage's key, so the stages stay those of the
reference run."""
BEFORE_PTI = ["probe", "landmarks", "align", "encode"]
BEFORE_RENDER = [*BEFORE_PTI, "pti", "edit", "stitch"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def clip(workdir: Path) -> Path:
    path = workdir / "clip.mp4"
    make_sample_clip(path, seconds=0.6, size=(160, 160))  # 15 frames
    return path


@pytest.fixture(scope="module")
def cli_env(prefect_server: str, workdir: Path) -> dict[str, str]:
    return {**os.environ, "PREFECT_API_URL": prefect_server,
            "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(workdir / "prefect-results")}


def edit_args(clip: Path, out: Path | str, store: Path | str, *extra: str) -> list[str]:
    return ["edit", str(clip), "--edit", "age=2", "--out", str(out), "--store", str(store), "--json", *FAST,
            *CHECKPOINTS, *extra]


@pytest.fixture(scope="module")
def reference(clip: Path, cli_env: dict[str, str], workdir: Path) -> dict:
    """An undisturbed run on a file store: what every disturbed run must end up with."""
    out = workdir / "reference.mp4"
    result = run_cli(edit_args(clip, out, workdir / "reference-store"), cli_env, workdir)
    assert result.returncode == 0, result.stderr
    return {"out": out, "store": workdir / "reference-store"}


def copy_stages(reference: dict, store: Path, stages: list[str]) -> None:
    """Give ``store`` the reference run's stages, as if an earlier run had made them."""
    for stage in stages:
        shutil.copytree(reference["store"] / stage, store / stage)


def frames(path: Path) -> np.ndarray:
    return np.stack(list(iter_frames(path)))


def start_cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    """The CLI in the background, in a process group of its own (as a terminal runs a command)."""
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for(found: Callable[[], bool], proc: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until ``found()`` while ``proc`` runs."""
    deadline = time.monotonic() + timeout
    while not found():
        if proc.poll() is not None:
            pytest.fail(f"the run ended first:\n{proc.stderr.read()}")
        if time.monotonic() > deadline:
            pytest.fail("timed out waiting for the run to get there")
        time.sleep(0.05)


def error_lines(stderr: str) -> list[str]:
    """What a run printed on stderr besides its stage lines (``stitchtime: pti done in ...``)."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("stitchtime: ")]


def assert_one_error_line(result: subprocess.CompletedProcess, *parts: str) -> None:
    """A run that stopped: non-zero, one ``Error:`` line holding every one of ``parts``, no traceback."""
    assert result.returncode not in (0, None), result.stderr
    [line] = error_lines(result.stderr)
    assert line.startswith("Error: ") and all(part.lower() in line.lower() for part in parts), result.stderr


def temp_files(names: list[str]) -> list[str]:
    """The names an interrupted atomic write leaves behind (``.name.tmp-...``)."""
    return [name for name in names if PurePosixPath(name).name.startswith(".") and ".tmp-" in name]


def assert_no_partial_artifact(objects: dict[str, bytes], reference: dict) -> None:
    """Every stored file is whole, and every stage marked done holds every file of the same stage in the
    undisturbed run.

    Args:
        objects: the store's files, key -> bytes.
    """
    assert not temp_files(list(objects))
    for key, data in objects.items():
        suffix = PurePosixPath(key).suffix
        if suffix == ".safetensors":
            artifacts.tensors_from_bytes(data, "cpu")
        elif suffix == ".parquet":
            artifacts.table_from_bytes(data)
        elif suffix == ".json":
            artifacts.json_from_bytes(data)
        elif suffix == ".mp4":
            with tempfile.NamedTemporaryFile(suffix=".mp4") as f:
                f.write(data)
                f.flush()
                assert len(frames(Path(f.name))) == 15, key
    for marker in [key for key in objects if key.endswith("/done.json")]:
        stage = marker.removesuffix("/done.json")
        made = {key.removeprefix(f"{stage}/") for key in objects if key.startswith(f"{stage}/")}
        assert made >= {p.name for p in (reference["store"] / stage).iterdir()}, stage


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _flow_run(client: SyncPrefectClient, out: Path):  # noqa: ANN202 - Prefect's FlowRun
    """The one edit_video flow run that wrote ``out`` (among the latest)."""
    runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["edit_video"])),
                                 sort=FlowRunSort.START_TIME_DESC, limit=50)
    [run] = [run for run in runs if run.parameters.get("out") == str(out)]
    return run


def flow_run_state(api_url: str, out: Path) -> str:
    """The state of the one edit_video flow run that wrote ``out`` (among the latest)."""
    with SyncPrefectClient(api_url) as client:
        return _flow_run(client, out).state.type.value


def pti_tries(api_url: str, out: Path) -> int:
    """How many times the PTI task of the one edit_video flow run that wrote ``out`` ran (Prefect's retries)."""
    with SyncPrefectClient(api_url) as client:
        run = _flow_run(client, out)
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    [pti] = [task for task in tasks if task.name.startswith("pti")]
    return pti.run_count


# --- Ctrl-C during PTI ------------------------------------------------------------------------------


def _servers_of(home: Path) -> list[int]:
    """Processes of a Prefect API app whose PREFECT_HOME is ``home``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if b"create_app" in (proc / "cmdline").read_bytes() and \
                    f"PREFECT_HOME={home}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return found


def test_ctrl_c_without_a_configured_server_stops_at_once_and_leaves_no_server(clip: Path, tmp_path: Path) -> None:
    """Without PREFECT_API_URL the command starts a temporary server of its own; a terminal's Ctrl-C (to the
    whole process group) must not stop that server before the command has reported the interrupted run."""
    home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), PREFECT_RESULTS_LOCAL_STORAGE_PATH=str(tmp_path / "results"))
    process = subprocess.Popen([sys.executable, "-m", "flows.cli", *edit_args(clip, tmp_path / "out.mp4",
                                                                             tmp_path / "data")],
                               env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "data").glob("landmarks/*")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _servers_of(home), "the command started no server of its own"
    os.killpg(process.pid, signal.SIGINT)
    started = time.monotonic()
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and time.monotonic() - started < 15, stderr
    assert "Traceback" not in stderr and "Error logging to API" not in stderr
    assert stderr.splitlines()[-1] == "Interrupted: run the same command again to go on where it stopped."
    time.sleep(1)
    assert _servers_of(home) == []


@pytest.mark.parametrize("ctrl_c", [True, False])
def test_ctrl_c_is_reported_as_such_even_when_clean_up_turns_it_into_another_error(ctrl_c: bool) -> None:
    """Ctrl-C between two of Prefect's tasks once came out as "Error: Task run is not set" and status 2: its
    engine's clean-up raised that error over the KeyboardInterrupt, and the command made a usage error of it.
    The same sequence here, in a command of the CLI's group: with Ctrl-C it is an interrupt, without it the
    error it is."""
    group = _Commands()

    @group.command()
    def work() -> None:
        try:
            try:
                if ctrl_c:
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(10)  # the signal lands here
            finally:
                raise ValueError("Task run is not set")
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None

    started = time.monotonic()
    result = CliRunner().invoke(group, ["work"])
    assert time.monotonic() - started < 5
    if ctrl_c:
        assert result.exit_code == 130 and result.output.strip() == (
            "Interrupted: run the same command again to go on where it stopped.")
    else:
        assert result.exit_code == 2 and "Error: Task run is not set" in result.output
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the CLI's handler is gone again


def test_ctrl_c_that_lands_in_a_finaliser_still_stops_the_command() -> None:
    """A signal raised while a ``__del__`` runs is dropped by Python ("Exception ignored in ..."); once, in CI,
    Ctrl-C landed in tqdm's and the edit ran on to its end with status 0. The command must stop all the same."""
    group = _Commands()
    finished = []

    class Finalised:
        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(10)  # the signal lands here, inside the finaliser

    @group.command()
    def work() -> None:
        Finalised()  # dropped at once: its __del__ runs here
        for _ in range(100):
            time.sleep(0.01)
        finished.append(True)

    hook, started = sys.unraisablehook, time.monotonic()
    result = CliRunner().invoke(group, ["work"])
    assert time.monotonic() - started < 5
    assert result.exit_code == 130 and not finished, result.output
    assert result.output.strip() == "Interrupted: run the same command again to go on where it stopped."
    assert sys.unraisablehook is hook  # the CLI's hook is gone again


def test_sigterm_ends_a_command_as_ctrl_c_does_with_its_own_status() -> None:
    group = _Commands()
    cleaned = []

    @group.command()
    def work() -> None:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)  # the signal lands here
        finally:
            cleaned.append(True)  # clean-ups run: SIGTERM raises KeyboardInterrupt, it does not end the process

    previous = signal.getsignal(signal.SIGTERM)
    started = time.monotonic()
    result = CliRunner().invoke(group, ["work"])
    assert time.monotonic() - started < 5 and cleaned == [True]
    assert result.exit_code == 143 and result.output.strip() == (
        "Terminated (SIGTERM): run the same command again to go on where it stopped.")
    assert signal.getsignal(signal.SIGTERM) is previous


def test_ctrl_c_during_pti_stops_at_once_and_the_next_start_goes_on_from_the_checkpoint(
        clip: Path, cli_env: dict[str, str], reference: dict, tmp_path: Path) -> None:
    store, out = tmp_path / "store", tmp_path / "out" / "edited.mp4"
    out.parent.mkdir()
    copy_stages(reference, store, BEFORE_PTI)
    args = edit_args(clip, out, store)
    proc = start_cli(args, cli_env, tmp_path)
    wait_for(lambda: any(store.glob("pti/*/checkpoint.safetensors")), proc)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
    interrupted = time.monotonic()
    stdout, stderr = proc.communicate(timeout=60)

    assert proc.returncode == 130 and time.monotonic() - interrupted < 15
    assert error_lines(stderr) == ["Interrupted: run the same command again to go on where it stopped."], stderr
    assert stdout == "" and list(out.parent.iterdir()) == []  # no output, summary or temp file
    assert not temp_files([str(p) for p in store.rglob(".*")])
    assert not any(store.glob("pti/*/done.json"))
    assert flow_run_state(cli_env["PREFECT_API_URL"], out) in ("CRASHED", "CANCELLED", "FAILED")

    again = run_cli(args, cli_env, tmp_path)
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert summary["reused_stages"] == BEFORE_PTI
    assert summary["pti"]["resumed_from_step"] in (5, 10, 15)
    np.testing.assert_array_equal(frames(out), frames(reference["out"]))  # PTI resumed exactly
    assert_no_partial_artifact(folder_files(store), reference)


def test_sigterm_during_pti_stops_the_run_with_one_line_and_marks_its_flow_run(
        clip: Path, cli_env: dict[str, str], reference: dict, tmp_path: Path) -> None:
    store, out = tmp_path / "store", tmp_path / "out" / "edited.mp4"
    out.parent.mkdir()
    copy_stages(reference, store, BEFORE_PTI)
    proc = start_cli(edit_args(clip, out, store), cli_env, tmp_path)
    wait_for(lambda: any(store.glob("pti/*/checkpoint.safetensors")), proc)
    os.kill(proc.pid, signal.SIGTERM)  # `kill PID`, or a scheduler stopping the job: the command's process only
    terminated = time.monotonic()
    stdout, stderr = proc.communicate(timeout=60)

    assert proc.returncode == 143 and time.monotonic() - terminated < 15
    assert error_lines(stderr) == ["Terminated (SIGTERM): run the same command again to go on where it stopped."], \
        stderr
    assert stdout == "" and list(out.parent.iterdir()) == []
    assert not temp_files([str(p) for p in store.rglob(".*")])
    assert flow_run_state(cli_env["PREFECT_API_URL"], out) in ("CRASHED", "CANCELLED", "FAILED")


# --- the S3 server goes down for a while -----------------------------------------------------------


class TcpProxy:
    """A TCP proxy on loopback in front of a server, that can be taken down and brought up again.

    :meth:`stop` closes the listening socket and resets every open connection, so clients see what
    they see when a server dies (connection reset, then connection refused); :meth:`start` listens
    again on the same port, as the restarted server would.

    Args:
        upstream: (host, port) of the server.
    """

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.port = _port_outside_the_ephemeral_range()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port))  # SO_REUSEADDR: the same port again
        with self._lock:
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            connections, self._open = self._open, set()
        if listener is not None:
            listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
            listener.close()
        for conn in connections:
            _reset(conn)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # stopped
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                if self._listener is not listener:  # stopped while this one was being accepted
                    _reset(client)
                    _reset(server)
                    return
                self._open.update((client, server))
            pair = _Pair()
            for source, dest in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(pair, source, dest), daemon=True).start()

    def _pump(self, pair: _Pair, source: socket.socket, dest: socket.socket) -> None:
        """Copy one direction; an end of stream is passed on as one (the other direction may still be
        sending: a reset now would drop the data not yet delivered), a reset as a reset."""
        try:
            while data := source.recv(1 << 16):
                dest.sendall(data)
            dest.shutdown(socket.SHUT_WR)
        except OSError:
            pair.broken = True
        with self._lock:
            pair.pumps -= 1
            if pair.pumps and not pair.broken:
                return  # the other direction goes on
            self._open.difference_update((source, dest))
        for conn in (source, dest):
            if pair.broken:
                _reset(conn)
            else:
                conn.close()  # both ends have finished: a plain close, which delivers what is still queued


def _port_outside_the_ephemeral_range() -> int:
    """A free port that no outgoing connection is given as its own while the proxy is down (the kernel
    takes those from the ephemeral range), so that the proxy surely gets it back."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in random.Random().sample(range(max(1024, low - 8000), low), 200):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


class _Pair:
    """A client's connection and its connection to the server: how many directions are still open, and
    whether one was reset."""

    def __init__(self) -> None:
        self.pumps = 2
        self.broken = False


def _reset(conn: socket.socket) -> None:
    """Close a connection with a reset (SO_LINGER 0), as the kernel of a server that died does."""
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.shutdown(socket.SHUT_RD)  # wakes the thread blocked reading it; close alone would not
    except OSError:
        pass
    conn.close()


@pytest.fixture
def s3_before_pti(s3_env, reference: dict) -> dict:
    """A prefix of its own in the session's bucket holding the reference run's stages before PTI, and ways
    to look at it past any proxy."""
    prefix = f"faults-{time.time_ns()}"
    s3 = boto3.client("s3", endpoint_url=s3_env.endpoint_url)  # straight to the server, past the proxy
    for stage in BEFORE_PTI:
        for path in (p for p in (reference["store"] / stage).rglob("*") if p.is_file()):
            s3.upload_file(str(path), s3_env.bucket, f"{prefix}/{path.relative_to(reference['store']).as_posix()}")

    def objects() -> dict[str, bytes]:
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=s3_env.bucket, Prefix=f"{prefix}/")
        keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
        return {key.removeprefix(f"{prefix}/"): s3.get_object(Bucket=s3_env.bucket, Key=key)["Body"].read()
                for key in keys}

    def has(pattern: str) -> bool:
        listing = s3.list_objects_v2(Bucket=s3_env.bucket, Prefix=f"{prefix}/")
        return any(PurePosixPath(o["Key"]).match(pattern) for o in listing.get("Contents", []))

    def pti_checkpoint_step() -> int | None:
        """The step of the stored PTI checkpoint, None while there is none."""
        listing = s3.list_objects_v2(Bucket=s3_env.bucket, Prefix=f"{prefix}/")
        for key in (o["Key"] for o in listing.get("Contents", [])):
            if PurePosixPath(key).match("*/pti/*/checkpoint.safetensors"):
                try:
                    body = s3.get_object(Bucket=s3_env.bucket, Key=key)["Body"].read()
                except s3.exceptions.NoSuchKey:  # deleted in between: PTI is done
                    return None
                return int(safetensors.torch.load(body)["step"])
        return None

    return {"store": f"s3://{s3_env.bucket}/{prefix}", "objects": objects, "has": has,
            "pti_checkpoint_step": pti_checkpoint_step}


def env_through(proxy_url: str, s3_env, cli_env: dict[str, str]) -> dict[str, str]:
    """The CLI's environment pointing at the S3 server through a proxy."""
    return {**cli_env, **s3_env.env, "AWS_ENDPOINT_URL": proxy_url, "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


@pytest.fixture
def s3_through_proxy(s3_before_pti: dict, s3_env, cli_env: dict[str, str]) -> Iterator[dict]:
    """:func:`s3_before_pti`, and the CLI's environment pointing at the S3 server through a :class:`TcpProxy`."""
    host, port = s3_env.endpoint_url.removeprefix("http://").split(":")
    proxy = TcpProxy((host, int(port)))
    proxy.start()
    try:
        yield {**s3_before_pti, "proxy": proxy, "env": env_through(proxy.url, s3_env, cli_env)}
    finally:
        proxy.stop()


OUTAGE = 8.0
"""Seconds the S3 server is away in the outage a run rides out. A stage task is tried three times, 2 s
and then 10 s apart, and botocore's own retries of a refused connection add about a second to each
try: an outage of up to 12 s is always ridden out (14 s was, 18 s was not, when measured)."""


def test_a_run_rides_out_a_short_s3_outage_and_a_long_one_stops_it_until_the_next_start(
        s3_through_proxy: dict, clip: Path, cli_env: dict[str, str], reference: dict, tmp_path: Path) -> None:
    s3, out = s3_through_proxy, tmp_path / "edited.mp4"
    # A checkpoint after every PTI step: requests all along PTI, so that the outage surely meets one.
    args = edit_args(clip, out, s3["store"], "--set", "pti.checkpoint_every=1")
    proc = start_cli(args, s3["env"], tmp_path)
    try:
        # 1. Away for a few seconds during PTI: a retry of the PTI task goes on from the checkpoint.
        # A checkpoint of the first steps, so that steps are left to meet the outage (PTI takes 15).
        wait_for(lambda: (step := s3["pti_checkpoint_step"]()) is not None and step < 10, proc)
        s3["proxy"].stop()
        time.sleep(OUTAGE)
        s3["proxy"].start()
        # 2. Away for good once the edit stage is done: the stitch stage's retries give up.
        wait_for(lambda: s3["has"]("*/edit/*/done.json"), proc)
        down = time.monotonic()
        s3["proxy"].stop()
        stdout, stderr = proc.communicate(timeout=120)
        gave_up = time.monotonic() - down
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert_one_error_line(subprocess.CompletedProcess(args, proc.returncode, stdout, stderr),
                          s3["store"], "cannot connect")
    assert 12 <= gave_up < 60, gave_up  # the stage retries waited, then the run stopped
    assert not out.exists() and flow_run_state(cli_env["PREFECT_API_URL"], out) == "FAILED"
    tries = pti_tries(cli_env["PREFECT_API_URL"], out)

    # 3. The server is back: the next start goes on after the edit stage.
    s3["proxy"].start()
    again = run_cli(args, s3["env"], tmp_path)
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert summary["reused_stages"] == [*BEFORE_PTI, "pti", "edit[age+2]"]
    if tries > 1:  # the outage failed a try of PTI: Prefect's retry went on from the checkpoint
        assert 0 < summary["pti"]["resumed_from_step"] < 15
    else:  # botocore's own retries of one request (random backoff, up to 15 s) outlasted the outage
        assert summary["pti"]["resumed_from_step"] == 0
    np.testing.assert_array_equal(frames(out), frames(reference["out"]))
    assert_no_partial_artifact(s3["objects"](), reference)


# --- the S3 server refuses PTI's last write --------------------------------------------------------


class RefusingProxy(ThreadingHTTPServer):
    """An HTTP proxy on loopback in front of the S3 server that answers ``503 SlowDown`` to the first
    ``refusals`` PUTs of objects whose key matches ``pattern``, as a busy S3 does, and passes every other
    request through as it came (its Host header too, so that its signature holds).

    Args:
        upstream: the S3 server's URL.
        pattern: a glob over object keys (``PurePosixPath.match``).
        refusals: how many of their PUTs to refuse; :attr:`refused` counts those refused so far.
    """

    daemon_threads = True

    def __init__(self, upstream: str, pattern: str, refusals: int):
        super().__init__(("127.0.0.1", 0), _RefusingHandler)
        self.upstream = upstream.removeprefix("http://")
        self.pattern, self.refusals, self.refused = pattern, refusals, 0
        self._lock = threading.Lock()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def refuses(self, method: str, path: str) -> bool:
        """Whether to refuse this request (counted as refused when so)."""
        key = urllib.parse.unquote(urllib.parse.urlsplit(path).path)
        with self._lock:
            if method != "PUT" or not PurePosixPath(key).match(self.pattern) or self.refused >= self.refusals:
                return False
            self.refused += 1
            return True


class _RefusingHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as boto3 expects
    server: RefusingProxy
    _HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "expect"}
    """Not passed on: the handler has read the whole request (answering ``Expect: 100-continue`` itself)."""

    def _forward(self) -> None:
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            self.send_error(501, "chunked requests are not proxied")
            return
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.server.refuses(self.command, self.path):
            error = b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code>" \
                    b"<Message>Please reduce your request rate.</Message></Error>"
            self._answer(503, [("Content-Type", "application/xml")], error)
            return
        upstream = http.client.HTTPConnection(self.server.upstream, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in self._HOP_BY_HOP}
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            answer = response.read()
            kept = [(k, v) for k, v in response.getheaders() if k.lower() not in self._HOP_BY_HOP]
            self._answer(response.status, kept, answer)
        finally:
            upstream.close()

    def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.send_response_only(status)
        for name, value in headers:
            if self.command == "HEAD" or name.lower() != "content-length":  # a HEAD keeps the object's length
                self.send_header(name, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self.end_headers()

    do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _forward

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        pass


SLOWDOWNS = 5
"""botocore tries a request 5 times (the store's ``max_attempts``, botocore's ``total_max_attempts``): 5 refusals
make one failed store write, and the stage's task fails once."""


def test_a_failed_last_write_of_pti_is_retried_without_tuning_again(
        s3_before_pti: dict, s3_env, clip: Path, cli_env: dict[str, str], reference: dict, tmp_path: Path) -> None:
    proxy = RefusingProxy(s3_env.endpoint_url, "*/pti/*/generator.safetensors", refusals=SLOWDOWNS)
    try:
        out = tmp_path / "edited.mp4"
        result = run_cli(edit_args(clip, out, s3_before_pti["store"]), env_through(proxy.url, s3_env, cli_env),
                         tmp_path)
    finally:
        proxy.shutdown()
        proxy.server_close()
    assert result.returncode == 0, result.stderr
    assert proxy.refused == SLOWDOWNS  # the stage's first try failed on its generator, the retry wrote it
    summary = json.loads(result.stdout)
    assert summary["reused_stages"] == BEFORE_PTI
    # The retry went on from the finished state checkpointed before the stage's writes: no step taken again.
    assert summary["pti"]["resumed_from_step"] == summary["pti"]["steps"] == 15
    objects = s3_before_pti["objects"]()
    [generator] = [key for key in objects if PurePosixPath(key).match("pti/*/generator.safetensors")]
    assert objects[generator] == (reference["store"] / generator).read_bytes()  # bit for bit the undisturbed one
    assert not [key for key in objects if key.endswith("/checkpoint.safetensors")]
    np.testing.assert_array_equal(frames(out), frames(reference["out"]))
    assert_no_partial_artifact(objects, reference)


# --- the disk fills up ------------------------------------------------------------------------------


@functools.cache
def _can_mount_tmpfs() -> bool:
    """Whether this machine lets us mount a tmpfs in user and mount namespaces of our own (no root)."""
    if not (shutil.which("unshare") and shutil.which("nsenter")):
        return False
    with tempfile.TemporaryDirectory() as folder:
        probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs '{folder}'"],
                               capture_output=True, check=False)
    return probe.returncode == 0


class SmallDisk:
    """A folder on a disk with ``free_kib`` KiB left, for the commands :meth:`run` starts.

    A tmpfs mounted over the folder in mount (and user) namespaces of its own, kept alive by a sleeping
    process; commands enter them with ``nsenter``, and the test reads the folder through that
    process's ``/proc/PID/root``. Most of the tmpfs is taken by a ballast file: :meth:`free` deletes
    it, as someone freeing space would. Where namespaces are not allowed, a file size limit
    (RLIMIT_FSIZE, SIGXFSZ ignored so writes fail with EFBIG) on the commands stands in for the disk.

    Args:
        folder: the folder to create; the commands see it on the small disk.
        free_kib: space left for them, or with the fallback the size no file they write may pass.
    """

    SIZE_KIB = 32 * 1024

    def __init__(self, folder: Path, free_kib: int):
        self.folder = folder
        self.free_kib: int | None = free_kib
        """None once :meth:`free` has made room."""
        folder.mkdir(parents=True)
        self.keeper = None
        if _can_mount_tmpfs():
            script = f"mount -t tmpfs -o size={self.SIZE_KIB}k tmpfs '{folder}' && echo mounted && exec sleep 3600"
            self.keeper = subprocess.Popen(["unshare", "-rm", "sh", "-c", script], stdout=subprocess.PIPE,
                                           text=True)
            assert self.keeper.stdout.readline() == "mounted\n"
            with open(self.view / "ballast", "wb") as f:
                os.posix_fallocate(f.fileno(), 0, (self.SIZE_KIB - free_kib) * 1024)

    @property
    def view(self) -> Path:
        """The folder as the commands see it, from outside."""
        return Path(f"/proc/{self.keeper.pid}/root{self.folder}") if self.keeper else self.folder

    def files(self) -> list[str]:
        """What the folder holds (the ballast left out), as seen by the commands."""
        return sorted(p.relative_to(self.view).as_posix() for p in self.view.rglob("*")
                      if p.relative_to(self.view).as_posix() != "ballast")

    def run(self, args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
        """The CLI, seeing the small disk."""
        if self.keeper:
            command = ["nsenter", "-t", str(self.keeper.pid), "-U", "-m", "--preserve-credentials", f"--wd={cwd}",
                       sys.executable, "-m", "flows.cli", *args]
            return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=600, check=False)
        limit = None if self.free_kib is None else self.free_kib * 1024

        def limit_file_size() -> None:
            if limit is not None:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        return subprocess.run([sys.executable, "-m", "flows.cli", *args], env=env, cwd=cwd, capture_output=True,
                              text=True, timeout=600, preexec_fn=limit_file_size, check=False)

    def free(self) -> None:
        """Make room: delete the ballast, or lift the file size limit."""
        if self.keeper:
            (self.view / "ballast").unlink()
        self.free_kib = None

    def close(self) -> None:
        if self.keeper:
            self.keeper.kill()
            self.keeper.wait()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[int], SmallDisk]]:
    """Makes a :class:`SmallDisk` at ``tmp_path/disk``; unmounted at the end."""
    disks = []

    def make(free_kib: int) -> SmallDisk:
        disks.append(SmallDisk(tmp_path / "disk", free_kib))
        return disks[-1]

    yield make
    for disk in disks:
        disk.close()


_WRITE_UNDER_A_FILE_SIZE_LIMIT = """
import resource, sys
from fractions import Fraction
import numpy as np
from stitchtime_core.config import OutputConfig
from stitchtime_core.video import VideoWriter
resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))
noise = np.random.default_rng(0).integers(0, 256, (30, 64, 64, 3), dtype=np.uint8)  # does not compress
try:
    with VideoWriter(sys.argv[1], width=64, height=64, fps=Fraction(25), config=OutputConfig()) as writer:
        for frame in noise:
            writer.write(frame)
except Exception as exc:
    print(type(exc).__name__, exc)
"""


def test_a_file_size_limit_that_kills_ffmpeg_is_named_as_such(tmp_path: Path) -> None:
    # `ulimit -f`: Python ignores SIGXFSZ, but its children get the default back, and it kills ffmpeg.
    out = tmp_path / "out.mp4"
    result = subprocess.run([sys.executable, "-c", _WRITE_UNDER_A_FILE_SIZE_LIMIT, str(out)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.stdout == f"InputError {out}: cannot be written (File too large)\n", result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_under_the_output_stops_the_run_with_one_line_and_leaves_nothing_there(
        small_disk: Callable[[int], SmallDisk], clip: Path, cli_env: dict[str, str], reference: dict,
        tmp_path: Path) -> None:
    disk = small_disk(16)  # the video takes about 30 KiB; its summary and config would fit
    store, out = tmp_path / "store", disk.folder / "out" / "edited.mp4"
    (disk.view / "out").mkdir()
    copy_stages(reference, store, BEFORE_RENDER)

    # 1. Rendering: ffmpeg runs out of space (it exits 0 all the same in ffmpeg 5).
    result = disk.run(edit_args(clip, out, store), cli_env, tmp_path)
    problem = "no space left on device" if disk.keeper else "file too large"
    assert_one_error_line(result, str(out), problem)
    assert disk.files() == ["out"]  # no partial video, no temp file, no summary
    assert not any(store.glob("render/*/done.json"))
    assert_no_partial_artifact(folder_files(store), reference)

    # 2. Somewhere with room: every stage before rendering is reused.
    roomy = tmp_path / "roomy" / "edited.mp4"
    roomy.parent.mkdir()
    result = run_cli(edit_args(clip, roomy, store), cli_env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["reused_stages"] == [*BEFORE_PTI, "pti", "edit[age+2]", "stitch[age+2]"]
    np.testing.assert_array_equal(frames(roomy), frames(reference["out"]))

    # 3. The small disk again: now the stored video is copied there, and that copy runs out of space.
    result = disk.run(edit_args(clip, out, store), cli_env, tmp_path)
    assert_one_error_line(result, str(out), problem)
    assert disk.files() == ["out"]


def test_a_temporary_folder_without_room_for_the_crops_stops_pti_with_one_line(
        small_disk: Callable[[int], SmallDisk], clip: Path, cli_env: dict[str, str], reference: dict,
        tmp_path: Path) -> None:
    """PTI reads the crops from a file in $TMPDIR, mapped into memory (so memory does not grow with the clip):
    a folder without room for it (15 crops of 12 KiB) ends the run with one line naming the folder."""
    disk = small_disk(16)
    store, out = tmp_path / "store", tmp_path / "out" / "edited.mp4"
    out.parent.mkdir()
    copy_stages(reference, store, BEFORE_PTI)
    env = {**cli_env, "TMPDIR": str(disk.folder)}

    result = disk.run(edit_args(clip, out, store), env, tmp_path)
    problem = "no space left on device" if disk.keeper else "file too large"
    assert_one_error_line(result, f"{disk.folder}: cannot hold the aligned crops PTI reads", problem, "set TMPDIR")
    assert crops_files(disk) == []  # the crops' file had no name, and went with the run
    assert list(out.parent.iterdir()) == [] and not any(store.glob("pti/*/done.json"))

    disk.free()
    result = disk.run(edit_args(clip, out, store), env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["reused_stages"] == BEFORE_PTI
    np.testing.assert_array_equal(frames(out), frames(reference["out"]))
    assert crops_files(disk) == []


def crops_files(disk: SmallDisk) -> list[str]:
    """What the run left in its temporary folder, but for torch's own caches (torch puts them there)."""
    return [name for name in disk.files() if not name.startswith("torchinductor_")]


def test_a_full_disk_while_the_report_is_written_leaves_none_of_the_run_s_outputs(
        small_disk: Callable[[int], SmallDisk], clip: Path, cli_env: dict[str, str], reference: dict,
        tmp_path: Path) -> None:
    """The video (about 30 KiB), its config and summary fit; the report (about 60 KiB) does not. A run's
    outputs appear together or not at all: a batch takes a video with a summary for done."""
    report_size = (reference["out"].with_name("reference.report.html")).stat().st_size
    video_size = reference["out"].stat().st_size
    free = video_size // 1024 + 24  # KiB: room for the video and the JSON files (under 8 KiB), not the report
    assert free * 1024 < report_size, (video_size, report_size)
    disk = small_disk(free)
    store, out = tmp_path / "store", disk.folder / "out" / "edited.mp4"
    (disk.view / "out").mkdir()
    (disk.view / "out" / "edited.summary.json").write_text("{}")  # an earlier run's
    copy_stages(reference, store, BEFORE_RENDER)

    result = disk.run(edit_args(clip, out, store), cli_env, tmp_path)
    problem = "no space left on device" if disk.keeper else "file too large"
    assert_one_error_line(result, str(out.with_name("edited.report.html")), problem)
    assert disk.files() == ["out", "out/edited.summary.json"]  # no video, config or report; the earlier summary
    assert (disk.view / "out" / "edited.summary.json").read_text() == "{}"


def test_a_full_disk_under_the_store_stops_the_run_and_the_next_start_with_room_goes_on(
        small_disk: Callable[[int], SmallDisk], clip: Path, cli_env: dict[str, str], reference: dict,
        tmp_path: Path) -> None:
    disk = small_disk(2048)  # PTI's checkpoint (its generator and optimiser state) takes 3 MiB
    store, out = disk.folder / "store", tmp_path / "edited.mp4"
    copy_stages(reference, disk.view / "store", BEFORE_PTI)
    args = edit_args(clip, out, store)

    result = disk.run(args, cli_env, tmp_path)
    problem = "no space left on device" if disk.keeper else "file too large"
    assert_one_error_line(result, f"{store}/pti/", "checkpoint.safetensors: cannot write", problem)
    assert not out.exists()
    assert not any((disk.view / "store").glob("pti/*/*.safetensors"))
    assert_no_partial_artifact(folder_files(disk.view / "store"), reference)

    disk.free()
    again = disk.run(args, cli_env, tmp_path)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["reused_stages"] == BEFORE_PTI
    np.testing.assert_array_equal(frames(out), frames(reference["out"]))
    assert_no_partial_artifact(folder_files(disk.view / "store"), reference)
