"""TL-ID, TG-ID and the similarity to the source read from real video files with dlib's identity network:
a clip against itself, against a copy blurred in every other frame, frames without a quad, and videos
that do not match."""

from __future__ import annotations

import re
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import pytest

from stitchtime_core.config import AlignmentConfig, OutputConfig
from stitchtime_core.errors import InputError, NoFaceError
from stitchtime_core.identity import DlibIdentity, load_dlib_identity
from stitchtime_core.sample_clip import make_sample_clip
from stitchtime_core.video import VideoWriter, iter_frames, probe
from stitchtime_core.measure import find_quads, measure_pair, measure_videos

FRAMES = 10


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("metrics") / "clip.mp4"
    make_sample_clip(path, seconds=FRAMES / 25, fps=Fraction(25), size=(160, 160))
    return path


@pytest.fixture(scope="module")
def identity() -> DlibIdentity:
    return load_dlib_identity()


@pytest.fixture(scope="module")
def quads(clip: Path) -> np.ndarray:
    return find_quads(clip, probe(clip), config=AlignmentConfig())


def write_frames(path: Path, frames: list[np.ndarray]) -> Path:
    height, width = frames[0].shape[:2]
    with VideoWriter(path, width=width, height=height, fps=Fraction(25), config=OutputConfig()) as writer:
        for frame in frames:
            writer.write(frame)
    return path


def test_quads_are_found_in_every_frame_of_the_clip(quads: np.ndarray) -> None:
    assert quads.shape == (FRAMES, 4, 2) and np.isfinite(quads).all()


def test_a_video_against_itself_scores_one(clip: Path, quads: np.ndarray, identity: DlibIdentity) -> None:
    result = measure_videos(clip, clip, quads=quads, identity=identity, batch_size=4)  # batches of 4, 4, 2
    assert result.tl_id == pytest.approx(1.0, abs=1e-9) and result.tg_id == pytest.approx(1.0, abs=1e-9)
    assert (result.frames, result.tg_pairs, result.network) == (FRAMES, FRAMES * (FRAMES - 1) // 2, identity.name)
    np.testing.assert_allclose(result.to_source, 1.0, atol=1e-5)
    assert result.source_similarity == pytest.approx(1.0, abs=1e-5)
    assert result.to_dict()["source_similarity"] == pytest.approx(1.0, abs=1e-5)


def test_blurring_every_other_frame_lowers_tl_id(clip: Path, identity: DlibIdentity, tmp_path: Path) -> None:
    frames = [cv2.GaussianBlur(frame, (0, 0), 4) if i % 2 else frame for i, frame in enumerate(iter_frames(clip))]
    blurred = write_frames(tmp_path / "blurred.mp4", frames)
    result = measure_pair(blurred, clip, identity=identity)
    assert result.tl_id < 0.97 and result.tg_id < 0.99  # measured: 0.933 and 0.962
    assert result.to_source[1::2].max() < result.to_source[0::2].min()  # the blurred frames moved away
    assert result.source_similarity == pytest.approx(result.to_source.mean()) and result.source_similarity < 0.99


def test_frames_without_a_quad_are_left_out(clip: Path, quads: np.ndarray, identity: DlibIdentity) -> None:
    holes = quads.copy()
    holes[[3, 4]] = np.nan
    result = measure_videos(clip, clip, quads=holes, identity=identity)
    assert np.isnan(result.to_source[[3, 4]]).all() and np.isnan(result.adjacent[[2, 3, 4]]).all()
    assert result.to_dict()["tl_pairs"] == FRAMES - 1 - 3 and result.tg_pairs == 8 * 7 // 2
    assert result.source_similarity == pytest.approx(np.nanmean(result.to_source))  # the 8 frames with a quad
    one = measure_videos(clip, clip, quads=np.where(np.arange(FRAMES)[:, None, None] == 0, quads, np.nan),
                         identity=identity)
    assert np.isnan(one.tl_id) and np.isnan(one.tg_id) and np.isfinite(one.to_source).sum() == 1
    with pytest.raises(NoFaceError, match="no face in any of its 10 frames"):
        measure_videos(clip, clip, quads=np.full_like(quads, np.nan), identity=identity)


def test_videos_that_do_not_match_are_refused(clip: Path, identity: DlibIdentity, tmp_path: Path) -> None:
    frames = list(iter_frames(clip))
    shorter = write_frames(tmp_path / "shorter.mp4", frames[:-2])
    with pytest.raises(InputError, match=re.escape(f"{shorter}: has 8 frames but its source {clip} has 10")):
        measure_pair(shorter, clip, identity=identity)
    smaller = write_frames(tmp_path / "smaller.mp4", [frame[:-16] for frame in frames])
    with pytest.raises(InputError, match="is 160x144 but its source .* is 160x160"):
        measure_pair(smaller, clip, identity=identity)
