"""TL-ID and TG-ID (paper section 4.2) and the similarity to the source on synthetic embeddings: exact
cases, the all-pairs mean against a plain double loop, frames without a face, tiny source similarities,
and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from stitchtime_core import metrics
from stitchtime_core.metrics import identity_metrics


def unit_rows(rng: np.random.Generator, n: int, dim: int = 16, spread: float = 0.3) -> np.ndarray:
    """float64 [n, dim] unit vectors around one direction, like one person's faces."""
    rows = np.ones(dim) + spread * rng.standard_normal((n, dim))
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def naive(edited: np.ndarray, source: np.ndarray, valid: np.ndarray, floor: float) -> tuple[float, float]:
    """TL-ID and TG-ID as the paper words them, one pair at a time."""
    def scores(pairs):
        kept = [(i, j) for i, j in pairs if valid[i] and valid[j] and source[i] @ source[j] >= floor]
        return np.mean([(edited[i] @ edited[j]) / (source[i] @ source[j]) for i, j in kept])

    n = len(edited)
    return scores((i, i + 1) for i in range(n - 1)), scores((i, j) for i in range(n) for j in range(i + 1, n))


def test_identical_videos_score_exactly_one() -> None:
    embeddings = unit_rows(np.random.default_rng(0), 3000, dim=128)  # a two-minute clip
    result = identity_metrics(embeddings, embeddings.copy(), network="test")
    assert (result.tl_id, result.tg_id) == (1.0, 1.0)
    assert result.frames == 3000 and result.tg_pairs == 3000 * 2999 // 2
    np.testing.assert_allclose(result.to_source, 1.0, atol=1e-12)
    assert result.source_similarity == pytest.approx(1.0, abs=1e-12)


def test_hand_computed_case() -> None:
    source = np.array([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8]])  # pair similarities: 01 0.8, 12 0.96, 02 0.6
    edited = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])  # 01 0.6, 12 0.8, 02 0.0
    result = identity_metrics(edited, source, network="test")
    np.testing.assert_allclose(result.adjacent, [0.75, 0.8 / 0.96])
    assert result.tl_id == pytest.approx((0.75 + 0.8 / 0.96) / 2)
    assert result.tg_id == pytest.approx((0.75 + 0.8 / 0.96 + 0.0) / 3)
    np.testing.assert_allclose(result.to_source, [1.0, 0.96, 0.8])
    assert result.source_similarity == pytest.approx((1.0 + 0.96 + 0.8) / 3)


def test_all_pairs_match_a_double_loop_across_row_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "_ROWS_PER_BLOCK", 7)  # several blocks, the last one short
    rng = np.random.default_rng(1)
    source, edited = unit_rows(rng, 40, spread=1.2), unit_rows(rng, 40, spread=1.2)
    valid = rng.random(40) > 0.2
    floor = 0.3
    assert (source @ source.T < floor).any()  # some pairs fall under the floor
    result = identity_metrics(edited, source, network="test", valid=valid, min_source_similarity=floor)
    tl_id, tg_id = naive(edited, source, valid, floor)
    assert result.tl_id == pytest.approx(tl_id, rel=1e-12)
    assert result.tg_id == pytest.approx(tg_id, rel=1e-12)


def test_frames_without_a_face_are_left_out() -> None:
    rng = np.random.default_rng(2)
    source, edited = unit_rows(rng, 12), unit_rows(rng, 12)
    valid = np.ones(12, dtype=bool)
    valid[[0, 5, 6]] = False
    edited[5], source[6] = np.nan, 0.0  # whatever an invalid row holds is ignored
    result = identity_metrics(edited, source, network="test", valid=valid)
    assert np.isnan(result.adjacent[[0, 4, 5, 6]]).all() and np.isfinite(result.adjacent[[1, 2, 3, 7]]).all()
    assert np.isnan(result.to_source[[0, 5, 6]]).all()
    # The similarity to the source is the mean over the frames with a face.
    expected = np.mean([edited[i] @ source[i] for i in np.flatnonzero(valid)])
    assert result.source_similarity == pytest.approx(expected, rel=1e-12)
    # TG-ID does not look at frame order, so it equals TG-ID of the frames with a face alone.
    alone = identity_metrics(edited[valid], source[valid], network="test")
    assert result.tg_id == pytest.approx(alone.tg_id, rel=1e-12) and result.tg_pairs == 9 * 8 // 2
    assert result.tl_id == pytest.approx(np.nanmean(result.adjacent))


def test_tiny_or_negative_source_similarities_are_left_out() -> None:
    source = np.array([[1.0, 0.0], [0.0, 1.0], [-0.6, 0.8], [-0.6, 0.8]])  # 01: 0, 12: 0.8, 23: 1, 02: -0.6
    edited = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [0.0, 1.0]])
    result = identity_metrics(edited, source, network="test")
    np.testing.assert_allclose(result.adjacent, [np.nan, 0.8 / 0.8, 1.0])
    assert result.tg_pairs == 3  # 12, 13, 23; 01, 02 and 03 are dropped
    assert np.isfinite(result.tg_id) and np.isfinite(result.tl_id)


def test_no_pair_left_gives_nan_and_null_in_json() -> None:
    source = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    edited = source.copy()
    valid = np.array([True, False, True])
    result = identity_metrics(edited, source, network="test", valid=valid)
    assert np.isnan(result.tl_id) and result.tg_id == 1.0
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["tl_id"] is None and data["adjacent"] == [None, None]
    assert data == {"tl_id": None, "tg_id": 1.0, "source_similarity": 1.0, "network": "test", "frames": 3,
                    "frames_with_face": 2, "tl_pairs": 0, "tg_pairs": 1, "adjacent": [None, None],
                    "to_source": [1.0, None, 1.0]}


@pytest.mark.parametrize("valid", [np.array([True]), np.array([False, True, False])])
def test_fewer_than_two_faces_leave_no_pair(valid: np.ndarray) -> None:
    unit = np.tile([[0.6, 0.8]], (len(valid), 1))
    result = identity_metrics(unit, unit, network="test", valid=valid)
    assert np.isnan(result.tl_id) and np.isnan(result.tg_id) and result.tg_pairs == 0
    assert result.to_dict()["frames_with_face"] == 1
    assert result.source_similarity == pytest.approx(1.0)


def test_no_frame_with_a_face_has_no_source_similarity() -> None:
    unit = np.tile([[0.6, 0.8]], (3, 1))
    result = identity_metrics(unit, unit, network="test", valid=np.zeros(3, dtype=bool))
    assert np.isnan(result.source_similarity) and result.to_dict()["source_similarity"] is None


@pytest.mark.parametrize("edited, source, kwargs, message", [
    (np.ones((3, 2)) / np.sqrt(2), np.ones((4, 2)) / np.sqrt(2), {}, "same shape"),
    (np.ones(3), np.ones(3), {}, "float [N, D]"),
    (np.ones((3, 1), np.int64), np.ones((3, 1), np.int64), {}, "float [N, D]"),
    ([[1.0], [1.0]], [[1.0], [1.0]], {}, "float [N, D] array, got list"),
    (np.ones((3, 1)), np.ones((3, 1)), {"valid": np.ones(2, bool)}, "bool [3]"),
    (np.ones((3, 1)), np.ones((3, 1)), {"valid": np.ones(3)}, "bool [3]"),
    (np.ones((3, 2)), np.ones((3, 2)) / np.sqrt(2), {}, "frame 0 has length 1.414"),
    (np.ones((3, 1)), np.array([[1.0], [np.nan], [1.0]]), {}, "frame 1 has length nan"),
    (np.ones((3, 1)), np.ones((3, 1)), {"min_source_similarity": 0.0}, "min_source_similarity must be > 0"),
])
def test_bad_input_raises_value_error(edited, source, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        identity_metrics(edited, source, network="test", **kwargs)
