"""Landmark face masks and the stitching boundary (paper section 3.4)."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data

from stitchtime_core import alignment, masks
from stitchtime_core.faces import load_landmarker

SIZE = 256


@pytest.fixture(scope="module")
def crop_landmarks() -> np.ndarray:
    landmarks = load_landmarker().detect(skimage.data.astronaut())[0][1]
    quad = alignment.quad_from_axes(*alignment.face_axes(landmarks))
    return alignment.landmarks_to_crop(landmarks, quad, SIZE)


def _at(mask: np.ndarray, point: np.ndarray) -> float:
    x, y = np.rint(point).astype(int)
    return float(mask[y, x])


def test_face_mask_covers_the_landmarks_and_the_forehead(crop_landmarks):
    mask = masks.landmark_face_mask(crop_landmarks, SIZE)
    assert mask.shape == (SIZE, SIZE) and mask.dtype == np.float32
    assert set(np.unique(mask)) == {0.0, 1.0}
    assert all(_at(mask, p) == 1.0 for p in crop_landmarks)

    brows = crop_landmarks[17:27].mean(axis=0)
    up = brows - crop_landmarks[33]
    assert _at(mask, brows + 0.3 * up) == 1.0  # forehead
    assert _at(mask, brows + 1.2 * up) == 0.0  # hair
    assert _at(mask, [5, 5]) == 0.0
    # The face fills a sensible share of an FFHQ crop.
    assert 0.2 < mask.mean() < 0.5


def test_face_mask_rejects_bad_landmarks():
    with pytest.raises(ValueError, match=r"\[68, 2\]"):
        masks.landmark_face_mask(np.zeros((5, 2)), SIZE)
    with pytest.raises(ValueError, match="finite"):
        masks.landmark_face_mask(np.full((68, 2), np.nan), SIZE)


def _disc(radius: float, size: int = 200) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return (np.hypot(xx - size / 2, yy - size / 2) <= radius).astype(np.float32)


def test_boundary_is_a_ring_of_the_given_width():
    mask = _disc(40)
    ring = masks.boundary(mask, 10)
    assert ring.dtype == np.float32
    assert not (ring * mask).any()
    np.testing.assert_array_equal(np.maximum(ring, mask), masks.dilate_mask(mask, 10))
    yy, xx = np.mgrid[:200, :200]
    r = np.hypot(xx - 100, yy - 100)
    assert ring[(r > 42) & (r < 48)].all()
    assert not ring[(r < 39) | (r > 52)].any()
    np.testing.assert_allclose(ring.sum(), np.pi * (50**2 - 40**2), rtol=0.05)


def test_dilate_mask_zero_is_identity_and_bad_input_raises():
    mask = _disc(30)
    np.testing.assert_array_equal(masks.dilate_mask(mask, 0), mask)
    assert masks.boundary(mask, 0).sum() == 0
    with pytest.raises(ValueError, match=">= 0"):
        masks.dilate_mask(mask, -1)
    with pytest.raises(ValueError, match=r"\[H, W\]"):
        masks.dilate_mask(mask[None], 3)


def test_scaled_px_scales_with_resolution():
    assert masks.scaled_px(50, 1024) == 50
    assert masks.scaled_px(50, 512) == 25
    assert masks.scaled_px(50, 256) == 13  # 12.5 rounds up
    assert masks.scaled_px(50, 64) == 3
    assert masks.scaled_px(1, 64) == 1  # never 0 for a positive width
    assert masks.scaled_px(0, 64) == 0
    with pytest.raises(ValueError):
        masks.scaled_px(-1, 64)


def test_parsed_masks_are_kept_and_empty_ones_fall_back_to_the_landmarks(crop_landmarks):
    parsed = np.zeros((3, SIZE, SIZE), np.float32)
    parsed[0, 40:200, 60:190] = 1  # a face found by the parser
    parsed[2, 10:12, 10:12] = 1  # a few stray pixels: no face found
    chosen, from_landmarks = masks.parsed_or_landmark_masks(parsed, np.stack([crop_landmarks] * 3))
    assert from_landmarks.tolist() == [False, True, True]
    assert np.array_equal(chosen[0], parsed[0])
    landmark_mask = masks.landmark_face_mask(crop_landmarks, SIZE)
    assert np.array_equal(chosen[1], landmark_mask) and np.array_equal(chosen[2], landmark_mask)
    with pytest.raises(ValueError, match=r"parsed must be \[2, S, S\]"):
        masks.parsed_or_landmark_masks(parsed, np.stack([crop_landmarks] * 2))


def test_boundaries_of_scales_the_width_from_1024(crop_landmarks):
    mask = masks.landmark_face_mask(crop_landmarks, SIZE)[None]
    ring = masks.boundaries_of(mask, border_px_1024=50)  # 12.5 -> 13 px at 256
    assert ring.shape == mask.shape and (ring * mask).sum() == 0
    assert np.array_equal(ring[0], masks.boundary(mask[0], 13))
