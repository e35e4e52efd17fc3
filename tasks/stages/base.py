"""What every stage shares: its reference, its key, its completion marker, and its Prefect task.

A stage's artifacts live under its key, ``<stage>/<digest>``: the digest of its ingredients (its
inputs' keys or content hashes, and its settings) and its code version. A stage writes its
artifacts, then, last, ``done.json``: that marker is the one cache. A stage whose marker exists is
done, so a re-run (on this machine or any other that shares the store) skips it, and a stage that
stopped half way runs again. Prefect caches nothing: a stage task that finds its marker ends in a
``Completed`` state named ``Cached``, so the Prefect UI shows the reuse as it shows its own cache hits.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
import typing
from collections.abc import Callable
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, State

import stitchtime_core
from stitchtime_core.artifacts import derive_key, file_hash
from stitchtime_core.config import to_dict
from stitchtime_core.errors import StitchtimeError, StoreError
from tasks.store import ArtifactStore

MARKER = "done.json"
"""Written last by a stage, under its key: its artifacts are complete. Holds its :class:`StageRef` facts."""

Ingredients = tuple[list[str], Any]
"""What a stage's key is made of: its inputs' keys or content hashes, in order, and its settings."""


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


@dataclasses.dataclass(frozen=True)
class Stage:
    """A stage's name and code version. Bump the version when the stage's code changes what it writes:
    its key, and every key downstream, change."""

    name: str
    version: int

    @property
    def code_version(self) -> str:
        return f"{stitchtime_core.__version__}/{self.version}"

    def key(self, ingredients: Ingredients) -> str:
        """The artifact key of this stage with these ingredients."""
        inputs, config = ingredients
        return derive_key(self.name, inputs=inputs, config=config, code_version=self.code_version)

    def make(self, store: ArtifactStore, ingredients: Ingredients,
             produce: Callable[[str], dict[str, Any]]) -> StageRef:
        """The stored stage when its marker exists, else ``produce(key)`` and then the marker.

        ``produce`` writes the stage's artifacts under ``key`` and returns the stage's small facts.
        """
        key = self.key(ingredients)
        start = time.perf_counter()
        done = self.reused(store, key)
        if done is not None:
            return done
        return self.finish(store, key, ingredients, produce(key), time.perf_counter() - start)

    def reused(self, store: ArtifactStore, key: str) -> StageRef | None:
        """The stored stage under ``key`` when its marker exists, else None."""
        start = time.perf_counter()
        if not store.exists(f"{key}/{MARKER}"):
            return None
        done = store.get_json(f"{key}/{MARKER}")
        return StageRef(self.name, key, True, time.perf_counter() - start, done.get("info", {}),
                        done.get("seconds", 0.0))

    def finish(self, store: ArtifactStore, key: str, ingredients: Ingredients, info: dict[str, Any],
               seconds: float) -> StageRef:
        """Write the stage's marker, last, once its artifacts under ``key`` are complete."""
        inputs, config = ingredients
        store.put_json(f"{key}/{MARKER}", {"stage": self.name, "inputs": inputs, "code_version": self.code_version,
                                           "config": None if config is None else to_dict(config), "info": info,
                                           "seconds": seconds})
        return StageRef(self.name, key, False, seconds, info, seconds)


DETERMINISTIC = (ValueError, TypeError, ArithmeticError, LookupError, AssertionError, AttributeError,
                 NotImplementedError)
"""Errors that come of the code and its inputs, not of the moment: a retry would fail the same way (a value out of
range, a NaN that JSON refuses, an overflow)."""


def _retry_unless_bad_input(task, task_run, state) -> bool:  # noqa: ANN001 - Prefect's hook signature
    """Retry failures that may pass (a store that is down, the network, a device out of memory); never a bad
    input, a missing bucket, refused credentials or a :data:`DETERMINISTIC` error, which fail the same way again."""
    try:
        state.result()
    except StitchtimeError as exc:
        return isinstance(exc, StoreError) and exc.transient
    except DETERMINISTIC:
        return False
    except Exception:  # noqa: BLE001 - anything else may be transient
        return True
    return False


retrying = functools.partial(task, retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=_retry_unless_bad_input,
                             cache_policy=NO_CACHE, persist_result=False)
"""A Prefect task that retries what may pass (see :func:`_retry_unless_bad_input`) and caches nothing."""


def stage_task(name: str) -> Callable[[Callable[..., Any]], Any]:
    """The Prefect task of a stage: when ``body`` returns a reused :class:`StageRef`, the task run ends ``Cached``.

    Run it with :func:`run` in a flow, or its code alone with :func:`call`.
    """
    def decorate(body: Callable[..., Any]) -> Any:
        @functools.wraps(body)
        def stage_run(*args: Any, **kwargs: Any) -> Any:
            result = body(*args, **kwargs)
            if isinstance(result, StageRef) and result.reused:
                return Completed(name="Cached", message="reused from the store", data=result)
            return result

        return retrying(name=name)(stage_run)

    return decorate


def run(stage: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a stage task in a flow and return what it returned (a :class:`StageRef`, mostly).

    Raises:
        whatever the task raised on its last try.
    """
    return stage(*args, return_state=True, **kwargs).result()  # a Cached state's result is its ref


def call(stage: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a stage task's code here, without Prefect (tests and benchmarks)."""
    result = stage.fn(*args, **kwargs)
    return result.result() if isinstance(result, State) else result


@functools.lru_cache(maxsize=64)
def _content_hash(path: str, size: int, mtime_ns: int) -> str:
    return file_hash(path)


def content_hash(path: str) -> str:
    """A file's content hash, computed once per version of the file in a process."""
    stat = os.stat(path)
    return _content_hash(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


def short_key(key: str) -> str:
    """A stage key's first hash digits: the progress label of stages that do not know the video's name."""
    return key.rsplit("/", 1)[-1][:8]


def to_parameters(arguments: dict[str, Any]) -> dict[str, Any]:
    """A stage task's keyword arguments as plain JSON values (a flow run's parameters): stage references and
    settings as dicts."""
    def plain(value: Any) -> Any:
        if isinstance(value, StageRef):
            return dataclasses.asdict(value)
        return to_dict(value) if dataclasses.is_dataclass(value) else value

    return {name: plain(value) for name, value in arguments.items()}


def from_parameters(stage: Any, parameters: dict[str, Any]) -> dict[str, Any]:
    """:func:`to_parameters` back, by the types the stage task's code declares."""
    hints = typing.get_type_hints(getattr(stage.fn, "__wrapped__", stage.fn))
    arguments = {}
    for name, value in parameters.items():
        kind = hints.get(name)
        if isinstance(value, dict) and isinstance(kind, type) and dataclasses.is_dataclass(kind):
            value = kind(**value)
        arguments[name] = value
    return arguments
