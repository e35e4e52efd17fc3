"""``stitchtime batch`` / the ``edit_library`` flow over a folder and over an S3 prefix, with a real
Prefect server and a real S3-protocol server: every video edited under its relative name, a corrupt
one reported without stopping the others, finished ones skipped on the next run, symlinks followed
only inside the library."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import boto3
import numpy as np
import pytest

from stitchtime_core.errors import InputError
from stitchtime_core.sample_clip import make_sample_clip
from stitchtime_core.video import iter_frames, probe
from tasks import library
from cli_runner import run_cli

FAST = ["--set", "pti.observations_per_frame=2", "--set", "stitching.steps=2"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("library")
    (folder / "src" / "talks" / "2026").mkdir(parents=True)
    make_sample_clip(folder / "src" / "a.mp4", seconds=0.4, size=(160, 160))
    make_sample_clip(folder / "src" / "talks" / "2026" / "b.mov", seconds=0.4, size=(160, 160), seed=1)
    (folder / "src" / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"broken" * 100)
    (folder / "src" / "notes.txt").write_text("not a video, not listed")
    # Symlinks out of the library, to a real video and to a folder of them, and one to itself: refused unread.
    (folder / "outside" / "more").mkdir(parents=True)
    shutil.copy(folder / "src" / "a.mp4", folder / "outside" / "x.mp4")
    shutil.copy(folder / "src" / "a.mp4", folder / "outside" / "more" / "y.mp4")
    (folder / "src" / "escape.mp4").symlink_to(Path("..", "outside", "x.mp4"))
    (folder / "src" / "elsewhere").symlink_to(Path("..", "outside", "more"), target_is_directory=True)
    (folder / "src" / "loop.mp4").symlink_to("loop.mp4")
    return folder


@pytest.fixture(scope="module")
def cli_env(prefect_server: str, workdir: Path) -> dict[str, str]:
    return {**os.environ, "PREFECT_API_URL": prefect_server,
            "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(workdir / "prefect-results")}


@pytest.fixture(scope="module")
def first_batch(workdir: Path, cli_env: dict[str, str]) -> subprocess.CompletedProcess:
    return run_cli(["batch", str(workdir / "src"), "--edit", "age=2", "--out", str(workdir / "out"),
                    "--store", str(workdir / "data"), "--json", *FAST], env=cli_env, cwd=workdir)


def test_a_library_with_a_corrupt_video_edits_the_others_and_reports_it(workdir: Path,
                                                                       first_batch: subprocess.CompletedProcess):
    assert first_batch.returncode == 3, first_batch.stderr  # partial failure
    assert "Traceback" not in first_batch.stderr
    summary = json.loads(first_batch.stdout)
    status = {v["name"]: v["status"] for v in summary["videos"]}
    assert status == {"a.mp4": "done", "corrupt.mp4": "failed", "elsewhere": "failed", "escape.mp4": "failed",
                      "loop.mp4": "failed", "talks/2026/b.mov": "done"}  # the links: see the next test
    assert summary["counts"] == {"done": 2, "skipped": 0, "failed": 4}
    [failed] = [v for v in summary["videos"] if v["name"] == "corrupt.mp4"]
    assert failed["source"] == str(workdir / "src" / "corrupt.mp4") and "corrupt.mp4" in failed["error"]
    assert "not a readable video" in failed["error"]
    # Outputs under the same relative names, with their run summaries; nothing for the corrupt one.
    out = workdir / "out"
    for name in ("a.mp4", "talks/2026/b.mov"):
        assert probe(out / name).frame_count == probe(workdir / "src" / name).frame_count == 10
    assert (out / "talks" / "2026" / "b.summary.json").is_file()
    assert not list(out.glob("corrupt*"))
    assert json.loads((out / "stitchtime-batch.summary.json").read_text()) == summary
    # The sources are untouched and the two edits differ from them.
    a_src = np.stack(list(iter_frames(workdir / "src" / "a.mp4"))).astype(int)
    a_out = np.stack(list(iter_frames(out / "a.mp4"))).astype(int)
    assert np.abs(a_src - a_out).mean() > 0.5


def test_a_batch_refuses_the_symlinks_that_leave_the_library_or_loop_and_never_reads_them(
        workdir: Path, first_batch: subprocess.CompletedProcess):
    src, outside = workdir / "src", workdir / "outside"
    failed = {v["name"]: v for v in json.loads(first_batch.stdout)["videos"] if v["status"] == "failed"}
    links = {name: (v["source"], v["error"], v["error_type"]) for name, v in failed.items() if name != "corrupt.mp4"}
    assert links == {
        "escape.mp4": (f"{src}/escape.mp4",
                       f"{src}/escape.mp4: a symlink to {outside}/x.mp4, outside the library: refused", "InputError"),
        "elsewhere": (f"{src}/elsewhere",
                      f"{src}/elsewhere: a symlink to {outside}/more, a folder outside the library: refused",
                      "InputError"),
        "loop.mp4": (f"{src}/loop.mp4", f"{src}/loop.mp4: a symlink loop", "InputError")}
    # Never read: no output, no run in the store made from the outside videos (the summaries name every input).
    out = workdir / "out"
    assert not list(out.glob("escape*")) and not (out / "elsewhere").exists() and not list(out.glob("loop*"))
    inputs = {json.loads(path.read_text())["input"] for path in out.rglob("*.summary.json")
              if path.name != library.BATCH_SUMMARY}
    assert inputs == {str((src / "a.mp4").resolve()), str((src / "talks" / "2026" / "b.mov").resolve())}
    lines = first_batch.stderr.splitlines()
    assert any(f"{src}/escape.mp4 failed: a symlink to {outside}/x.mp4" in line for line in lines)


def test_a_second_batch_skips_the_finished_videos(workdir: Path, cli_env: dict[str, str],
                                                  first_batch: subprocess.CompletedProcess):
    before = (workdir / "out" / "a.mp4").stat().st_mtime_ns
    result = run_cli(["batch", str(workdir / "src"), "--edit", "age=2", "--out", str(workdir / "out"),
                      "--store", str(workdir / "data"), *FAST], env=cli_env, cwd=workdir)
    assert result.returncode == 3, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("skipped") and line.endswith("a.mp4") for line in lines)
    assert any(line.startswith("failed") and "corrupt.mp4" in line for line in lines)
    assert f"failed   {workdir / 'src' / 'loop.mp4'}: a symlink loop" in lines
    assert lines[-1] == "0 done, 2 skipped, 4 failed"
    assert (workdir / "out" / "a.mp4").stat().st_mtime_ns == before


def test_a_batch_from_and_to_s3(workdir: Path, cli_env: dict[str, str], s3_server) -> None:
    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint_url, aws_access_key_id=s3_server.access_key_id,
                      aws_secret_access_key=s3_server.secret_access_key, region_name=s3_server.region)
    s3.upload_file(str(workdir / "src" / "a.mp4"), s3_server.bucket, "library/raw/people/a.mp4")
    env = {**cli_env, **s3_server.env, "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    bucket = f"s3://{s3_server.bucket}"
    result = run_cli(["batch", f"{bucket}/library/raw", "--edit", "age=-2,2", "--out", f"{bucket}/library/edited",
                      "--store", f"{bucket}/library/stitchtime", "--json", *FAST], env=env, cwd=workdir)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    [video] = summary["videos"]
    assert video["status"] == "done" and video["source"] == f"{bucket}/library/raw/people/a.mp4"
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_server.bucket, Prefix="library/edited/")["Contents"]}
    assert {"library/edited/people/a.age-2.mp4", "library/edited/people/a.age+2.mp4",
            "library/edited/people/a.summary.json", "library/edited/people/a.config.json",
            "library/edited/people/a.age-2.report.html", "library/edited/people/a.age+2.report.html",
            "library/edited/stitchtime-batch.summary.json"} <= keys
    assert video["outputs"] == [f"{bucket}/library/edited/people/a.age-2.mp4",
                                f"{bucket}/library/edited/people/a.age+2.mp4"]
    assert video["reports"] == [f"{bucket}/library/edited/people/a.age-2.report.html",
                                f"{bucket}/library/edited/people/a.age+2.report.html"]
    # The run's summary names what the bucket holds, not the staging folder that is gone.
    run = json.loads(s3.get_object(Bucket=s3_server.bucket, Key="library/edited/people/a.summary.json")["Body"].read())
    assert run["input"] == f"{bucket}/library/raw/people/a.mp4"
    assert run["config"] == f"{bucket}/library/edited/people/a.config.json"
    assert [(o["output"], o["report"]) for o in run["outputs"]] == list(zip(video["outputs"], video["reports"]))
    downloaded = workdir / "from-s3.mp4"
    s3.download_file(s3_server.bucket, "library/edited/people/a.age+2.mp4", str(downloaded))
    assert probe(downloaded).frame_count == 10
    again = run_cli(["batch", f"{bucket}/library/raw", "--edit", "age=-2,2", "--out", f"{bucket}/library/edited",
                     "--store", f"{bucket}/library/stitchtime", "--json", *FAST], env=env, cwd=workdir)
    assert again.returncode == 0 and json.loads(again.stdout)["counts"]["skipped"] == 1


def test_library_listing_and_names(workdir: Path) -> None:
    assert library.list_library(str(workdir / "src")).videos == ["a.mp4", "corrupt.mp4", "talks/2026/b.mov"]
    assert library.output_name("x/clip.webm") == "x/clip.mp4" and library.output_name("y/c.MOV") == "y/c.MOV"
    assert library.output_names(["a/x.avi", "a/x.mp4", "a/x.webm", "b/x.webm", "c.MOV"]) == {
        "a/x.avi": "a/x.avi.mp4", "a/x.mp4": "a/x.mp4", "a/x.webm": "a/x.webm.mp4", "b/x.webm": "b/x.mp4",
        "c.MOV": "c.MOV"}


def _linked_library(root: Path) -> Path:
    """A library holding every kind of link, and a folder beside it; the files are not videos (never run)."""
    lib, outside = root / "lib", root / "outside"
    for folder in (lib / "videos" / "deep", lib / "sub", outside / "dir"):
        folder.mkdir(parents=True)
    for path in (lib / "videos" / "a.mp4", lib / "videos" / "deep" / "b.mov", outside / "x.mp4",
                 outside / "dir" / "o.mp4"):
        path.write_bytes(b"a video")
    links = {"inside.mp4": "videos/a.mp4",  # a file inside: listed under the link's name
             "alias": "videos",  # a folder inside: followed
             "escape.mp4": "../outside/x.mp4", "out-dir": "../outside/dir",  # leading outside: refused
             "loop.mp4": "loop.mp4", "broken.mp4": "gone.mp4",  # a video's name that leads nowhere: reported
             "sub/up": "..", "videos/deep/again": "../..",  # back to a folder holding the link: a loop
             "ring": "ring", "notes.txt": "../outside/x.mp4"}  # no video's name, nothing to follow: not listed
    for name, target in links.items():
        (lib / name).symlink_to(target)
    os.mkfifo(lib / "pipe.mp4")
    return lib


def test_a_library_listing_keeps_the_files_inside_it_and_reports_the_links_it_refuses(tmp_path: Path) -> None:
    lib = _linked_library(tmp_path)
    listing = library.list_library(str(lib))
    assert listing.videos == ["alias/a.mp4", "alias/deep/b.mov", "inside.mp4", "videos/a.mp4", "videos/deep/b.mov"]
    outside = tmp_path / "outside"
    loop = "a folder that holds it: a symlink loop, not followed"
    assert listing.refused == {
        "alias/deep/again": f"a symlink to {lib}, {loop}",  # the loop is met again under the followed link, once
        "broken.mp4": f"a symlink to {lib / 'gone.mp4'}, which does not exist",
        "escape.mp4": f"a symlink to {outside / 'x.mp4'}, outside the library: refused",
        "loop.mp4": "a symlink loop",
        "out-dir": f"a symlink to {outside / 'dir'}, a folder outside the library: refused",
        "pipe.mp4": "not a regular file (a pipe, a socket or a device): refused",
        "sub/up": f"a symlink to {lib}, {loop}",
        "videos/deep/again": f"a symlink to {lib}, {loop}"}
    assert library.list_library(str(lib)).videos == listing.videos


def test_a_library_that_is_a_symlink_loop_is_named_as_one(tmp_path: Path) -> None:
    (tmp_path / "lib").symlink_to("lib")
    with pytest.raises(InputError, match="a symlink loop"):
        library.list_library(str(tmp_path / "lib"))


def test_a_link_that_leaves_the_library_after_the_listing_is_still_refused(tmp_path: Path) -> None:
    lib = _linked_library(tmp_path)
    assert library.local_source(str(lib), "inside.mp4", tmp_path) == lib / "inside.mp4"
    (lib / "inside.mp4").unlink()
    (lib / "inside.mp4").symlink_to(tmp_path / "outside" / "x.mp4")
    (lib / "alias").unlink()
    (lib / "alias").symlink_to(tmp_path / "outside" / "dir")
    outside = tmp_path / "outside"
    for name, problem in [("inside.mp4", f"a symlink to {outside / 'x.mp4'}, outside the library"),
                          ("alias/o.mp4", f"through a folder symlink, a file at {outside / 'dir' / 'o.mp4'}, outside "
                                          "the library")]:
        with pytest.raises(InputError, match="refused") as refused:
            library.local_source(str(lib), name, tmp_path)
        assert refused.value.path == str(lib / name) and refused.value.problem.startswith(problem)


def test_a_link_inside_the_library_is_done_when_the_file_it_leads_to_was_edited_under_its_name(tmp_path: Path) -> None:
    # Run summaries name their input by its real path: the link's output is done, not made again each batch.
    lib, dest = _linked_library(tmp_path), tmp_path / "out"
    dest.mkdir()
    (dest / "inside.summary.json").write_text(json.dumps({"input": str((lib / "videos" / "a.mp4").resolve())}))
    assert library.is_done(str(dest), "inside.mp4", "inside.mp4", "inside.summary.json", source=str(lib))
    (dest / "inside.summary.json").write_text(json.dumps({"input": str((lib / "videos" / "deep" / "b.mov").resolve())}))
    assert not library.is_done(str(dest), "inside.mp4", "inside.mp4", "inside.summary.json", source=str(lib))


def test_a_batch_whose_every_entry_is_refused_fails_with_each_reason(tmp_path: Path, cli_env: dict[str, str]) -> None:
    (tmp_path / "outside").mkdir()
    make_sample_clip(tmp_path / "outside" / "x.mp4", seconds=0.2, size=(64, 64))
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "escape.mp4").symlink_to(tmp_path / "outside" / "x.mp4")
    (lib / "loop.mp4").symlink_to("loop.mp4")
    result = run_cli(["batch", str(lib), "--edit", "age=2", "--out", str(tmp_path / "out"),
                      "--store", str(tmp_path / "data")], env=cli_env, cwd=tmp_path)
    assert result.returncode == 1, result.stderr  # all failed
    assert "Traceback" not in result.stderr
    assert result.stdout.splitlines() == [
        f"failed   {lib / 'escape.mp4'}: a symlink to {tmp_path / 'outside' / 'x.mp4'}, "
        "outside the library: refused",
        f"failed   {lib / 'loop.mp4'}: a symlink loop",
        "0 done, 0 skipped, 2 failed"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [library.BATCH_SUMMARY]
    assert not (tmp_path / "data").exists()  # nothing was read, so no run was started


def test_an_output_made_from_another_video_of_that_name_is_not_taken_as_done(tmp_path: Path) -> None:
    # x.webm was edited into x.mp4; then x.mp4 joined the library: x.mp4 is not done, x.webm is not either
    # (its output is x.webm.mp4 now).
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "x.summary.json").write_text(json.dumps({"input": str(tmp_path / "lib" / "x.webm")}))
    assert library.is_done(str(dest), "x.webm", "x.mp4", "x.summary.json")
    assert not library.is_done(str(dest), "x.mp4", "x.mp4", "x.summary.json")
    assert not library.is_done(str(dest), "x.webm", "x.webm.mp4", "x.webm.summary.json")
    (dest / "x.summary.json").write_text("not json")
    assert not library.is_done(str(dest), "x.webm", "x.mp4", "x.summary.json")


def test_videos_whose_outputs_would_share_a_name_never_share_one(tmp_path: Path, cli_env: dict[str, str]) -> None:
    # x.webm would be x.mp4, then x.webm.mp4: both taken by videos of those very names. It is refused, not
    # run on top of another video's output. (The videos are not videos: they fail at once, cheaply.)
    (tmp_path / "lib").mkdir()
    for name in ("x.mp4", "x.webm", "x.webm.mp4"):
        (tmp_path / "lib" / name).write_bytes(b"not a video")
    result = run_cli(["batch", str(tmp_path / "lib"), "--edit", "age=2", "--out", str(tmp_path / "out"), "--json"],
                     env=cli_env, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    videos = {video["name"]: video for video in json.loads(result.stdout)["videos"]}
    assert "its output x.webm.mp4 would also be that of x.webm.mp4; rename one" in videos["x.webm"]["error"]
    assert all("not a readable video" in videos[name]["error"] for name in ("x.mp4", "x.webm.mp4"))


def test_an_empty_library_is_an_error(tmp_path: Path, cli_env: dict[str, str]) -> None:
    (tmp_path / "empty").mkdir()
    result = run_cli(["batch", str(tmp_path / "empty"), "--edit", "age=2", "--out", str(tmp_path / "out")],
                     env=cli_env, cwd=tmp_path)
    assert result.returncode == 1 and "no videos found" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("case, status, problem", [
    ("missing", 1, "{source}: no such folder"),
    ("file", 2, "SOURCE: {source}: a file, not a folder"),
])
def test_a_source_that_is_no_folder_is_named_as_such(case: str, status: int, problem: str, tmp_path: Path,
                                                      cli_env: dict[str, str]) -> None:
    source = tmp_path / "lib.mp4"
    if case == "file":
        make_sample_clip(source, seconds=0.2, size=(64, 64))
    result = run_cli(["batch", str(source), "--edit", "age=2", "--out", str(tmp_path / "out")], env=cli_env,
                     cwd=tmp_path)
    assert result.returncode == status
    assert result.stderr.splitlines()[-1] == f"Error: {problem.format(source=source)}"
    assert not (tmp_path / "out").exists()  # nothing to edit: no destination folder made


@pytest.mark.parametrize("option, uri, problem", [
    ("SOURCE", "s3://", "store URI 's3://' names no bucket"),
    ("--out", "ftp://x", "store URI 'ftp://x' has unknown scheme 'ftp'"),
    ("--store", "", "store URI is empty"),
])
def test_a_bad_uri_is_named_by_its_option(option: str, uri: str, problem: str, tmp_path: Path) -> None:
    (tmp_path / "lib").mkdir()
    uris = {"SOURCE": str(tmp_path / "lib"), "--out": str(tmp_path / "out"), "--store": str(tmp_path / "data"),
            option: uri}
    result = run_cli(["batch", uris["SOURCE"], "--edit", "age=2", "--out", uris["--out"], "--store", uris["--store"]],
                     env=dict(os.environ), cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.splitlines()[-1].startswith(f"Error: {option}: {problem}")


def test_a_destination_that_cannot_be_written_fails_before_any_video(tmp_path: Path, cli_env: dict[str, str]) -> None:
    (tmp_path / "lib").mkdir()
    make_sample_clip(tmp_path / "lib" / "a.mp4", seconds=0.2, size=(64, 64))
    (tmp_path / "file").write_text("a file, where the destination's parent folder should be")
    result = run_cli(["batch", str(tmp_path / "lib"), "--edit", "age=2", "--out", str(tmp_path / "file" / "out"),
                      "--store", str(tmp_path / "data")], env=cli_env, cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    [starting, line] = [line for line in result.stderr.splitlines() if line.strip()]
    assert starting == f"stitchtime: starting to edit the videos under {tmp_path / 'lib'}"
    assert line == f"Error: {tmp_path / 'file' / 'out'}: the destination folder cannot be written (Not a directory)"
    assert not (tmp_path / "data").exists()  # no video was started
    result = run_cli(["batch", str(tmp_path / "lib"), "--edit", "age=2", "--out", str(tmp_path / "file"),
                      "--store", str(tmp_path / "data")], env=cli_env, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == f"Error: --out: {tmp_path / 'file'}: a file, not a folder"
    assert not (tmp_path / "data").exists()
