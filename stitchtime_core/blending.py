"""Paste a stitched crop back into its frame through a feathered mask (paper section 3.4, last step)."""

from __future__ import annotations

import math

import cv2
import numpy as np

from stitchtime_core.alignment import quad_bounds, uncrop


def feather(mask: np.ndarray, sigma_px: float) -> np.ndarray:
    """Soften the edge of a paste mask with a Gaussian, keeping the softened edge inside the mask.

    ``mask`` is the region to paste, the paper's dilated mask m^d = m + boundary. It is first
    eroded by r = ceil(2 sigma) and then blurred with a Gaussian of ``sigma_px`` truncated at r.
    So the result is 0 everywhere outside the mask (pixels there were never tuned to match the
    frame), ramps up over the mask's outer 2r pixels (about 4 sigma, which stays inside the
    stitching boundary: 48 of its 50 px at 1024 with the defaults), and is exactly 1 deeper in.
    The image border counts as outside, so the mask also fades out where it meets the crop
    edge and pasting leaves no seam along the crop's square outline.

    Args:
        mask: float [H, W] in [0, 1].
        sigma_px: Gaussian sigma in pixels of this mask (scale the 1024 px setting to the crop
            size first); 0 returns the mask as it is.

    Returns:
        float32 [H, W] in [0, 1].

    Raises:
        ValueError: the mask is not 2-D or ``sigma_px`` is negative.
    """
    m = np.asarray(mask, dtype=np.float32)
    if m.ndim != 2:
        raise ValueError(f"mask must have shape [H, W], got {list(m.shape)}")
    if sigma_px < 0:
        raise ValueError(f"sigma_px must be >= 0, got {sigma_px}")
    m = np.clip(m, 0.0, 1.0)
    if sigma_px == 0:
        return m.copy()
    r = math.ceil(2 * sigma_px)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    eroded = cv2.erode(m, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0.0)
    blurred = cv2.GaussianBlur(
        eroded, (2 * r + 1, 2 * r + 1), sigmaX=sigma_px, sigmaY=sigma_px, borderType=cv2.BORDER_CONSTANT
    )
    return np.clip(blurred, 0.0, 1.0)


def paste_back(
    frame: np.ndarray, crop_image: np.ndarray, crop_mask: np.ndarray, quad: np.ndarray
) -> np.ndarray:
    """Warp a crop and its mask back onto the frame and alpha-blend: out = frame (1 - a) + crop a.

    Only the frame box around the quad is computed and changed; every pixel outside the quad
    (and every pixel where the mask is 0) keeps its value exactly.

    Args:
        frame: uint8 [H, W, 3] the source frame.
        crop_image: uint8 or float [S, S, 3] in [0, 255], aligned like ``quad``.
        crop_mask: float [S, S] in [0, 1], the blend weight in crop pixels (feather it first).
        quad: float [4, 2] frame-pixel corners the crop was taken from.

    Returns:
        uint8 [H, W, 3] a new frame.

    Raises:
        ValueError: bad shapes or dtypes.
    """
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.shape[2:] != (3,):
        dtype = getattr(frame, "dtype", type(frame))
        raise ValueError(f"frame must be a uint8 [H, W, 3] array, got {dtype} {list(np.shape(frame))}")
    image = np.asarray(crop_image)
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] != image.shape[1]:
        raise ValueError(f"crop_image must have shape [S, S, 3], got {list(image.shape)}")
    mask = np.asarray(crop_mask, dtype=np.float32)
    if mask.shape != image.shape[:2]:
        raise ValueError(f"crop_mask must have shape {list(image.shape[:2])}, got {list(mask.shape)}")

    out = frame.copy()
    x0, y0, x1, y1 = quad_bounds(quad, frame.shape)
    if x1 <= x0 or y1 <= y0:
        return out
    # Image and mask warp together as four channels; outside the quad the mask is cut by `valid`.
    both = np.concatenate([image.astype(np.float32), mask[:, :, None]], axis=2)
    warped, valid = uncrop(both, quad, frame.shape, box=(x0, y0, x1, y1))
    alpha = np.clip(warped[:, :, 3:] * valid[:, :, None], 0.0, 1.0)
    warped = warped[:, :, :3]
    region = out[y0:y1, x0:x1].astype(np.float32)
    blended = region * (1.0 - alpha) + warped * alpha
    out[y0:y1, x0:x1] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return out
