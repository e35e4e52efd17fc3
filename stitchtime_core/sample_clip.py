"""The demo clip: a real face photo filmed by a slowly moving virtual camera, with a sound track.

The photo is scikit-image's ``astronaut`` (Eileen Collins, NASA, public domain; 512x512 RGB), or any
photo with the box of the face to film. The camera zooms in slowly towards the face, pans gently and
rolls a few degrees back and forth, so the face moves like a head in a hand-held shot while staying
whole and large in every frame. The camera's path is set relative to the face box (its centre and
size), so every face is framed as the astronaut's. The sound track is a soft chord of sine tones
under a slow swell, encoded as AAC, so the pipeline's audio copy can be checked on it.

Everything is a function of ``seed``: it picks the phases of the camera's wobble and of the tones.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import wave
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import skimage.data

from stitchtime_core.config import OutputConfig
from stitchtime_core.errors import StitchtimeError
from stitchtime_core.video import VideoWriter, ffmpeg_binary

FACE_BOX = (175.0, 55.0, 262.0, 182.0)
"""The astronaut's face (brow to chin, ear to ear) in the photo: x0, y0, x1, y1 in pixels."""

SAMPLE_RATE = 48_000
"""Audio samples per second of the sound track."""

# The camera's path in face units: lengths in face sizes (the mean of the face box's width and height),
# points from the face box's centre. Each is the demo's original value in astronaut pixels over her
# face size, so the astronaut's clip is as it was, and any other face is framed as hers.
_DEMO_FACE_SIZE = (FACE_BOX[2] - FACE_BOX[0] + FACE_BOX[3] - FACE_BOX[1]) / 2.0  # 107 px
_START_WINDOW = 250.0 / _DEMO_FACE_SIZE
"""Shorter side of the camera's view at the first frame, in face sizes (250 px for the astronaut)..."""
_END_WINDOW = 195.0 / _DEMO_FACE_SIZE
"""...and at the last one (the zoom-in)."""
_START_CENTRE = np.array([-4.5, 5.5]) / _DEMO_FACE_SIZE
"""Where the view's centre is at the first frame, from the face's centre in face sizes (just below it)..."""
_END_CENTRE = np.array([3.5, -8.5]) / _DEMO_FACE_SIZE
"""...and at the last one."""
_WOBBLE = 5.0 / _DEMO_FACE_SIZE
"""Amplitude of the hand-held pan, in face sizes."""
_ROLL_DEGREES = 4.0
"""Amplitude of the camera roll."""


def camera_matrices(
    frame_count: int,
    *,
    fps: Fraction,
    size: tuple[int, int],
    seed: int = 0,
    face_box: tuple[float, float, float, float] = FACE_BOX,
) -> np.ndarray:
    """The camera path around a face: for each frame the affine map from photo pixels to frame pixels.

    Args:
        frame_count: number of frames.
        fps: frames per second (the motion's speed is set in seconds).
        size: (width, height) of the frames.
        seed: picks the phases of the pan and roll oscillations.
        face_box: the face in the photo, (x0, y0, x1, y1) pixels, brow to chin and ear to ear as
            :data:`FACE_BOX`; the view is placed and sized from its centre and size.

    Returns:
        float64 [frame_count, 2, 3]: frame point = M[:, :2] @ photo point + M[:, 2], pixel
        centres at integer coordinates.

    Raises:
        ValueError: a face box that is not finite with x1 > x0 and y1 > y0.
    """
    face_centre, face_size = _face_frame(face_box)
    width, height = size
    rng = np.random.default_rng(seed)
    pan_phase = rng.uniform(0.0, 2.0 * np.pi, size=2)
    roll_phase = rng.uniform(0.0, 2.0 * np.pi)
    seconds = np.arange(frame_count) / float(fps)
    progress = np.arange(frame_count) / max(frame_count - 1, 1)
    ease = progress * progress * (3.0 - 2.0 * progress)  # smoothstep: starts and stops gently

    frame_centre = np.array([(width - 1) / 2.0, (height - 1) / 2.0])
    matrices = np.empty((frame_count, 2, 3))
    for i in range(frame_count):
        t = seconds[i]
        window = face_size * (_START_WINDOW + (_END_WINDOW - _START_WINDOW) * ease[i])
        photo_centre = face_centre + face_size * (_START_CENTRE + (_END_CENTRE - _START_CENTRE) * ease[i])
        wobble = face_size * _WOBBLE * np.sin(2.0 * np.pi * np.array([0.31, 0.23]) * t + pan_phase)
        photo_centre = photo_centre + wobble
        roll = np.deg2rad(_ROLL_DEGREES) * np.sin(2.0 * np.pi * 0.37 * t + roll_phase)
        zoom = min(width, height) / window  # frame pixels per photo pixel
        cos, sin = np.cos(roll), np.sin(roll)
        linear = zoom * np.array([[cos, sin], [-sin, cos]])
        matrices[i, :, :2] = linear
        matrices[i, :, 2] = frame_centre - linear @ photo_centre
    return matrices


def _face_frame(face_box: tuple[float, float, float, float]) -> tuple[np.ndarray, float]:
    """The centre (float64 [2], x and y) and size (mean of width and height) of a face box."""
    x0, y0, x1, y1 = (float(v) for v in face_box)
    if not (np.isfinite([x0, y0, x1, y1]).all() and x1 > x0 and y1 > y0):
        raise ValueError(f"face_box must be finite (x0, y0, x1, y1) with x1 > x0 and y1 > y0, got {face_box}")
    return np.array([(x0 + x1) / 2.0, (y0 + y1) / 2.0]), (x1 - x0 + y1 - y0) / 2.0


def render_frame(photo: np.ndarray, matrix: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """One camera view of the photo.

    Args:
        photo: uint8 [H, W, 3] RGB.
        matrix: float [2, 3] photo-to-frame affine map, from :func:`camera_matrices`.
        size: (width, height) of the frame.

    Returns:
        uint8 [height, width, 3] RGB; outside the photo it is mirrored.
    """
    return cv2.warpAffine(
        photo, matrix, size, flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT_101
    )


def sound_track(sample_count: int, *, seed: int = 0) -> np.ndarray:
    """A soft stereo chord of sine tones with a slow swell and gentle fades, at :data:`SAMPLE_RATE`.

    Args:
        sample_count: samples per channel.
        seed: picks the tones' phases and slight detuning.

    Returns:
        int16 [sample_count, 2] (left, right).
    """
    rng = np.random.default_rng(seed)
    t = np.arange(sample_count) / SAMPLE_RATE
    tones = np.array([220.0, 277.18, 329.63, 440.0]) * (1.0 + rng.uniform(-0.004, 0.004, size=4))
    phases = rng.uniform(0.0, 2.0 * np.pi, size=4)
    left_gain = np.array([0.9, 0.4, 0.7, 0.3])
    chord = np.sin(2.0 * np.pi * tones[None, :] * t[:, None] + phases[None, :])
    left = chord @ left_gain
    right = chord @ left_gain[::-1]
    swell = 0.6 + 0.4 * np.sin(2.0 * np.pi * 0.25 * t) ** 2
    fade = np.clip(np.minimum(t, sample_count / SAMPLE_RATE - t) / 0.1, 0.0, 1.0)
    stereo = np.stack([left, right], axis=1) * (swell * fade / left_gain.sum())[:, None]
    return np.round(0.4 * 32767.0 * stereo).astype(np.int16)


def _write_wav(path: Path, samples: np.ndarray) -> None:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(samples.shape[1])
        wav.setsampwidth(2)
        wav.setframerate(SAMPLE_RATE)
        wav.writeframes(samples.astype("<i2").tobytes())


def make_sample_clip(
    path: str | os.PathLike,
    *,
    photo: np.ndarray | None = None,
    face_box: tuple[float, float, float, float] | None = None,
    seconds: float = 3.0,
    fps: Fraction = Fraction(25),
    size: tuple[int, int] = (384, 384),
    seed: int = 0,
) -> None:
    """Write a sample clip: a photo under a camera moving around a face, with an AAC sound track.

    By default the photo is the astronaut and the face :data:`FACE_BOX` (the demo clip). The sound
    track is written as a WAV, encoded to AAC in an .m4a (both in a temporary folder), and copied
    into the clip by :class:`VideoWriter` like any source's audio; so the clip is written
    atomically, by the same code path as the pipeline's outputs. Its length is exactly the video's
    (frame_count / fps).

    Args:
        path: the output file, e.g. ``sample.mp4``.
        photo: uint8 [H, W, 3] RGB; the astronaut when None. Outside the photo the view is mirrored.
        face_box: the face to film in ``photo``, (x0, y0, x1, y1) pixels, brow to chin and ear to ear
            as :data:`FACE_BOX` (the camera frames any box as it frames that one); required with
            ``photo``, and :data:`FACE_BOX` when both are None.
        seconds: length; the clip has ``round(seconds * fps)`` frames (at least one).
        fps: frames per second.
        size: (width, height) in pixels. The face is at least 30% of the frame width for square
            sizes; wide frames show more of the surroundings.
        seed: picks the camera wobble and the tones; the same seed gives the same frames and sound.

    Raises:
        ValueError: a photo that is not uint8 [H, W, 3], a photo without a face box, or a bad face box.
        InputError: the output folder is missing or not writable.
        StitchtimeError: ffmpeg is not installed or fails.
    """
    if photo is None:
        photo = skimage.data.astronaut()
        face_box = FACE_BOX if face_box is None else face_box
    elif face_box is None:
        raise ValueError("a photo needs the face_box of the face to film")
    if not isinstance(photo, np.ndarray) or photo.dtype != np.uint8 or photo.ndim != 3 or photo.shape[2] != 3:
        described = f"{photo.dtype} {list(photo.shape)}" if isinstance(photo, np.ndarray) else type(photo).__name__
        raise ValueError(f"photo must be a uint8 [H, W, 3] RGB array, got {described}")
    fps = Fraction(fps)
    frame_count = max(1, round(seconds * fps))
    sample_count = round(SAMPLE_RATE * frame_count / fps)
    matrices = camera_matrices(frame_count, fps=fps, size=size, seed=seed, face_box=face_box)

    with tempfile.TemporaryDirectory(prefix="stitchtime-sample-") as folder:
        wav_path = Path(folder) / "sound.wav"
        m4a_path = Path(folder) / "sound.m4a"
        _write_wav(wav_path, sound_track(sample_count, seed=seed))
        result = subprocess.run(
            [
                ffmpeg_binary(), "-v", "error", "-nostdin", "-y", "-i", str(wav_path),
                "-c:a", "aac", "-b:a", "128k", str(m4a_path),
            ],
            capture_output=True, text=True,
        )
        if result.returncode != 0:
            raise StitchtimeError(
                f"ffmpeg failed to encode the sample sound track: {result.stderr.strip()}"
            )

        writer = VideoWriter(
            path, width=size[0], height=size[1], fps=fps, config=OutputConfig(),
            audio_source=m4a_path,
        )
        with writer:
            for matrix in matrices:
                writer.write(render_frame(photo, matrix, size))
