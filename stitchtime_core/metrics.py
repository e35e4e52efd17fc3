"""Temporal identity consistency of an edited video: TL-ID and TG-ID (paper section 4.2).

Both metrics compare frames of the edited video with each other, never with the source directly:
the identity similarity of a pair of edited frames is divided by the similarity of the same pair
of source frames, which removes the identity network's own inconsistency, and these normalised
scores are averaged over the video. TL-ID takes the pairs of adjacent frames (local jitter), TG-ID
all pairs of frames (slow drift). A score of 1 means the edit kept the source's consistency.
Beside them, ``source_similarity`` compares each edited frame with its own source frame: how much
of the source's identity the edit keeps (a strong edit lowers it by design; TL-ID and TG-ID do not
see a change that is the same in every frame).

Two choices the paper leaves open:

- Frames without a usable face (``valid`` False: no face was tracked, so no crop exists) are left
  out: a pair with such a frame counts for neither metric. TL-ID keeps the adjacent pairs only, it
  does not join the frames on either side of a gap.
- A pair whose source similarity is below ``min_source_similarity`` is left out: there the network
  does not see the same face in the two source frames, and dividing by a value near 0 (or below)
  would let one such pair outweigh the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

_ROWS_PER_BLOCK = 1024
"""TG-ID's similarity matrices are built this many rows at a time, so a clip of N frames holds at
most 1024 x N of them at once, not N x N."""

_UNIT_TOLERANCE = 1e-3
"""How far an embedding's length may be from 1."""


@dataclass(frozen=True, eq=False)
class IdentityMetrics:
    """TL-ID and TG-ID of an edited video, with the per-frame values behind them.

    Attributes:
        tl_id: mean normalised similarity of adjacent frame pairs; NaN when no pair is left.
        tg_id: mean normalised similarity of all frame pairs i < j; NaN when no pair is left.
        network: the identity network's name (:class:`stitchtime_core.identity.IdentityNet`).
        frames: N, the number of frames, with and without a face.
        tg_pairs: how many pairs TG-ID averages.
        adjacent: float64 [N-1], sim(edited_i, edited_i+1) / sim(source_i, source_i+1); NaN for
            the pairs left out.
        to_source: float64 [N], sim(edited_i, source_i), the cosine similarity of each edited frame
            to its source frame; NaN for frames without a face.
    """

    tl_id: float
    tg_id: float
    network: str
    frames: int
    tg_pairs: int
    adjacent: np.ndarray
    to_source: np.ndarray

    @property
    def source_similarity(self) -> float:
        """How much the edit keeps the source's identity: the mean of ``to_source`` over the frames with a face
        (1: the same embedding as the source in every frame); NaN when no frame has one."""
        return _mean(self.to_source)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values: floats rounded to 6 decimals, NaN written as None."""
        return {
            "tl_id": _rounded(self.tl_id), "tg_id": _rounded(self.tg_id),
            "source_similarity": _rounded(self.source_similarity), "network": self.network,
            "frames": self.frames, "frames_with_face": int(np.isfinite(self.to_source).sum()),
            "tl_pairs": int(np.isfinite(self.adjacent).sum()), "tg_pairs": self.tg_pairs,
            "adjacent": [_rounded(v) for v in self.adjacent.tolist()],
            "to_source": [_rounded(v) for v in self.to_source.tolist()],
        }


def identity_metrics(
    edited: np.ndarray,  # [N, D] unit embeddings of the edited frames' aligned crops
    source: np.ndarray,  # [N, D] unit embeddings of the source frames' aligned crops
    *,
    network: str,
    valid: np.ndarray | None = None,  # [N] bool, False for frames without a face
    min_source_similarity: float = 0.1,
) -> IdentityMetrics:
    """TL-ID and TG-ID (paper section 4.2) from identity embeddings of both videos.

    For a pair of frames (i, j) the normalised score is ``(e_i . e_j) / (s_i . s_j)``, e and s the
    edited and source embeddings. TL-ID is its mean over the adjacent pairs (i, i+1), TG-ID its
    mean over all pairs i < j. Pairs with an invalid frame, or whose source similarity is below
    ``min_source_similarity``, are left out (see the module docstring).

    Example:
        >>> e = np.array([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8]])  # float [3, 2], unit rows
        >>> m = identity_metrics(e, e, network="test")
        >>> m.tl_id, m.tg_id, m.adjacent.shape, m.to_source.shape
        (1.0, 1.0, (2,), (3,))

    Args:
        edited: float [N, D] unit vectors, embeddings of the edited video's aligned crops.
        source: float [N, D] unit vectors, of the source video's crops cut with the same quads.
        network: the name of the identity network that made them, for the report.
        valid: bool [N], False for frames without a face (their rows are ignored, any values);
            all frames when None.
        min_source_similarity: pairs whose source similarity is below this are left out, > 0.
            Two frames of one face score far above 0.1 with both networks (dlib gives even two
            different people 0.8 or more); ArcFace scores unrelated faces near 0.

    Returns:
        The :class:`IdentityMetrics`; ``tl_id`` or ``tg_id`` is NaN when all its pairs are left out,
        as both are when fewer than 2 frames are valid (a one-frame video has no pair).

    Raises:
        ValueError: the embeddings are not float [N, D] of the same shape, a valid row is not a
            finite unit vector, ``valid`` is not a bool [N] mask, or ``min_source_similarity`` is
            not positive.
    """
    _check_embeddings(edited, "edited")
    _check_embeddings(source, "source")
    if edited.shape != source.shape:
        raise ValueError(f"edited and source must have the same shape, got {list(edited.shape)} "
                         f"and {list(source.shape)}")
    n = len(edited)
    valid = np.ones(n, dtype=bool) if valid is None else valid
    if not isinstance(valid, np.ndarray) or valid.dtype != bool or valid.shape != (n,):
        described = f"{valid.dtype} {list(valid.shape)}" if isinstance(valid, np.ndarray) else type(valid).__name__
        raise ValueError(f"valid must be a bool [{n}] array, got {described}")
    if not min_source_similarity > 0:
        raise ValueError(f"min_source_similarity must be > 0, got {min_source_similarity}")
    # Invalid rows become zeros, so their similarities are 0 and the source threshold drops them.
    e = np.where(valid[:, None], edited, 0.0).astype(np.float64)
    s = np.where(valid[:, None], source, 0.0).astype(np.float64)
    _check_unit(e, valid, "edited")
    _check_unit(s, valid, "source")

    adjacent = _normalised(np.sum(e[:-1] * e[1:], axis=1), np.sum(s[:-1] * s[1:], axis=1), min_source_similarity)
    total, pairs = 0.0, 0
    for start in range(0, n, _ROWS_PER_BLOCK):
        stop = min(start + _ROWS_PER_BLOCK, n)
        later = np.arange(start, n)[None, :] > np.arange(start, stop)[:, None]  # j > i, i in the block
        scores = _normalised(e[start:stop] @ e[start:].T, s[start:stop] @ s[start:].T, min_source_similarity)[later]
        kept = np.isfinite(scores)
        total += float(scores[kept].sum())
        pairs += int(kept.sum())
    to_source = np.where(valid, np.sum(e * s, axis=1), np.nan)
    return IdentityMetrics(
        tl_id=_mean(adjacent), tg_id=total / pairs if pairs else float("nan"), network=network, frames=n,
        tg_pairs=pairs, adjacent=adjacent, to_source=to_source)


def _normalised(edited_similarity: np.ndarray, source_similarity: np.ndarray, floor: float) -> np.ndarray:
    """edited / source similarity where the source similarity is at least ``floor``, NaN elsewhere."""
    kept = source_similarity >= floor
    return np.where(kept, edited_similarity / np.where(kept, source_similarity, 1.0), np.nan)


def _mean(values: np.ndarray) -> float:
    kept = values[np.isfinite(values)]
    return float(kept.mean()) if len(kept) else float("nan")


def _rounded(value: float) -> float | None:
    return None if np.isnan(value) else round(float(value), 6)


def _check_embeddings(embeddings: np.ndarray, name: str) -> None:
    if (not isinstance(embeddings, np.ndarray) or not np.issubdtype(embeddings.dtype, np.floating)
            or embeddings.ndim != 2):
        described = (f"{embeddings.dtype} {list(embeddings.shape)}" if isinstance(embeddings, np.ndarray)
                     else type(embeddings).__name__)
        raise ValueError(f"{name} must be a float [N, D] array, got {described}")


def _check_unit(embeddings: np.ndarray, valid: np.ndarray, name: str) -> None:
    lengths = np.linalg.norm(embeddings, axis=1)
    bad = np.flatnonzero(valid & ~(np.abs(lengths - 1.0) <= _UNIT_TOLERANCE))  # NaN counts as bad
    if len(bad):
        raise ValueError(f"{name} embeddings must be finite unit vectors; frame {bad[0]} has length "
                         f"{lengths[bad[0]]:.4g}")
