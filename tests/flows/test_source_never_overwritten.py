"""An output never replaces its source, however the paths are spelled.

``stitchtime edit``: an ``--out`` that names the source through another spelling (relative against
absolute, ``..``, a symbolic link to it or to its folder, a hard link), or a summary, config or
report written beside the outputs (a generated output name is in test_edit_specs.py). ``stitchtime
batch``: a destination that is the library, lies inside it or holds it (outputs keep their video's
relative name, so one could replace another source video), on folders and on S3 prefixes.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from tasks.outputs import check_outputs
from stitchtime_core.errors import InputError
from stitchtime_core.sample_clip import make_sample_clip
from tasks import library
from cli_runner import run_cli


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with its content hash (links as what they point to)."""
    return {p.relative_to(folder).as_posix(): (os.readlink(p) if p.is_symlink() else _digest(p))
            for p in sorted(folder.rglob("*")) if p.is_file() or p.is_symlink()}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a real clip, ``clip.mp4``, and other spellings of it."""
    root = tmp_path_factory.mktemp("spellings")
    (root / "videos").mkdir()
    make_sample_clip(root / "videos" / "clip.mp4", seconds=0.2, size=(96, 96))
    (root / "link.mp4").symlink_to(root / "videos" / "clip.mp4")
    (root / "videos-link").symlink_to(root / "videos", target_is_directory=True)
    os.link(root / "videos" / "clip.mp4", root / "hard.mp4")
    (root / "elsewhere").mkdir()
    return root


SPELLINGS = {
    "relative": lambda root: "clip.mp4",  # from the working directory root/videos
    "dot-dot": lambda root: str(root / "elsewhere" / ".." / "videos" / "clip.mp4"),
    "symlink-to-the-source": lambda root: str(root / "link.mp4"),
    "symlinked-folder": lambda root: str(root / "videos-link" / "clip.mp4"),
    "hard-link": lambda root: str(root / "hard.mp4"),
}


@pytest.mark.parametrize("spelling", SPELLINGS.values(), ids=SPELLINGS.keys())
def test_edit_refuses_an_out_that_is_the_source_spelled_otherwise(spelling, folder: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(folder / "videos")
    with pytest.raises(InputError, match="overwrite its source"):
        check_outputs(str(folder / "videos" / "clip.mp4"), spelling(folder), [[("age", 2.0)]])


def test_edit_takes_an_out_of_the_same_name_elsewhere(folder: Path) -> None:
    """The control: the checks above refuse the source, not every path that looks like it."""
    out = folder / "elsewhere" / "clip.mp4"
    assert check_outputs(str(folder / "videos" / "clip.mp4"), out, [[("age", 2.0)]]) == [("age+2", out)]


@pytest.mark.parametrize("source, out, edits", [
    ("take.summary.json", "take.mp4", [[("age", 2.0)]]),  # the run summary beside --out
    ("take.config.json", "take.mp4", [[("age", 2.0)]]),  # its resolved config
    ("take.report.html", "take.mp4", [[("age", 2.0)]]),  # the report of the one output
    ("take.age+2.report.html", "take.mp4", [[("age", 2.0)], [("age", 3.0)]]),  # a report of one of several
], ids=["summary", "config", "report", "report-of-several"])
def test_edit_refuses_sidecars_that_would_be_the_source(source: str, out: str, edits: list, folder: Path,
                                                        tmp_path: Path) -> None:
    path = tmp_path / source
    path.write_bytes((folder / "videos" / "clip.mp4").read_bytes())  # a video, whatever its name says
    with pytest.raises(InputError, match="overwrite its source"):
        check_outputs(str(path), tmp_path / out, edits)


@pytest.mark.parametrize("spelling", ["symlink-to-the-source", "hard-link"])
def test_the_cli_refuses_the_source_spelled_otherwise_and_leaves_it_as_it_was(spelling: str, folder: Path,
                                                                              prefect_server: str) -> None:
    before = _tree(folder)
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    result = run_cli(["edit", str(folder / "videos" / "clip.mp4"), "--edit", "age=2", "--out",
                      SPELLINGS[spelling](folder), "--store", str(folder / "data")], env=env, cwd=folder / "videos")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "output would overwrite its source" in errors[0], result.stderr
    assert _tree(folder) == before


# --- stitchtime batch ------------------------------------------------------------------------------


@pytest.mark.parametrize("source, dest", [
    ("{root}/lib", "{root}/lib"),
    ("{root}/lib", "{root}/lib/"),
    ("{root}/lib", "file://{root}/lib"),
    ("{root}/lib", "{root}/other/../lib"),
    ("{root}/lib", "{root}/lib-link"),  # a symbolic link to the library
    ("{root}/lib", "{root}/lib/edited"),  # the next batch would take the outputs for sources
    ("{root}/lib/raw", "{root}/lib"),  # raw/raw/x.mp4 would be written over raw/x.mp4
    ("s3://bucket/lib", "s3://bucket/lib/"),
    ("s3://bucket/lib", "s3://bucket/lib/edited"),
    ("s3://bucket/lib/raw", "s3://bucket/lib"),
    ("s3://bucket/lib", "s3://bucket"),
])
def test_batch_refuses_a_destination_that_overlaps_the_library(source: str, dest: str, tmp_path: Path) -> None:
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib-link").symlink_to(tmp_path / "lib", target_is_directory=True)
    with pytest.raises(ValueError, match="overlaps the library"):
        library.check_apart(source.format(root=tmp_path), dest.format(root=tmp_path))


@pytest.mark.parametrize("source, dest", [
    ("{root}/lib", "{root}/lib-edited"),  # a common prefix of the names is not an overlap
    ("{root}/lib/raw", "{root}/lib/edited"),
    ("s3://bucket/lib", "s3://bucket/lib-edited"),
    ("s3://bucket/lib", "s3://other-bucket/lib"),
    ("{root}/lib", "s3://bucket/lib"),
])
def test_batch_takes_a_destination_beside_the_library(source: str, dest: str, tmp_path: Path) -> None:
    library.check_apart(source.format(root=tmp_path), dest.format(root=tmp_path))


def test_a_batch_into_its_own_library_is_refused_and_every_source_kept(tmp_path: Path, prefect_server: str) -> None:
    """The library holds ``x.mp4`` and, as a source of its own, ``x.age+2.mp4``: the name of one of
    ``x.mp4``'s outputs when the destination is the library itself."""
    lib = tmp_path / "lib"
    lib.mkdir()
    make_sample_clip(lib / "x.mp4", seconds=0.2, size=(96, 96))
    make_sample_clip(lib / "x.age+2.mp4", seconds=0.2, size=(96, 96), seed=1)
    before = _tree(lib)
    env = {**os.environ, "PREFECT_API_URL": prefect_server,
           "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp_path / "results")}
    result = run_cli(["batch", str(lib), "--edit", "age=2,3", "--out", str(lib), "--store", str(tmp_path / "data"),
                      "--json"], env=env, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "overlaps the library" in errors[0], result.stderr
    assert _tree(lib) == before
    assert result.stdout == ""
