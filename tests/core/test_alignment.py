"""FFHQ quads, temporal smoothing, gaps in the face track and the crop transform (paper section 3.1).

Face detection and the track itself are tested in test_faces.py.
"""

from __future__ import annotations

import cv2
import numpy as np
import PIL.Image
import pytest

from stitchtime_core import alignment


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


def test_sigmas_scale_with_the_frame_rate():
    assert alignment.fps_scaled_sigma(1.0, 25.0) == 1.0
    assert alignment.fps_scaled_sigma(3.0, 50.0) == 6.0
    assert alignment.fps_scaled_sigma(3.0, 30.0) == pytest.approx(3.6)
    assert alignment.fps_scaled_sigma(0.0, 60.0) == 0.0
    with pytest.raises(ValueError, match="fps"):
        alignment.fps_scaled_sigma(1.0, 0.0)
    with pytest.raises(ValueError, match="sigma"):
        alignment.fps_scaled_sigma(-1.0, 25.0)


def _plan(found: str, max_gap: int) -> tuple[str, str]:
    """plan_gaps on a string of 1 (found) and 0 (missing); returns the two masks as strings."""
    interpolated, passthrough = alignment.plan_gaps(np.array([c == "1" for c in found]), max_gap=max_gap)
    found_mask = np.array([c == "1" for c in found])
    # found, interpolated and passthrough partition the frames.
    np.testing.assert_array_equal(found_mask.astype(int) + interpolated + passthrough, 1)
    return "".join("1" if v else "0" for v in interpolated), "".join("1" if v else "0" for v in passthrough)


@pytest.mark.parametrize(
    ("found", "max_gap", "interpolated", "passthrough"),
    [
        ("1100111", 2, "0011000", "0000000"),  # inner short gap
        ("1100011", 2, "0000000", "0011100"),  # inner long gap
        ("1100011", 3, "0011100", "0000000"),  # exactly max_gap
        ("0011100", 2, "0000000", "1100011"),  # gaps at either end pass through, however short
        ("0001110", 2, "0000000", "1110001"),
        ("1010001", 1, "0100000", "0001110"),  # one short and one long inner gap
        ("1101", 0, "0000", "0010"),  # max_gap 0: every gap passes through
        ("0000", 10, "0000", "1111"),  # no face at all
        ("111", 2, "000", "000"),
        ("", 2, "", ""),
    ],
)
def test_plan_gaps(found, max_gap, interpolated, passthrough):
    assert _plan(found, max_gap) == (interpolated, passthrough)


def test_plan_gaps_rejects_bad_input():
    with pytest.raises(ValueError, match="max_gap"):
        alignment.plan_gaps(np.ones(3, bool), max_gap=-1)
    with pytest.raises(ValueError, match=r"\[N\]"):
        alignment.plan_gaps(np.ones((3, 2), bool), max_gap=1)


def test_interpolate_gaps_stays_inside_each_segment():
    values = np.array([0.0, np.nan, 2.0, np.nan, 10.0, np.nan, 20.0])
    known = np.isfinite(values)
    valid = np.array([True, True, True, False, True, True, True])
    filled = alignment.interpolate_gaps(values, known, valid=valid)
    np.testing.assert_allclose(filled, [0, 1, 2, np.nan, 10, 15, 20])
    # A segment without a known frame cannot be filled.
    with pytest.raises(ValueError, match="frames 4..5 have no known frame"):
        alignment.interpolate_gaps(values, known & (values != 10.0), valid=np.array([1, 1, 1, 0, 1, 1, 0], bool))


def _moving_face(astronaut_landmarks, n: int, seed: int) -> np.ndarray:
    """[n, 68, 2] the face moving 2 px a frame to the right, with 1 px landmark noise."""
    rng = np.random.default_rng(seed)
    lm = astronaut_landmarks[None] + np.stack([np.array([2.0 * i, 0.0]) for i in range(n)])[:, None]
    return lm + rng.normal(0.0, 1.0, size=lm.shape)


def test_a_short_gap_is_filled_from_its_neighbours(astronaut_landmarks):
    lm = _moving_face(astronaut_landmarks, 16, seed=0)
    lm[7:9] = np.nan
    found = np.isfinite(lm).all(axis=(1, 2))
    interpolated, passthrough = alignment.plan_gaps(found, max_gap=5)
    np.testing.assert_array_equal(np.flatnonzero(interpolated), [7, 8])
    assert not passthrough.any()
    quads = alignment.smooth_quads(lm, center_sigma=1, axes_sigma=3, scale=1, valid=~passthrough)
    assert np.isfinite(quads).all()
    # The face moves 2 px a frame: the filled frames sit between their neighbours, on the line.
    centres = quads.mean(axis=1)
    np.testing.assert_allclose(centres[7:9], centres[6] + (centres[9] - centres[6]) * [[1 / 3], [2 / 3]], atol=0.5)
    np.testing.assert_allclose(np.diff(centres[5:11, 0]), 2.0, atol=0.5)


def test_a_long_gap_passes_through_and_splits_the_smoothing(astronaut_landmarks):
    before = _moving_face(astronaut_landmarks, 10, seed=1)
    after = _moving_face(astronaut_landmarks, 10, seed=2) + (150.0, 40.0)  # the face jumps across the gap
    lm = np.concatenate([before, np.full((20, 68, 2), np.nan), after])
    found = np.isfinite(lm).all(axis=(1, 2))
    interpolated, passthrough = alignment.plan_gaps(found, max_gap=5)
    np.testing.assert_array_equal(np.flatnonzero(passthrough), np.arange(10, 30))
    assert not interpolated.any()

    settings = dict(center_sigma=1.0, axes_sigma=3.0, scale=1.0)
    quads = alignment.smooth_quads(lm, valid=~passthrough, **settings)
    assert np.isnan(quads[10:30]).all() and np.isfinite(quads[:10]).all() and np.isfinite(quads[30:]).all()
    # Each side is smoothed on its own: exactly what smoothing that side alone gives.
    np.testing.assert_allclose(quads[:10], alignment.smooth_quads(before, **settings), atol=1e-9)
    np.testing.assert_allclose(quads[30:], alignment.smooth_quads(after, **settings), atol=1e-9)
    # Smoothing across the gap instead would drag the first frames after it towards the old place.
    across = alignment.smooth_quads(lm, **settings)
    assert np.abs(across[30] - quads[30]).max() > 1.0


def test_smoothing_with_no_valid_frame_gives_no_quads(astronaut_landmarks):
    lm = np.repeat(astronaut_landmarks[None], 3, axis=0)
    quads = alignment.smooth_quads(lm, center_sigma=1, axes_sigma=3, scale=1, valid=np.zeros(3, bool))
    assert quads.shape == (3, 4, 2) and np.isnan(quads).all()
    with pytest.raises(ValueError, match="valid"):
        alignment.smooth_quads(lm, center_sigma=1, axes_sigma=3, scale=1, valid=np.ones(4, bool))


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
    np.testing.assert_array_equal(alignment.crop(astronaut, quad, size, sampler="pil"), np.asarray(pil))


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


@pytest.mark.parametrize("sampler", alignment.SAMPLERS)
def test_crop_of_a_large_quad_does_not_alias(sampler):
    # One-pixel stripes seen through a quad 12 times larger than the crop average out to grey.
    stripes = np.zeros((1024, 1024, 3), np.uint8)
    stripes[:, ::2] = 255
    centre, right, down = np.array([512.0, 512.0]), np.array([380.0, 20.0]), np.array([-20.0, 380.0])
    quad = alignment.quad_from_axes(centre, right, down)
    crop = alignment.crop(stripes, quad, 64, sampler=sampler).astype(np.float64)
    assert abs(crop.mean() - 127.5) < 3
    assert crop.std() < 10


@pytest.mark.parametrize("sampler", alignment.SAMPLERS)
@pytest.mark.parametrize("shrink_by", ["side", "half-diagonal"])
def test_crop_mirrors_the_frame_where_the_quad_leaves_it(sampler, shrink_by):
    frame = np.full((100, 100, 3), 200, np.uint8)
    quad = alignment.quad_from_axes(np.array([10.0, 90.0]), np.array([40.0, 0.0]), np.array([0.0, 40.0]))
    np.testing.assert_array_equal(alignment.crop(frame, quad, 32, shrink_by=shrink_by, sampler=sampler), 200)
    # A ramp across the left edge, one frame pixel per crop pixel: column u shows frame column u - 9.5, and
    # mirrored at frame column 0 the crop is symmetric about u = 9.5.
    ramp = np.broadcast_to(np.arange(100, dtype=np.uint8)[None, :, None] * 2, (100, 100, 3)).copy()
    upright = alignment.quad_from_axes(np.array([10.0, 50.0]), np.array([20.0, 0.0]), np.array([0.0, 20.0]))
    row = alignment.crop(ramp, upright, 40, sampler=sampler)[20, :, 0].astype(int)
    np.testing.assert_allclose(row[:10], row[10:20][::-1], atol=1)
    assert row[0] >= 18


@pytest.mark.parametrize("sampler", alignment.SAMPLERS)
@pytest.mark.parametrize("shrink_by", ["side", "half-diagonal"])
def test_black_pad_fills_where_the_samples_leave_the_frame(shrink_by, sampler):
    # Crop pixel (u, v) samples frame point (-30 + 2.5 (u + 0.5), 50 + 2.5 (v + 0.5)): off the frame's
    # pixel edges (x < -0.5, y >= 99.5) from column 11 down and row 20 up. "side" pools by 2 first (with
    # "pil" the pooled quad moves half a frame pixel, which the samples' distance from the edges absorbs).
    frame = np.full((100, 100, 3), 200, np.uint8)
    quad = alignment.quad_from_axes(np.array([10.0, 90.0]), np.array([40.0, 0.0]), np.array([0.0, 40.0]))
    assert alignment.shrink_factor(quad, 32, shrink_by=shrink_by) == (2 if shrink_by == "side" else 1)
    crop = alignment.crop(frame, quad, 32, pad="black", shrink_by=shrink_by, sampler=sampler)
    expected = np.full((32, 32, 3), 200, np.uint8)
    expected[:, :12] = 0
    expected[20:] = 0
    np.testing.assert_array_equal(crop, expected)


@pytest.mark.parametrize("sampler", alignment.SAMPLERS)
def test_a_large_quad_off_the_frame_crops_black_or_mirrored(sampler):
    frame = np.full((100, 100, 3), 200, np.uint8)
    quad = alignment.quad_from_axes(np.array([2000.0, 50.0]), np.array([30.0, 5.0]), np.array([-5.0, 30.0]))
    assert alignment.shrink_factor(quad, 16) == 3
    np.testing.assert_array_equal(alignment.crop(frame, quad, 16, pad="black", sampler=sampler), 0)
    np.testing.assert_array_equal(alignment.crop(frame, quad, 16, sampler=sampler), 200)


def test_crop_rejects_unknown_pads_and_shrinks():
    frame = np.zeros((20, 20, 3), np.uint8)
    quad = alignment.quad_from_axes(np.array([10.0, 10.0]), np.array([5.0, 0.0]), np.array([0.0, 5.0]))
    with pytest.raises(ValueError, match="pad"):
        alignment.crop(frame, quad, 8, pad="zeros")
    with pytest.raises(ValueError, match="shrink_by"):
        alignment.crop(frame, quad, 8, shrink_by="diagonal")
    with pytest.raises(ValueError, match="sampler"):
        alignment.crop(frame, quad, 8, sampler="cv2")


def test_the_pil_sampler_shrinks_the_whole_frame_and_shifts_the_quad():
    # A pooled pixel of PIL's resize by k is centred on frame pixel k j + (k - 1) / 2; the quad divided by k
    # puts it at k j: the crop shows the frame (k - 1) / 2 pixels right and down of where the quad is.
    frame = cv2.resize(np.random.default_rng(0).integers(0, 256, (24, 32, 3)).astype(np.uint8), (256, 192),
                       interpolation=cv2.INTER_CUBIC)
    quad = alignment.quad_from_axes(np.array([128.0, 96.0]), np.array([40.0, 0.0]), np.array([0.0, 40.0]))
    assert alignment.shrink_factor(quad, 16, shrink_by="side") == 5
    pooled = PIL.Image.fromarray(frame).resize((51, 38), PIL.Image.Resampling.LANCZOS)  # rint(256 / 5), rint(192 / 5)
    expected = pooled.transform((16, 16), PIL.Image.Transform.QUAD, (quad / 5 + 0.5).ravel().tolist(),
                                PIL.Image.Resampling.BILINEAR)
    np.testing.assert_array_equal(alignment.crop(frame, quad, 16, sampler="pil"), np.asarray(expected))


@pytest.mark.parametrize("sampler", alignment.SAMPLERS)
def test_uncrop_valid_covers_the_quad(astronaut_landmarks, sampler):
    quad = alignment.quad_from_axes(*alignment.face_axes(astronaut_landmarks))
    image, valid = alignment.uncrop(np.full((64, 64, 3), 7, np.uint8), quad, (512, 512, 3), sampler=sampler)
    assert image.shape == (512, 512, 3) and valid.shape == (512, 512)
    cx, cy = np.rint(quad.mean(axis=0)).astype(int)
    assert valid[cy, cx] == 1.0 and image[cy, cx, 0] == 7
    assert valid[0, 0] == 0.0 and valid[500, 500] == 0.0
    # Area of the valid region equals the quad's (side^2), to within its one-pixel edge.
    side = np.hypot(*(quad[3] - quad[0]))
    assert abs(valid.sum() - side**2) < 4 * side


def test_the_pil_uncrop_is_pils_perspective_transform(astronaut, astronaut_landmarks):
    quad = alignment.quad_from_axes(*alignment.face_axes(astronaut_landmarks))
    crop = alignment.crop(astronaut, quad, 64, sampler="pil")
    rgba = np.dstack([crop, np.linspace(0, 255, 64 * 64).reshape(64, 64).astype(np.uint8)])
    box = alignment.quad_bounds(quad, astronaut.shape)
    image, valid = alignment.uncrop(rgba, quad, astronaut.shape, box=box, sampler="pil")
    # PIL's data maps frame points (pixel i's centre at i + 0.5) onto the crop's edges 0 and 64, the whole frame.
    rows = []
    for (x, y), (u, v) in zip(quad + 0.5, [[0, 0], [0, 64], [64, 64], [64, 0]]):
        rows += [[x, y, 1, 0, 0, 0, -u * x, -u * y, u], [0, 0, 0, x, y, 1, -v * x, -v * y, v]]
    system = np.array(rows)
    data = np.linalg.lstsq(system[:, :8], system[:, 8], rcond=None)[0].tolist()
    whole = PIL.Image.fromarray(rgba).transform((512, 512), PIL.Image.Transform.PERSPECTIVE, data,
                                                PIL.Image.Resampling.BILINEAR)
    x0, y0, x1, y1 = box
    np.testing.assert_array_equal(image, np.asarray(whole)[y0:y1, x0:x1])
    assert set(np.unique(valid)) == {0.0, 1.0}
    np.testing.assert_array_equal(image[valid == 0], 0)
    with pytest.raises(ValueError, match="uint8 RGB or RGBA"):
        alignment.uncrop(crop.astype(np.float32), quad, astronaut.shape, sampler="pil")
    with pytest.raises(ValueError, match="sampler"):
        alignment.uncrop(crop, quad, astronaut.shape, sampler="cv2")
