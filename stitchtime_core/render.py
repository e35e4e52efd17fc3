"""Paste stitched crops back into every frame and encode the result with the source's audio."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from stitchtime_core.blending import feather, feather_square, paste_back, paste_mask, paste_poisson
from stitchtime_core.config import BlendingConfig, OutputConfig
from stitchtime_core.masks import scaled_px
from stitchtime_core.video import VideoInfo, VideoWriter, iter_frames


class CropPaste(NamedTuple):
    """What goes back into one frame."""

    crop: np.ndarray
    """uint8 [S, S, 3] the stitched crop."""
    mask: np.ndarray
    """float [S, S] in [0, 1]: the segmentation mask m (soft-edged with ``stitching.mask_shape`` "square")."""
    paste_mask: np.ndarray
    """float [S, S] in [0, 1]: the dilated mask m^d = m + boundary."""


def blend_frame(frame: np.ndarray, item: CropPaste, quad: np.ndarray, blending: BlendingConfig, *,
                sampler: str) -> np.ndarray:
    """One frame with its crop pasted back the way ``blending.method`` says.

    "feather" pastes through m^d with a Gaussian edge (the paper); "mask" pastes inside m with a hard
    edge; "poisson" Poisson-blends inside m (the blending baselines of the ablation). ``sampler``
    (``alignment.sampler``, as the crop was made) warps the crop back.
    """
    if blending.method == "mask":
        return paste_mask(frame, item.crop, item.mask, quad, sampler=sampler)
    if blending.method == "poisson":
        return paste_poisson(frame, item.crop, item.mask, quad, sampler=sampler)
    size = item.crop.shape[0]
    if blending.feather_shape == "square":
        soft = feather_square(item.paste_mask, scaled_px(blending.feather_radius_px, size))
    else:
        soft = feather(item.paste_mask, blending.feather_px * size / 1024)
    return paste_back(frame, item.crop, soft, quad, sampler=sampler)


def render_video(source: str | os.PathLike, out: str | os.PathLike, *, info: VideoInfo, quads: np.ndarray,
                 crops: Callable[[int], CropPaste | None], blending: BlendingConfig, sampler: str,
                 output: OutputConfig, progress: Callable[[int], None] | None = None) -> int:
    """Write the edited video: each frame with its stitched crop pasted back.

    Args:
        source: the source video (frames and audio are read from it, never written). The output keeps
            its frame count, display size and rotation; a variable-frame-rate source comes out at its
            average rate (see :mod:`stitchtime_core.video`).
        out: the output path, written atomically.
        info: the source's probe.
        quads: float [N, 4, 2] crop quads in frame pixels.
        crops: frame index → what to paste into that frame, or None to keep the frame as it is.
        blending: how to paste.
        sampler: what warps the crops back (``alignment.sampler``, as they were made).
        output: codec settings.
        progress: called with 1 after each frame is written.

    Returns:
        the number of frames written.
    """
    written = 0
    with VideoWriter(out, width=info.width, height=info.height, fps=info.fps, config=output,
                     audio_source=str(source), rotation=info.rotation) as writer:
        for index, frame in enumerate(iter_frames(source, info)):
            item = crops(index) if index < len(quads) else None
            if item is not None:
                frame = blend_frame(frame, item, quads[index], blending, sampler=sampler)
            writer.write(frame)
            written += 1
            if progress is not None:
                progress(1)
    return written
