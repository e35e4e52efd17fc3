"""The bad-input corpus: unusual and broken videos, each built on the spot from the sample clip.

Every builder writes one file and returns its path. The valid-but-unusual ones keep the sample
clip's moving face, so the pipeline has something to edit; the broken ones are cut, emptied or
faked from it.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

from stitchtime_core.config import OutputConfig
from stitchtime_core.sample_clip import make_sample_clip
from stitchtime_core.video import VideoWriter, ffmpeg_binary, iter_frames

FRAMES = 6
"""Frames of every valid clip: enough for the pipeline's temporal steps, few enough to be quick."""
SIZE = (160, 160)


def _ffmpeg(*args: str | Path) -> None:
    subprocess.run([ffmpeg_binary(), "-v", "error", "-nostdin", "-y", *map(str, args)], check=True)


def _write(path: Path, frames: list[np.ndarray], *, fps: Fraction = Fraction(25)) -> Path:
    height, width = frames[0].shape[:2]
    with VideoWriter(path, width=width, height=height, fps=fps, config=OutputConfig(crf=12)) as writer:
        for frame in frames:
            writer.write(frame)
    return path


def base_clip(folder: Path) -> Path:
    """The sample clip (a real face under a moving camera, with sound), FRAMES frames at SIZE."""
    path = folder / "base.mp4"
    if not path.exists():
        make_sample_clip(path, seconds=FRAMES / 25, size=SIZE)
    return path


def _base_frames(folder: Path) -> list[np.ndarray]:
    return list(iter_frames(base_clip(folder)))


# --- broken files: each must end in one clear error ---------------------------------------------

def empty(folder: Path) -> Path:
    path = folder / "empty.mp4"
    path.write_bytes(b"")
    return path


def truncated(folder: Path) -> Path:
    """The first 60% of an MP4 whose index (moov) comes first: half the frames' data is missing."""
    whole = folder / "faststart.mp4"
    _ffmpeg("-i", base_clip(folder), "-c", "copy", "-movflags", "+faststart", whole)
    path = folder / "truncated.mp4"
    path.write_bytes(whole.read_bytes()[: int(whole.stat().st_size * 0.6)])
    return path


def text(folder: Path) -> Path:
    path = folder / "notes.mp4"
    path.write_text("These are my notes, not a video.\n")
    return path


def audio_only(folder: Path) -> Path:
    path = folder / "podcast.mp4"
    _ffmpeg("-i", base_clip(folder), "-vn", "-c:a", "copy", path)
    return path


def no_face(folder: Path) -> Path:
    return _write(folder / "wall.mp4", [np.full((96, 128, 3), 40 * i, np.uint8) for i in range(FRAMES)])


# --- valid but unusual: each must give a correct edited video -----------------------------------

def tiny_frame(folder: Path) -> Path:
    """64x64: the whole face is a few dozen pixels."""
    return _write(folder / "thumb.mp4", [cv2.resize(f, (64, 64), interpolation=cv2.INTER_AREA)
                                         for f in _base_frames(folder)])


def face_leaves(folder: Path) -> Path:
    """12 frames: the sample clip, then its last frame sliding out to the right, 20 px a frame.

    From frame 9 on (60 px and more) the face is more than half out of the frame.
    """
    frames = _base_frames(folder)
    for shift in range(20, 140, 20):
        moved = np.full_like(frames[-1], 90)
        moved[:, shift:] = frames[FRAMES - 1][:, : SIZE[0] - shift]
        frames.append(moved)
    return _write(folder / "exit.mp4", frames)


def two_faces(folder: Path) -> Path:
    """The sample face and a smaller mirrored copy side by side."""
    frames = []
    for frame in _base_frames(folder):
        small = cv2.resize(frame[:, ::-1], (128, 128), interpolation=cv2.INTER_AREA)
        right = np.full_like(frame, 90)
        right[16:144, 16:144] = small
        frames.append(np.concatenate([frame, right], axis=1))
    return _write(folder / "pair.mp4", frames)


def huge_frame(folder: Path) -> Path:
    """Two 8K frames (7680x4320): the face scaled up to the full height, grey at the sides."""
    path = folder / "8k.mp4"
    _ffmpeg("-i", base_clip(folder), "-frames:v", "2", "-vf", "scale=4320:4320:flags=bicubic,pad=7680:4320:1680:0:gray",
            "-c:v", "libx264", "-preset", "ultrafast", "-crf", "28", "-an", path)
    return path


def odd_size(folder: Path) -> Path:
    """161x157, stored 4:4:4 (4:2:0 cannot hold odd sizes)."""
    path = folder / "odd.mp4"
    _ffmpeg("-i", base_clip(folder), "-vf", "scale=161:157", "-c:v", "libx264", "-pix_fmt", "yuv444p",
            "-crf", "12", "-c:a", "copy", path)
    return path


def variable_rate(folder: Path) -> Path:
    """Frames at uneven times: 1/25 s apart, then 4/25 s apart from the third frame on."""
    path = folder / "vfr.mp4"
    _ffmpeg("-i", base_clip(folder), "-vf", "setpts='(N+3*gt(N,2)*(N-2))/25/TB'", "-fps_mode", "passthrough",
            "-c:v", "libx264", "-crf", "12", "-an", path)
    return path


def rotated(folder: Path) -> Path:
    """Portrait, stored landscape with a 90° display rotation, as phones record."""
    frames = [f[:, 24:136] for f in _base_frames(folder)]  # 112x160
    path = folder / "phone.mp4"
    with VideoWriter(path, width=112, height=160, fps=Fraction(25), rotation=90, config=OutputConfig(crf=12)) as writer:
        for frame in frames:
            writer.write(frame)
    return path


def ten_bit(folder: Path) -> Path:
    path = folder / "10bit.mp4"
    _ffmpeg("-i", base_clip(folder), "-c:v", "libx264", "-pix_fmt", "yuv420p10le", "-crf", "12", "-c:a", "copy", path)
    return path


def grayscale(folder: Path) -> Path:
    """One grey plane (FFV1 in Matroska: this ffmpeg's H.264 encoder turns grey into 4:2:0)."""
    path = folder / "gray.mkv"
    _ffmpeg("-i", base_clip(folder), "-c:v", "ffv1", "-pix_fmt", "gray", "-c:a", "copy", path)
    return path


def one_frame(folder: Path) -> Path:
    path = folder / "still.mp4"
    _ffmpeg("-i", base_clip(folder), "-frames:v", "1", "-c:v", "libx264", "-crf", "12", "-an", path)
    return path


BROKEN: dict[str, Callable[[Path], Path]] = {
    "empty": empty, "truncated": truncated, "text": text, "audio-only": audio_only, "no-face": no_face,
}
UNUSUAL: dict[str, Callable[[Path], Path]] = {
    "64x64": tiny_frame, "face-leaves": face_leaves, "two-faces": two_faces, "8k": huge_frame, "odd-size": odd_size,
    "vfr": variable_rate, "rotated": rotated, "10-bit": ten_bit, "grayscale": grayscale, "one-frame": one_frame,
}
