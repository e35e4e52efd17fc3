"""Feathering and pasting a crop back into its frame."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import skimage.data

from stitchtime_core import alignment, blending
from stitchtime_core.faces import load_landmarker


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skimage.data.astronaut()


@pytest.fixture(scope="module")
def quad(astronaut) -> np.ndarray:
    landmarks = load_landmarker().detect(astronaut)[0][1]
    return alignment.smooth_quads(landmarks[None], center_sigma=1, axes_sigma=3, scale=1)[0]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


@pytest.mark.parametrize("sampler", alignment.SAMPLERS)
def test_unedited_crop_pastes_back_to_the_frame(astronaut, quad, sampler):
    size = 512
    crop = alignment.crop(astronaut, quad, size, sampler=sampler)
    ones = np.ones((size, size), np.float32)
    mask = cv2.erode(ones, np.ones((9, 9)), borderType=cv2.BORDER_CONSTANT, borderValue=0)
    out = blending.paste_back(astronaut, crop, mask, quad, sampler=sampler)
    assert out.shape == astronaut.shape and out.dtype == np.uint8

    warped_mask, valid = alignment.uncrop(mask[:, :, None], quad, astronaut.shape)
    inside = warped_mask[:, :, 0] * valid > 0.999
    assert inside.sum() > 25_000
    # Measured: 43 dB (bilinear there and back); "pil" 42 dB, truncated twice and so a level darker.
    assert _psnr(out[inside], astronaut[inside]) > 38
    outside = valid == 0
    np.testing.assert_array_equal(out[outside], astronaut[outside])


@pytest.mark.parametrize("sampler", alignment.SAMPLERS)
def test_zero_mask_leaves_the_frame_untouched(astronaut, quad, sampler):
    crop = np.zeros((64, 64, 3), np.uint8)
    out = blending.paste_back(astronaut, crop, np.zeros((64, 64), np.float32), quad, sampler=sampler)
    np.testing.assert_array_equal(out, astronaut)


@pytest.mark.parametrize("sampler", alignment.SAMPLERS)
def test_full_mask_pastes_the_crop_inside_the_quad(astronaut, quad, sampler):
    crop = np.full((64, 64, 3), (10, 200, 30), np.float32)
    out = blending.paste_back(astronaut, crop, np.ones((64, 64), np.float32), quad, sampler=sampler)
    cx, cy = np.rint(quad.mean(axis=0)).astype(int)
    centre = out[cy - 20 : cy + 20, cx - 20 : cx + 20]
    np.testing.assert_array_equal(centre, np.broadcast_to((10, 200, 30), (40, 40, 3)))
    x0, y0, x1, y1 = alignment.quad_bounds(quad, astronaut.shape)
    untouched = np.ones(astronaut.shape[:2], bool)
    untouched[y0:y1, x0:x1] = False
    np.testing.assert_array_equal(out[untouched], astronaut[untouched])


@pytest.mark.parametrize("sampler", alignment.SAMPLERS)
def test_paste_handles_quads_leaving_the_frame(astronaut, sampler):
    crop = np.full((32, 32, 3), 255, np.uint8)
    mask = np.ones((32, 32), np.float32)
    half_out = alignment.quad_from_axes(np.array([5.0, 5.0]), np.array([30.0, 0]), np.array([0, 30.0]))
    out = blending.paste_back(astronaut, crop, mask, half_out, sampler=sampler)
    assert (out[:20, :20] == 255).all()
    gone = half_out + 2000.0
    np.testing.assert_array_equal(blending.paste_back(astronaut, crop, mask, gone, sampler=sampler), astronaut)


def test_the_pil_paste_is_pils_alpha_composite(astronaut, quad):
    # The crop and its 8-bit mask warped as one RGBA image (premultiplied, as PIL transforms RGBA), then laid
    # over the frame: against OpenCV's float warp a few levels at the mask's edge, rounding inside it.
    crop = alignment.crop(astronaut, quad, 64)
    crop[:, :, 0] = 255 - crop[:, :, 0]
    mask = blending.feather_square(np.pad(np.ones((40, 40), np.float32), 12), 4)
    pil = blending.paste_back(astronaut, crop, mask, quad, sampler="pil").astype(int)
    ours = blending.paste_back(astronaut, crop, mask, quad).astype(int)
    changed = (pil != astronaut).any(axis=-1)
    assert changed.sum() > 1000 and np.abs(pil - ours).max() <= 8
    assert 0.2 < (ours - pil)[changed].mean() < 1.0
    with pytest.raises(ValueError, match="sampler"):
        blending.paste_back(astronaut, crop, mask, quad, sampler="cv2")


def test_paste_rejects_bad_shapes(astronaut, quad):
    with pytest.raises(ValueError, match="crop_mask"):
        blending.paste_back(astronaut, np.zeros((64, 64, 3)), np.zeros((32, 32)), quad)
    with pytest.raises(ValueError, match="frame"):
        blending.paste_back(astronaut.astype(np.float32), np.zeros((64, 64, 3)), np.zeros((64, 64)), quad)


def test_feather_softens_only_the_edge_inside_the_mask():
    size, sigma = 256, 4.0
    mask = np.zeros((size, size), np.float32)
    mask[64:192, 64:192] = 1.0
    soft = blending.feather(mask, sigma)
    assert soft.dtype == np.float32 and soft.min() >= 0.0 and soft.max() <= 1.0
    assert not soft[mask == 0].any()  # never reaches outside
    r = int(np.ceil(2 * sigma))
    np.testing.assert_allclose(soft[64 + 2 * r : 192 - 2 * r, 64 + 2 * r : 192 - 2 * r], 1.0, atol=1e-6)
    row = soft[128, 60:100]
    assert (np.diff(row) >= -1e-6).all() and 0.2 < soft[128, 64 + r] < 0.8


def test_feather_fades_at_the_image_edge_and_checks_input():
    ones = np.ones((64, 64), np.float32)
    soft = blending.feather(ones, 2.0)
    # Only the Gaussian's truncated tail remains on the outermost pixel row.
    assert soft[0, 32] < 0.05 and soft[32, 32] == pytest.approx(1.0)
    np.testing.assert_array_equal(blending.feather(ones, 0.0), ones)
    with pytest.raises(ValueError, match="sigma"):
        blending.feather(ones, -1.0)
    with pytest.raises(ValueError, match=r"\[H, W\]"):
        blending.feather(ones[None], 1.0)


# Blending baselines of the ablation (paper section 4.3): a square quad and an elliptical mask.
_CROP = 256


def _square_quad(cx: float, cy: float, half: float) -> np.ndarray:
    return alignment.quad_from_axes(np.array([cx, cy]), np.array([half, 0.0]), np.array([0.0, half]))


@pytest.fixture(scope="module")
def ellipse() -> np.ndarray:
    yy, xx = np.mgrid[:_CROP, :_CROP]
    c = (_CROP - 1) / 2
    return ((((xx - c) / (0.38 * _CROP)) ** 2 + ((yy - c) / (0.45 * _CROP)) ** 2) <= 1).astype(np.float32)


def _frame_mask(mask: np.ndarray, quad: np.ndarray, shape) -> np.ndarray:
    """The crop mask warped into the frame and thresholded as paste_poisson does."""
    warped, valid = alignment.uncrop(mask[:, :, None], quad, shape)
    return warped[:, :, 0] * valid >= 0.5


def _assert_not_shifted(out: np.ndarray, frame: np.ndarray, inside: np.ndarray) -> None:
    """Inside the mask, the result matches the frame far better than the frame moved by 1 px."""
    exact = _psnr(out[inside], frame[inside])
    for dy, dx in [(0, 1), (0, -1), (1, 0), (-1, 0)]:
        moved = np.roll(frame, (dy, dx), axis=(0, 1))
        # Measured: 36.8 dB against the frame, about 25 dB against a 1-px shift.
        assert exact > _psnr(out[inside], moved[inside]) + 8


def test_paste_mask_is_paste_back_with_the_hard_mask(astronaut, ellipse):
    quad = _square_quad(240.0, 180.0, 100.0)
    crop = np.full((_CROP, _CROP, 3), 7, np.uint8)
    soft = ellipse * 0.9  # still the same mask once thresholded
    np.testing.assert_array_equal(
        blending.paste_mask(astronaut, crop, soft, quad), blending.paste_back(astronaut, crop, ellipse, quad)
    )


@pytest.mark.parametrize("sampler", alignment.SAMPLERS)
def test_poisson_with_an_unedited_crop_returns_the_frame(astronaut, ellipse, sampler):
    quad = _square_quad(240.0, 180.0, 100.0)
    crop = alignment.crop(astronaut, quad, _CROP, sampler=sampler)
    out = blending.paste_poisson(astronaut, crop, ellipse, quad, sampler=sampler)
    assert out.shape == astronaut.shape and out.dtype == np.uint8
    inside = _frame_mask(ellipse, quad, astronaut.shape)
    assert inside.sum() > 20_000
    # Measured: 36.8 dB (the naive paste gets 36.4: bilinear there and back on fine texture).
    assert _psnr(out[inside], astronaut[inside]) > 34
    _assert_not_shifted(out, astronaut, inside)
    np.testing.assert_array_equal(out[~inside], astronaut[~inside])


def test_poisson_hides_the_seam_of_a_colour_shifted_crop(astronaut, ellipse):
    quad = _square_quad(240.0, 180.0, 100.0)
    crop = alignment.crop(astronaut, quad, _CROP).astype(np.int16)
    crop[:, :, 0] += 40
    crop = np.clip(crop, 0, 255).astype(np.uint8)
    poisson = blending.paste_poisson(astronaut, crop, ellipse, quad)
    naive = blending.paste_mask(astronaut, crop, ellipse, quad)

    inside = _frame_mask(ellipse, quad, astronaut.shape)
    square = np.ones((5, 5), np.uint8)
    core = cv2.erode(inside.astype(np.uint8), square, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    ring = inside & ~core.astype(bool)  # 2 px just inside the mask edge

    def seam(out: np.ndarray) -> float:
        return float(np.abs(out[ring].astype(np.float64) - astronaut[ring]).mean())

    # Measured: Poisson 0.53, naive 13.5, a factor of 25.
    assert seam(poisson) * 10 < seam(naive)
    np.testing.assert_array_equal(poisson[~inside], astronaut[~inside])
    x0, y0, x1, y1 = alignment.quad_bounds(quad, astronaut.shape)
    untouched = np.ones(astronaut.shape[:2], bool)
    untouched[y0:y1, x0:x1] = False
    np.testing.assert_array_equal(poisson[untouched], astronaut[untouched])


def test_poisson_with_an_empty_mask_leaves_the_frame_untouched(astronaut, ellipse):
    quad = _square_quad(240.0, 180.0, 100.0)
    crop = np.zeros((_CROP, _CROP, 3), np.uint8)
    out = blending.paste_poisson(astronaut, crop, np.zeros_like(ellipse), quad)
    np.testing.assert_array_equal(out, astronaut)
    gone = quad + 2000.0
    np.testing.assert_array_equal(blending.paste_poisson(astronaut, crop, ellipse, gone), astronaut)


def test_poisson_with_a_mask_touching_the_frame_border(astronaut, ellipse):
    quad = _square_quad(60.0, 60.0, 100.0)  # reaches past the top and left edges
    crop = alignment.crop(astronaut, quad, _CROP)
    inside = _frame_mask(ellipse, quad, astronaut.shape)
    assert inside[0].any() and inside[:, 0].any()
    out = blending.paste_poisson(astronaut, crop, ellipse, quad)
    # Measured: 44.0 dB.
    assert _psnr(out[inside], astronaut[inside]) > 40
    _assert_not_shifted(out, astronaut, inside)
    np.testing.assert_array_equal(out[~inside], astronaut[~inside])


def test_poisson_rejects_bad_shapes(astronaut):
    quad = _square_quad(240.0, 180.0, 100.0)
    with pytest.raises(ValueError, match="crop_mask"):
        blending.paste_poisson(astronaut, np.zeros((64, 64, 3)), np.zeros((32, 32)), quad)
    with pytest.raises(ValueError, match="frame"):
        blending.paste_poisson(astronaut.astype(np.float32), np.zeros((64, 64, 3)), np.zeros((64, 64)), quad)
