"""Face detection, 68-point landmarks, and one face track through a video (paper section 3.1).

Detection is dlib's HOG frontal face detector or its CNN (MMOD) face detector; landmarks are dlib's
68-point shape predictor (the iBUG 300-W layout that the FFHQ alignment recipe indexes into).
Coordinates are pixel indices of the frame: x to the right, y down, (0, 0) the centre of the
top-left pixel.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import cv2
import dlib
import numpy as np

from stitchtime_core.errors import InputError

Rect = tuple[int, int, int, int]
"""A face box (x0, y0, x1, y1) in frame pixels, corners included."""

DETECTORS = ("hog", "cnn")
"""The face detectors :func:`load_landmarker` knows."""

_MODEL_PACKAGE = "face_recognition_models"
_LANDMARK_FILE = "models/shape_predictor_68_face_landmarks.dat"
_CNN_FILE = "models/mmod_human_face_detector.dat"



MAX_GATE_GROWTH = 2
"""The track's gate grows with each missed frame up to (1 + this) times its base size."""

def _packaged_model(relative: str, what: str) -> Path:
    # Located without importing the package: its __init__ imports pkg_resources, which recent
    # setuptools no longer provides.
    spec = importlib.util.find_spec(_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(_MODEL_PACKAGE, f"package is not installed; it ships the {what}")
    path = Path(spec.submodule_search_locations[0]) / relative
    if not path.is_file():
        raise InputError(path, f"{what} file is missing")
    return path


def landmark_model_path() -> Path:
    """Where the 68-point landmark model shipped by ``face_recognition_models`` lies.

    Returns:
        The path of ``shape_predictor_68_face_landmarks.dat``.

    Raises:
        InputError: the package is not installed or the file is missing from it.
    """
    return _packaged_model(_LANDMARK_FILE, "landmark model")


def cnn_detector_model_path() -> Path:
    """Where dlib's CNN (MMOD) face detector shipped by ``face_recognition_models`` lies.

    Returns:
        The path of ``mmod_human_face_detector.dat``.

    Raises:
        InputError: the package is not installed or the file is missing from it.
    """
    return _packaged_model(_CNN_FILE, "CNN face detector")


@dataclass(frozen=True, eq=False)
class FaceLandmarker:
    """A face detector and a landmark predictor, loaded; build it with :func:`load_landmarker`.

    Attributes:
        detector: dlib's HOG frontal face detector or its CNN face detector.
        predictor: dlib's 68-point shape predictor.
        upsample: how many times the detector upsamples the image it searches (HOG finds face
            boxes down to ~30 px at 1, ~55 px at 0, as ``benchmarks/landmarks.py`` measured; the
            CNN about the same), counted in pixels of the downscaled copy (see ``max_side``). A
            frame whose longer side is below ``SMALL_FRAME`` (160) px, a thumbnail whose face is a
            few dozen pixels, is upsampled as many more times as it takes to reach it: once for
            80-159 px, twice for 40-79.
        max_side: the detector searches a copy of the frame shrunk so its longer side is at most
            this many pixels (0: never shrink); landmarks are always fitted on the full frame.
            Shrinking also raises the smallest face found: 960 on a 1080p frame halves it, so at
            upsample 1 boxes need ~60 frame pixels instead of ~30 (on a 4K frame ~120).

    The defaults here (upsample 1, at most 960 px) are this module's; the pipeline passes
    ``AlignmentConfig``'s, which follow the reference code (0 and 0: the full frame, no upsampling).
    """

    detector: dlib.fhog_object_detector | dlib.cnn_face_detection_model_v1
    predictor: dlib.shape_predictor
    upsample: int = 1
    max_side: int = 960

    def detect(self, frame: np.ndarray) -> list[tuple[Rect, np.ndarray]]:
        """Find faces and their landmarks in one frame.

        Args:
            frame: uint8 [H, W, 3] RGB image.

        Returns:
            One (rect, landmarks) pair per face, largest box first (ties: higher detector score
            first). ``rect`` is (x0, y0, x1, y1) in full-frame pixels; ``landmarks`` is float64
            [68, 2] of (x, y) full-frame pixel coordinates. Empty when no face is found.

        Raises:
            ValueError: the frame is not a uint8 [H, W, 3] array.
        """
        _check_frame(frame)
        image = np.ascontiguousarray(frame)
        boxes = self._find_boxes(image)
        boxes.sort(key=lambda box: ((box[0][2] - box[0][0] + 1) * (box[0][3] - box[0][1] + 1), box[1]),
                   reverse=True)
        faces = []
        for rect, _ in boxes:
            shape = self.predictor(image, dlib.rectangle(*rect))
            points = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)
            faces.append((rect, points))
        return faces

    def _find_boxes(self, image: np.ndarray) -> list[tuple[Rect, float]]:
        """(rect, score) of every face, rects in full-frame pixels."""
        height, width = image.shape[:2]
        small, sx, sy = image, 1.0, 1.0
        if 0 < self.max_side < max(height, width):
            factor = self.max_side / max(height, width)
            size = (max(round(width * factor), 1), max(round(height * factor), 1))
            small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
            sx, sy = size[0] / width, size[1] / height
        upsample = self.upsample + _extra_upsample(max(height, width))
        if isinstance(self.detector, dlib.cnn_face_detection_model_v1):
            found = [(d.rect, d.confidence) for d in self.detector(small, upsample)]
        else:
            rects, scores, _ = self.detector.run(small, upsample)
            found = list(zip(rects, scores))
        boxes = []
        for r, score in found:
            # Map pixel edges, not centres: small pixel i spans full pixels i/s .. (i+1)/s - 1.
            rect = (round(r.left() / sx), round(r.top() / sy),
                    round((r.right() + 1) / sx) - 1, round((r.bottom() + 1) / sy) - 1)
            boxes.append((rect, float(score)))
        return boxes


SMALL_FRAME = 160
"""Frames whose longer side is below this are searched with extra upsampling (see ``FaceLandmarker``)."""


def _extra_upsample(longer_side: int) -> int:
    """How many more times to double a small frame so its longer side reaches SMALL_FRAME."""
    return math.ceil(math.log2(SMALL_FRAME / longer_side)) if longer_side < SMALL_FRAME else 0


def load_landmarker(
    *,
    detector: str = "hog",
    upsample: int = 1,
    max_side: int = 960,
    predictor_path: str | os.PathLike | None = None,
    cnn_path: str | os.PathLike | None = None,
) -> FaceLandmarker:
    """Load a dlib face detector and the 68-point landmark predictor.

    Args:
        detector: "hog" (dlib's frontal HOG detector: fast, frontal faces) or "cnn" (dlib's MMOD
            CNN detector: finds turned faces too, ~20x slower on a CPU).
        upsample: detector upsampling count, >= 0 (the pipeline passes
            ``AlignmentConfig.detector_upsample``, 0 by default).
        max_side: detect on a copy whose longer side is at most this many pixels, >= 0; 0 never
            shrinks (the pipeline passes ``AlignmentConfig.detect_max_side``, 0 by default).
            Landmarks are fitted on the full-resolution frame either way.
        predictor_path: a ``shape_predictor_68_face_landmarks.dat`` file; the one shipped by
            ``face_recognition_models`` when None.
        cnn_path: a ``mmod_human_face_detector.dat`` file for ``detector="cnn"``; the one shipped
            by ``face_recognition_models`` when None.

    Returns:
        A ready :class:`FaceLandmarker`.

    Raises:
        InputError: a model file is missing or dlib cannot read it.
        ValueError: an unknown detector, a negative ``upsample`` or ``max_side``.
    """
    if detector not in DETECTORS:
        raise ValueError(f"detector must be one of {DETECTORS}, got {detector!r}")
    if upsample < 0:
        raise ValueError(f"upsample must be >= 0, got {upsample}")
    if max_side < 0:
        raise ValueError(f"max_side must be >= 0 (0: never downscale), got {max_side}")
    path = Path(predictor_path) if predictor_path is not None else landmark_model_path()
    if not path.is_file():
        raise InputError(path, "landmark model file not found")
    if detector == "cnn":
        detector_path = Path(cnn_path) if cnn_path is not None else cnn_detector_model_path()
        if not detector_path.is_file():
            raise InputError(detector_path, "CNN face detector file not found")
        try:
            face_detector = dlib.cnn_face_detection_model_v1(str(detector_path))
        except RuntimeError as e:
            raise InputError(detector_path, f"not a dlib CNN face detector ({e})") from e
    else:
        face_detector = dlib.get_frontal_face_detector()
    try:
        predictor = dlib.shape_predictor(str(path))
    except RuntimeError as e:
        raise InputError(path, f"not a dlib shape predictor ({e})") from e
    return FaceLandmarker(face_detector, predictor, upsample, max_side)


@dataclass(frozen=True, eq=False)
class FaceTrack:
    """One face followed through a video; built by :func:`landmarks_for_video`."""

    landmarks: np.ndarray
    """float64 [N, 68, 2] (x, y) frame pixels of the tracked face; NaN where not found."""
    found: np.ndarray
    """bool [N], True where the tracked face was found."""
    boxes: np.ndarray
    """float64 [N, 4] the tracked face's detector box (x0, y0, x1, y1), corners included; NaN where
    not found."""
    faces_per_frame: np.ndarray
    """int64 [N] how many faces the detector saw in each frame (tracked or not)."""


def landmarks_for_video(
    frames: Iterable[np.ndarray],
    landmarker: FaceLandmarker,
    *,
    choose: str = "largest",
    max_jump: float = 0.5,
    progress: Callable[[int], None] | None = None,
) -> FaceTrack:
    """Landmarks of one face followed through a video.

    The track starts in the first frame that has faces, at the face ``choose`` names. In each
    later frame it continues with the detected face whose box centre is closest to the tracked
    face's last box centre, but only when that distance is below ``max_jump`` times the last box
    size (the mean of its width and height) times (1 + the number of frames missed since, at most
    :data:`MAX_GATE_GROWTH`, so a long absence never lets the track jump to another person). Else
    the frame has no face for this track: it never jumps to another person in view.

    Args:
        frames: uint8 [H, W, 3] RGB frames, in order.
        landmarker: from :func:`load_landmarker`.
        choose: which face of that first frame to follow: "largest"; "N", a non-negative integer,
            the N-th face by box size (0 = the largest); or "X,Y", the face whose box (corners
            included) contains frame pixel (X, Y); when several do, the smallest box (a face partly
            behind a larger one's box is the one the point singles out), ties to the nearest centre.
        max_jump: the gate above, as a fraction of the box size per frame, > 0.
        progress: called with 1 after each frame's detection.

    Returns:
        The :class:`FaceTrack` of the frames (all arrays of length 0 when there are none).

    Raises:
        ValueError: a bad ``choose`` or ``max_jump``, a frame that is not a uint8 [H, W, 3] array,
            "N" when the first frame with faces has N or fewer, or "X,Y" when no face box in that
            frame contains the point (the message names the nearest box and its distance). The
            stages turn these into :class:`~stitchtime_core.errors.InputError`, which is not retried.
    """
    pick = _parse_choose(choose)
    if not max_jump > 0:
        raise ValueError(f"max_jump must be > 0, got {max_jump}")
    landmarks: list[np.ndarray] = []
    boxes: list[np.ndarray] = []
    found: list[bool] = []
    counts: list[int] = []
    last_box: np.ndarray | None = None
    missed = 0
    for index, frame in enumerate(frames):
        faces = landmarker.detect(frame)
        if progress is not None:
            progress(1)
        counts.append(len(faces))
        chosen = None
        if last_box is None:
            if faces:
                chosen = faces[_start_face(faces, pick, choose, index)]
        elif faces:
            distances = [np.linalg.norm(_box_centre(np.array(r)) - _box_centre(last_box)) for r, _ in faces]
            nearest = int(np.argmin(distances))
            if distances[nearest] < max_jump * _box_size(last_box) * (1 + min(missed, MAX_GATE_GROWTH)):
                chosen = faces[nearest]
        if chosen is None:
            landmarks.append(np.full((68, 2), np.nan))
            boxes.append(np.full(4, np.nan))
            found.append(False)
            missed += 1
            continue
        last_box = np.array(chosen[0], dtype=np.float64)
        missed = 0
        landmarks.append(chosen[1])
        boxes.append(last_box)
        found.append(True)
    if not counts:
        return FaceTrack(np.zeros((0, 68, 2)), np.zeros(0, bool), np.zeros((0, 4)), np.zeros(0, np.int64))
    return FaceTrack(np.stack(landmarks), np.array(found, dtype=bool), np.stack(boxes),
                     np.array(counts, dtype=np.int64))


def _parse_choose(choose: str) -> int | np.ndarray:
    """The face rank (int) or the frame point (float64 [2]) a ``choose`` string names."""
    text = str(choose).strip()
    if text == "largest":
        return 0
    if re.fullmatch(r"\d+", text):
        return int(text)
    number = r"\s*(-?\d+(?:\.\d*)?)\s*"
    match = re.fullmatch(number + "," + number, text)
    if match:
        return np.array([float(match[1]), float(match[2])])
    raise ValueError(f'choose must be "largest", a face rank "N" (0 = largest) or a point "X,Y", got {choose!r}')


def _start_face(faces: list[tuple[Rect, np.ndarray]], pick: int | np.ndarray, choose: str, index: int) -> int:
    """Index into ``faces`` (largest first) of the face ``pick`` names."""
    if isinstance(pick, int):
        if pick >= len(faces):
            raise ValueError(f"--face {choose}: asks for face {pick} (0 = largest), but frame {index}, "
                             f"the first with faces, has {len(faces)} face{'s' if len(faces) != 1 else ''}")
        return pick

    boxes = np.array([rect for rect, _ in faces], dtype=np.float64)
    # Corners included, as the detector's boxes are: (X, Y) on an edge pixel is inside.
    outside = np.maximum(np.maximum(boxes[:, :2] - pick, pick - boxes[:, 2:]), 0.0)
    distances = np.hypot(outside[:, 0], outside[:, 1])
    centres = np.linalg.norm(_box_centre(boxes) - pick, axis=1)
    areas = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    containing = np.flatnonzero(distances == 0)
    if containing.size:
        # A smaller box inside a larger one's (a face behind another) is the one the point singles out.
        return int(min(containing, key=lambda i: (areas[i], centres[i])))
    nearest = int(np.argmin(distances))
    x0, y0, x1, y1 = faces[nearest][0]
    raise ValueError(f"--face {_number(pick[0])},{_number(pick[1])}: no face contains this point in frame {index}, "
                     f"the first with faces; the nearest is the face at ({x0},{y0})-({x1},{y1}), "
                     f"{_number(round(float(distances[nearest]), 1))} px away")


def _number(value: float) -> str:
    """A coordinate or distance as a person would write it: 57, 10.5."""
    return f"{value:g}"


def _box_centre(box: np.ndarray) -> np.ndarray:
    return (box[..., :2] + box[..., 2:]) / 2.0


def _box_size(box: np.ndarray) -> float:
    return float((box[2] - box[0] + box[3] - box[1]) / 2.0 + 1.0)


def _check_frame(frame: np.ndarray) -> None:
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8:
        dtype = getattr(frame, "dtype", type(frame))
        raise ValueError(f"frame must be a uint8 numpy array, got {dtype}")
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"frame must have shape [H, W, 3], got {list(frame.shape)}")
