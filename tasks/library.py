"""A video library: the videos under a folder or an ``s3://`` prefix, and where their edits go.

Library and destination are opened as artifact stores (:func:`tasks.store.open_store`), so a
folder and an S3 prefix behave alike, object names can never reach outside their root, and every
upload is atomic. Local files are used where they are; S3 objects are copied to a staging folder
for ffmpeg and the outputs uploaded after.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from stitchtime_core.artifacts import check_key
from tasks.store import ArtifactStore, FileStore, open_store

VIDEO_SUFFIXES = (".mp4", ".mov", ".m4v", ".mkv", ".avi", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".ts")
"""File names taken as videos (any case)."""

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


def output_name(name: str) -> str:
    """The output's name for a library video: the same relative name, ``.mp4`` where the container
    cannot hold H.264."""
    path = PurePosixPath(name)
    return name if path.suffix.lower() in H264_CONTAINERS else str(path.with_suffix(".mp4"))


def local_source(source: str, name: str, staging: Path) -> Path:
    """A local path of the library video ``name``: the file itself in a folder, a staged copy from S3."""
    store = open_store(source)
    if isinstance(store, FileStore):
        return store.root.joinpath(*_parts(name))
    return store.get_file(name, staging.joinpath("source", *_parts(name)))


def local_output(dest: str, name: str, staging: Path) -> Path:
    """Where the edit of ``name`` is written on this machine: in the destination folder itself, or
    in the staging folder when the destination is S3 (see :func:`deliver`)."""
    store = open_store(dest)
    root = store.root if isinstance(store, FileStore) else staging / "out"
    return root.joinpath(*_parts(output_name(name)))


def is_done(dest: str, name: str, summary_name: str) -> bool:
    """True when ``name``'s run summary is in the destination (it is written after every output)."""
    return open_store(dest).exists(str(PurePosixPath(output_name(name)).with_name(summary_name)))


def deliver(dest: str, name: str, files: list[Path], staging: Path) -> list[str]:
    """Upload an S3 destination's outputs from the staging folder (the summary last); returns their URIs.

    For a folder destination the files are already in place and only their URIs are returned.
    """
    store = open_store(dest)
    if isinstance(store, FileStore):
        return [f.resolve().as_uri() for f in files]
    folder = PurePosixPath(output_name(name)).parent
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
    return str(store.root.joinpath(*_parts(name))) if isinstance(store, FileStore) else _join(store, name)

