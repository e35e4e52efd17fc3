"""Prefect caching of the stage tasks, on the artifact store.

A stage task's Prefect cache key is its artifact key, and Prefect's record of the task's result (a
small :class:`StageRef`, as JSON) is kept in the artifact store beside the stage's artifacts, at
``{key}/prefect-result.json``. So:

- a re-run anywhere that shares the store (another machine, a GPU worker, the next nightly batch)
  finds the stage in Prefect's cache, and the task run ends in the ``Cached`` state;
- deleting a stage's artifacts deletes its cache entry with them, and a record whose stage has no
  ``done.json`` marker (artifacts partly removed, e.g. by an expiry rule) is not taken as a hit;
- Prefect never holds tensors, and reading a record never unpickles anything: a record that names any
  serializer but ours (one planted in a shared store, say) is treated as missing.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Callable
from typing import Any, Literal

from prefect._internal.compatibility.async_dispatch import async_dispatch
from prefect.filesystems import WritableFileSystem
from prefect.serializers import Serializer
from pydantic import Field

from tasks.store import ArtifactStore, open_store

log = logging.getLogger("stitchtime")

RECORD = "prefect-result.json"
"""A stage's Prefect result record, under the stage's key."""

MARKER = "done.json"
"""Written last by a stage: its artifacts are complete."""


@dataclasses.dataclass(frozen=True)
class StageRef:
    """What a stage task returns: where its artifacts are, and how it went."""

    stage: str
    key: str
    """Prefix of the stage's artifacts in the store."""
    reused: bool
    """True when an earlier run had already written this stage's output."""
    seconds: float
    """What the stage took in this run (the look-up, when reused)."""
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Small facts the flow reports (frame counts, losses); never tensors."""
    made_seconds: float = 0.0
    """What the stage took when its output was made, reused or not."""


@functools.lru_cache(maxsize=16)
def _store(uri: str) -> ArtifactStore:
    return open_store(uri)


def record_path(store_uri: str, key: str) -> str:
    """The Prefect cache key of a stage: its record's place, ``<store URI>/<stage key>/prefect-result.json``."""
    return f"{_store(store_uri).uri.rstrip('/')}/{key}/{RECORD}"


def _split(path: str) -> tuple[ArtifactStore, str]:
    """(store, stage key) of a :func:`record_path`: a stage key is ``stage/digest``."""
    store_uri, stage, digest, name = path.rsplit("/", 3)
    if name != RECORD:
        raise ValueError(f"{path!r} is not a stage's Prefect record")
    return _store(store_uri), f"{stage}/{digest}"


class StageResults(WritableFileSystem):
    """Prefect result storage that keeps each stage's record in the artifact store, beside its artifacts.

    A record only counts while its stage's ``done.json`` marker exists. The block has no settings (a
    record's path names its store); Prefect wants it saved on the server: see :func:`save_stage_results`.
    """

    _block_type_name = "stitchtime stage results"
    _block_type_slug = "stitchtime-stage-results"

    def _resolve_path(self, path: str) -> None:
        return None  # keys are full record paths already; Prefect must not make them relative to a folder

    async def aread_path(self, path: str) -> bytes | None:
        return self._read(path)

    @async_dispatch(aread_path)
    def read_path(self, path: str) -> bytes | None:
        return self._read(path)

    async def awrite_path(self, path: str, content: bytes) -> str:
        return self._write(path, content)

    @async_dispatch(awrite_path)
    def write_path(self, path: str, content: bytes) -> str:
        return self._write(path, content)

    @staticmethod
    def _read(path: str) -> bytes | None:
        store, key = _split(path)
        if not store.exists(f"{key}/{MARKER}") or not store.exists(f"{key}/{RECORD}"):
            return None
        content = store.get_bytes(f"{key}/{RECORD}")
        if not _is_stage_ref_record(content):
            log.warning("%s is not a stitchtime stage record: ignored, the stage runs again", store.url_for(key))
            return None
        return content

    @staticmethod
    def _write(path: str, content: bytes) -> str:
        store, key = _split(path)
        store.put_bytes(f"{key}/{RECORD}", content)
        return path


STAGE_RESULTS = "stitchtime-stage-results/artifact-store"
"""The saved :class:`StageResults` block, as stage tasks name their result storage."""


def save_stage_results() -> None:
    """Save the :class:`StageResults` block on the Prefect server (idempotent); a flow does it before its stage tasks."""
    StageResults().save(STAGE_RESULTS.split("/")[1], overwrite=True)


class StageRefSerializer(Serializer):
    """StageRefs as plain JSON: a record is read without importing or unpickling anything it names."""

    type: Literal["stitchtime-stage-ref"] = Field(default="stitchtime-stage-ref", frozen=True)

    def dumps(self, obj: StageRef) -> bytes:
        return json.dumps(dataclasses.asdict(obj), sort_keys=True).encode()

    def loads(self, blob: bytes) -> StageRef:
        return StageRef(**json.loads(blob))


_SERIALIZER_TYPE = StageRefSerializer.model_fields["type"].default


def _is_stage_ref_record(content: bytes) -> bool:
    """Whether a Prefect record names :class:`StageRefSerializer` as its serializer, and no other.

    Prefect decodes a record's result with whatever serializer the record itself names, pickle
    included: a record that someone else wrote into a shared store would run code when read. Only
    records of our own serializer are handed to Prefect; any other is treated as missing.
    """
    try:
        record = json.loads(content)
    except ValueError:  # not UTF-8 or not JSON
        return False
    metadata = record.get("metadata") if isinstance(record, dict) else None
    serializer = metadata.get("serializer") if isinstance(metadata, dict) else None
    # A top-level "serializer" is Prefect's older layout, which it still reads.
    return isinstance(serializer, dict) and serializer.get("type") == _SERIALIZER_TYPE and "serializer" not in record


def cache_key_fn(key_of: Callable[..., str]) -> Callable[[Any, dict[str, Any]], str | None]:
    """A stage task's ``cache_key_fn``: its record path from the stage key that ``key_of(**parameters)`` gives.

    ``key_of`` is the function the task itself derives its key with, so the two never disagree.
    """
    def key(context: Any, parameters: dict[str, Any]) -> str | None:
        try:
            return record_path(parameters["store_uri"], key_of(**parameters))
        except Exception:  # noqa: BLE001 - a bad input fails in the task itself, with its own message
            return None

    return key
