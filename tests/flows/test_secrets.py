"""S3 credentials and Prefect API keys never reach logs, summaries, reports, results or error messages.

Real CLI runs carry recognisable secrets in every place credentials are given: working temporary S3
credentials (key id, secret and session token from the S3 server's STS), a password in the endpoint
URL, a Prefect API key and auth string, then wrong credentials, and credentials in the store URI.
Everything the runs wrote or sent is then searched for each secret, raw, URL- and JSON-escaped, and
inside base64 (Prefect keeps results as base64): the CLI's output, the output folder, the whole S3
prefix, Prefect's local results and home, and all the Prefect server holds, through its API and in
its database file.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, quote_plus, urlsplit

import boto3
import httpx
import pytest

from stitchtime_core.errors import StoreError
from stitchtime_core.sample_clip import make_sample_clip
from tasks.store import S3Store
from cli_runner import run_cli

FAST = ["--set", "stitching.steps=2", "--ablation", "no-pti"]
"""Few steps and no generator tuning: the runs are about where things are written, not the edit."""
WRONG_KEY_ID = "AKIAFAKESECRETTEST123"
WRONG_SECRET = "fake/Secret+Key/StitchtimeTest0123456789"
URI_KEY_ID = "AKIAFAKEURIKEYTEST456"
URI_SECRET = "fake/Uri+Secret/StitchtimeTest9876543210"


@dataclass(frozen=True)
class Secrets:
    """The recognisable secrets the runs are given (the working ones made for this module)."""

    key_id: str
    secret_key: str
    session_token: str
    endpoint_password: str
    prefect_api_key: str
    prefect_auth_string: str
    server_key_id: str
    """The S3 server's own user, whose keys made the temporary ones (other tests use them too)."""
    server_secret_key: str

    def all(self) -> dict[str, str]:
        """Every secret by name, the fixed wrong ones included."""
        return dict(vars(self)) | {"wrong key id": WRONG_KEY_ID, "wrong secret": WRONG_SECRET,
                                   "key id in the URI": URI_KEY_ID, "secret in the URI": URI_SECRET}


def _s3(server, **credentials: str):
    """A boto3 S3 client of the server, with the server user's keys unless others are given."""
    return boto3.session.Session(**(credentials or {
        "aws_access_key_id": server.access_key_id, "aws_secret_access_key": server.secret_access_key,
    })).client("s3", endpoint_url=server.endpoint_url, region_name=server.region)


def _temporary_credentials(server) -> dict[str, str]:
    """Working temporary credentials with a session token: a role assumed through the server's STS."""
    session = boto3.session.Session(aws_access_key_id=server.access_key_id,
                                    aws_secret_access_key=server.secret_access_key)
    iam = session.client("iam", endpoint_url=server.endpoint_url, region_name=server.region)
    role = f"stitchtime-secrets-{uuid.uuid4().hex[:8]}"
    trust = {"Version": "2012-10-17",
             "Statement": [{"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"}]}
    arn = iam.create_role(RoleName=role, AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
    allow_all = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
    iam.put_role_policy(RoleName=role, PolicyName="all", PolicyDocument=json.dumps(allow_all))
    sts = session.client("sts", endpoint_url=server.endpoint_url, region_name=server.region)
    credentials = sts.assume_role(RoleArn=arn, RoleSessionName="stitchtime-secrets")["Credentials"]
    return {"aws_access_key_id": credentials["AccessKeyId"], "aws_secret_access_key": credentials["SecretAccessKey"],
            "aws_session_token": credentials["SessionToken"]}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("secrets")
    make_sample_clip(folder / "clip.mp4", seconds=0.4, size=(160, 160))
    return folder


@pytest.fixture(scope="module")
def secrets(s3_server) -> Secrets:
    temporary = _temporary_credentials(s3_server)
    _s3(s3_server, **temporary).list_objects_v2(Bucket=s3_server.bucket, MaxKeys=1)  # they work, token included
    tag = uuid.uuid4().hex[:12]
    return Secrets(key_id=temporary["aws_access_key_id"], secret_key=temporary["aws_secret_access_key"],
                   session_token=temporary["aws_session_token"], endpoint_password=f"EndpointPassw0rd{tag}",
                   prefect_api_key=f"pnu_FAKEPREFECTKEY{tag}", prefect_auth_string=f"admin:FakeAuthString{tag}",
                   server_key_id=s3_server.access_key_id, server_secret_key=s3_server.secret_access_key)


@pytest.fixture(scope="module")
def prefix() -> str:
    """The runs' S3 prefix; recognisable too, as the control that the searches find what is there."""
    return f"secrets-{uuid.uuid4().hex[:12]}"


def _env(s3_server, secrets: Secrets, prefect_server: str, workdir: Path) -> dict[str, str]:
    endpoint = urlsplit(s3_server.endpoint_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PREFECT_"))}
    return {**env,
            "AWS_ENDPOINT_URL": f"http://stitchtime:{secrets.endpoint_password}@{endpoint.netloc}",
            "AWS_ACCESS_KEY_ID": secrets.key_id, "AWS_SECRET_ACCESS_KEY": secrets.secret_key,
            "AWS_SESSION_TOKEN": secrets.session_token, "AWS_DEFAULT_REGION": s3_server.region,
            "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "PREFECT_API_URL": prefect_server, "PREFECT_API_KEY": secrets.prefect_api_key,
            "PREFECT_API_AUTH_STRING": secrets.prefect_auth_string,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
            "PREFECT_HOME": str(workdir / "prefect-home"),
            "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(workdir / "prefect-results")}


@pytest.fixture(scope="module")
def runs(s3_server, secrets: Secrets, prefect_server: str, workdir: Path, prefix: str
         ) -> dict[str, subprocess.CompletedProcess]:
    """A working edit against S3, one with wrong credentials, one with credentials in the store URI."""
    env = _env(s3_server, secrets, prefect_server, workdir)
    store = f"s3://{s3_server.bucket}/{prefix}/store"
    clip = str(workdir / "clip.mp4")
    results = {}
    (workdir / "out").mkdir()
    # Verbose: Prefect's own log lines go to stderr as well, and are searched too.
    results["working"] = run_cli(["edit", clip, "--edit", "age=2", "--out", str(workdir / "out" / "edited.mp4"),
                                  "--store", store, "--json", "-v", *FAST], env=env, cwd=workdir)
    wrong = {**env, "AWS_ACCESS_KEY_ID": WRONG_KEY_ID, "AWS_SECRET_ACCESS_KEY": WRONG_SECRET}
    del wrong["AWS_SESSION_TOKEN"]
    results["wrong credentials"] = run_cli(["edit", clip, "--edit", "age=2", "--out", str(workdir / "out" / "w.mp4"),
                                            "--store", f"{store}-wrong", *FAST], env=wrong, cwd=workdir)
    in_uri = f"s3://{URI_KEY_ID}:{quote(URI_SECRET, safe='')}@{s3_server.bucket}/{prefix}/uri"
    results["credentials in the URI"] = run_cli(["edit", clip, "--edit", "age=2", "--out",
                                                 str(workdir / "out" / "u.mp4"), "--store", in_uri, *FAST],
                                                env=env, cwd=workdir)
    return results


def test_the_working_run_succeeds_with_every_secret_in_place(runs: dict[str, subprocess.CompletedProcess],
                                                             workdir: Path) -> None:
    result = runs["working"]
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["outputs"][0]["output"] == str(workdir / "out" / "edited.mp4")


@pytest.mark.parametrize("run, problem", [("wrong credentials", "access denied (check the credentials"),
                                          ("credentials in the URI", "does not name a valid S3 bucket")])
def test_a_refused_run_fails_in_one_clear_line(run: str, problem: str, runs: dict[str, subprocess.CompletedProcess],
                                               workdir: Path) -> None:
    result = runs[run]
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and problem in errors[0], result.stderr
    assert not (workdir / "out" / ("w.mp4" if run == "wrong credentials" else "u.mp4")).exists()


def test_an_unreachable_endpoint_error_masks_the_endpoint_password(s3_env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://stitchtime:EndpointPassw0rdUnreachable@127.0.0.1:9")
    with pytest.raises(StoreError) as refused:
        S3Store(s3_env.bucket, max_attempts=1).exists("k")
    assert "cannot connect to http://***@127.0.0.1:9" in str(refused.value)
    assert "EndpointPassw0rdUnreachable" not in str(refused.value)


# --- searching everything the runs left ------------------------------------------------------------


def _forms(secret: str) -> set[bytes]:
    """The spellings a secret may take: raw, URL-encoded, JSON- and shell-escaped, and each of those inside
    base64 (Prefect keeps results and records as base64)."""
    texts = {secret, quote(secret, safe=""), quote(secret), quote_plus(secret), json.dumps(secret)[1:-1],
             secret.replace("/", "\\/")}
    plain = {text.encode() for text in texts}
    return plain | {encoded for text in plain for encoded in _in_base64(text)}


def _in_base64(data: bytes) -> set[bytes]:
    """What ``data`` looks like inside any base64 text: its encoding at each of the 3 offsets it may start
    at in a 3-byte group, keeping only the characters whose 6 bits all come from ``data``."""
    forms = set()
    for offset in range(3):
        encoded = base64.b64encode(bytes(offset) + data)
        forms.add(encoded[-(-8 * offset // 6):8 * (offset + len(data)) // 6])
    return forms


def _leaks(blobs: dict[str, bytes], secrets: dict[str, str]) -> list[str]:
    """``secret name in where`` for every secret that any blob holds in any form."""
    forms = {name: _forms(secret) for name, secret in secrets.items()}
    return sorted({f"{name} in {where}" for where, blob in blobs.items() for name in secrets
                   if any(form in blob for form in forms[name])})


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _s3_objects(server, prefix: str) -> dict[str, bytes]:
    s3 = _s3(server)
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=server.bucket, Prefix=f"{prefix}/")
    keys = [obj["Key"] for page in pages for obj in page.get("Contents", [])]
    return {f"s3://{server.bucket}/{key}": s3.get_object(Bucket=server.bucket, Key=key)["Body"].read() for key in keys}


_SERVER_COLLECTIONS = ["flow_runs", "task_runs", "logs", "artifacts", "block_documents", "variables", "deployments",
                       "flows", "work_pools", "automations", "concurrency_limits"]


def _server_records(api: str) -> dict[str, bytes]:
    """All the Prefect server holds, as its API returns it: runs with their parameters and states, logs,
    artifacts, block documents with their secrets, variables, events."""
    pages = {}
    with httpx.Client(base_url=api, timeout=60) as http:
        for collection in _SERVER_COLLECTIONS:
            offset = 0
            while True:
                body = {"offset": offset, "limit": 200}
                if collection == "block_documents":
                    body["include_secrets"] = True
                response = http.post(f"/{collection}/filter", json=body)
                response.raise_for_status()
                pages[f"server {collection} from {offset}"] = response.content
                if len(response.json()) < 200:
                    break
                offset += 200
        response = http.post("/events/filter", json={"limit": 50})  # the most a page may hold
        while True:
            response.raise_for_status()
            page = response.json()
            pages[f"server events {len(pages)}"] = response.content
            if not page.get("next_page"):
                break
            response = http.get(page["next_page"])
    return pages


def _server_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The Prefect server's database and log (the session's server keeps them in its PREFECT_HOME)."""
    homes = [home for home in tmp_path_factory.getbasetemp().glob("prefect-home*") if (home / "prefect.db").is_file()]
    assert homes, "the Prefect server's database was not found"
    return {str(p): p.read_bytes() for home in homes for p in home.iterdir()
            if p.is_file() and (p.name.startswith("prefect.db") or p.suffix == ".log")}


@pytest.fixture(scope="module")
def everything(runs: dict[str, subprocess.CompletedProcess], s3_server, prefect_server: str, workdir: Path,
               prefix: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, bytes]]:
    """Where the runs may have put a secret, by kind."""
    return {
        "cli output": {f"{run} {stream}": getattr(result, stream).encode() for run, result in runs.items()
                       for stream in ("stdout", "stderr")},
        "files": _files(workdir),  # outputs, summaries, configs, reports, PREFECT_HOME, local Prefect results
        "s3 prefix": _s3_objects(s3_server, prefix),
        "prefect server api": _server_records(prefect_server),
        "prefect server files": _server_files(tmp_path_factory),
    }


def test_the_searches_reach_what_the_runs_wrote(everything: dict[str, dict[str, bytes]], prefix: str,
                                                runs: dict[str, subprocess.CompletedProcess]) -> None:
    """The control: the runs' own recognisable strings are found where they belong, so a leak would be too."""
    flow_run_id = json.loads(runs["working"].stdout)["flow_run_id"]
    assert any(name.endswith("edited.summary.json") for name in everything["files"])
    assert any(name.endswith("edited.report.html") for name in everything["files"])
    assert any(name.endswith("done.json") for name in everything["s3 prefix"])
    for kind in ("prefect server api", "prefect server files"):
        assert _leaks(everything[kind], {"store prefix": prefix, "flow run": flow_run_id}), kind
    assert _leaks(everything["files"], {"store prefix": prefix})
    hidden = base64.b64encode(f"xx{prefix}yy".encode())
    assert _leaks({"base64": hidden}, {"store prefix": prefix}) == ["store prefix in base64"]


@pytest.mark.parametrize("kind", ["cli output", "files", "s3 prefix", "prefect server api", "prefect server files"])
def test_no_secret_is_anywhere(kind: str, everything: dict[str, dict[str, bytes]], secrets: Secrets) -> None:
    assert everything[kind], f"nothing was searched in {kind}"
    assert _leaks(everything[kind], secrets.all()) == []
