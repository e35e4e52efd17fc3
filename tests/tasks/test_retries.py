"""Which failures of a stage task Prefect retries, on a real Prefect server: those that may pass (the store or
the network away for a moment), never those that fail the same way again (a bad input, a value out of range)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect import flow
from prefect.settings import PREFECT_API_URL, temporary_settings

from stitchtime_core.errors import InputError, StoreError
from tasks.stages.base import retrying
from tasks.store import FileStore

ATTEMPTS: list[str] = []


def _raise(kind: str) -> None:
    if kind == "json-nan":
        json.dumps(float("nan"), allow_nan=False)  # what a NaN in a stage's info raised before settings were checked
    errors = {
        "overflow": OverflowError("cannot convert float infinity to integer"),
        "bad-input": InputError("clip.mp4", "has no video stream"),
        "store-refused": StoreError("s3://bucket: access denied", transient=False),
        "store-away": StoreError("s3://bucket: connection refused", transient=True),
        "os": ConnectionResetError("connection reset by peer"),
        "runtime": RuntimeError("CUDA out of memory"),
    }
    raise errors[kind]


@retrying(name="flaky", retry_delay_seconds=0)
def flaky(kind: str) -> None:
    ATTEMPTS.append(kind)
    _raise(kind)


@flow(name="retries")
def run_flaky(kind: str) -> None:
    flaky(kind)


@pytest.fixture
def prefect_api(prefect_server: str) -> Iterator[str]:
    with temporary_settings({PREFECT_API_URL: prefect_server}):
        yield prefect_server


@pytest.mark.parametrize("kind, attempts", [
    ("json-nan", 1), ("overflow", 1), ("bad-input", 1), ("store-refused", 1),
    ("store-away", 3), ("os", 3), ("runtime", 3),
])
def test_only_failures_that_may_pass_are_retried(kind: str, attempts: int, prefect_api: str) -> None:
    ATTEMPTS.clear()
    with pytest.raises(Exception):
        run_flaky(kind)
    assert ATTEMPTS == [kind] * attempts


@retrying(name="write", retry_delay_seconds=0)
def write(root: str) -> None:
    ATTEMPTS.append(root)
    FileStore(root).put_json("probe/k/probe.json", {"frames": 1})


@flow(name="write-to-store")
def run_write(root: str) -> None:
    write(root)


def test_a_store_folder_that_is_a_file_is_tried_once(tmp_path: Path, prefect_api: str) -> None:
    (tmp_path / "afile").write_text("not a folder")
    ATTEMPTS.clear()
    with pytest.raises(StoreError) as error:
        run_write(str(tmp_path / "afile"))
    assert str(error.value) == f"{tmp_path / 'afile'}: the store folder is a file, not a folder"
    assert ATTEMPTS == [str(tmp_path / "afile")]
