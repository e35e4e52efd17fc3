"""``stitchtime metrics``: the JSON it prints, the file it writes, and one clear line for bad input."""

from __future__ import annotations

import json
import os
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from stitchtime_core.config import OutputConfig
from stitchtime_core.sample_clip import make_sample_clip
from stitchtime_core.video import VideoWriter
from cli_runner import run_cli


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("metrics-cli") / "clip.mp4"
    make_sample_clip(path, seconds=0.32, size=(160, 160))  # 8 frames
    return path


def test_json_of_a_clip_against_itself(clip: Path, tmp_path: Path) -> None:
    out = tmp_path / "metrics.json"
    result = run_cli(["metrics", str(clip), str(clip), "--json", "--out", str(out)], dict(os.environ), tmp_path)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed == json.loads(out.read_text())
    assert {"tl_id", "tg_id", "frames", "network", "adjacent", "to_source"} <= printed.keys()
    assert (printed["tl_id"], printed["tg_id"]) == (1.0, 1.0)
    assert (printed["frames"], printed["network"]) == (8, "dlib_face_recognition_resnet_model_v1")


def _plain_clip(path: Path, frames: int) -> Path:
    with VideoWriter(path, width=96, height=64, fps=Fraction(25), config=OutputConfig(preset="ultrafast")) as writer:
        for i in range(frames):
            writer.write(np.full((64, 96, 3), 30 * i, np.uint8))
    return path


@pytest.mark.parametrize("case, message", [
    ("missing", "missing.mp4: no such file"),
    ("text", "notes.mp4: not a readable video"),
    ("shorter", "shorter.mp4: has 5 frames but its source"),
    ("no-face", "wall.mp4: no face found in any of its 8 frames"),
])
def test_bad_input_ends_with_one_clear_line(case: str, message: str, clip: Path, tmp_path: Path) -> None:
    edited, source = {"missing": (tmp_path / "missing.mp4", clip), "text": (tmp_path / "notes.mp4", clip),
                      "shorter": (_plain_clip(tmp_path / "shorter.mp4", 5), clip),
                      "no-face": (_plain_clip(tmp_path / "wall.mp4", 8), tmp_path / "wall.mp4")}[case]
    if case == "text":
        edited.write_text("not a video\n")
    result = run_cli(["metrics", str(edited), str(source)], dict(os.environ), tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stdout == "" and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("Error: ") and message in result.stderr


def test_a_face_point_outside_every_face_names_the_nearest(clip: Path, tmp_path: Path) -> None:
    result = run_cli(["metrics", str(clip), str(clip), "--face", "2,3"], dict(os.environ), tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stdout == "" and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"Error: {clip}: --face 2,3: no face contains this point in frame 0, "
                                    "the first with faces; the nearest is the face at ("), result.stderr
    assert result.stderr.rstrip().endswith(" px away"), result.stderr


@pytest.mark.parametrize("face, problem", [
    ("160,5", "the point lies outside the frame of {clip} (160x160 px; X from 0 to 159, Y from 0 to 159)"),
    ("abc", "alignment.face must be 'largest', an index N or a pixel X,Y; got 'abc'"),
])
def test_a_bad_face_option_is_named_before_measuring(face: str, problem: str, clip: Path, tmp_path: Path) -> None:
    result = run_cli(["metrics", str(clip), str(clip), "--face", face], dict(os.environ), tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines()[-1] == f"Error: --face {face}: {problem.format(clip=clip)}"


@pytest.mark.parametrize("case", ["edited", "source", "missing-folder"])
def test_out_is_checked_before_measuring_and_never_overwrites_a_video(case: str, clip: Path, tmp_path: Path) -> None:
    edited, source = tmp_path / "edited.mp4", tmp_path / "source.mp4"
    shutil.copy(clip, edited)
    shutil.copy(clip, source)
    out = {"edited": edited, "source": source, "missing-folder": tmp_path / "nowhere" / "m.json"}[case]
    result = run_cli(["metrics", str(edited), str(source), "--out", str(out)], dict(os.environ), tmp_path)
    assert result.returncode == 1 and result.stdout == ""  # nothing measured, no scores printed
    problem = "output folder does not exist" if case == "missing-folder" else "output would overwrite its source"
    shown = out.parent if case == "missing-folder" else out
    assert result.stderr.splitlines() == [f"Error: {shown}: {problem}"]
    assert edited.read_bytes() == source.read_bytes() == clip.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited.mp4", "source.mp4"]
