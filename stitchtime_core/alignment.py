"""FFHQ-style face crops, smoothed over time, and their inverse (paper section 3.1).

A crop is described by its quad: the four frame-pixel corners [4, 2] of an oriented square,
ordered top-left, bottom-left, bottom-right, top-right as seen in the crop (PIL's QUAD order,
which the reference code uses). Frame and crop points are pixel indices: x to the right, y down,
(0, 0) the centre of the top-left pixel.

The sampling convention is the reference code's (``PIL.Image.transform(QUAD, quad + 0.5)``): the
quad corners, read as pixel indices, land on the crop's outer pixel *edges*. Crop pixel (0, 0) is
therefore half a crop pixel inside the quad's first corner. Because every quad built here is a
square, PIL's bilinear QUAD map and the perspective map used here coincide.

Two samplers resample with that map (``AlignmentConfig.sampler``): "opencv" (``cv2.warpPerspective``,
values rounded; a large quad is box-averaged around itself with the exact pixel mapping) and "pil", the
reference code's own calls (PIL's bilinear QUAD and PERSPECTIVE transforms, values truncated; a large
quad's whole frame is shrunk with PIL's Lanczos filter and the quad divided by the factor).
"""

from __future__ import annotations

import cv2
import numpy as np
import PIL.Image
from scipy.ndimage import gaussian_filter1d

from stitchtime_core.config import AlignmentConfig


def face_axes(landmarks: np.ndarray, *, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The FFHQ crop square of one face: its centre and half-side axes.

    The FFHQ recipe: the crop is centred a little below the eyes, oriented by the eye-to-eye and
    eye-to-mouth directions, and sized by whichever of the two distances dominates.

    Args:
        landmarks: float [68, 2] dlib 68-point landmarks, (x, y) frame pixels.
        scale: crop size relative to the FFHQ crop (``AlignmentConfig.scale``), > 0.

    Returns:
        ``(c, x, y)``, each float64 [2]: the centre, the half-side vector pointing to the crop's
        right and the one pointing down (``x`` turned by +90 degrees, same length).

    Raises:
        ValueError: the landmarks are not [68, 2] or not finite.
    """
    lm = _check_landmarks(landmarks)
    eye_left = lm[36:42].mean(axis=0)
    eye_right = lm[42:48].mean(axis=0)
    eye_avg = (eye_left + eye_right) * 0.5
    eye_to_eye = eye_right - eye_left
    mouth_avg = (lm[48] + lm[54]) * 0.5
    eye_to_mouth = mouth_avg - eye_avg
    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1.0, 1.0]
    x = x / np.hypot(*x)
    x = x * max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8) * scale
    y = np.flipud(x) * [-1.0, 1.0]
    c = eye_avg + eye_to_mouth * 0.1
    return c, x, y


def quad_from_axes(c: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The quad [4, 2] (top-left, bottom-left, bottom-right, top-right) of centre ``c`` and axes."""
    return np.stack([c - x - y, c - x + y, c + x + y, c + x - y], axis=-2)


def fps_scaled_sigma(sigma_at_25: float, fps: float) -> float:
    """A temporal sigma given in frames at 25 fps, in frames of a clip at ``fps``.

    The reference code's sigmas (centre 1, axes 3) are frame counts tuned on 25 fps video; the
    same time constant spans twice as many frames at 50 fps.

    Args:
        sigma_at_25: sigma in frames at 25 fps, >= 0.
        fps: the clip's frame rate, > 0.

    Returns:
        ``sigma_at_25 * fps / 25``.

    Raises:
        ValueError: a negative sigma or a non-positive frame rate.
    """
    if sigma_at_25 < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma_at_25}")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    return float(sigma_at_25) * float(fps) / 25.0


def plan_gaps(found: np.ndarray, *, max_gap: int) -> tuple[np.ndarray, np.ndarray]:
    """Which frames without a tracked face are filled in and which pass through unedited.

    A run of missing frames of at most ``max_gap`` frames between two found frames is
    interpolated linearly. A longer run passes through: those frames are left as they are, and
    smoothing does not cross them. So does any run at the start or end of the clip, however short:
    nothing says the face is still there (it may have left the frame, or not come in yet), and
    editing a guessed place would paste a face where there is none.

    Args:
        found: bool [N], True where the face was found.
        max_gap: the longest run of missing frames that is filled in, >= 0.

    Returns:
        ``(interpolated, passthrough)``, each bool [N]. ``found``, ``interpolated`` and
        ``passthrough`` partition the frames. With no found frame at all every frame passes
        through.

    Raises:
        ValueError: ``found`` is not 1-D or ``max_gap`` is negative.
    """
    found = np.asarray(found, dtype=bool)
    if found.ndim != 1:
        raise ValueError(f"found must have shape [N], got {list(found.shape)}")
    if max_gap < 0:
        raise ValueError(f"max_gap must be >= 0, got {max_gap}")
    interpolated = np.zeros_like(found)
    passthrough = np.zeros_like(found)
    if not found.any():
        passthrough[:] = True
        return interpolated, passthrough
    for start, stop in _runs(~found):
        inner = start > 0 and stop < len(found)
        (interpolated if inner and stop - start <= max_gap else passthrough)[start:stop] = True
    return interpolated, passthrough


def track_quads(landmarks: np.ndarray, found: np.ndarray, *, config: AlignmentConfig,
                fps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The crop quads of a face track as the pipeline makes them: its gap plan, then smoothed quads.

    Args:
        landmarks: float [N, 68, 2] frame pixels, NaN where the face was not found.
        found: bool [N], True where it was.
        config: ``max_gap``, the smoothing sigmas and their ``sigma_unit``, and ``scale``.
        fps: the clip's frame rate; with ``sigma_unit`` "frame-at-25fps" the sigmas scale with it
            (:func:`fps_scaled_sigma`), with "frame" they are frames of the clip as they are.

    Returns:
        ``(quads, interpolated, passthrough)``: float64 [N, 4, 2] quads, NaN in frames that pass
        through, and the two bool [N] masks of :func:`plan_gaps`.
    """
    interpolated, passthrough = plan_gaps(found, max_gap=config.max_gap)
    # "frame": the reference code's sigmas, frame counts whatever the clip's rate.
    rate = fps if config.sigma_unit == "frame-at-25fps" else 25.0
    quads = smooth_quads(landmarks, center_sigma=fps_scaled_sigma(config.center_sigma, rate),
                         axes_sigma=fps_scaled_sigma(config.axes_sigma, rate), scale=config.scale,
                         valid=~passthrough)
    return quads, interpolated, passthrough


def smooth_quads(
    landmarks: np.ndarray,
    *,
    center_sigma: float,
    axes_sigma: float,
    scale: float,
    valid: np.ndarray | None = None,
) -> np.ndarray:
    """Per-frame FFHQ quads with the crop centre and axes low-passed over time.

    Each contiguous run of ``valid`` frames (a segment) is handled on its own: frames without
    landmarks (NaN rows) get their centre and axes interpolated linearly from the nearest frames
    of the segment that have them (held constant before the first and after the last), then the
    segment is smoothed with a Gaussian over time, as the reference code does (scipy's
    ``gaussian_filter1d``, default 'reflect' ends at the segment's ends). Smoothing therefore never
    crosses frames that are not valid. The down axis is rebuilt from the smoothed right axis,
    which equals smoothing both (the turn is linear).

    Args:
        landmarks: float [N, 68, 2] frame pixels; a frame with any NaN counts as having no face.
        center_sigma: Gaussian sigma over time for the centres, in frames; 0 skips it.
        axes_sigma: Gaussian sigma over time for the axes, in frames; 0 skips it.
        scale: crop size relative to the FFHQ crop, > 0.
        valid: bool [N], False for frames that pass through unedited (see :func:`plan_gaps`,
            ``~passthrough``); all frames when None.

    Returns:
        float64 [N, 4, 2] quads (top-left, bottom-left, bottom-right, top-right) in frame pixels;
        NaN in frames that are not valid.

    Raises:
        ValueError: bad shapes, a negative sigma, a non-positive scale, or a segment (with
            ``valid`` None: the whole clip) without a frame with landmarks.
    """
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.ndim != 3 or lm.shape[1:] != (68, 2):
        raise ValueError(f"landmarks must have shape [N, 68, 2], got {list(lm.shape)}")
    if center_sigma < 0 or axes_sigma < 0:
        raise ValueError(f"sigmas must be >= 0, got center {center_sigma}, axes {axes_sigma}")
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    valid = _check_valid(valid, len(lm))
    has_face = np.isfinite(lm).all(axis=(1, 2))
    if valid.all() and not has_face.any():
        raise ValueError("no frame has landmarks")

    n = len(lm)
    centres = np.zeros((n, 2))
    axes = np.zeros((n, 2))
    for i in np.flatnonzero(has_face & valid):
        centres[i], axes[i], _ = face_axes(lm[i], scale=scale)
    centres = interpolate_gaps(centres, has_face, valid=valid)
    axes = interpolate_gaps(axes, has_face, valid=valid)
    for start, stop in _runs(valid):
        if center_sigma > 0:
            centres[start:stop] = gaussian_filter1d(centres[start:stop], sigma=center_sigma, axis=0)
        if axes_sigma > 0:
            axes[start:stop] = gaussian_filter1d(axes[start:stop], sigma=axes_sigma, axis=0)
    downs = axes[:, ::-1] * [-1.0, 1.0]
    return quad_from_axes(centres, axes, downs)


def interpolate_gaps(values: np.ndarray, known: np.ndarray, *, valid: np.ndarray | None = None) -> np.ndarray:
    """Fill the frames where ``known`` is False by linear interpolation over time.

    Each contiguous run of ``valid`` frames is filled from its own known frames only.

    Args:
        values: float [N, ...] per-frame values; rows where ``known`` is False are ignored.
        known: bool [N]; every segment of valid frames needs a True.
        valid: bool [N], False for frames left out (see :func:`plan_gaps`, ``~passthrough``); all
            frames when None.

    Returns:
        float64 [N, ...]: known valid rows as they were; gaps interpolated from the nearest known
        frames on each side in their segment, held constant before its first and after its last
        known frame; NaN in rows that are not valid.

    Raises:
        ValueError: bad mask shapes, or a segment (with ``valid`` None: the whole clip) without a
            known frame.
    """
    values = np.asarray(values, dtype=np.float64)
    known = np.asarray(known, dtype=bool)
    if known.shape != values.shape[:1]:
        raise ValueError(f"known must be a bool [N] mask, got shape {list(known.shape)}")
    valid = _check_valid(valid, len(values))
    flat = values.reshape(len(values), -1).copy()
    flat[~valid] = np.nan
    for start, stop in _runs(valid):
        idx = np.flatnonzero(known[start:stop])
        if len(idx) == 0:
            raise ValueError(f"frames {start}..{stop - 1} have no known frame to interpolate from")
        if len(idx) == stop - start:
            continue
        segment = flat[start:stop]
        t = np.arange(stop - start)
        for k in range(flat.shape[1]):
            segment[:, k] = np.interp(t, idx, segment[idx, k])
    return flat.reshape(values.shape)


def _check_valid(valid: np.ndarray | None, n: int) -> np.ndarray:
    if valid is None:
        return np.ones(n, dtype=bool)
    valid = np.asarray(valid)
    if valid.dtype != bool or valid.shape != (n,):
        raise ValueError(f"valid must be a bool [{n}] mask, got {valid.dtype} {list(valid.shape)}")
    return valid


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of every run of True in a bool [N] mask, stop exclusive."""
    padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def crop_transform(quad: np.ndarray, size: int) -> np.ndarray:
    """The 3x3 perspective matrix from frame pixels to crop pixels.

    Args:
        quad: float [4, 2] frame-pixel corners (top-left, bottom-left, bottom-right, top-right).
        size: crop side in pixels, > 0.

    Returns:
        float64 [3, 3] ``M`` with ``crop_point ~ M @ [x, y, 1]`` (homogeneous).

    Raises:
        ValueError: bad quad shape, a degenerate quad, or a non-positive size.
    """
    q = _check_quad(quad)
    if size <= 0:
        raise ValueError(f"size must be > 0, got {size}")
    corners = np.array([[0, 0], [0, size], [size, size], [size, 0]], dtype=np.float64)
    # Quad corners land on crop pixel edges, i.e. half a pixel before crop pixel centres.
    half_pixel = np.array([[1.0, 0.0, -0.5], [0.0, 1.0, -0.5], [0.0, 0.0, 1.0]])
    return half_pixel @ _homography(q, corners)


PADS = ("mirror", "black")
"""What :func:`crop` puts where the quad reaches beyond the frame (``AlignmentConfig.pad``)."""
SHRINK_BY = ("side", "half-diagonal")
"""What :func:`shrink_factor` measures the quad by (``AlignmentConfig.shrink_by``)."""
SAMPLERS = ("opencv", "pil")
"""What :func:`crop` and :func:`uncrop` resample with (``AlignmentConfig.sampler``)."""


def shrink_factor(quad: np.ndarray, size: int, *, shrink_by: str = "side") -> int:
    """By how many frame pixels per pooled pixel :func:`crop` box-averages the frame first.

    Args:
        quad: float [4, 2] frame-pixel corners.
        size: crop side in pixels, > 0.
        shrink_by: "side": floor(side / size), so a quad two or more times the crop is pooled
            before bilinear sampling, which would alias beyond 2x; "half-diagonal": the reference
            code's floor(diagonal / size * 0.5) (its ``qsize`` is the quad's diagonal, where FFHQ's
            is the side), which first pools at 2.83x.

    Returns:
        The factor k; 0 or 1 means no pooling.

    Raises:
        ValueError: bad quad, size or ``shrink_by``.
    """
    q = _check_quad(quad)
    if size <= 0:
        raise ValueError(f"size must be > 0, got {size}")
    if shrink_by == "side":
        return int(np.hypot(*(q[3] - q[0])) // size)
    if shrink_by == "half-diagonal":
        return int(np.floor(np.hypot(*(q[3] - q[1])) / size * 0.5))
    raise ValueError(f"shrink_by must be one of {SHRINK_BY}, got {shrink_by!r}")


def crop(frame: np.ndarray, quad: np.ndarray, size: int, *, pad: str = "mirror", shrink_by: str = "side",
         sampler: str = "opencv") -> np.ndarray:
    """Resample the quad of a frame into an aligned square crop.

    Bilinear sampling. When :func:`shrink_factor` is 2 or more the frame is first shrunk by that
    integer factor, so the crop does not alias: with "opencv" the frame region around the quad is
    box-averaged and the quad mapped exactly onto the pooled pixels; with "pil" the whole frame is
    resized with PIL's Lanczos filter (to ``rint(W / k) x rint(H / k)``) and the quad divided by k, as
    the reference code does, which moves the crop (k - 1) / 2 frame pixels right and down (pooled pixel
    j is centred on frame pixel k j + (k - 1) / 2, not k j).

    Args:
        frame: uint8 [H, W, 3] image.
        quad: float [4, 2] frame-pixel corners.
        size: crop side in pixels.
        pad: where the quad reaches beyond the frame: "mirror" reflects the frame at its edge
            (OpenCV's BORDER_REFLECT_101, numpy's 'reflect', as FFHQ pads), so the crop has no
            black wedges; "black" fills 0 as the reference code's PIL transform does: a crop pixel
            whose sample point lies more than half a pixel outside the frame is black, one within
            that half pixel repeats the edge pixel.
        shrink_by: see :func:`shrink_factor`.
        sampler: "opencv" rounds each bilinear value to the nearest level; "pil" is the reference
            code's ``crop_image`` (without its unused padding): PIL's bilinear QUAD transform, which
            truncates, so its crops are on average half a level darker.

    Returns:
        uint8 [size, size, 3] crop.

    Raises:
        ValueError: bad shapes, size, ``pad``, ``shrink_by`` or ``sampler``.
    """
    _check_image(frame, "frame")
    if pad not in PADS:
        raise ValueError(f"pad must be one of {PADS}, got {pad!r}")
    check_sampler(sampler)
    matrix = crop_transform(quad, size)
    q = np.asarray(quad, dtype=np.float64)
    shrink = shrink_factor(q, size, shrink_by=shrink_by)
    if sampler == "pil":
        return _crop_pil(frame, q, size, pad=pad, shrink=shrink)
    source, to_source = np.ascontiguousarray(frame), matrix
    if shrink >= 2:
        source, to_frame = _box_shrink(frame, q, shrink)
        to_source = matrix @ to_frame
    out = cv2.warpPerspective(
        source,
        to_source,
        (size, size),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REFLECT_101 if pad == "mirror" else cv2.BORDER_REPLICATE,
    )
    if out.dtype != np.uint8:
        out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    if pad == "black":
        out[~_samples_inside(matrix, frame.shape, size)] = 0
    return out


def _crop_pil(frame: np.ndarray, quad: np.ndarray, size: int, *, pad: str, shrink: int) -> np.ndarray:
    """:func:`crop` with the "pil" sampler: the reference's steps, so its crops come out to the bit."""
    image, q = PIL.Image.fromarray(frame), quad.copy()
    diagonal = np.hypot(*(q[3] - q[1]))
    if shrink >= 2:
        w, h = image.size
        image = image.resize((int(np.rint(w / shrink)), int(np.rint(h / shrink))), PIL.Image.Resampling.LANCZOS)
        q, diagonal = q / shrink, diagonal / shrink
    # Cut the image to the quad's box plus a margin, as the reference does: the corners then move by whole
    # pixels and the transform's coefficients, and its truncated values, are the reference's to the last bit.
    margin = max(int(np.rint(diagonal * 0.1)), 3)
    w, h = image.size
    box = (max(int(np.floor(q[:, 0].min())) - margin, 0), max(int(np.floor(q[:, 1].min())) - margin, 0),
           min(int(np.ceil(q[:, 0].max())) + margin, w), min(int(np.ceil(q[:, 1].max())) + margin, h))
    width, height = box[2] - box[0], box[3] - box[1]
    if width > 0 and height > 0 and (width < w or height < h):  # empty when the quad lies off the image
        image, q = image.crop(box), q - box[:2]
    if pad == "mirror":
        # PIL fills 0 beyond the image: mirror the image as far as the quad reaches past it, and move the quad.
        w, h = image.size
        left, top = (max(2 - int(np.floor(q[:, k].min())), 0) for k in (0, 1))
        right, bottom = (max(int(np.ceil(q[:, k].max())) + 2 - n, 0) for k, n in ((0, w), (1, h)))
        if left or top or right or bottom:
            padded = np.pad(np.asarray(image), ((top, bottom), (left, right), (0, 0)), mode="reflect")
            image, q = PIL.Image.fromarray(padded), q + [left, top]
    out = image.transform((size, size), PIL.Image.Transform.QUAD, (q + 0.5).ravel().tolist(),
                          PIL.Image.Resampling.BILINEAR)
    return np.array(out)


def _samples_inside(matrix: np.ndarray, frame_shape: tuple[int, ...], size: int) -> np.ndarray:
    """bool [size, size]: where a crop pixel's sample point lies in the frame, its pixel edges included
    ([-0.5, W - 0.5) x [-0.5, H - 0.5) in pixel centres, PIL's test)."""
    h, w = frame_shape[:2]
    v, u = np.mgrid[0:size, 0:size].astype(np.float64)
    points = _apply(np.linalg.inv(matrix), np.stack([u.ravel(), v.ravel()], axis=1)).reshape(size, size, 2)
    x, y = points[..., 0], points[..., 1]
    return (x >= -0.5) & (x < w - 0.5) & (y >= -0.5) & (y < h - 0.5)


def uncrop(
    crop_image: np.ndarray,
    quad: np.ndarray,
    frame_shape: tuple[int, ...],
    *,
    box: tuple[int, int, int, int] | None = None,
    sampler: str = "opencv",
) -> tuple[np.ndarray, np.ndarray]:
    """Warp a crop back onto the frame it came from (the inverse of :func:`crop`).

    Bilinear sampling. "opencv": outside the quad the crop's edge pixels are repeated
    (BORDER_REPLICATE) so a blend that reaches one pixel past the edge does not pull in black. "pil":
    the reference code's paste-back, PIL's PERSPECTIVE transform with the coefficients that map frame
    pixels to crop pixels (``quad + 0.5`` to the crop's edges): values are truncated to integers, a frame
    pixel whose sample point lies off the crop is 0, and an RGBA crop is interpolated premultiplied by its
    alpha and returned straight (PIL transforms RGBA so).

    Args:
        crop_image: uint8 or float [S, S, C] crop (values kept as they are, e.g. [0, 255]); with "pil",
            uint8 [S, S, 3] (RGB) or [S, S, 4] (RGBA, straight alpha).
        quad: float [4, 2] frame-pixel corners the crop was taken from.
        frame_shape: (H, W) or (H, W, ...) of the frame.
        box: only compute this frame box (x0, y0, x1, y1), end-exclusive, e.g. from
            :func:`quad_bounds`; the whole frame when None.
        sampler: "opencv" or "pil", as the crop was made.

    Returns:
        ``(image, valid)``: float32 [h, w, C] the crop in frame pixels, and float32 [h, w] in
        [0, 1]: 1 where the frame pixel maps inside the crop, 0 outside; with "opencv" a one-pixel
        bilinear ramp at the quad edge. (h, w) is (H, W), or the box's size when ``box`` is given.

    Raises:
        ValueError: bad shapes, a box outside the frame, an unknown sampler, or a crop "pil" cannot take.
    """
    image = np.asarray(crop_image)
    if image.ndim != 3 or image.shape[0] != image.shape[1]:
        raise ValueError(f"crop_image must have shape [S, S, C], got {list(image.shape)}")
    check_sampler(sampler)
    h, w = int(frame_shape[0]), int(frame_shape[1])
    x0, y0, x1, y1 = (0, 0, w, h) if box is None else box
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise ValueError(f"box {box} is empty or outside the {w}x{h} frame")
    size = image.shape[0]
    if sampler == "pil":
        return _uncrop_pil(image, _check_quad(quad), (x0, y0, x1, y1))
    from_box = np.array([[1.0, 0.0, x0], [0.0, 1.0, y0], [0.0, 0.0, 1.0]])
    # Maps box pixels to crop pixels: the direction cv2 wants with WARP_INVERSE_MAP.
    matrix = crop_transform(quad, size) @ from_box
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    warped = cv2.warpPerspective(
        image.astype(np.float32),
        matrix,
        (x1 - x0, y1 - y0),
        flags=flags,
        borderMode=cv2.BORDER_REPLICATE,
    )
    warped = warped.reshape(y1 - y0, x1 - x0, image.shape[2])
    valid = cv2.warpPerspective(
        np.ones((size, size), np.float32),
        matrix,
        (x1 - x0, y1 - y0),
        flags=flags,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0.0,
    )
    return warped, valid


def _uncrop_pil(image: np.ndarray, quad: np.ndarray, box: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """:func:`uncrop` with the "pil" sampler."""
    if image.dtype != np.uint8 or image.shape[2] not in (3, 4):
        raise ValueError(f"the pil sampler uncrops uint8 RGB or RGBA crops, got {image.dtype} {list(image.shape)}")
    x0, y0, x1, y1 = box
    size = image.shape[0]
    # PIL's coordinates put pixel i's centre at i + 0.5; PERSPECTIVE's data maps output (frame box) points to
    # input (crop) points, with the last coefficient 1.
    edges = np.array([[0, 0], [0, size], [size, size], [size, 0]], dtype=np.float64)
    to_crop = _homography(quad + 0.5 - [x0, y0], edges).ravel()[:8].tolist()

    def warp(picture: PIL.Image.Image) -> np.ndarray:
        return np.asarray(picture.transform((x1 - x0, y1 - y0), PIL.Image.Transform.PERSPECTIVE, to_crop,
                                            PIL.Image.Resampling.BILINEAR), dtype=np.float32)

    warped = warp(PIL.Image.fromarray(np.ascontiguousarray(image)))
    valid = warp(PIL.Image.new("L", (size, size), 255)) / 255
    return warped, valid


def landmarks_to_crop(landmarks: np.ndarray, quad: np.ndarray, size: int) -> np.ndarray:
    """Frame-pixel points in crop-pixel coordinates.

    Args:
        landmarks: float [K, 2] (e.g. [68, 2]) frame pixels.
        quad: float [4, 2] frame-pixel corners of the crop.
        size: crop side in pixels.

    Returns:
        float64 [K, 2] crop pixels.

    Raises:
        ValueError: bad shapes.
    """
    points = np.asarray(landmarks, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"landmarks must have shape [K, 2], got {list(points.shape)}")
    return _apply(crop_transform(quad, size), points)


def quad_bounds(
    quad: np.ndarray, frame_shape: tuple[int, ...], *, margin: int = 2
) -> tuple[int, int, int, int]:
    """The frame-pixel box (x0, y0, x1, y1), end-exclusive, around a quad, clipped to the frame.

    Empty (x1 <= x0 or y1 <= y0) when the quad lies outside the frame.
    """
    q = _check_quad(quad)
    h, w = int(frame_shape[0]), int(frame_shape[1])
    x0 = max(int(np.floor(q[:, 0].min())) - margin, 0)
    y0 = max(int(np.floor(q[:, 1].min())) - margin, 0)
    x1 = min(int(np.ceil(q[:, 0].max())) + margin + 1, w)
    y1 = min(int(np.ceil(q[:, 1].max())) + margin + 1, h)
    return x0, y0, x1, y1


def _box_shrink(frame: np.ndarray, quad: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Box-average the frame region around ``quad`` by ``k``; also return pooled->frame pixels."""
    x0, y0, x1, y1 = quad_bounds(quad, frame.shape, margin=2 * k + 2)
    w = (x1 - x0) // k * k
    h = (y1 - y0) // k * k
    if w <= 0 or h <= 0:
        # The quad lies off the frame: nothing to pool, mirror the whole frame as it is.
        return frame, np.eye(3)
    region = frame[y0 : y0 + h, x0 : x0 + w].astype(np.float32)
    pooled = region.reshape(h // k, k, w // k, k, -1).mean(axis=(1, 3))
    # Pooled pixel j averages frame pixels x0 + k*j .. x0 + k*j + k - 1, centred (k-1)/2 in.
    to_frame = np.array(
        [[k, 0.0, x0 + (k - 1) / 2], [0.0, k, y0 + (k - 1) / 2], [0.0, 0.0, 1.0]]
    )
    return pooled, to_frame


def _homography(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 3x3 perspective map taking the 4 points ``src`` to ``dst``, solved in float64."""
    a = np.zeros((8, 8))
    b = np.zeros(8)
    for i, ((x, y), (u, v)) in enumerate(zip(src, dst)):
        a[2 * i] = [x, y, 1, 0, 0, 0, -u * x, -u * y]
        a[2 * i + 1] = [0, 0, 0, x, y, 1, -v * x, -v * y]
        b[2 * i], b[2 * i + 1] = u, v
    try:
        h = np.linalg.solve(a, b)
    except np.linalg.LinAlgError as e:
        raise ValueError(f"degenerate quad {src.tolist()}") from e
    return np.append(h, 1.0).reshape(3, 3)


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    homogeneous = np.concatenate([points, np.ones((len(points), 1))], axis=1) @ matrix.T
    return homogeneous[:, :2] / homogeneous[:, 2:3]


def _check_points(points: np.ndarray, count: int, name: str) -> np.ndarray:
    p = np.asarray(points, dtype=np.float64)
    if p.shape != (count, 2):
        raise ValueError(f"{name} must have shape [{count}, 2], got {list(p.shape)}")
    if not np.isfinite(p).all():
        raise ValueError(f"{name} must be finite")
    return p


def _check_landmarks(landmarks: np.ndarray) -> np.ndarray:
    return _check_points(landmarks, 68, "landmarks")


def _check_quad(quad: np.ndarray) -> np.ndarray:
    return _check_points(quad, 4, "quad")


def check_sampler(sampler: str) -> None:
    """Raises ValueError unless ``sampler`` is one of :data:`SAMPLERS`."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")


def _check_image(image: np.ndarray, name: str) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        dtype = getattr(image, "dtype", type(image))
        raise ValueError(f"{name} must be a uint8 numpy array, got {dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{name} must have shape [H, W, 3], got {list(image.shape)}")
