"""The HTML report: its content, escaping, keyframe choice, and that a real browser renders it from disk."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data

from browser import BROWSER, NO_BROWSER, open_in_chromium
from stitchtime_core import report
from stitchtime_core.report import Keyframe, ReportData, choose_keyframes, render_report

FRAMES = 12
FPS = 25.0
HOSTILE = '<script>alert("x")</script> & co'


def _keyframe(frame: int, source: np.ndarray) -> Keyframe:
    """A keyframe whose steps are plausible variations of the source crop, with a disc mask and its ring."""
    size = source.shape[0]
    mask = np.zeros((size, size), np.float32)
    cv2.circle(mask, (size // 2, size // 2), size // 3, 1.0, thickness=-1)
    boundary = cv2.dilate(mask, np.ones((9, 9), np.uint8)) - mask
    return Keyframe(frame=frame, source=source, inversion=cv2.GaussianBlur(source, (5, 5), 0),
                    raw_edit=np.clip(source.astype(np.int16) + 40, 0, 255).astype(np.uint8),
                    stitched=np.clip(source.astype(np.int16) + 20, 0, 255).astype(np.uint8),
                    mask=mask, boundary=boundary)


def _report_data(sources: list[np.ndarray]) -> ReportData:
    rng = np.random.default_rng(0)
    frames = choose_keyframes(FRAMES, len(sources))
    return ReportData(
        title=f"clip {HOSTILE}",
        inputs={"video": f"{HOSTILE}.mp4", "edit": "age=-4"},
        settings={"pti": {"steps": 350, "lr": 3e-4}, "stitching": {"method": "feather", "dilation_px": 25}},
        seconds={"probe": 0.2, "pti": 41.5, "stitch": 12.2},
        keyframes=[_keyframe(frame, source) for frame, source in zip(frames, sources)],
        identity={"tl_id": 0.98765, "tg_id": 0.95432, "source_similarity": 0.65437, "network": "dlib-resnet",
                  "adjacent": list(0.97 + 0.02 * rng.random(FRAMES - 1)),
                  "to_source": list(0.6 + 0.1 * rng.random(FRAMES))},
        stitching={"boundary_error_before": 0.1234, "boundary_error_after": 0.0321},
        pti={"method": "pti", "steps": 48, "first_loss": 0.9, "last_loss": 0.4, "reconstruction_mse": 0.01876,
             "reconstruction_lpips_before": 0.4321, "reconstruction_lpips_after": 0.2161,
             "reconstruction_frames": [0, 4, 7, 11]},
        ablations=[{"variant": "full", "tl_id": 0.99, "tg_id": 0.96, "boundary_error": 0.03, "seconds": 60.0},
                   {"variant": HOSTILE, "tl_id": 0.9, "tg_id": None, "boundary_error": None, "seconds": 5.0}],
        fps=FPS)


@pytest.fixture(scope="module")
def data() -> ReportData:
    rng = np.random.default_rng(1)
    return _report_data([rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(3)])


@pytest.fixture(scope="module")
def page(data) -> str:
    return render_report(data)


def test_report_shows_metrics_stage_times_and_settings(page):
    for text in ("0.9877", "0.9543", "dlib-resnet", "0.1234", "0.0321", "-74.0 %",
                 "probe", "pti", "stitch", "41.5", "53.9", "dilation_px", "feather", "0.0003"):
        assert text in page, text


def test_report_shows_the_similarity_to_the_source_and_the_pti_reconstruction(page):
    assert "similarity to the source" in page and "0.6544" in page
    assert "Inversion (PTI)" in page
    for text in ("0.4321", "0.2161", "-50.0 %", "on 4 frames", "48 steps", "0.0188"):
        assert text in page, text


def test_pti_without_tuning_or_reconstruction_numbers():
    untuned = render_report(ReportData(title="t", inputs={}, settings={}, seconds={}, fps=FPS,
                                       pti={"method": "none", "steps": 0}))
    assert "not tuned" in untuned and "LPIPS" not in untuned
    # A PTI stage made before the reconstruction was measured, and identity measured before source_similarity.
    identity = {"tl_id": 0.9, "tg_id": 0.9, "network": "dlib-resnet", "adjacent": [1.0], "to_source": [0.7, 0.8]}
    older = render_report(ReportData(title="t", inputs={}, settings={}, seconds={}, fps=FPS, identity=identity,
                                     pti={"method": "pti", "steps": 12, "first_loss": 0.5, "last_loss": 0.3}))
    assert "12 steps" in older and older.count(">—</td>") == 4  # LPIPS before, after, change; source similarity


def test_user_strings_are_escaped(page):
    assert "<script" not in page
    assert page.count("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; co") == 4  # title twice, file, variant


def test_every_keyframe_shows_five_inline_jpegs(page, data):
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert len(sources) == page.count("<img") == 5 * len(data.keyframes)
    assert all(src.startswith("data:image/jpeg;base64,") for src in sources)
    for frame in choose_keyframes(FRAMES, 3):
        assert f"frame {frame}<br>" in page


def _paths(page: str) -> dict[str, str]:
    """The path data of each plotted series, by class."""
    return dict(re.findall(r'<path class="([a-z-]+)"[^>]* d="([^"]*)"', page))


def test_plot_draws_both_series_against_time(page):
    assert page.count("<svg") == 1
    paths = _paths(page)
    assert sorted(paths) == ["adjacent", "to-source"]
    assert paths["to-source"].count("M") == paths["adjacent"].count("M") == 1
    assert paths["to-source"].count("L") == FRAMES - 1 and paths["adjacent"].count("L") == FRAMES - 2
    xs = [float(x) for x in re.findall(r"[ML]([\d.]+),", paths["to-source"])]
    assert xs == sorted(xs) and xs[0] < xs[-1]
    assert "time (s)" in page and "0.44" in page  # the last tick is (FRAMES - 1) / FPS seconds


def test_unmeasured_identity_values_leave_gaps_and_dashes():
    # The shape of stitchtime_core.metrics.IdentityMetrics.to_dict(): None for NaN, extra keys.
    identity = {"tl_id": None, "tg_id": 0.9, "network": "arcface_ir_se50", "frames": 5, "tg_pairs": 3,
                "adjacent": [None, None, 1.0, float("nan")], "to_source": [0.7, None, 0.8, 0.8, 0.75]}
    page = render_report(ReportData(title="t", inputs={}, settings={}, seconds={}, identity=identity, fps=FPS))
    assert ">—</td>" in page and "0.9000" in page
    paths = _paths(page)
    assert paths["to-source"].count("M") == 2 and paths["to-source"].count("L") == 2
    assert paths["adjacent"].count("M") == 1 and "L" not in paths["adjacent"]  # a lone point: a dot
    assert "nan" not in page.lower()


def test_missing_parts_read_not_measured_and_ablation_is_left_out():
    page = render_report(ReportData(title="t", inputs={}, settings={}, seconds={}, fps=30))
    assert page.count("Not measured.") == 5  # seconds, keyframes, identity, stitching, PTI
    assert "<img" not in page and "<svg" not in page and "Ablation" not in page


def test_data_uri_downscales_to_the_thumbnail_side():
    image = cv2.resize(skimage.data.astronaut(), (1024, 512), interpolation=cv2.INTER_AREA)
    prefix = "data:image/jpeg;base64,"
    uri = report.image_data_uri(image)
    decoded = cv2.imdecode(np.frombuffer(base64.b64decode(uri[len(prefix):]), np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == (128, 256, 3)
    expected = cv2.resize(image, (256, 128), interpolation=cv2.INTER_AREA)[:, :, ::-1]
    assert np.abs(decoded.astype(int) - expected).mean() < 4
    small = report.image_data_uri(image[:40, :50])
    assert cv2.imdecode(np.frombuffer(base64.b64decode(small[len(prefix):]), np.uint8), 1).shape == (40, 50, 3)


def test_overlay_tints_mask_blue_and_boundary_red():
    source = np.full((8, 8, 3), 128, np.uint8)
    mask, boundary = np.zeros((8, 8)), np.zeros((8, 8))
    mask[:4], boundary[4:6] = 1, 1
    out = report.overlay_masks(source, mask, boundary).astype(int)
    assert (out[:4, :, 2] > 128).all() and (out[:4, :, 0] < 128).all()
    assert (out[4:6, :, 0] > 128).all() and (out[4:6, :, 2] < 128).all()
    assert (out[6:] == 128).all()


@pytest.mark.parametrize(("n_frames", "count", "expected"), [
    (10, 4, [0, 3, 6, 9]), (100, 5, [0, 25, 50, 74, 99]), (4, 4, [0, 1, 2, 3]), (2, 4, [0, 1]),
    (1, 4, [0]), (0, 4, []), (7, 1, [0]),
])
def test_choose_keyframes(n_frames, count, expected):
    assert choose_keyframes(n_frames, count) == expected


def test_keyframes_are_unique_sorted_and_span_the_video():
    for n_frames in range(2, 60):
        for count in range(2, 9):
            frames = choose_keyframes(n_frames, count)
            assert len(frames) == len(set(frames)) == min(count, n_frames)
            assert frames == sorted(frames) and frames[0] == 0 and frames[-1] == n_frames - 1


def test_bad_inputs_raise_value_errors(data):
    source = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="inversion"):
        Keyframe(frame=0, source=source, inversion=source[:8], raw_edit=source, stitched=source,
                 mask=np.zeros((16, 16)), boundary=np.zeros((16, 16)))
    with pytest.raises(ValueError, match="boundary"):
        Keyframe(frame=0, source=source, inversion=source, raw_edit=source, stitched=source,
                 mask=np.zeros((16, 16)), boundary=np.full((16, 16), 255))
    with pytest.raises(ValueError, match="adjacent"):
        ReportData(title="t", inputs={}, settings={}, seconds={}, fps=FPS,
                   identity={**data.identity, "adjacent": [1.0]})
    with pytest.raises(ValueError, match="boundary_error_after"):
        ReportData(title="t", inputs={}, settings={}, seconds={}, fps=FPS, stitching={"boundary_error_before": 0.1})
    with pytest.raises(ValueError, match="pti lacks steps"):
        ReportData(title="t", inputs={}, settings={}, seconds={}, fps=FPS, pti={"method": "pti"})
    with pytest.raises(ValueError, match="fps"):
        ReportData(title="t", inputs={}, settings={}, seconds={}, fps=0)


@pytest.mark.skipif(BROWSER is None, reason=NO_BROWSER)
def test_report_renders_from_disk_in_headless_chromium(tmp_path: Path):
    astronaut = skimage.data.astronaut()
    crops = [cv2.resize(astronaut[top:top + 240, left:left + 240], (512, 512), interpolation=cv2.INTER_AREA)
             for top, left in ((20, 160), (30, 170), (10, 150), (25, 165))]
    page = render_report(_report_data(crops))
    assert len(page.encode()) < 1_000_000  # 20 inline thumbnails at <= 256 px
    (tmp_path / "report.html").write_text(page, encoding="utf-8")
    attributes = open_in_chromium(tmp_path / "report.html", tmp_path)
    assert attributes["images"] == attributes["loaded"] == "20"
    assert float(attributes["svg-width"]) > 0
    widths = [float(w) for w in attributes["line-widths"].split()]
    assert len(widths) == 2 and all(w > 100 for w in widths)
