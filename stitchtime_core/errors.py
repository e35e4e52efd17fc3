"""Typed errors. Each names the offending input so the CLI can print one clear line."""

from __future__ import annotations

import os
import re


class StitchtimeError(Exception):
    """Base class of every error stitchtime reports to a user without a traceback."""


class InputError(StitchtimeError):
    """An input file (video, model, direction) is missing, unreadable or unusable.

    Args:
        path: the offending file.
        problem: what is wrong with it, as a short sentence fragment.
    """

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        # One line, whatever a library's message held (dlib's span several): the CLI prints one line.
        self.problem = re.sub(r"\s*\n\s*", " ", problem).strip()
        super().__init__(f"{self.path}: {self.problem}")

    def __reduce__(self):  # pickled with both arguments (Prefect pickles errors), not the joined message
        return type(self), (self.path, self.problem)


class NoFaceError(InputError):
    """No face was found in a video (or in too few of its frames to edit it)."""


class DeviceError(StitchtimeError):
    """The compute device a run asks for is not there: no CUDA device is visible, or fewer than its index.

    Args:
        device: the device asked for, as given ("cuda", "cuda:1").
        problem: what is wrong, as a short sentence fragment.
    """

    def __init__(self, device: str, problem: str):
        self.device, self.problem = device, problem
        super().__init__(f"device {device}: {problem}")

    def __reduce__(self):
        return type(self), (self.device, self.problem)


class StoreError(StitchtimeError):
    """The artifact store cannot be reached or refused an operation.

    Args:
        message: one line naming the store or object and the problem.
        transient: whether trying again may help (a connection or a server error may pass; a missing
            bucket or refused credentials will not).
    """

    def __init__(self, message: str, *, transient: bool = True):
        self.transient = transient
        super().__init__(message)

    def __reduce__(self):  # keep `transient` when the error is pickled (Prefect does)
        return _store_error, (str(self), self.transient)


def _store_error(message: str, transient: bool) -> StoreError:
    return StoreError(message, transient=transient)
