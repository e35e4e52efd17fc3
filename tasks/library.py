"""A video library: the videos under a folder or an ``s3://`` prefix, and where their edits go.

Library and destination are opened as artifact stores (:func:`tasks.store.open_store`), so a
folder and an S3 prefix behave alike, object names can never reach outside their root, and every
upload is atomic. Local files are used where they are; S3 objects are copied to a staging folder
for ffmpeg and the outputs uploaded after. In a folder, symbolic links are followed only where they
stay inside the library (see :func:`list_library`).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import stat
import tempfile
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Any

from stitchtime_core.artifacts import check_key
from stitchtime_core.errors import InputError, StoreError
from tasks.outputs import write_json
from tasks.store import ArtifactStore, FileStore, open_store

VIDEO_SUFFIXES = (".mp4", ".mov", ".m4v", ".mkv", ".avi", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".ts")
"""File names taken as videos (any case)."""

BATCH_SUMMARY = "stitchtime-batch.summary.json"
"""The batch's summary, written at the root of the destination."""

H264_CONTAINERS = (".mp4", ".mov", ".m4v", ".mkv")
"""Output containers that hold H.264 and AAC; other videos are written as ``.mp4``."""


@dataclasses.dataclass(frozen=True)
class Listing:
    """What a library holds: the videos to edit, and the entries refused without being read."""

    videos: list[str]
    """The videos' names (relative '/'-separated paths), sorted."""
    refused: dict[str, str]
    """Name -> why it is not edited (a symlink leading outside the library, a symlink loop, ...)."""


def list_library(source: str) -> Listing:
    """The videos under ``source``, and in a folder the entries refused as they are found.

    A folder's symbolic links are followed only inside the library: a link to a video or to a folder
    whose real path lies in the library is listed under the link's own name (so the video may be edited
    twice, under both names), while a link leading outside it, a folder link back to a folder that holds
    it (a loop), a video's name that is a symlink loop or a broken link, and anything but a regular file
    are refused, with the reason, and never read. A folder that cannot be read is refused too. S3 has no
    links: every key is listed as it is (a bad key is refused later by :func:`check_name`).

    Raises:
        ValueError: ``source`` is a file (see :func:`tasks.store.open_store`).
        InputError: the folder is missing or a symlink loop.
        StoreError: the folder or bucket cannot be read.
    """
    store = open_store(source)
    if not isinstance(store, FileStore):
        return Listing(sorted(key for key in store.list("") if _is_video_name(key)), {})
    try:
        root = os.path.realpath(store.root, strict=True)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputError(store.root, "a symlink loop") from None
        raise InputError(store.root, "no such folder") from None
    videos: list[str] = []
    refused: dict[str, str] = {}
    try:
        entries = _entries(store.root)
    except OSError as exc:
        raise StoreError(f"{store.root}: cannot read the library folder ({exc.strerror or exc})",
                         transient=False) from None
    _list_folder(entries, "", (root,), root=root, videos=videos, refused=refused)
    return Listing(sorted(videos), dict(sorted(refused.items())))


def _is_video_name(name: str) -> bool:
    path = PurePosixPath(name)
    return path.suffix.lower() in VIDEO_SUFFIXES and not path.name.startswith(".")


def _entries(folder: str | os.PathLike) -> list[os.DirEntry]:
    with os.scandir(folder) as entries:
        return sorted(entries, key=lambda entry: entry.name)


def _list_folder(entries: list[os.DirEntry], prefix: str, above: tuple[str, ...], *, root: str,
                 videos: list[str], refused: dict[str, str]) -> None:
    """Sort one folder's entries into ``videos`` and ``refused``, and go down its folders.

    Args:
        prefix: the folder's name in the library, '' or ending with '/'.
        above: the real paths of the folders walked down to this one, itself last: a folder link to one
            of them is a loop.
        root: the library's real path.
    """
    for entry in entries:
        name = prefix + entry.name
        if entry.is_symlink():
            try:
                real = os.path.realpath(entry.path, strict=True)
            except OSError as exc:  # a loop or a broken link: reported under a video's name, else left out
                if _is_video_name(name):  # as any other file is (what it was meant to be is unknown)
                    refused[name] = _broken_link_problem(entry.path, exc)
                continue
            if not os.path.isdir(real):
                if _is_video_name(name):
                    problem = _link_problem(entry.path, root)
                    if problem:
                        refused[name] = problem
                    else:
                        videos.append(name)
                continue
            if not _inside(real, root):
                refused[name] = f"a symlink to {real}, a folder outside the library: refused"
                continue
            if real in above:  # os.walk(followlinks=True) would go round it until the path is too long
                refused[name] = f"a symlink to {real}, a folder that holds it: a symlink loop, not followed"
                continue
            folder = real
        elif entry.is_dir(follow_symlinks=False):
            folder = os.path.join(above[-1], entry.name)
        else:
            if _is_video_name(name):
                if entry.is_file(follow_symlinks=False):
                    videos.append(name)
                else:
                    refused[name] = _NOT_REGULAR
            continue
        try:
            inner = _entries(entry.path)
        except OSError as exc:
            refused[name] = f"a folder that cannot be read ({exc.strerror or exc}): its videos are not listed"
            continue
        _list_folder(inner, f"{name}/", (*above, folder), root=root, videos=videos, refused=refused)


_NOT_REGULAR = "not a regular file (a pipe, a socket or a device): refused"


def _inside(real: str, root: str) -> bool:
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def _broken_link_problem(path: str | os.PathLike, exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "a symlink loop"
    return f"a symlink to {os.path.realpath(path)}, which does not exist"


def _link_problem(path: str | os.PathLike, root: str | os.PathLike) -> str | None:
    """Why the library file ``path`` may not be read, or None when it may: it is (or links to) a regular
    file whose real path lies inside the folder ``root``.

    Returns:
        "a symlink to REAL, outside the library: refused", "a symlink loop", "a symlink to REAL, which does
        not exist", "not a regular file ...", or None.
    """
    root = os.path.realpath(root)
    link = os.path.islink(path)
    try:
        real = os.path.realpath(path, strict=True)
        mode = os.stat(real).st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP or link:
            return _broken_link_problem(path, exc)
        return "no such file" if exc.errno in (errno.ENOENT, errno.ENOTDIR) else f"cannot be read ({exc.strerror})"
    what = "a symlink to" if link else "through a folder symlink, a file at"
    if not _inside(real, root):
        return f"{what} {real}, outside the library: refused"
    if not stat.S_ISREG(mode):
        return f"a symlink to {real}, not a regular file: refused" if link else _NOT_REGULAR
    return None


def check_name(source: str, name: str) -> None:
    """Refuse a listed name that could reach outside the library or the destination.

    Names come from a folder or bucket listing, which whoever can write there controls: an S3 key
    may be ``../x.mp4``, ``a//b.mp4`` or hold a backslash or NUL. Such a video is reported, never used.

    Raises:
        InputError: the name is not a relative '/'-separated path (see
            :func:`stitchtime_core.artifacts.check_key`).
    """
    try:
        check_key(name)
    except ValueError:
        raise InputError(display(source, name), f"refused the name {name!r}: a library name must be a relative "
                                                 "path without empty, '.' or '..' parts, backslashes or NUL, so "
                                                 "that it cannot reach outside the library") from None


def check_apart(source: str, dest: str) -> None:
    """Refuse a destination that is the library itself, lies inside it or holds it.

    Outputs keep their video's relative name, so in such a destination an output could replace a
    source video, and the next batch would take the outputs for sources.

    Raises:
        ValueError: the two overlap (symbolic links are followed).
    """
    places = []
    for uri in (source, dest):
        store = open_store(uri)
        place = os.path.realpath(store.root) if isinstance(store, FileStore) else store.uri
        places.append(place.rstrip("/") + "/")
    if places[0].startswith(places[1]) or places[1].startswith(places[0]):
        raise ValueError(f"the destination {dest} overlaps the library {source}: outputs could replace source "
                         "videos; choose a destination outside it")


def check_dest(dest: str) -> None:
    """Fail at once when the destination cannot take outputs, not once per video after its work.

    A folder is made if missing and must take a file; an S3 prefix's bucket must exist and answer.

    Raises:
        InputError: the folder cannot be made or written.
        StoreError: the bucket is missing or refuses the credentials.
    """
    store = open_store(dest)
    if not isinstance(store, FileStore):
        store.exists(BATCH_SUMMARY)
        return
    try:  # a real file: permissions, a read-only file system, ACLs (os.access misses some)
        store.root.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=store.root).close()
    except OSError as exc:
        raise InputError(store.root, f"the destination folder cannot be written ({exc.strerror or exc})") from None


def output_name(name: str) -> str:
    """The output's name for a library video: the same relative name, ``.mp4`` where the container
    cannot hold H.264."""
    path = PurePosixPath(name)
    return name if path.suffix.lower() in H264_CONTAINERS else str(path.with_suffix(".mp4"))


def output_names(names: list[str]) -> dict[str, str]:
    """Each library video's output name (:func:`output_name`); where two videos would share one (``x.mp4``
    and ``x.webm``), the one whose container changes keeps its whole name: ``x.webm.mp4``."""
    plain = {name: output_name(name) for name in names}
    shared = Counter(plain.values())
    return {name: out if shared[out] == 1 or out == name else f"{name}.mp4" for name, out in plain.items()}


def local_source(source: str, name: str, staging: Path) -> Path:
    """A local path of the library video ``name``: the file itself in a folder, a staged copy from S3.

    Raises:
        InputError: the folder's file is no longer a regular file inside the library (a link changed since
            the listing, say): the check :func:`list_library` made, made again just before the file is used.
    """
    store = open_store(source)
    if isinstance(store, FileStore):
        path = store.root.joinpath(*_parts(name))
        problem = _link_problem(path, store.root)  # again: the link may have changed since the listing
        if problem:
            raise InputError(display(source, name), problem)
        return path
    return store.get_file(name, staging.joinpath("source", *_parts(name)))


def local_output(dest: str, out: str, staging: Path) -> Path:
    """Where the output named ``out`` (see :func:`output_names`) is written on this machine: in the
    destination folder itself, or in the staging folder when the destination is S3 (see :func:`deliver`)."""
    store = open_store(dest)
    root = store.root if isinstance(store, FileStore) else staging / "out"
    return root.joinpath(*_parts(out))


def is_done(dest: str, name: str, out: str, summary_name: str, *, source: str | None = None) -> bool:
    """True when the destination holds the run summary of ``name``'s output ``out`` (it is written after
    every output), and that summary is of ``name``: not of another video whose output had that name before
    (an ``x.webm`` edited before an ``x.mp4`` joined it). Given the library ``source``, a summary of the file
    a folder's symlink ``name`` leads to (summaries name a video by its real path) is of ``name`` too."""
    for key in (name, out):
        check_key(key)  # PurePosixPath would quietly turn a//b.mp4 into a/b.mp4, another video's name
    store = open_store(dest)
    key = str(PurePosixPath(out).with_name(summary_name))
    if not store.exists(key):
        return False
    try:
        made_from = PurePosixPath(str(store.get_json(key)["input"]))
    except (InputError, KeyError, TypeError):
        return False  # not a summary of ours: made again
    if made_from.parts[-len(_parts(name)):] == tuple(_parts(name)):
        return True
    library = open_store(source) if source else None
    return isinstance(library, FileStore) and str(made_from) == os.path.realpath(library.root.joinpath(*_parts(name)))


def deliver(dest: str, out: str, files: list[Path], staging: Path) -> list[str]:
    """Upload an S3 destination's outputs from the staging folder (the summary last); returns their URIs.

    ``out`` is the output's name (see :func:`output_names`). For a folder destination the files are
    already in place and only their URIs are returned.
    """
    check_key(out)  # PurePosixPath would quietly turn a//b.mp4 into a/b.mp4, another video's name
    store = open_store(dest)
    if isinstance(store, FileStore):
        return [f.resolve().as_uri() for f in files]
    folder = PurePosixPath(out).parent
    uris = []
    for path in files:
        key = str(folder / path.name) if str(folder) != "." else path.name
        store.put_file(key, path)
        uris.append(_join(store, key))
    return uris


def is_remote(dest: str) -> bool:
    """Whether outputs for ``dest`` are staged here and uploaded (S3), not written in place (a folder)."""
    return not isinstance(open_store(dest), FileStore)


def publish_summary(summary_path: Path, published: dict[str, str]) -> None:
    """Make a staged run summary name what the destination will hold: every value that is the path of a staged
    file (a key of ``published``: the outputs, their reports, the config, an S3 video's local copy) becomes
    the URI or name given for it; the staging folder is gone once the batch moves on."""
    def swap(value: Any) -> Any:
        if isinstance(value, str):
            return published.get(value, value)
        if isinstance(value, list):
            return [swap(item) for item in value]
        if isinstance(value, dict):
            return {key: swap(item) for key, item in value.items()}
        return value

    published = {str(Path(path).resolve()): uri for path, uri in published.items()}
    write_json(summary_path, swap(json.loads(summary_path.read_text())))


def _join(store: ArtifactStore, key: str) -> str:
    return f"{store.uri.rstrip('/')}/{key}"


def _parts(name: str) -> list[str]:
    return check_key(name).split("/")


def display(source: str, name: str) -> str:
    """How a library video is named in messages and summaries."""
    store = open_store(source)
    if not isinstance(store, FileStore):
        return _join(store, name)
    try:
        return str(store.root.joinpath(*_parts(name)))
    except ValueError:  # a refused name (see check_name), shown as listed
        return f"{store.root}/{name}"

