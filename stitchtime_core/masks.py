"""Face masks in crop coordinates and the stitching boundary b = m XOR dilate(m) (paper section 3.4).

The paper segments the face with a parsing network; :func:`landmark_face_mask` is the
landmark-only mask used where no parsing network is loaded (the tiny profile, tests). The masks of
:func:`face_masks` and :func:`boundaries_of` are float32 [size, size] arrays with values in {0, 1}
(``mask_shape`` "disc"); :func:`square_masks` makes the reference code's, soft-edged (``mask_shape`` "square").
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F

FOREHEAD_LIFT = 0.5
"""How far the eyebrows are lifted to close the mask over the forehead, as a fraction of the
brow-to-nose-base distance. The forehead is about as tall as that distance (the facial thirds),
so half of it covers the lower forehead while staying below most hairlines and fringes."""


def landmark_face_mask(crop_landmarks: np.ndarray, size: int) -> np.ndarray:
    """A filled face region from 68 landmarks, reaching up over the forehead.

    The region is the convex hull of the 68 points and of the ten eyebrow points (17:27) lifted
    along the face's up direction (nose base to brow centre) by ``FOREHEAD_LIFT`` times the
    brow-to-nose-base distance.

    Args:
        crop_landmarks: float [68, 2] dlib landmarks in crop pixels (x, y).
        size: mask side in pixels, > 0.

    Returns:
        float32 [size, size], 1 inside the face, 0 outside.

    Raises:
        ValueError: bad landmark shape, non-finite landmarks or a non-positive size.
    """
    lm = np.asarray(crop_landmarks, dtype=np.float64)
    if lm.shape != (68, 2):
        raise ValueError(f"crop_landmarks must have shape [68, 2], got {list(lm.shape)}")
    if not np.isfinite(lm).all():
        raise ValueError("crop_landmarks must be finite")
    if size <= 0:
        raise ValueError(f"size must be > 0, got {size}")
    brows = lm[17:27]
    up = brows.mean(axis=0) - lm[33]
    forehead = brows + up * FOREHEAD_LIFT
    points = np.concatenate([lm, forehead])
    # Fixed-point coordinates (4 fractional bits) keep sub-pixel landmark positions.
    fixed = np.rint(points * 16).astype(np.int32)
    hull = cv2.convexHull(fixed)
    mask = np.zeros((size, size), np.uint8)
    cv2.fillConvexPoly(mask, hull, 1, lineType=cv2.LINE_8, shift=4)
    return mask.astype(np.float32)


def dilate_mask(mask: np.ndarray, px: int) -> np.ndarray:
    """Grow a mask by ``px`` pixels with a disc (elliptical kernel of radius ``px``).

    Args:
        mask: float [H, W]; values above 0.5 count as inside.
        px: dilation radius in pixels, >= 0.

    Returns:
        float32 [H, W] in {0, 1}.

    Raises:
        ValueError: the mask is not 2-D or ``px`` is negative.
    """
    binary = _binary(mask)
    if px < 0:
        raise ValueError(f"px must be >= 0, got {px}")
    if px == 0:
        return binary.astype(np.float32)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * px + 1, 2 * px + 1))
    return cv2.dilate(binary, kernel).astype(np.float32)


def boundary(mask: np.ndarray, px: int) -> np.ndarray:
    """The ring just outside a mask: b = m XOR dilate(m, px).

    Args:
        mask: float [H, W]; values above 0.5 count as inside.
        px: ring width in pixels, >= 0.

    Returns:
        float32 [H, W] in {0, 1}.

    Raises:
        ValueError: the mask is not 2-D or ``px`` is negative.
    """
    inside = _binary(mask)
    return np.logical_xor(dilate_mask(inside, px) > 0.5, inside > 0).astype(np.float32)


def scaled_px(px_at_1024: float, size: int) -> int:
    """A width given in pixels at 1024 px, in pixels at ``size``, never rounding a positive width to 0.

    Args:
        px_at_1024: width at 1024 px (e.g. ``StitchingConfig.border_px``), >= 0.
        size: the image side it applies to, > 0.

    Returns:
        The width rounded to whole pixels; at least 1 when ``px_at_1024`` > 0.

    Raises:
        ValueError: a negative width or a non-positive size.
    """
    if px_at_1024 < 0:
        raise ValueError(f"px_at_1024 must be >= 0, got {px_at_1024}")
    if size <= 0:
        raise ValueError(f"size must be > 0, got {size}")
    if px_at_1024 == 0:
        return 0
    # Halves round up (12.5 -> 13), unlike Python's round-half-to-even.
    return max(1, math.floor(px_at_1024 * size / 1024 + 0.5))


def _binary(mask: np.ndarray) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must have shape [H, W], got {list(m.shape)}")
    return (m > 0.5).astype(np.uint8)


def face_masks(crop_landmarks: np.ndarray, size: int, *, parsed: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Face masks m at ``size``: parsed where given and found, from the landmarks elsewhere.

    Args:
        crop_landmarks: float [N, 68, 2] landmarks in pixels of a ``size`` crop.
        parsed: float [N, size, size] face masks from a parsing network, or None.

    Returns:
        (float32 [N, size, size] masks in {0, 1}, bool [N] True where the mask came from the landmarks).
    """
    if parsed is not None:
        return parsed_or_landmark_masks(parsed, crop_landmarks)
    masks = np.stack([landmark_face_mask(lm, size) for lm in crop_landmarks]).astype(np.float32)
    return masks.reshape(len(crop_landmarks), size, size), np.ones(len(masks), bool)


def square_masks(faces: torch.Tensor, size: int, *, border_px_1024: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference code's stitching masks (STIT's ``create_masks`` as ``calc_masks`` calls it).

    On the face masks as given (BiSeNet's 512 px there), with r = ``border_px_1024`` // 2: the full mask is the
    face dilated by a (2r + 1)² square; the boundary b is the full mask minus the face, together with the face
    within r px of the crop's edge (so the crop's edge is pulled to the original there too); the content mask
    is the face minus b. Each is then resized to ``size`` bilinearly (corners aligned), so its edge is soft.

    Args:
        faces: float [N, S, S] face masks in {0, 1}.
        size: the crop side of the results.
        border_px_1024: the stitching border at 1024 px (``StitchingConfig.border_px``).

    Returns:
        (face m, content, boundary b, full mask m^d), each float32 [N, 1, size, size] in [0, 1].

    Raises:
        ValueError: the masks are not [N, S, S] or the border is negative.
    """
    if faces.ndim != 3 or faces.shape[1] != faces.shape[2]:
        raise ValueError(f"faces must be [N, S, S], got {list(faces.shape)}")
    if border_px_1024 < 0:
        raise ValueError(f"border_px_1024 must be >= 0, got {border_px_1024}")
    r, side = border_px_1024 // 2, faces.shape[-1]
    face = faces[:, None].float()
    # A square's maximum is the maximum of the row maxima: two 1-D passes, the same numbers 25x cheaper at r = 25.
    # Outside the image counts as nothing.
    full = F.max_pool2d(F.max_pool2d(face, (1, 2 * r + 1), stride=1, padding=(0, r)), (2 * r + 1, 1), stride=1,
                        padding=(r, 0))
    near_edge = torch.ones(side, side, device=faces.device)
    near_edge[r:side - r, r:side - r] = 0
    border = torch.maximum(torch.minimum(near_edge, face), full - face).clamp(0, 1)
    content = (face - border).clamp(0, 1)
    face, content, border, full = (F.interpolate(m, (size, size), mode="bilinear", align_corners=True)
                                   for m in (face, content, border, full))
    return face, content, border, full


def boundaries_of(masks: np.ndarray, *, border_px_1024: float) -> np.ndarray:
    """b = m XOR dilate(m) for each mask of float [N, S, S], the width given at 1024 px; float32 [N, S, S]."""
    px = scaled_px(border_px_1024, masks.shape[-1])
    return np.stack([boundary(m, px) for m in masks]).astype(np.float32).reshape(masks.shape)


def parsed_or_landmark_masks(parsed: np.ndarray, crop_landmarks: np.ndarray, *,
                             min_fraction: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """Face masks from a face-parsing network where it found a face, from the landmarks elsewhere.

    Args:
        parsed: float [N, S, S] in {0, 1}, the parsing network's face masks (see
            ``bisenet.face_mask_from_labels``).
        crop_landmarks: float [N, 68, 2] landmarks in crop pixels.
        min_fraction: a parsed mask covering less of the crop than this counts as "no face found"
            (a parsing failure on a badly edited or unusual frame), and that frame uses its landmarks.

    Returns:
        (float32 [N, S, S] masks, bool [N] True where the mask came from the landmarks).
    """
    crop_landmarks = np.asarray(crop_landmarks)
    parsed = np.asarray(parsed, dtype=np.float32)
    if parsed.ndim != 3 or parsed.shape[0] != len(crop_landmarks):
        raise ValueError(f"parsed must be [{len(crop_landmarks)}, S, S], got {list(parsed.shape)}")
    fallback = parsed.mean(axis=(1, 2)) < min_fraction
    masks = parsed.copy()
    for i in np.flatnonzero(fallback):
        masks[i] = landmark_face_mask(crop_landmarks[i], parsed.shape[-1])
    return masks, fallback
