"""Writing files so that a reader never sees half of one, and a failed write leaves nothing behind."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

from stitchtime_core.errors import InputError


def file_problem(path: str | os.PathLike) -> str | None:
    """Why a user's input ``path`` cannot be read as a file (symbolic links followed), or None when it can.

    Returns:
        "no such file"; "a symlink loop" (the path, or a folder link on its way, leads back to itself: the
        OS's "too many levels of symbolic links", not a missing file); "no such file (a broken symlink to
        TARGET)"; "not a file" (a folder, a pipe, a device); "cannot be read (REASON)"; or None.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a symlink loop"
        if os.path.islink(path):
            return f"no such file (a broken symlink to {os.path.realpath(path)})"
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return "no such file"
        return f"cannot be read ({exc.strerror or exc})"
    return None if stat.S_ISREG(mode) else "not a file"


def check_file(path: str | os.PathLike) -> None:
    """Refuse a user's input ``path`` that cannot be read as a file (see :func:`file_problem`).

    Raises:
        InputError: naming ``path`` and the problem, e.g. "clip.mp4: a symlink loop".
    """
    problem = file_problem(path)
    if problem:
        raise InputError(path, problem)


def is_symlink_loop(path: str | os.PathLike) -> bool:
    """Whether following ``path`` meets a symlink loop (``Path.resolve`` raises RuntimeError on one)."""
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno == errno.ELOOP
    return False


@contextlib.contextmanager
def replacing(target: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``target`` for the block to write; when the block ends it is flushed to disk
    and renamed over ``target``, so ``target`` is either as before or whole. If the block fails the
    temporary file is removed and ``target`` is untouched."""
    target = Path(target)
    temp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")
    try:
        yield temp
        fd = os.open(temp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)
    _fsync_dir(target.parent)


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable; some platforms cannot open folders, which is harmless."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def writing_output(path: str | os.PathLike) -> Iterator[None]:
    """Report a failure to write a user's output file (a full disk, a read-only folder) as an
    :class:`InputError` naming it."""
    try:
        yield
    except OSError as exc:
        raise InputError(path, f"cannot be written ({exc.strerror or exc})") from None


def write_output(path: str | os.PathLike, text: str) -> None:
    """Write a user's text output file atomically (:func:`replacing`).

    Raises:
        InputError: ``path`` cannot be written; nothing is left behind.
    """
    with writing_output(path), replacing(path) as temp:
        temp.write_text(text)
