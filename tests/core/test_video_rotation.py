"""Display rotation, as phones record portrait clips: probed, decoded upright, written back as it was.

The rotated sources are made by ffmpeg's own stream copy, then checked pixel by pixel against
ffmpeg's decoding (autorotate), which is how players show them; the writer's outputs are then
compared with the sources through raw ffprobe fields (coded size, display matrix).
"""

from __future__ import annotations

import json
import os
import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from stitchtime_core.config import OutputConfig
from stitchtime_core.video import (
    VideoWriter,
    ffmpeg_binary,
    ffmpeg_version,
    ffprobe_binary,
    iter_frames,
    probe,
)

NEAR_LOSSLESS = OutputConfig(crf=0, preset="ultrafast", pix_fmt="yuv444p")
CODED_SIZE = (96, 64)
"""(width, height) of the stored frames: a landscape sensor, like a phone's."""


def coded_frames(count: int, width: int, height: int) -> list[np.ndarray]:
    """Frames whose every quarter turn and mirror image differ: red across, green down, blue per frame."""
    y, x = np.mgrid[0:height, 0:width]
    return [
        np.stack([255 * x / (width - 1), 255 * (y / (height - 1)) ** 2, np.full_like(x, 40 * i)], axis=-1)
        .round().astype(np.uint8)
        for i in range(count)
    ]


def raw_geometry(path: Path) -> tuple[int, int, float | None]:
    """(coded width, coded height, counter-clockwise display matrix rotation or None), from ffprobe."""
    result = subprocess.run(
        [ffprobe_binary(), "-v", "error", "-select_streams", "v:0", "-show_streams", "-print_format", "json",
         str(path)],
        capture_output=True, text=True, check=True,
    )
    stream = json.loads(result.stdout)["streams"][0]
    rotation = next((float(s["rotation"]) for s in stream.get("side_data_list", []) if "rotation" in s), None)
    return int(stream["width"]), int(stream["height"]), rotation


def audio_packets(path: Path) -> list[tuple[str, str]]:
    result = subprocess.run(
        [ffprobe_binary(), "-v", "error", "-select_streams", "a", "-show_packets", "-show_data_hash", "MD5",
         "-show_entries", "packet=pts,data_hash", "-print_format", "json", str(path)],
        capture_output=True, text=True, check=True,
    )
    return [(p["pts"], p["data_hash"]) for p in json.loads(result.stdout).get("packets", [])]


def mean_error(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.abs(a.astype(np.int16) - b).mean())


def tag_rotation(source: Path, out: Path, clockwise: int) -> None:
    """Copy ``source`` with a display rotation, as a phone stores a portrait clip."""
    counter_clockwise = str((360 - clockwise) % 360)
    version = ffmpeg_version()
    if version is not None and version < (6, 0):
        options = ["-i", str(source), "-metadata:s:v:0", f"rotate={counter_clockwise}"]
    else:
        options = ["-display_rotation:v:0", counter_clockwise, "-i", str(source)]
    subprocess.run([ffmpeg_binary(), "-v", "error", *options, "-map", "0", "-c", "copy", str(out)],
                   check=True, capture_output=True)


@pytest.fixture(scope="module")
def sound(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sound") / "sound.m4a"
    subprocess.run([ffmpeg_binary(), "-v", "error", "-f", "lavfi", "-i", "sine=frequency=330:duration=0.5",
                    "-c:a", "aac", str(path)], check=True, capture_output=True)
    return path


def make_phone_clip(folder: Path, clockwise: int, sound: Path) -> tuple[Path, list[np.ndarray]]:
    """A 6-frame clip stored as 96x64 with a display rotation and a sound track; and its stored frames."""
    frames = coded_frames(6, *CODED_SIZE)
    plain = folder / "plain.mp4"
    with VideoWriter(plain, width=CODED_SIZE[0], height=CODED_SIZE[1], fps=Fraction(25), config=NEAR_LOSSLESS,
                     audio_source=sound) as writer:
        for frame in frames:
            writer.write(frame)
    phone = folder / f"phone{clockwise}.mp4"
    tag_rotation(plain, phone, clockwise)
    return phone, frames


@pytest.mark.parametrize("clockwise", [90, 180, 270])
def test_rotated_clip_is_probed_and_decoded_upright(tmp_path: Path, sound: Path, clockwise: int) -> None:
    phone, stored = make_phone_clip(tmp_path, clockwise, sound)
    width, height, counter_clockwise = raw_geometry(phone)
    assert (width, height) == CODED_SIZE
    assert counter_clockwise is not None and (round(counter_clockwise) + clockwise) % 360 == 0
    info = probe(phone)
    assert info.rotation == clockwise
    turned = clockwise in (90, 270)
    assert (info.width, info.height) == (CODED_SIZE[::-1] if turned else CODED_SIZE)
    decoded = list(iter_frames(phone, info))
    assert len(decoded) == 6
    for frame, upright in zip(stored, decoded):
        assert mean_error(np.rot90(frame, k=-clockwise // 90), upright) < 1.5  # turned clockwise


@pytest.mark.parametrize("clockwise", [90, 180, 270])
def test_writer_keeps_the_coded_size_and_display_rotation(
    tmp_path: Path, sound: Path, clockwise: int
) -> None:
    phone, _ = make_phone_clip(tmp_path, clockwise, sound)
    info = probe(phone)
    upright = list(iter_frames(phone, info))
    edits = tmp_path / "edits"
    edits.mkdir()
    out = edits / "out.mp4"
    with VideoWriter(out, width=info.width, height=info.height, fps=info.fps, config=NEAR_LOSSLESS,
                     audio_source=phone, rotation=info.rotation) as writer:
        assert writer.rotation == clockwise
        for frame in upright:
            writer.write(frame)
    assert os.listdir(edits) == ["out.mp4"]  # no temporary file left behind
    assert raw_geometry(out) == raw_geometry(phone)  # coded 96x64, the same display matrix rotation
    out_info = probe(out)
    assert (out_info.width, out_info.height, out_info.rotation) == (info.width, info.height, info.rotation)
    assert out_info.frame_count == 6 and out_info.fps == info.fps
    assert audio_packets(out) == audio_packets(phone)
    decoded = list(iter_frames(out, out_info))
    assert len(decoded) == 6
    for written, read in zip(upright, decoded):
        assert mean_error(written, read) < 1.5  # only YUV rounding


def test_odd_display_size_is_padded_in_coded_orientation(tmp_path: Path) -> None:
    upright = [np.rot90(frame, k=-1) for frame in coded_frames(3, 63, 47)]  # display 47x63
    out = tmp_path / "out.mp4"
    config = OutputConfig(crf=0, preset="ultrafast", pix_fmt="yuv420p")
    with VideoWriter(out, width=47, height=63, fps=Fraction(30), config=config, rotation=90) as writer:
        for frame in upright:
            writer.write(frame)
    assert raw_geometry(out)[:2] == (64, 48)  # coded 63x47 plus one repeated column and row
    info = probe(out)
    assert (info.width, info.height, info.rotation) == (48, 64, 90)
    decoded = next(iter_frames(out, info))
    # coded column 63 and row 47 are display row 63 and column 0: the picture itself is unmoved
    assert mean_error(decoded[:63, 1:], upright[0]) < 3


def test_containers_without_rotation_get_upright_frames(tmp_path: Path) -> None:
    upright = [np.rot90(frame, k=-1) for frame in coded_frames(3, *CODED_SIZE)]
    out = tmp_path / "out.mkv"
    with VideoWriter(out, width=64, height=96, fps=Fraction(25), config=NEAR_LOSSLESS, rotation=90) as writer:
        assert writer.rotation == 0
        for frame in upright:
            writer.write(frame)
    assert raw_geometry(out) == (64, 96, None)
    info = probe(out)
    assert (info.width, info.height, info.rotation) == (64, 96, 0)
    for written, read in zip(upright, iter_frames(out, info)):
        assert mean_error(written, read) < 1.5


@pytest.mark.parametrize("rotation", [45, -90, 360])
def test_rotation_must_be_a_quarter_turn(tmp_path: Path, rotation: int) -> None:
    with pytest.raises(ValueError, match="rotation"):
        VideoWriter(tmp_path / "out.mp4", width=64, height=48, fps=Fraction(25), config=NEAR_LOSSLESS,
                    rotation=rotation)
    assert os.listdir(tmp_path) == []
