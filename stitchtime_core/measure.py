"""TL-ID and TG-ID of an edited video against its source, read from the two video files.

Both videos are cut into FFHQ-aligned crops with the same quads, the source's, so the edited and
source crops of a frame show the same region; the crops are embedded by an identity network in
batches as the videos stream past, and only the embeddings are kept.
"""

from __future__ import annotations

import itertools
import os

import numpy as np

from stitchtime_core import alignment, faces, video
from stitchtime_core.config import AlignmentConfig
from stitchtime_core.errors import InputError, NoFaceError
from stitchtime_core.identity import IdentityNet
from stitchtime_core.metrics import IdentityMetrics, identity_metrics

CROP_SIZE = 256
"""Side of the aligned crops the identity networks read: dlib cuts its 150 px chip from them, and
ArcFace's input is cut from a 256 px crop as pSp's identity loss does."""


def probe_pair(edited_path: str | os.PathLike,
               source_path: str | os.PathLike) -> tuple[video.VideoInfo, video.VideoInfo]:
    """Probe an edited video and its source, which must have the same frame count and size.

    Raises:
        InputError: either file is missing or not a readable video, or the two differ in frame
            count or size (named on the edited video). An edited video one pixel wider or taller
            than an odd-sized source matches it: that is how an odd size is encoded.
    """
    edited, source = video.probe(edited_path), video.probe(source_path)
    if edited.frame_count != source.frame_count:
        raise InputError(edited_path, f"has {edited.frame_count} frames but its source {source_path} has "
                                      f"{source.frame_count}")
    # An odd-sized source is written one pixel larger (4:2:0 chroma needs even sizes): see VideoWriter.
    even = (source.width + source.width % 2, source.height + source.height % 2)
    if (edited.width, edited.height) not in ((source.width, source.height), even):
        raise InputError(edited_path, f"is {edited.width}x{edited.height} but its source {source_path} is "
                                      f"{source.width}x{source.height}")
    return edited, source


def find_quads(source_path: str | os.PathLike, info: video.VideoInfo, *, config: AlignmentConfig) -> np.ndarray:
    """The pipeline's crop quads of a video: its face track, gap plan and smoothed quads.

    As the ``landmarks`` and ``align`` stages find them, without a store.

    Args:
        source_path: the video.
        info: its :func:`stitchtime_core.video.probe` result.
        config: detector, face choice, gaps and smoothing.

    Returns:
        float64 [N, 4, 2] quads in frame pixels; NaN in frames that pass through without a face.

    Raises:
        InputError: the video cannot be decoded, or ``config.face`` names a face that is not there.
        NoFaceError: no frame has a face.
    """
    landmarker = faces.load_landmarker(detector=config.detector, upsample=config.detector_upsample,
                                       max_side=config.detect_max_side)
    try:
        track = faces.landmarks_for_video(video.iter_frames(source_path, info), landmarker, choose=config.face)
    except ValueError as exc:  # e.g. face "2" when the first frame with faces has only two
        raise InputError(source_path, str(exc)) from None
    if not track.found.any():
        raise NoFaceError(source_path, f"no face found in any of its {len(track.found)} frames")
    quads, _, _ = alignment.track_quads(track.landmarks, track.found, config=config, fps=float(info.fps))
    return quads


def measure_videos(edited_path: str | os.PathLike, source_path: str | os.PathLike, *, quads: np.ndarray,
                   identity: IdentityNet, batch_size: int = 32) -> IdentityMetrics:
    """TL-ID and TG-ID of an edited video, both videos cropped with the given quads.

    Args:
        edited_path: the edited video.
        source_path: its source: same frame count and size.
        quads: float [N, 4, 2] frame-pixel crop quads, N the videos' frame count; NaN rows mark
            frames without a face, which the metrics leave out.
        identity: the identity network.
        batch_size: crops per :meth:`IdentityNet.embed` call, > 0.

    Returns:
        The metrics (:func:`stitchtime_core.metrics.identity_metrics`); NaN scores when fewer than
        two frames have a quad.

    Raises:
        InputError: a video is unreadable or the two do not match (:func:`probe_pair`).
        NoFaceError: no frame has a quad.
        ValueError: ``quads`` is not [N, 4, 2] or ``batch_size`` is not positive.
    """
    edited_info, source_info = probe_pair(edited_path, source_path)
    n = source_info.frame_count
    quads = np.asarray(quads, dtype=np.float64)
    if quads.shape != (n, 4, 2):
        raise ValueError(f"quads must have shape [{n}, 4, 2] for {n} frames, got {list(quads.shape)}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    has_quad = np.isfinite(quads).all(axis=(1, 2))
    if not has_quad.any():  # checked before the videos are decoded
        raise NoFaceError(source_path, f"no face in any of its {n} frames")
    frames = zip(video.iter_frames(edited_path, edited_info), video.iter_frames(source_path, source_info))
    crops = ((i, alignment.crop(edited[:source.shape[0], :source.shape[1]], quads[i], CROP_SIZE),
              alignment.crop(source, quads[i], CROP_SIZE))
             for i, (edited, source) in enumerate(frames) if has_quad[i])
    index: list[int] = []
    edited_embeddings, source_embeddings = [], []
    while batch := list(itertools.islice(crops, batch_size)):
        rows, edited_crops, source_crops = zip(*batch)
        index += rows
        edited_embeddings.append(identity.embed(np.stack(edited_crops)))
        source_embeddings.append(identity.embed(np.stack(source_crops)))
    valid = np.zeros(n, dtype=bool)
    valid[index] = True
    return identity_metrics(_by_frame(edited_embeddings, index, n), _by_frame(source_embeddings, index, n),
                            network=identity.name, valid=valid)


def measure_pair(edited_path: str | os.PathLike, source_path: str | os.PathLike, *, identity: IdentityNet,
                 config: AlignmentConfig = AlignmentConfig()) -> IdentityMetrics:
    """TL-ID and TG-ID of any edited video against its source, the quads found in the source.

    Args:
        edited_path: the edited video.
        source_path: its source: same frame count and size.
        identity: the identity network.
        config: how the face is found and aligned in the source (:func:`find_quads`).

    Raises:
        InputError: a video is unreadable, the two do not match, or the face choice is not there.
        NoFaceError: no source frame has a face.
    """
    _, source_info = probe_pair(edited_path, source_path)  # before the slow face search
    quads = find_quads(source_path, source_info, config=config)
    return measure_videos(edited_path, source_path, quads=quads, identity=identity)


def _by_frame(chunks: list[np.ndarray], index: list[int], n: int) -> np.ndarray:
    """float32 [n, D]: the embedded rows in their frames, zeros elsewhere."""
    embeddings = np.concatenate(chunks)
    out = np.zeros((n, embeddings.shape[1]), np.float32)
    out[index] = embeddings
    return out
