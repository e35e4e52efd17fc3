"""The bad-input corpus, through the real CLI: a broken input or setting ends in one clear error line
that names it, a non-zero exit, no traceback and nothing at the output path; a valid but unusual video
gives a correct edited video."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import corpus
from stitchtime_core.models.bisenet import BiSeNet
from stitchtime_core.video import iter_frames, probe
from cli_runner import run_cli

_spec = importlib.util.spec_from_file_location("fake_official", Path(__file__).parents[1] / "core" / "fake_official.py")
fake_official = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fake_official)

FAST = ["--set", "pti.observations_per_frame=2", "--set", "stitching.steps=2"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bad-inputs")


@pytest.fixture(scope="module")
def cli_env(prefect_server: str, workdir: Path) -> dict[str, str]:
    return {**os.environ, "PREFECT_API_URL": prefect_server,
            "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(workdir / "prefect-results")}


@pytest.fixture(scope="module")
def clip(workdir: Path) -> Path:
    return corpus.base_clip(workdir)


def edit(source: Path, out: Path, env: dict[str, str], cwd: Path, *options: str) -> subprocess.CompletedProcess:
    out.parent.mkdir(parents=True, exist_ok=True)
    return run_cli(["edit", str(source), "--edit", "age=2", "--out", str(out), "--store", str(cwd / "data"),
                    *FAST, *options], env=env, cwd=cwd)


def assert_refused(result: subprocess.CompletedProcess, out_folder: Path, *expected: str) -> None:
    """Exit 1, no traceback, one ``Error:`` line holding every ``expected`` text, nothing in ``out_folder``."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    for text in expected:
        assert text in errors[0], errors[0]
    assert list(out_folder.iterdir()) == []  # no output, no summary, no temp file


@pytest.mark.parametrize("case, problem", [
    ("empty", "is empty (0 bytes)"),
    ("truncated", "frames could be decoded, the file is damaged or cut short"),
    ("text", "not a readable video"),
    ("audio-only", "has no video stream"),
    ("no-face", "no face found in any of its 6 frames"),
])
def test_a_broken_video_is_refused(case: str, problem: str, workdir: Path, cli_env: dict[str, str],
                                   tmp_path: Path) -> None:
    source = corpus.BROKEN[case](workdir)
    result = edit(source, tmp_path / "out" / "edited.mp4", cli_env, tmp_path)
    assert_refused(result, tmp_path / "out", str(source), problem)


@pytest.mark.parametrize("options, problem", [
    (["--edit", "no-such-direction=1"], "unknown edit direction"),
    (["--set", "pti.steps=1"], "--set pti.steps=1: pti.steps is not a setting"),
])
def test_an_unknown_direction_or_setting_is_refused(options: list[str], problem: str, clip: Path,
                                                     cli_env: dict[str, str], tmp_path: Path) -> None:
    result = edit(clip, tmp_path / "out" / "edited.mp4", cli_env, tmp_path, *options)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and problem in errors[0], result.stderr
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("options, expected", [
    (["--edit", "age=1e30"], ["'--edit'", "the strength of age must be a finite number from -100 to 100"]),
    (["--edit", "age=nan"], ["'--edit'", "'age=nan'"]),  # not a number of the edit language at all
    (["--set", "pti.lr=nan"], ["--set pti.lr=nan: pti.lr must be a finite number, got nan"]),
    (["--set", "blending.feather_px=inf"], ["--set blending.feather_px=inf: ", "must be a finite number"]),
    (["--set", "stitching.lambda_m=-1"], ["--set stitching.lambda_m=-1: stitching.lambda_m must be >= 0"]),
    (["--set", "output.crf=999"], ["--set output.crf=999: output.crf must be <= 63, got 999"]),
    (["--set", "alignment.detector_upsample=6"], ["--set alignment.detector_upsample=6: alignment.detector_upsample "
                                                   "must be <= 3, got 6"]),
    (["--set", "output.codec=nosuchcodec"], ["edited.mp4: output.codec=nosuchcodec", "Unknown encoder"]),
    (["--set", "output.preset=warp"], ["ffmpeg cannot encode with these settings", "invalid preset 'warp'"]),
    (["--out-name", "edited.txt"], ["edited.txt: ffmpeg cannot write a .txt file holding libx264 video"]),
    (["--out-name", "edited.avi"], ["edited.avi: ffmpeg cannot write a .avi file holding libx264 video and the "
                                    "source's audio: name the output .mp4, .mkv or .mov (ffmpeg: "]),
    (["--face", "9999,5"], ["--face 9999,5: the point lies outside the frame of", "(160x160 px"]),
    (["--face", "-5,5"], ["--face -5,5: alignment.face must be 'largest', an index N or a pixel X,Y"]),
    (["--edit", "agee=2"], ["--edit: unknown edit direction 'agee': not a profile direction (age, pose, smile), "
                            "sefa:K or a file"]),
    (["--place", "pti=a/b/c"], ["'--place'", "placement 'pti=a/b/c': a deployment is named FLOW/DEPLOYMENT"]),
    (["--fan-out", "stitch-chunk"], ["'--fan-out'", "a deployment is named FLOW/DEPLOYMENT", "'stitch-chunk'"]),
])
def test_a_bad_setting_fails_before_prefect_starts(options: list[str], expected: list[str], clip: Path,
                                                    tmp_path: Path) -> None:
    """One Error: line naming the option, exit 2, nothing written; checked before Prefect is even imported
    (importing it creates PREFECT_HOME), so it takes well under the seconds a server takes to start."""
    home = tmp_path / "prefect-home"
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(home)
    name = options[1] if options[0] == "--out-name" else "edited.mp4"
    options = [] if options[0] == "--out-name" else options
    (tmp_path / "out").mkdir()
    result = run_cli(["edit", str(clip), "--edit", "age=2", "--out", str(tmp_path / "out" / name), *FAST,
                      "--store", str(tmp_path / "data"), *options], env=env, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and all(text in errors[0] for text in expected), result.stderr
    if not expected[0].startswith("'--"):  # click reads these options itself, before the command runs
        assert result.stderr.splitlines()[0] == f"stitchtime: starting to edit {clip}"
        assert result.stderr.splitlines()[1] == errors[0]  # one line, no usage text
    assert not home.exists() and not (tmp_path / "data").exists()
    assert list((tmp_path / "out").iterdir()) == []


def test_a_placement_on_a_missing_deployment_is_one_line(clip: Path, cli_env: dict[str, str], tmp_path: Path) -> None:
    """--place is read without Prefect, whose console logs the command quiets only once it starts."""
    result = edit(clip, tmp_path / "out" / "edited.mp4", cli_env, tmp_path, "--place", "pti=run-stage/nosuch")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"stitchtime: starting to edit {clip}",
        f"Error: no deployment 'run-stage/nosuch' on {cli_env['PREFECT_API_URL']}; deploy it (see "
        "deployments/README.md) or run the stage in the edit flow"]
    assert list((tmp_path / "out").iterdir()) == []


def test_a_missing_gpu_fails_before_prefect_starts(clip: Path, tmp_path: Path) -> None:
    """--device cuda where no GPU is visible (CUDA_VISIBLE_DEVICES hides any): one Error: line, exit 2."""
    home = tmp_path / "prefect-home"
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), CUDA_VISIBLE_DEVICES="")
    (tmp_path / "out").mkdir()
    result = run_cli(["edit", str(clip), "--edit", "age=2", "--out", str(tmp_path / "out" / "edited.mp4"), *FAST,
                      "--store", str(tmp_path / "data"), "--device", "cuda"], env=env, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 2 and lines[0] == f"stitchtime: starting to edit {clip}", result.stderr
    assert lines[1].startswith("Error: --device cuda: no CUDA GPU is visible here (torch ")
    assert lines[1].endswith("CUDA_VISIBLE_DEVICES=''): run with --device cpu, or where an NVIDIA GPU and its "
                             "driver are")
    assert not home.exists() and not (tmp_path / "data").exists()
    assert list((tmp_path / "out").iterdir()) == []


def test_a_bad_setting_fails_a_batch_before_prefect_starts(clip: Path, tmp_path: Path) -> None:
    library, home = tmp_path / "library", tmp_path / "prefect-home"
    library.mkdir()
    shutil.copy(clip, library / "a.mp4")
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(home)
    result = run_cli(["batch", str(library), "--edit", "age=2", "--out", str(tmp_path / "edited"),
                      "--set", "output.codec=nosuchcodec"], env=env, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [f"stitchtime: starting to edit the videos under {library}",
                                          "Error: output.codec=nosuchcodec, output.crf=18, output.preset=medium, "
                                          "output.pix_fmt=yuv420p: ffmpeg cannot encode with these settings "
                                          "(Unknown encoder 'nosuchcodec')"]
    assert not home.exists() and not (tmp_path / "edited").exists()


def test_a_missing_source_is_refused(cli_env: dict[str, str], tmp_path: Path) -> None:
    result = edit(tmp_path / "missing.mp4", tmp_path / "out" / "edited.mp4", cli_env, tmp_path)
    assert_refused(result, tmp_path / "out", str(tmp_path / "missing.mp4"), "no such file")


@pytest.mark.parametrize("case, problem", [
    ("loop", "a symlink loop"),  # not "no such file": the OS says too many levels of symbolic links
    ("loop through a folder", "a symlink loop"),
    ("broken", "no such file (a broken symlink to {root}/gone.mp4)"),
])
def test_a_source_that_is_a_symlink_loop_or_a_broken_link_is_named_as_such(case: str, problem: str,
                                                                             cli_env: dict[str, str],
                                                                             tmp_path: Path) -> None:
    (tmp_path / "loop.mp4").symlink_to("loop.mp4")
    (tmp_path / "ring").symlink_to("ring", target_is_directory=True)
    (tmp_path / "broken.mp4").symlink_to("gone.mp4")
    source = {"loop": tmp_path / "loop.mp4", "loop through a folder": tmp_path / "ring" / "clip.mp4",
              "broken": tmp_path / "broken.mp4"}[case]
    result = edit(source, tmp_path / "out" / "edited.mp4", cli_env, tmp_path)
    assert_refused(result, tmp_path / "out", f"Error: {source}: {problem.format(root=tmp_path)}")


def test_an_output_that_is_a_symlink_loop_is_named_as_one(clip: Path, cli_env: dict[str, str],
                                                          tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "edited.mp4").symlink_to("edited.mp4")
    result = edit(clip, tmp_path / "out" / "edited.mp4", cli_env, tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr  # Path.resolve raised RuntimeError
    assert [line for line in result.stderr.splitlines() if line.startswith("Error:")] == [
        f"Error: {tmp_path / 'out' / 'edited.mp4'}: a symlink loop"]
    assert os.listdir(tmp_path / "out") == ["edited.mp4"]  # the link left as it was, nothing written
    assert os.readlink(tmp_path / "out" / "edited.mp4") == "edited.mp4"


def _models_folder(folder: Path, *, generator: bool) -> Path:
    """Files under the ffhq profile's names, all BiSeNet weights but a real-layout generator if asked."""
    folder.mkdir()
    torch.save(fake_official.seeded_weights(BiSeNet(), seed=1).state_dict(), folder / "79999_iter.pth")
    for name in ("ffhq.pkl", "e4e_ffhq_encode.pt", "alexnet-owt-7be5be79.pth"):
        shutil.copy(folder / "79999_iter.pth", folder / name)
    if generator:
        fake_official.write_fake_ada_pickle(folder / "ffhq.pkl", img_resolution=64)
    return folder


@pytest.mark.parametrize("role, file, problem", [
    (None, "ffhq.pkl", "stitchtime models fetch"),
    ("generator", "ffhq.pkl", "is not a stylegan2-ada network pickle (found a dict of 191 tensors"),
    ("encoder", "e4e_ffhq_encode.pt", "is not an e4e checkpoint"),
])
def test_missing_or_wrong_model_files_are_named(role: str | None, file: str, problem: str, clip: Path,
                                                cli_env: dict[str, str], tmp_path: Path) -> None:
    """No files at all; then BiSeNet's face-parsing weights given as the generator, then as the encoder."""
    models = tmp_path / "models"
    if role is None:
        models.mkdir()
    else:
        _models_folder(models, generator=role == "encoder")
    result = edit(clip, tmp_path / "out" / "edited.mp4", cli_env, tmp_path, "--profile", "ffhq", "--models", str(models))
    assert_refused(result, tmp_path / "out", str(models / file), problem)


def _read_only_command(folder: Path, command: list[str]) -> list[str]:
    """``command`` run where ``folder`` cannot be written: a read-only bind mount in a user namespace
    (no privileges needed); permissions suffice when not root."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return command
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("running as root without user namespaces: no way to make a folder read-only")
    mount = f"mount --bind {folder} {folder} && mount -o remount,ro,bind {folder} {folder}"
    return ["unshare", "-rm", "sh", "-c", f'{mount} && exec "$@"', "sh", *command]


def test_an_output_folder_that_cannot_be_written(clip: Path, cli_env: dict[str, str], tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    command = _read_only_command(locked, [sys.executable, "-m", "flows.cli", "edit", str(clip), "--edit", "age=2",
                                          "--out", str(locked / "edited.mp4"), "--store", str(tmp_path / "data")])
    result = subprocess.run(command, capture_output=True, text=True, env=cli_env, cwd=tmp_path, timeout=600)
    assert_refused(result, locked, str(locked), "output folder is not writable")
    assert not (tmp_path / "data").exists()  # refused before any stage ran


@pytest.mark.parametrize("case, problem", [
    ("missing bucket", "no-such-bucket"),
    ("wrong credentials", "credentials"),
])
def test_an_unusable_s3_store(case: str, problem: str, s3_server, clip: Path, cli_env: dict[str, str],
                              tmp_path: Path) -> None:
    env = {**cli_env, **s3_server.env, "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    store = f"s3://{s3_server.bucket}/bad-inputs"
    if case == "missing bucket":
        store = "s3://no-such-bucket/stitchtime"
    else:
        env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret-key"
    out = tmp_path / "out" / "edited.mp4"
    out.parent.mkdir()
    result = run_cli(["edit", str(clip), "--edit", "age=2", "--out", str(out), "--store", store, *FAST], env=env,
                     cwd=tmp_path)
    assert_refused(result, out.parent, problem)


# --- valid but unusual videos: one batch edits them all --------------------------------------------

@pytest.fixture(scope="module")
def library(workdir: Path) -> Path:
    folder = workdir / "library"
    folder.mkdir()
    for build in corpus.UNUSUAL.values():
        path = build(workdir)
        shutil.move(path, folder / path.name)
    return folder


@pytest.fixture(scope="module")
def unusual_batch(library: Path, workdir: Path, cli_env: dict[str, str]) -> dict:
    result = run_cli(["batch", str(library), "--edit", "age=2", "--out", str(workdir / "edited"),
                      "--store", str(workdir / "data"), "--json", *FAST], env=cli_env, cwd=workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    return {video["name"]: video for video in json.loads(result.stdout)["videos"]}


def _frames(path: Path) -> np.ndarray:
    return np.stack(list(iter_frames(path))).astype(np.float32)


@pytest.mark.parametrize("case", list(corpus.UNUSUAL))
def test_an_unusual_video_is_edited_correctly(case: str, library: Path, workdir: Path, unusual_batch: dict) -> None:
    name = corpus.UNUSUAL[case](workdir).name
    source, out = library / name, workdir / "edited" / name
    assert unusual_batch[name]["status"] == "done"
    src_info, out_info = probe(source), probe(out)
    # The source's frames, display size (odd sizes one pixel larger), rotation, duration and sound.
    assert out_info.frame_count == src_info.frame_count
    assert (out_info.width - src_info.width, out_info.height - src_info.height) == \
        (src_info.width % 2, src_info.height % 2)
    assert out_info.rotation == src_info.rotation and out_info.has_audio == src_info.has_audio
    assert abs(out_info.duration - src_info.duration) <= 1.5 / float(src_info.fps)

    summary = json.loads(out.with_name(f"{out.stem}.summary.json").read_text())
    passed = summary["passed_through_frames"]
    src = _frames(source)
    change = np.abs(_frames(out)[:, :src_info.height, :src_info.width] - src).mean(axis=(1, 2, 3))
    edited = np.delete(change, passed)
    assert len(edited) == summary["edited_frames"] > 0
    # Passed-through frames, and the face that is not edited, only carry re-encoding loss (crf 18:
    # about 2 grey levels on these small, detailed frames); the edited face changes far more.
    if case == "face-leaves":
        assert 0 not in passed and {9, 10, 11} <= set(passed)
        assert change[passed].max() < 4.0 and edited.min() > 2 * change[passed].max(), change
    elif case == "two-faces":  # the larger face (left) is edited, the other is left alone
        half = src.shape[2] // 2
        left, right = (np.abs(_frames(out)[:, :, part] - src[:, :, part]).mean()
                       for part in (slice(None, half), slice(half, None)))
        assert right < 4.0 and left > 3 * right, (left, right)
    else:
        assert passed == [] and edited.min() > 5.0, change
