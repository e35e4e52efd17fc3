"""Paste a stitched crop back into its frame (paper section 3.4, last step).

:func:`paste_back` is the method's paste through a feathered mask. :func:`paste_mask` (naive paste
inside the hard segmentation mask) and :func:`paste_poisson` (Poisson blending) are the two
baselines of the blending ablation (paper section 4.3).
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import PIL.Image

from stitchtime_core.alignment import check_sampler, quad_bounds, uncrop


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
    m = np.clip(_checked_mask(mask, sigma_px=sigma_px), 0.0, 1.0)
    if sigma_px == 0:
        return m.copy()
    r = math.ceil(2 * sigma_px)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    eroded = cv2.erode(m, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0.0)
    blurred = cv2.GaussianBlur(
        eroded, (2 * r + 1, 2 * r + 1), sigmaX=sigma_px, sigmaY=sigma_px, borderType=cv2.BORDER_CONSTANT
    )
    return np.clip(blurred, 0.0, 1.0)


def _checked_mask(mask: np.ndarray, **amount: float) -> np.ndarray:
    """The mask as float32 [H, W], refused when it is not 2-D or the feathering amount is negative."""
    m = np.asarray(mask, dtype=np.float32)
    if m.ndim != 2:
        raise ValueError(f"mask must have shape [H, W], got {list(m.shape)}")
    for name, value in amount.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    return m


def feather_square(mask: np.ndarray, radius_px: int) -> np.ndarray:
    """The reference code's feathering (STIT's ``paste_image_mask``): erode with a (2r + 1)² square, then blur
    with a (2r + 1)² Gaussian whose σ OpenCV derives from the size, 0.3·(r − 1) + 0.8 (8 at r = 25).

    The mask is taken as the reference takes it, an 8-bit image (values rounded to 1/255), and so is the
    result. The erosion counts outside the image as 0; the blur mirrors the image at its edge (OpenCV's default).

    Args:
        mask: float [H, W] in [0, 1], the paste mask m^d.
        radius_px: r in pixels of this mask (scale the 1024 px setting to the crop first); 0 returns the mask.

    Returns:
        float32 [H, W] in [0, 1], multiples of 1/255.

    Raises:
        ValueError: the mask is not 2-D or ``radius_px`` is negative.
    """
    m = _checked_mask(mask, radius_px=radius_px)
    image = np.rint(np.clip(m, 0.0, 1.0) * 255).astype(np.uint8)
    if radius_px > 0:
        side = (2 * radius_px + 1, 2 * radius_px + 1)
        eroded = cv2.erode(image, np.ones(side), borderType=cv2.BORDER_CONSTANT, borderValue=0)
        image = cv2.GaussianBlur(eroded, side, sigmaX=0)
    return image.astype(np.float32) / 255


def paste_back(
    frame: np.ndarray, crop_image: np.ndarray, crop_mask: np.ndarray, quad: np.ndarray, *, sampler: str = "opencv"
) -> np.ndarray:
    """Warp a crop and its mask back onto the frame and alpha-blend: out = frame (1 - a) + crop a.

    Only the frame box around the quad is computed and changed; every pixel outside the quad
    (and every pixel where the mask is 0) keeps its value exactly.

    Args:
        frame: uint8 [H, W, 3] the source frame.
        crop_image: uint8 or float [S, S, 3] in [0, 255], aligned like ``quad``.
        crop_mask: float [S, S] in [0, 1], the blend weight in crop pixels (feather it first).
        quad: float [4, 2] frame-pixel corners the crop was taken from.
        sampler: "opencv": crop and mask warped in floating point, the blend rounded once; "pil": the
            reference code's ``paste_image_mask``: crop and mask rounded to 8 bits and made one RGBA
            image, warped by PIL (see :func:`~stitchtime_core.alignment.uncrop`) and laid over the frame
            with PIL's ``alpha_composite``.

    Returns:
        uint8 [H, W, 3] a new frame.

    Raises:
        ValueError: bad shapes, dtypes or sampler.
    """
    warp = _warp_back(frame, crop_image, crop_mask, quad, sampler=sampler)
    out = frame.copy()
    if warp is None:
        return out
    (x0, y0, x1, y1), warped, alpha = warp
    if sampler == "pil":
        over = PIL.Image.fromarray(np.dstack([warped, np.rint(alpha * 255)]).astype(np.uint8))
        under = PIL.Image.fromarray(out[y0:y1, x0:x1]).convert("RGBA")
        under.alpha_composite(over)
        out[y0:y1, x0:x1] = np.asarray(under)[:, :, :3]
        return out
    alpha = alpha[:, :, None]
    region = out[y0:y1, x0:x1].astype(np.float32)
    blended = region * (1.0 - alpha) + warped * alpha
    out[y0:y1, x0:x1] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return out


def paste_mask(
    frame: np.ndarray, crop_image: np.ndarray, crop_mask: np.ndarray, quad: np.ndarray, *, sampler: str = "opencv"
) -> np.ndarray:
    """Naive paste inside the hard segmentation mask: the first blending baseline (section 4.3).

    :func:`paste_back` with the mask thresholded at 0.5, undilated and unfeathered. The only
    softening left is the one-pixel bilinear ramp of warping the mask back into the frame.

    Args:
        frame: uint8 [H, W, 3] the source frame.
        crop_image: uint8 or float [S, S, 3] in [0, 255], aligned like ``quad``.
        crop_mask: float [S, S] in {0, 1}, the segmentation mask in crop pixels.
        quad: float [4, 2] frame-pixel corners the crop was taken from.
        sampler: see :func:`paste_back`.

    Returns:
        uint8 [H, W, 3] a new frame.

    Raises:
        ValueError: bad shapes, dtypes or sampler.
    """
    _, mask = _check_paste_inputs(frame, crop_image, crop_mask)
    return paste_back(frame, crop_image, (mask >= 0.5).astype(np.float32), quad, sampler=sampler)


def paste_poisson(
    frame: np.ndarray, crop_image: np.ndarray, crop_mask: np.ndarray, quad: np.ndarray, *, sampler: str = "opencv"
) -> np.ndarray:
    """Poisson blending inside the segmentation mask: the second blending baseline (section 4.3).

    The crop and mask are warped back into the frame as in :func:`paste_back`, the warped mask is
    thresholded at 0.5, and ``cv2.seamlessClone(..., cv2.NORMAL_CLONE)`` solves for the pixels
    inside it: the crop's gradients with the frame's values on the mask's bounding rectangle.
    Two details keep OpenCV from moving anything:

    - seamlessClone zeroes the outermost pixel ring of the mask and needs the destination
      rectangle inside the image, so a mask touching the frame edge would be cut or fail. The
      frame is therefore mirrored (BORDER_REFLECT_101) by 2 px, the work is done there and the
      padding cropped off.
    - OpenCV places the mask's bounding rectangle (x, y, w, h) at ``center - (w // 2, h // 2)``,
      so ``center = (x + w // 2, y + h // 2)`` puts it back exactly where it was.

    Pixels where the warped mask is 0 keep their frame values exactly (the solver's result is
    only taken inside the mask).

    Args:
        frame: uint8 [H, W, 3] the source frame.
        crop_image: uint8 or float [S, S, 3] in [0, 255], aligned like ``quad``.
        crop_mask: float [S, S] in {0, 1}, the segmentation mask in crop pixels.
        quad: float [4, 2] frame-pixel corners the crop was taken from.
        sampler: how crop and mask are warped back (see :func:`paste_back`).

    Returns:
        uint8 [H, W, 3] a new frame; the frame itself when the mask is empty in the frame.

    Raises:
        ValueError: bad shapes, dtypes or sampler.
    """
    warp = _warp_back(frame, crop_image, crop_mask, quad, sampler=sampler)
    out = frame.copy()
    if warp is None:
        return out
    (x0, y0, x1, y1), warped, alpha = warp
    inside = alpha >= 0.5
    if not inside.any():
        return out

    pad = _POISSON_PAD
    # Real frame pixels around the box where there are some, mirrored ones past the frame edge.
    padded_frame = cv2.copyMakeBorder(frame, pad, pad, pad, pad, cv2.BORDER_REFLECT_101)
    dst = np.ascontiguousarray(padded_frame[y0 : y1 + 2 * pad, x0 : x1 + 2 * pad])
    source = np.clip(np.rint(warped), 0, 255).astype(np.uint8)
    src = cv2.copyMakeBorder(source, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    mask_u8 = np.zeros(dst.shape[:2], np.uint8)
    mask_u8[pad:-pad, pad:-pad] = inside * np.uint8(255)
    x, y, w, h = cv2.boundingRect(mask_u8)
    center = (x + w // 2, y + h // 2)
    cloned = cv2.seamlessClone(src, dst, mask_u8, center, cv2.NORMAL_CLONE)
    region = out[y0:y1, x0:x1]
    region[inside] = cloned[pad:-pad, pad:-pad][inside]
    return out


# Mirrored frame border for seamlessClone: one ring it zeroes in the mask, one to spare.
_POISSON_PAD = 2


def _warp_back(frame: np.ndarray, crop_image: np.ndarray, crop_mask: np.ndarray, quad: np.ndarray, *, sampler: str
               ) -> tuple[tuple[int, int, int, int], np.ndarray, np.ndarray] | None:
    """Warp a crop and its mask back onto the quad's frame box (None when the box is empty).

    Returns:
        (box x0, y0, x1, y1; float32 [h, w, 3] warped crop; float32 [h, w] mask in [0, 1], 0 outside
        the crop; with "pil" both are multiples of 1 and 1/255).
    """
    image, mask = _check_paste_inputs(frame, crop_image, crop_mask)
    check_sampler(sampler)
    x0, y0, x1, y1 = quad_bounds(quad, frame.shape)
    if x1 <= x0 or y1 <= y0:
        return None
    box = (x0, y0, x1, y1)
    if sampler == "pil":
        # The reference's 8-bit RGBA crop, its alpha the mask: PIL fills 0 (transparent) off the crop.
        both = np.clip(np.rint(np.concatenate([image, mask[:, :, None] * 255], axis=2)), 0, 255).astype(np.uint8)
        warped, _ = uncrop(both, quad, frame.shape, box=box, sampler=sampler)
        return box, warped[:, :, :3], warped[:, :, 3] / 255
    # Image and mask warp together as four channels; outside the quad the mask is cut by `valid`.
    both = np.concatenate([image.astype(np.float32), mask[:, :, None]], axis=2)
    warped, valid = uncrop(both, quad, frame.shape, box=box, sampler=sampler)
    return box, warped[:, :, :3], np.clip(warped[:, :, 3] * valid, 0.0, 1.0)


def _check_paste_inputs(
    frame: np.ndarray, crop_image: np.ndarray, crop_mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Validate the paste inputs; return the crop image as an array and the mask as float32."""
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.shape[2:] != (3,):
        dtype = getattr(frame, "dtype", type(frame))
        raise ValueError(f"frame must be a uint8 [H, W, 3] array, got {dtype} {list(np.shape(frame))}")
    image = np.asarray(crop_image)
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] != image.shape[1]:
        raise ValueError(f"crop_image must have shape [S, S, 3], got {list(image.shape)}")
    mask = np.asarray(crop_mask, dtype=np.float32)
    if mask.shape != image.shape[:2]:
        raise ValueError(f"crop_mask must have shape {list(image.shape[:2])}, got {list(mask.shape)}")
    return image, mask
