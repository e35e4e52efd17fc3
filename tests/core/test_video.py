"""Video I/O on real files made by ffmpeg: probe, streamed decoding, atomic encoding, the demo clip."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import tracemalloc
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from stitchtime_core import video as video_module
from stitchtime_core.config import OutputConfig
from stitchtime_core.errors import InputError, StitchtimeError
from stitchtime_core.sample_clip import (
    FACE_BOX,
    SAMPLE_RATE,
    camera_matrices,
    make_sample_clip,
    sound_track,
)
from stitchtime_core.video import (
    VideoInfo,
    VideoWriter,
    ffmpeg_binary,
    ffmpeg_version,
    ffprobe_binary,
    iter_frames,
    probe,
    same_file,
)

FAST = OutputConfig(preset="ultrafast")
NEAR_LOSSLESS = OutputConfig(crf=0, preset="ultrafast", pix_fmt="yuv444p")


@pytest.fixture(scope="module")
def sample_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sample") / "sample.mp4"
    make_sample_clip(path)
    return path


def gradient_frames(count: int, width: int, height: int) -> list[np.ndarray]:
    """Smooth frames with a different pattern in each channel (so RGB/BGR mix-ups show)."""
    y, x = np.mgrid[0:height, 0:width]
    frames = []
    for i in range(count):
        r = 255 * x / max(width - 1, 1)
        g = 255 * y / max(height - 1, 1)
        b = np.full_like(r, 20.0 * i % 256)
        frames.append(np.stack([r, g, b], axis=-1).round().astype(np.uint8))
    return frames


def write_video(
    path: Path, frames: list[np.ndarray], *, fps: Fraction = Fraction(25),
    config: OutputConfig = FAST, audio_source: Path | None = None,
) -> None:
    height, width = frames[0].shape[:2]
    with VideoWriter(
        path, width=width, height=height, fps=fps, config=config, audio_source=audio_source
    ) as writer:
        for frame in frames:
            writer.write(frame)


def audio_packets(path: Path) -> list[tuple[str, str]]:
    """(pts, md5 of the data) of every audio packet."""
    result = subprocess.run(
        [
            ffprobe_binary(), "-v", "error", "-select_streams", "a", "-show_packets",
            "-show_data_hash", "MD5", "-show_entries", "packet=pts,data_hash",
            "-print_format", "json", str(path),
        ],
        capture_output=True, text=True, check=True,
    )
    return [(p["pts"], p["data_hash"]) for p in json.loads(result.stdout).get("packets", [])]


# ----------------------------------------------------------------------------- the demo clip


def test_sample_clip_probe(sample_clip: Path) -> None:
    info = probe(sample_clip)
    assert (info.width, info.height) == (384, 384)
    assert info.fps == Fraction(25)
    assert info.frame_count == 75
    assert info.duration == pytest.approx(3.0, abs=0.05)
    assert info.rotation == 0
    assert info.codec == "h264" and info.pix_fmt == "yuv420p"
    assert info.has_audio and info.audio_codec == "aac"
    assert not info.variable_frame_rate


def test_sample_clip_frames_move_smoothly(sample_clip: Path) -> None:
    info = probe(sample_clip)
    frames = list(iter_frames(sample_clip, info))
    assert len(frames) == info.frame_count
    assert all(f.shape == (384, 384, 3) and f.dtype == np.uint8 for f in frames)
    first = frames[0].astype(np.float64)
    assert 60 < first.mean() < 200
    assert first.std() > 30  # a photo, not a flat colour
    steps = [np.abs(b.astype(np.int16) - a).mean() for a, b in zip(frames, frames[1:])]
    assert min(steps) > 0.5  # the camera never stops...
    assert max(steps) < 15  # ...and never jumps
    assert np.abs(frames[-1].astype(np.int16) - frames[0]).mean() > max(steps)


def test_sample_clip_keeps_the_face_whole_and_large() -> None:
    size = (384, 384)
    matrices = camera_matrices(75, fps=Fraction(25), size=size, seed=0)
    x0, y0, x1, y1 = FACE_BOX
    corners = np.array([[x0, y0], [x1, y0], [x0, y1], [x1, y1]])
    in_frame = np.einsum("nij,kj->nki", matrices[:, :, :2], corners) + matrices[:, None, :, 2]
    assert in_frame.min() > 0 and in_frame.max() < size[0] - 1
    face_width = in_frame[..., 0].max(axis=1) - in_frame[..., 0].min(axis=1)
    assert face_width.min() > 0.3 * size[0]
    centre = in_frame.mean(axis=1)
    assert np.all(np.abs(centre - np.array(size) / 2) < 0.15 * size[0])


def test_the_camera_frames_any_face_as_it_frames_the_astronauts() -> None:
    """A face box twice as large and elsewhere in a photo gives the same frames of the face: the camera
    follows the box (photo points map to the same frame points once the shift and zoom are undone)."""
    size, fps = (384, 384), Fraction(12)
    x0, y0, x1, y1 = FACE_BOX
    moved = (2 * x0 + 100, 2 * y0 + 40, 2 * x1 + 100, 2 * y1 + 40)
    astronaut = camera_matrices(24, fps=fps, size=size, seed=2)
    other = camera_matrices(24, fps=fps, size=size, seed=2, face_box=moved)
    corners = np.array([[x0, y0, 1.0], [x1, y1, 1.0], [x0, y1, 1.0]])
    moved_corners = np.array([[2 * x + 100, 2 * y + 40, 1.0] for x, y, _ in corners])
    np.testing.assert_allclose(np.einsum("nij,kj->nki", other, moved_corners),
                               np.einsum("nij,kj->nki", astronaut, corners), atol=1e-6)


def test_sample_clip_is_deterministic(tmp_path: Path) -> None:
    options = dict(seconds=0.4, size=(96, 64))
    make_sample_clip(tmp_path / "a.mp4", seed=3, **options)
    make_sample_clip(tmp_path / "b.mp4", seed=3, **options)
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["a.mp4", "b.mp4"]
    fps = Fraction(25)
    assert not np.array_equal(
        camera_matrices(10, fps=fps, size=(96, 64), seed=3),
        camera_matrices(10, fps=fps, size=(96, 64), seed=4),
    )
    assert not np.array_equal(sound_track(SAMPLE_RATE, seed=3), sound_track(SAMPLE_RATE, seed=4))


# ----------------------------------------------------------------------------- writer round trips


@pytest.mark.parametrize(
    "fps", [Fraction(24), Fraction(25), Fraction(30000, 1001), Fraction(30), Fraction(60)]
)
def test_writer_round_trip_keeps_frames_fps_and_audio(
    tmp_path: Path, sample_clip: Path, fps: Fraction
) -> None:
    out = tmp_path / "out.mp4"
    write_video(out, gradient_frames(10, 64, 48), fps=fps, audio_source=sample_clip)
    info = probe(out)
    assert (info.width, info.height, info.frame_count, info.fps) == (64, 48, 10, fps)
    assert not info.variable_frame_rate
    assert info.has_audio and info.audio_codec == "aac"
    source_packets = audio_packets(sample_clip)
    assert len(source_packets) > 100
    assert audio_packets(out) == source_packets  # copied, not re-encoded, not cut
    assert len(list(iter_frames(out))) == 10
    assert os.listdir(tmp_path) == ["out.mp4"]


def test_writer_without_audio_source_and_source_without_audio(tmp_path: Path) -> None:
    silent = tmp_path / "silent.mp4"
    write_video(silent, gradient_frames(5, 64, 48))
    assert not probe(silent).has_audio
    out = tmp_path / "out.mp4"
    write_video(out, gradient_frames(5, 64, 48), audio_source=silent)
    info = probe(out)
    assert not info.has_audio and info.audio_codec is None and info.frame_count == 5


def test_pixels_survive_a_near_lossless_round_trip(tmp_path: Path) -> None:
    frames = gradient_frames(4, 64, 48)
    out = tmp_path / "out.mp4"
    write_video(out, frames, config=NEAR_LOSSLESS)
    decoded = list(iter_frames(out))
    assert len(decoded) == 4
    for a, b in zip(frames, decoded):
        assert np.abs(a.astype(np.int16) - b).mean() < 1.5  # only YUV rounding


def test_odd_sizes_repeat_the_edge_pixels(tmp_path: Path) -> None:
    frames = gradient_frames(3, 63, 47)
    out = tmp_path / "out.mp4"
    write_video(out, frames, config=OutputConfig(crf=0, preset="ultrafast", pix_fmt="yuv420p"))
    info = probe(out)
    assert (info.width, info.height, info.frame_count) == (64, 48, 3)
    decoded = next(iter_frames(out, info)).astype(np.int16)
    expected = np.pad(frames[0], ((0, 1), (0, 1), (0, 0)), mode="edge")
    assert np.abs(decoded - expected).mean() < 3  # chroma subsampling, no black seam
    assert np.abs(decoded[:, -1] - expected[:, -1]).max() < 20


def test_count_packets_when_the_container_has_no_frame_count(tmp_path: Path) -> None:
    out = tmp_path / "out.mkv"  # Matroska stores no per-stream frame count
    write_video(out, gradient_frames(7, 64, 48))
    assert probe(out).frame_count == 7


def make_vfr_clip(path: Path) -> None:
    """40 frames: 20 at 30 fps, then 20 at 15 fps, with a 2 s sine sound track."""
    subprocess.run(
        [ffmpeg_binary(), "-v", "error", "-f", "lavfi", "-i", "testsrc=size=64x48:rate=30",
         "-f", "lavfi", "-i", "sine=frequency=440:duration=2", "-frames:v", "40",
         "-vf", "setpts='(N+gt(N,19)*(N-19))/30/TB'", "-fps_mode", "passthrough",
         "-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac", str(path)],
        check=True, capture_output=True,
    )


def frame_times(path: Path) -> list[float]:
    result = subprocess.run(
        [ffprobe_binary(), "-v", "error", "-select_streams", "v:0", "-show_entries",
         "packet=pts_time", "-print_format", "json", str(path)],
        capture_output=True, text=True, check=True,
    )
    return sorted(float(p["pts_time"]) for p in json.loads(result.stdout)["packets"])


@pytest.fixture(scope="module")
def vfr_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vfr") / "vfr.mp4"
    make_vfr_clip(path)
    return path


def test_variable_frame_rate_is_detected(vfr_clip: Path) -> None:
    gaps = np.diff(frame_times(vfr_clip))
    assert gaps.min() == pytest.approx(1 / 30, abs=1e-3) and gaps.max() == pytest.approx(2 / 30, abs=1e-3)
    info = probe(vfr_clip)
    assert info.variable_frame_rate
    assert info.frame_count == 40
    assert info.fps == pytest.approx(40 / info.duration, rel=0.01)  # the average rate
    assert len(list(iter_frames(vfr_clip, info))) == 40  # no duplicated or dropped frames


def test_variable_frame_rate_becomes_constant_with_the_same_frames_and_duration(
    tmp_path: Path, vfr_clip: Path
) -> None:
    info = probe(vfr_clip)
    frames = list(iter_frames(vfr_clip, info))
    out = tmp_path / "out.mp4"
    write_video(out, frames, fps=info.fps, config=NEAR_LOSSLESS, audio_source=vfr_clip)
    out_info = probe(out)
    assert not out_info.variable_frame_rate
    assert out_info.frame_count == info.frame_count == 40
    assert out_info.fps == pytest.approx(float(info.fps), rel=1e-3)
    # Same length: one frame period of slack, plus 10 ms for the containers' timestamp rounding.
    assert abs(out_info.duration - info.duration) <= 1 / info.fps + 0.010
    gaps = np.diff(frame_times(out))
    assert gaps.max() - gaps.min() < 2e-3  # evenly spaced now
    assert audio_packets(out) == audio_packets(vfr_clip)  # the sound is untouched
    decoded = list(iter_frames(out, out_info))
    for written, read in zip(frames, decoded):  # each source frame exactly once, in order
        assert np.abs(written.astype(np.int16) - read).mean() < 1.5


def test_decoding_holds_only_a_couple_of_frames(tmp_path: Path) -> None:
    clip = tmp_path / "long.mp4"
    subprocess.run(
        [ffmpeg_binary(), "-v", "error", "-f", "lavfi", "-i", "testsrc=size=640x360:rate=30",
         "-frames:v", "300", "-c:v", "libx264", "-preset", "ultrafast", str(clip)],
        check=True, capture_output=True,
    )
    info = probe(clip)
    frame_bytes = 640 * 360 * 3
    tracemalloc.start()
    try:
        count = 0
        for _ in iter_frames(clip, info):
            count += 1
        _, streamed_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        kept = list(itertools.islice(iter_frames(clip, info), 10))
        _, kept_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 300
    assert streamed_peak < 5 * frame_bytes
    assert len(kept) == 10 and kept_peak > 10 * frame_bytes  # tracemalloc does see frame buffers


def test_info_dict_round_trip(sample_clip: Path) -> None:
    info = probe(sample_clip)
    data = json.loads(json.dumps(info.to_dict()))
    assert data["fps"] == "25/1"
    assert VideoInfo.from_dict(data) == info


def test_early_break_ends_ffmpeg(sample_clip: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = probe(sample_clip)
    started: list[subprocess.Popen] = []
    real_popen = subprocess.Popen

    def recording_popen(*args, **kwargs):  # type: ignore[no-untyped-def]
        process = real_popen(*args, **kwargs)
        started.append(process)
        return process

    monkeypatch.setattr(video_module.subprocess, "Popen", recording_popen)
    frames = iter_frames(sample_clip, info)
    next(frames)
    next(frames)
    frames.close()
    assert len(started) == 1 and started[0].poll() is not None


# ----------------------------------------------------------------------------- codec settings


def encoder_settings(path: Path) -> str:
    """The settings line x264 and x265 write into the stream ("... crf=23.0 ... me=dia ...")."""
    match = re.search(rb"options: ([ -~]+)", path.read_bytes())
    assert match, f"no encoder settings in {path}"
    return match[1].decode()


def has_encoder(name: str) -> bool:
    result = subprocess.run(
        [ffmpeg_binary(), "-hide_banner", "-encoders"], capture_output=True, text=True, check=True
    )
    return any(line.split()[1:2] == [name] for line in result.stdout.splitlines())


def test_crf_trades_size_for_quality(tmp_path: Path, sample_clip: Path) -> None:
    frames = list(itertools.islice(iter_frames(sample_clip), 10))  # a real photo, moving
    sizes, errors = {}, {}
    for crf in (10, 35):
        out = tmp_path / f"crf{crf}.mp4"
        write_video(out, frames, config=OutputConfig(crf=crf, preset="ultrafast"))
        assert f" crf={crf}.0 " in f" {encoder_settings(out)} "
        sizes[crf] = out.stat().st_size
        decoded = np.stack(list(iter_frames(out))).astype(np.int16)
        errors[crf] = np.abs(decoded - np.stack(frames)).mean()
    assert sizes[35] < sizes[10] / 3
    assert errors[35] > errors[10]


@pytest.mark.parametrize(("preset", "motion_search"), [("ultrafast", "me=dia"), ("medium", "me=hex")])
def test_preset_reaches_the_encoder(tmp_path: Path, preset: str, motion_search: str) -> None:
    out = tmp_path / "out.mp4"
    write_video(out, gradient_frames(3, 64, 48), config=OutputConfig(preset=preset))
    assert motion_search in encoder_settings(out).split()


@pytest.mark.parametrize("pix_fmt", ["yuv420p", "yuv444p"])
def test_pixel_format_is_the_configured_one(tmp_path: Path, pix_fmt: str) -> None:
    out = tmp_path / "out.mp4"
    write_video(out, gradient_frames(3, 64, 48), config=OutputConfig(preset="ultrafast", pix_fmt=pix_fmt))
    assert probe(out).pix_fmt == pix_fmt


def test_another_codec(tmp_path: Path) -> None:
    if not has_encoder("libx265"):
        pytest.skip("this ffmpeg has no libx265 encoder")
    frames = gradient_frames(5, 64, 48)
    out = tmp_path / "out.mp4"
    write_video(out, frames, config=OutputConfig(codec="libx265", crf=20, preset="ultrafast"))
    info = probe(out)
    assert info.codec == "hevc" and info.frame_count == 5 and (info.width, info.height) == (64, 48)
    assert "crf=20.0" in encoder_settings(out).split()
    for written, read in zip(frames, iter_frames(out, info)):
        assert np.abs(written.astype(np.int16) - read).mean() < 4


# ----------------------------------------------------------------------------- ffmpeg versions


@pytest.mark.parametrize(("first_line", "version"), [
    ("ffmpeg version 5.1.9-0+deb12u1 Copyright (c) 2000-2026 the FFmpeg developers", (5, 1)),
    ("ffmpeg version 4.4.2-0ubuntu0.22.04.1 Copyright (c) 2000-2021", (4, 4)),
    ("ffmpeg version n7.1 Copyright (c) 2000-2024 the FFmpeg developers", (7, 1)),
    ("ffmpeg version 6.0-static https://johnvansickle.com/ffmpeg/", (6, 0)),
    ("ffmpeg version N-113607-g2f8c4e1 Copyright (c) 2000-2024", None),  # a git build
])
def test_ffmpeg_version_is_read_from_the_banner(first_line: str, version: tuple[int, int] | None) -> None:
    assert video_module._parse_ffmpeg_version(first_line + "\nbuilt with gcc 12\n") == version


def test_installed_ffmpeg_version() -> None:
    version = ffmpeg_version()
    assert version is None or version >= (4, 0)
    assert ffmpeg_version() is version  # read once


# ----------------------------------------------------------------------------- errors


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.mp4"
    with pytest.raises(InputError, match="no such file") as error:
        probe(missing)
    assert error.value.path == str(missing)
    with pytest.raises(InputError, match="no such file"):
        next(iter_frames(missing))


def test_a_symlink_loop_or_a_broken_link_is_named_as_such(tmp_path: Path) -> None:
    (tmp_path / "loop.mp4").symlink_to("loop.mp4")
    (tmp_path / "ring").symlink_to("ring", target_is_directory=True)
    (tmp_path / "broken.mp4").symlink_to("gone.mp4")
    (tmp_path / "folder.mp4").mkdir()
    for path, problem in [(tmp_path / "loop.mp4", "a symlink loop"), (tmp_path / "ring" / "x.mp4", "a symlink loop"),
                          (tmp_path / "broken.mp4", f"no such file (a broken symlink to {tmp_path / 'gone.mp4'})"),
                          (tmp_path / "folder.mp4", "not a file")]:
        with pytest.raises(InputError) as error:
            probe(path)
        assert (error.value.path, error.value.problem) == (str(path), problem)
    assert not same_file(tmp_path / "loop.mp4", tmp_path / "broken.mp4")  # Path.resolve raises on a loop


@pytest.mark.parametrize(("content", "problem"), [(b"", "is empty"),
                                                   (b"hello, I am not a video\n" * 20, "not a readable video: .+")])
def test_not_a_video(tmp_path: Path, content: bytes, problem: str) -> None:
    path = tmp_path / "fake.mp4"
    path.write_bytes(content)
    with pytest.raises(InputError, match=problem) as error:
        probe(path)
    assert error.value.path == str(path)
    assert str(path) in str(error.value)


def test_audio_only_file_has_no_video_stream(tmp_path: Path) -> None:
    path = tmp_path / "sound.m4a"
    subprocess.run(
        [ffmpeg_binary(), "-v", "error", "-f", "lavfi", "-i", "sine=duration=0.2",
         "-c:a", "aac", str(path)],
        check=True, capture_output=True,
    )
    with pytest.raises(InputError, match="has no video stream"):
        probe(path)


@pytest.mark.parametrize("interrupt", [RuntimeError, KeyboardInterrupt])
def test_failure_midway_leaves_nothing(tmp_path: Path, interrupt: type[BaseException]) -> None:
    out = tmp_path / "out.mp4"
    with pytest.raises(interrupt):
        with VideoWriter(out, width=64, height=48, fps=Fraction(25), config=FAST) as writer:
            for frame in gradient_frames(3, 64, 48):
                writer.write(frame)
            raise interrupt()
    assert os.listdir(tmp_path) == []


def test_failed_rewrite_keeps_the_previous_output(tmp_path: Path) -> None:
    out = tmp_path / "out.mp4"
    write_video(out, gradient_frames(3, 64, 48))
    before = out.read_bytes()
    with pytest.raises(ValueError, match="uint8"):
        with VideoWriter(out, width=64, height=48, fps=Fraction(25), config=FAST) as writer:
            writer.write(gradient_frames(1, 64, 48)[0])
            writer.write(np.zeros((48, 64, 3), dtype=np.float32))
    assert out.read_bytes() == before
    assert os.listdir(tmp_path) == ["out.mp4"]


def test_ffmpeg_failure_is_reported_and_cleaned_up(tmp_path: Path) -> None:
    out = tmp_path / "out.mp4"
    config = OutputConfig(codec="no-such-codec", preset="ultrafast")
    with pytest.raises(StitchtimeError, match="ffmpeg"):
        with VideoWriter(out, width=64, height=48, fps=Fraction(25), config=config) as writer:
            for frame in gradient_frames(30, 64, 48):
                writer.write(frame)
    assert os.listdir(tmp_path) == []


def test_writer_refuses_to_overwrite_its_source(tmp_path: Path) -> None:
    source = tmp_path / "in.mp4"
    write_video(source, gradient_frames(3, 64, 48))
    link = tmp_path / "link.mp4"
    link.symlink_to(source)
    for target in (source, tmp_path / "." / "in.mp4", link):
        with pytest.raises(InputError, match="overwrite its source"):
            VideoWriter(
                target, width=64, height=48, fps=Fraction(25), config=FAST, audio_source=source
            )
    assert sorted(os.listdir(tmp_path)) == ["in.mp4", "link.mp4"]


def test_writer_needs_an_existing_output_folder(tmp_path: Path) -> None:
    folder = tmp_path / "missing"
    with pytest.raises(InputError, match="output folder does not exist") as error:
        VideoWriter(folder / "out.mp4", width=64, height=48, fps=Fraction(25), config=FAST)
    assert error.value.path == str(folder)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only folders")
def test_writer_needs_a_writable_output_folder(tmp_path: Path) -> None:
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(InputError, match="not writable"):
            VideoWriter(folder / "out.mp4", width=64, height=48, fps=Fraction(25), config=FAST)
    finally:
        folder.chmod(0o700)


def test_missing_binaries_say_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STITCHTIME_FFMPEG", raising=False)
    monkeypatch.delenv("STITCHTIME_FFPROBE", raising=False)
    monkeypatch.setenv("PATH", "")
    with pytest.raises(StitchtimeError, match="ffmpeg not found.*apt-get install ffmpeg"):
        ffmpeg_binary()
    with pytest.raises(StitchtimeError, match="ffprobe not found.*apt-get install ffmpeg"):
        ffprobe_binary()
    monkeypatch.setenv("STITCHTIME_FFPROBE", "/no/such/ffprobe")
    with pytest.raises(StitchtimeError, match="STITCHTIME_FFPROBE"):
        ffprobe_binary()
    monkeypatch.setenv("PATH", os.defpath)
    monkeypatch.setenv("STITCHTIME_FFMPEG", "true")  # runs, says nothing: its silence is not the video's fault
    with pytest.raises(StitchtimeError, match=r"^STITCHTIME_FFMPEG=true is not an ffmpeg program \(`true -version` "
                                              r"does not print 'ffmpeg version'\)$"):
        ffmpeg_binary()
