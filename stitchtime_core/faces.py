"""Face detection, 68-point landmarks, and one face track through a video (paper section 3.1).

Detection is dlib's HOG frontal face detector; landmarks are dlib's 68-point shape predictor (the
iBUG 300-W layout that the FFHQ alignment recipe indexes into). Coordinates are pixel indices of
the frame: x to the right, y down, (0, 0) the centre of the top-left pixel.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import dlib
import numpy as np

from stitchtime_core.errors import InputError

Rect = tuple[int, int, int, int]
"""A face box (x0, y0, x1, y1) in frame pixels, corners included."""

_MODEL_PACKAGE = "face_recognition_models"
_MODEL_FILE = "models/shape_predictor_68_face_landmarks.dat"


def landmark_model_path() -> Path:
    """Where the 68-point landmark model shipped by ``face_recognition_models`` lies.

    The package is located without importing it: its ``__init__`` imports ``pkg_resources``,
    which recent setuptools no longer provides.

    Returns:
        The path of ``shape_predictor_68_face_landmarks.dat``.

    Raises:
        InputError: the package is not installed or the file is missing from it.
    """
    spec = importlib.util.find_spec(_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(_MODEL_PACKAGE, "package is not installed; it ships the landmark model")
    path = Path(spec.submodule_search_locations[0]) / _MODEL_FILE
    if not path.is_file():
        raise InputError(path, "landmark model file is missing")
    return path


@dataclass(frozen=True, eq=False)
class FaceLandmarker:
    """A face detector and a landmark predictor, loaded; build it with :func:`load_landmarker`.

    Attributes:
        detector: dlib's HOG frontal face detector.
        predictor: dlib's 68-point shape predictor.
        upsample: how many times the detector upsamples a frame (finds faces down to ~40 px at 1,
            ~80 px at 0).
    """

    detector: dlib.fhog_object_detector
    predictor: dlib.shape_predictor
    upsample: int = 1

    def detect(self, frame: np.ndarray) -> list[tuple[Rect, np.ndarray]]:
        """Find faces and their landmarks in one frame.

        Args:
            frame: uint8 [H, W, 3] RGB image.

        Returns:
            One (rect, landmarks) pair per face, largest box first (ties: higher detector score
            first). ``rect`` is (x0, y0, x1, y1); ``landmarks`` is float64 [68, 2] of (x, y)
            pixel coordinates. Empty when no face is found.

        Raises:
            ValueError: the frame is not a uint8 [H, W, 3] array.
        """
        _check_frame(frame)
        image = np.ascontiguousarray(frame)
        rects, scores, _ = self.detector.run(image, self.upsample)
        order = sorted(
            range(len(rects)),
            key=lambda i: (rects[i].width() * rects[i].height(), scores[i]),
            reverse=True,
        )
        faces = []
        for i in order:
            r = rects[i]
            shape = self.predictor(image, r)
            points = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)
            faces.append(((r.left(), r.top(), r.right(), r.bottom()), points))
        return faces


def load_landmarker(
    *, predictor_path: str | os.PathLike | None = None, upsample: int = 1
) -> FaceLandmarker:
    """Load dlib's face detector and 68-point landmark predictor.

    Args:
        predictor_path: a ``shape_predictor_68_face_landmarks.dat`` file; the one shipped by
            ``face_recognition_models`` when None.
        upsample: detector upsampling count (``AlignmentConfig.detector_upsample``), >= 0.

    Returns:
        A ready :class:`FaceLandmarker`.

    Raises:
        InputError: the model file is missing or dlib cannot read it.
        ValueError: ``upsample`` is negative.
    """
    if upsample < 0:
        raise ValueError(f"upsample must be >= 0, got {upsample}")
    path = Path(predictor_path) if predictor_path is not None else landmark_model_path()
    if not path.is_file():
        raise InputError(path, "landmark model file not found")
    try:
        predictor = dlib.shape_predictor(str(path))
    except RuntimeError as e:
        raise InputError(path, f"not a dlib shape predictor ({e})") from e
    return FaceLandmarker(dlib.get_frontal_face_detector(), predictor, upsample)


def landmarks_for_video(
    frames: Iterable[np.ndarray], landmarker: FaceLandmarker
) -> tuple[np.ndarray, np.ndarray]:
    """Landmarks of one face followed through a video.

    The track starts at the largest face of the first frame that has one; in each later frame it
    continues with the face whose box centre is closest to the last tracked box centre. A frame
    without faces leaves the last tracked box as the reference for the next one.

    Args:
        frames: uint8 [H, W, 3] RGB frames, in order.
        landmarker: from :func:`load_landmarker`.

    Returns:
        ``(landmarks, found)``: float64 [N, 68, 2] pixel coordinates, NaN in frames without a
        face; bool [N], True where a face was found.

    Raises:
        ValueError: a frame is not a uint8 [H, W, 3] array.
    """
    all_landmarks: list[np.ndarray] = []
    found: list[bool] = []
    last_centre: np.ndarray | None = None
    for frame in frames:
        faces = landmarker.detect(frame)
        if not faces:
            all_landmarks.append(np.full((68, 2), np.nan))
            found.append(False)
            continue
        if last_centre is None:
            rect, points = faces[0]
        else:
            distances = [np.linalg.norm(_box_centre(r) - last_centre) for r, _ in faces]
            rect, points = faces[int(np.argmin(distances))]
        last_centre = _box_centre(rect)
        all_landmarks.append(points)
        found.append(True)
    if not all_landmarks:
        return np.zeros((0, 68, 2)), np.zeros((0,), dtype=bool)
    return np.stack(all_landmarks), np.array(found, dtype=bool)


def _box_centre(rect: Rect) -> np.ndarray:
    x0, y0, x1, y1 = rect
    return np.array([(x0 + x1) / 2.0, (y0 + y1) / 2.0])


def _check_frame(frame: np.ndarray) -> None:
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8:
        dtype = getattr(frame, "dtype", type(frame))
        raise ValueError(f"frame must be a uint8 numpy array, got {dtype}")
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"frame must have shape [H, W, 3], got {list(frame.shape)}")
