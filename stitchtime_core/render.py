"""Paste stitched crops back into every frame and encode the result with the source's audio."""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from stitchtime_core.blending import feather, paste_back
from stitchtime_core.config import BlendingConfig, OutputConfig
from stitchtime_core.video import VideoInfo, VideoWriter, iter_frames


def render_video(source: str | os.PathLike, out: str | os.PathLike, *, info: VideoInfo, quads: np.ndarray,
                 crops: Callable[[int], tuple[np.ndarray, np.ndarray] | None], blending: BlendingConfig,
                 output: OutputConfig) -> int:
    """Write the edited video: each frame with its stitched crop pasted back.

    Args:
        source: the source video (frames and audio are read from it, never written). The output keeps
            its frame count, display size and rotation; a variable-frame-rate source comes out at its
            average rate (see :mod:`stitchtime_core.video`).
        out: the output path, written atomically.
        info: the source's probe.
        quads: float [N, 4, 2] crop quads in frame pixels.
        crops: frame index → (stitched crop uint8 [S, S, 3], paste mask float [S, S] in [0, 1]),
            or None to keep that frame as it is.
        blending: feathering of the paste mask.
        output: codec settings.

    Returns:
        the number of frames written.
    """
    written = 0
    with VideoWriter(out, width=info.width, height=info.height, fps=info.fps, config=output,
                     audio_source=str(source), rotation=info.rotation) as writer:
        for index, frame in enumerate(iter_frames(source, info)):
            item = crops(index) if index < len(quads) else None
            if item is not None:
                crop, mask = item
                soft = feather(mask, blending.feather_px * crop.shape[0] / 1024)
                frame = paste_back(frame, crop, soft, quads[index])
            writer.write(frame)
            written += 1
    return written
