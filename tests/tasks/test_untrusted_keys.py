"""Names from a library listing cannot reach outside the library, its destination or the staging folder.

A library's object names are not ours: whoever can write into the bucket (or the folder) chooses them,
and S3 takes any key, ``../x.mp4``, ``a//b.mp4``, a backslash or a NUL included. Every library function
that turns a name into a path or a key refuses such a name, and a batch reports the video as failed,
with a clear reason, while the other videos go on; nothing is read or written outside the roots.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import boto3
import pytest
from cli_runner import run_cli

from stitchtime_core.errors import InputError
from tasks import library

BAD_NAMES = {
    "parent": "../evil.mp4",
    "parents-inside": "a/../../up.mp4",
    "absolute": "/etc/passwd.mp4",
    "backslash": "a\\..\\..\\evil.mp4",
    "empty-segment": "a//x.mp4",
    "dot-segment": "./dot.mp4",
    "trailing-slash": "folder.mp4/",
    "nul": "nul\x00.mp4",
}
"""Listed names that must never become a path or a key (S3 stores all of them as they are)."""


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


def _s3(server) -> boto3.client:
    return boto3.session.Session().client("s3", endpoint_url=server.endpoint_url, region_name=server.region,
                                          aws_access_key_id=server.access_key_id,
                                          aws_secret_access_key=server.secret_access_key)


def _bucket_keys(server) -> set[str]:
    pages = _s3(server).get_paginator("list_objects_v2").paginate(Bucket=server.bucket)
    return {obj["Key"] for page in pages for obj in page.get("Contents", [])}


@pytest.fixture
def roots(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    """A library (source) and a destination URI of one backend, inside a sandbox folder or prefix."""
    if request.param == "file":
        deep = tmp_path / "sandbox" / "deep"
        (deep / "lib").mkdir(parents=True)
        return {"source": str(deep / "lib"), "dest": str(deep / "out")}
    server = request.getfixturevalue("s3_env")
    prefix = f"s3://{server.bucket}/keys-{uuid.uuid4().hex[:8]}"
    return {"source": f"{prefix}/deep/lib", "dest": f"{prefix}/deep/out"}


@pytest.mark.parametrize("roots", ["file", "s3"], indirect=True)
def test_no_library_function_turns_a_bad_name_into_a_path_or_key(roots: dict[str, str], tmp_path: Path,
                                                                  request: pytest.FixtureRequest) -> None:
    staging = tmp_path / "staging"
    staging.mkdir()
    output = staging / "x.mp4"
    output.write_bytes(b"an output")
    before = _files(tmp_path)
    s3 = request.getfixturevalue("s3_env") if roots["source"].startswith("s3://") else None
    keys_before = _bucket_keys(s3) if s3 else set()
    for name in BAD_NAMES.values():
        with pytest.raises(InputError) as refused:
            library.check_name(roots["source"], name)
        assert repr(name) in str(refused.value) and "outside the library" in str(refused.value)
        assert refused.value.path == library.display(roots["source"], name)
        calls = [
            (library.local_source, roots["source"], name, staging),
            (library.local_output, roots["dest"], name, staging),
            (library.is_done, roots["dest"], name, "ok.mp4", "x.summary.json"),
            (library.deliver, roots["dest"], name, [output], staging),
        ]
        for call, *args in calls:
            with pytest.raises(ValueError, match="artifact key"):
                call(*args)
                pytest.fail(f"{call.__name__} took the name {name!r}")
    assert _files(tmp_path) == before  # nothing written, locally or in a file store
    if s3:
        assert _bucket_keys(s3) == keys_before


def test_a_listing_stays_inside_its_prefix_and_keeps_bad_names_to_report(s3_env) -> None:
    prefix = f"keys-{uuid.uuid4().hex[:8]}"
    s3 = _s3(s3_env)
    for key in [f"{prefix}/raw/{name}" for name in BAD_NAMES.values()] + [
            f"{prefix}/raw/ok.mp4", f"{prefix}/raw-other/sibling.mp4", f"{prefix}/outside.mp4"]:
        s3.put_object(Bucket=s3_env.bucket, Key=key, Body=b"not a video")
    names = library.list_library(f"s3://{s3_env.bucket}/{prefix}/raw").videos
    assert names == sorted([*BAD_NAMES.values(), "ok.mp4"])  # listed, to be reported; nothing from beside it


def test_a_file_library_reports_a_backslash_name(tmp_path: Path) -> None:
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "a\\b.mp4").write_bytes(b"x")  # a legal file name on POSIX, refused as a key
    [name] = library.list_library(str(tmp_path / "lib")).videos
    with pytest.raises(InputError, match="backslashes") as refused:
        library.check_name(str(tmp_path / "lib"), name)
    assert refused.value.path == f"{tmp_path / 'lib'}/a\\b.mp4"


# --- the batch, through the command line -----------------------------------------------------------


def _cli(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return run_cli(args, env, cwd)


def test_a_batch_over_bad_s3_names_reports_each_and_edits_the_rest(s3_server, prefect_server: str,
                                                                   tmp_path: Path) -> None:
    prefix = f"batch-keys-{uuid.uuid4().hex[:8]}"
    s3 = _s3(s3_server)
    for name in [*BAD_NAMES.values(), "fine/corrupt.mp4"]:
        s3.put_object(Bucket=s3_server.bucket, Key=f"{prefix}/raw/{name}", Body=b"\x00\x00\x00\x18ftypmp42broken")
    keys_before = _bucket_keys(s3_server)
    work = tmp_path / "work"
    dest = work / "a" / "b" / "out"  # where a '..' would land: work/a/b, work/a, work
    dest.mkdir(parents=True)
    env = {**os.environ, **s3_server.env, "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
           "PREFECT_API_URL": prefect_server, "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp_path / "results")}
    result = _cli(["batch", f"s3://{s3_server.bucket}/{prefix}/raw", "--edit", "age=1", "--out", str(dest),
                   "--store", str(work / "a" / "b" / "store"), "--json"], tmp_path, env)
    assert result.returncode == 1, result.stderr  # every video failed, and the batch ran to its end
    assert "Traceback" not in result.stderr
    summary = json.loads(result.stdout)
    status = {video["name"]: video for video in summary["videos"]}
    assert set(status) == {*BAD_NAMES.values(), "fine/corrupt.mp4"}
    assert all(video["status"] == "failed" for video in summary["videos"])
    assert "not a readable video" in status["fine/corrupt.mp4"]["error"]  # it went through the pipeline
    for name in status.keys() - {"fine/corrupt.mp4"}:
        error = status[name]["error"]
        assert f"refused the name {name!r}" in error and "outside the library" in error, error
        assert status[name]["source"] == f"s3://{s3_server.bucket}/{prefix}/raw/{name}"
    assert _bucket_keys(s3_server) == keys_before  # the library is only read
    assert {p for p in _files(work) if not p.startswith(("a/b/out", "a/b/store"))} == {"a", "a/b"}
    assert {p for p in _files(dest) if (dest / p).is_file()} == {"stitchtime-batch.summary.json"}
