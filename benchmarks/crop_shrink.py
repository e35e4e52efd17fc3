"""Benchmark: how far a crop is from an alias-free one under each ``alignment.shrink_by`` rule.

The astronaut photo is scaled so the FFHQ quad of its face is 2.2-2.8 times a 128 px crop: the range where
"side" (pool by floor(side / size)) pools by 2 before bilinear sampling and "half-diagonal" (the reference
code's floor(diagonal / size / 2)) samples the frame directly. Each crop is compared with the same quad
sampled at 8x the size and area-averaged down; prints the RMS difference in 8-bit levels.

    .venv/bin/python benchmarks/crop_shrink.py
"""

from __future__ import annotations

import cv2
import numpy as np
from skimage.data import astronaut

from stitchtime_core import alignment, faces

SIZE = 128
SCALES = (2.2, 2.4, 2.6, 2.8)


def errors() -> dict[float, dict[str, float]]:
    """``{quad side / crop side: {shrink_by: RMS difference to the supersampled crop}}``."""
    photo = astronaut()
    c, x, y = alignment.face_axes(faces.load_landmarker().detect(photo)[0][1])
    result = {}
    for scale in SCALES:
        f = scale * SIZE / (2 * np.hypot(*x))
        frame = cv2.resize(photo, None, fx=f, fy=f, interpolation=cv2.INTER_CUBIC)
        # Pixel centres scale about the image's corner edge: centre i lands at (i + 0.5) f - 0.5.
        quad = alignment.quad_from_axes(c * f + (f - 1) / 2, x * f, y * f)
        truth = cv2.resize(alignment.crop(frame, quad, SIZE * 8).astype(np.float32), (SIZE, SIZE),
                           interpolation=cv2.INTER_AREA)
        result[scale] = {by: float(np.sqrt(((alignment.crop(frame, quad, SIZE, shrink_by=by) - truth) ** 2).mean()))
                         for by in alignment.SHRINK_BY}
    return result


if __name__ == "__main__":
    for scale, rms in errors().items():
        print(f"quad {scale:.1f}x the crop: " + ", ".join(f"{by} {value:.2f}" for by, value in rms.items()))
