"""A video library: the videos under a folder or an ``s3://`` prefix, and where their edits go.

Library and destination are opened as artifact stores (:func:`tasks.store.open_store`), so a
folder and an S3 prefix behave alike, object names can never reach outside their root, and every
upload is atomic. Local files are used where they are; S3 objects are copied to a staging folder
for ffmpeg and the outputs uploaded after.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path, PurePosixPath

from stitchtime_core.artifacts import check_key
from stitchtime_core.errors import InputError
from tasks.store import ArtifactStore, FileStore, open_store

VIDEO_SUFFIXES = (".mp4", ".mov", ".m4v", ".mkv", ".avi", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".ts")
"""File names taken as videos (any case)."""

BATCH_SUMMARY = "stitchtime-batch.summary.json"
"""The batch's summary, written at the root of the destination."""

H264_CONTAINERS = (".mp4", ".mov", ".m4v", ".mkv")
"""Output containers that hold H.264 and AAC; other videos are written as ``.mp4``."""


def list_videos(source: str) -> list[str]:
    """The names (relative '/'-separated paths) of the videos under ``source``, sorted.

    Raises:
        StoreError: the folder or bucket cannot be read.
    """
    store = open_store(source)
    return sorted(key for key in store.list("") if PurePosixPath(key).suffix.lower() in VIDEO_SUFFIXES
                  and not PurePosixPath(key).name.startswith("."))


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
    """A local path of the library video ``name``: the file itself in a folder, a staged copy from S3."""
    store = open_store(source)
    if isinstance(store, FileStore):
        return store.root.joinpath(*_parts(name))
    return store.get_file(name, staging.joinpath("source", *_parts(name)))


def local_output(dest: str, out: str, staging: Path) -> Path:
    """Where the output named ``out`` (see :func:`output_names`) is written on this machine: in the
    destination folder itself, or in the staging folder when the destination is S3 (see :func:`deliver`)."""
    store = open_store(dest)
    root = store.root if isinstance(store, FileStore) else staging / "out"
    return root.joinpath(*_parts(out))


def is_done(dest: str, name: str, out: str, summary_name: str) -> bool:
    """True when the destination holds the run summary of ``name``'s output ``out`` (it is written after
    every output), and that summary is of ``name``: not of another video whose output had that name before
    (an ``x.webm`` edited before an ``x.mp4`` joined it)."""
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
    return made_from.parts[-len(_parts(name)):] == tuple(_parts(name))


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

