"""Video I/O through the ffmpeg and ffprobe programs: probe, streamed decoding, atomic encoding.

The source video is the frame store (DESIGN.md, artifacts): frames are decoded on demand, one at a
time, from an ffmpeg pipe, never all held in memory. Frames are uint8 [H, W, 3] RGB arrays in
display orientation (ffmpeg applies the stream's rotation while decoding).

Display rotation (phone clips): a stream stored ("coded") as 1920x1080 with a display rotation of
90 degrees is probed as 1080x1920 with ``rotation=90`` and decoded as upright 1080x1920 frames.
:class:`VideoWriter` given that rotation turns each frame back to the coded orientation and tags
the output with the same display rotation, so the edited video has the source's coded size and
rotation and plays the same way.

Variable frame rate (VFR): :func:`probe` flags a stream whose r_frame_rate and avg_frame_rate
differ (``VideoInfo.variable_frame_rate``) and reports the average rate as its ``fps``.
:func:`iter_frames` decodes with passthrough timing, so every stored frame comes out exactly once
(no duplicates or drops to reach a constant rate). Written at ``info.fps``, the output is
constant-rate with the same frame count, so its duration equals the source's (within one frame
period and the container's timestamp rounding) and the copied audio stays in sync at both ends;
in between a frame can be early or late by the source's own jitter around the average rate.
Frame timestamps are not reproduced.

ffmpeg versions: :func:`ffmpeg_version` reads ``ffmpeg -version`` once per program. Options that
changed between versions are chosen by it: ``-fps_mode`` (5.1 and later; ``-vsync`` before, which
later versions dropped: 9.0 refuses it) and how a display rotation is written (see
:class:`VideoWriter`). Checked with Debian's 5.1 and a 9.0 build.

The binaries are found through the environment variables ``STITCHTIME_FFMPEG`` and
``STITCHTIME_FFPROBE``, else on ``PATH``.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import numpy as np

from stitchtime_core.config import OutputConfig
from stitchtime_core.errors import InputError, StitchtimeError
from stitchtime_core.files import check_file

_VFR_TOLERANCE = 0.005
"""Relative difference between r_frame_rate and avg_frame_rate above which a stream counts as
variable frame rate (containers with millisecond timestamps put small errors in avg_frame_rate)."""

_COMPONENT_PREFIX = re.compile(r"^\[[^\]]* @ 0x[0-9a-fA-F]+\] ")

_DISK_ERRORS = tuple(os.strerror(code) for code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS))
"""The OS's messages for a file that cannot be written (full disk, quota, file size limit, read-only), as
ffmpeg prints them; none of them can come from reading its inputs."""

_OUTPUT_ERRORS = ("Error writing trailer", "Error closing file", *_DISK_ERRORS)
"""ffmpeg's messages for an output it could not finish. ffmpeg 5 prints the first two and still exits 0
(a full disk leaves half a file behind an exit status of success), so its messages are checked too."""


def _disk_error(text: str) -> str | None:
    """The OS message in ffmpeg's error output when it failed to write its output file, else None."""
    return next((problem for problem in _DISK_ERRORS if problem in text), None)


def _output_failed(text: str) -> bool:
    """Whether ffmpeg's error output says that it could not finish writing its output file."""
    return any(message in text for message in _OUTPUT_ERRORS)


_VERSION = re.compile(r"^ffmpeg version n?(\d+)\.(\d+)")

_ROTATION_CONTAINERS = frozenset({".mp4", ".m4v", ".mov", ".3gp", ".3g2"})
"""Extensions of the MP4/QuickTime family, whose track header stores a display rotation with
every ffmpeg version (Matroska only learned it in recent versions)."""


def _binary(name: str, env_var: str) -> str:
    chosen = os.environ.get(env_var)
    if chosen:
        found = shutil.which(chosen)
        if not found:
            raise StitchtimeError(f"{env_var}={chosen} is not an executable {name} program")
        if not _answers_as(found, name):  # else its silence would be blamed on the video
            raise StitchtimeError(f"{env_var}={chosen} is not an {name} program (`{chosen} -version` does not "
                                  f"print '{name} version')")
        return found
    found = shutil.which(name)
    if not found:
        raise StitchtimeError(
            f"{name} not found: install ffmpeg (e.g. `apt-get install ffmpeg`) or set {env_var} "
            f"to the {name} program"
        )
    return found


def ffmpeg_binary() -> str:
    """The ffmpeg program: ``$STITCHTIME_FFMPEG``, else ``ffmpeg`` on ``PATH``.

    Raises:
        StitchtimeError: neither is set or found.
    """
    return _binary("ffmpeg", "STITCHTIME_FFMPEG")


@functools.lru_cache(maxsize=None)
def _version_run(binary: str) -> subprocess.CompletedProcess:
    """``binary -hide_banner -version``, run once per program (what it is, and which version)."""
    return subprocess.run([binary, "-hide_banner", "-version"], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=60)


def _answers_as(binary: str, name: str) -> bool:
    """Whether ``binary -version`` says it is ``name`` (ffmpeg or ffprobe)."""
    try:
        return _version_run(binary).stdout.lstrip().startswith(f"{name} version")
    except (OSError, subprocess.TimeoutExpired):
        return False


def _parse_ffmpeg_version(text: str) -> tuple[int, int] | None:
    match = _VERSION.match(text.strip())
    return (int(match[1]), int(match[2])) if match else None


@functools.lru_cache(maxsize=None)
def _version_of(binary: str) -> tuple[int, int] | None:
    result = _version_run(binary)
    if result.returncode != 0:
        raise StitchtimeError(f"{binary} -version failed: {result.stderr.strip() or 'no message'}")
    return _parse_ffmpeg_version(result.stdout)


def ffmpeg_version() -> tuple[int, int] | None:
    """(major, minor) of :func:`ffmpeg_binary`, read from ``ffmpeg -version`` once per program.

    Returns:
        e.g. ``(5, 1)`` for Debian's ``5.1.9-0+deb12u1`` or ``(7, 1)`` for ``n7.1``; None for a
        build named after its git revision (``N-113600-g...``), which counts as newer than
        every release.

    Raises:
        StitchtimeError: ffmpeg is not installed or does not run.
    """
    return _version_of(ffmpeg_binary())


def _ffmpeg_at_least(major: int, minor: int = 0) -> bool:
    version = ffmpeg_version()
    return version is None or version >= (major, minor)


def ffprobe_binary() -> str:
    """The ffprobe program: ``$STITCHTIME_FFPROBE``, else ``ffprobe`` on ``PATH``.

    Raises:
        StitchtimeError: neither is set or found.
    """
    return _binary("ffprobe", "STITCHTIME_FFPROBE")


@dataclass(frozen=True)
class VideoInfo:
    """What the pipeline needs to know about a video's first video stream.

    Cover art (an attached picture stream) is not counted as a video stream.
    """

    path: str
    width: int
    """Display width in pixels (after rotation)."""
    height: int
    """Display height in pixels (after rotation)."""
    fps: Fraction
    """Frame rate: r_frame_rate for constant-rate streams, avg_frame_rate for variable-rate ones,
    so that a constant-rate re-encoding of all frame_count frames at fps keeps the duration and
    the audio in sync (module docstring, variable frame rate)."""
    frame_count: int
    """Exact number of frames: the container's count, else counted packets."""
    duration: float
    """Seconds."""
    rotation: int
    """Clockwise degrees (0, 90, 180 or 270) that the stored frames are turned to be displayed.
    The coded size is (height, width) for 90 and 270."""
    pix_fmt: str
    codec: str
    has_audio: bool
    audio_codec: str | None
    """Codec of the first audio stream, None without audio."""
    variable_frame_rate: bool
    """r_frame_rate and avg_frame_rate differ by more than 0.5%: the frames are not evenly spaced.
    They are still all decoded, once each; fps is then their average rate."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data; ``fps`` is written as a ``"num/den"`` string."""
        data = asdict(self)
        data["fps"] = f"{self.fps.numerator}/{self.fps.denominator}"
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VideoInfo:
        """Rebuild the info written by :meth:`to_dict`."""
        fields = dict(data)
        fields["fps"] = Fraction(fields["fps"])
        return cls(**fields)


def _first_error_line(text: str, path: str | os.PathLike) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return "ffmpeg gave no error message"
    # Drop the prefixes ffmpeg puts before a message: the input's name (InputError shows it
    # already) or the component and its address ("[mov,mp4,m4a,3gp,3g2,mj2 @ 0x55d0c0] ").
    line = _COMPONENT_PREFIX.sub("", lines[0])
    prefix = f"{os.fspath(path)}: "
    return line[len(prefix):] if line.startswith(prefix) else line


def _parse_rate(text: str | None) -> Fraction | None:
    if not text or "/" not in text:
        return None
    num, den = text.split("/", 1)
    if int(den) == 0 or int(num) == 0:
        return None
    return Fraction(int(num), int(den))


def _rotation(stream: dict[str, Any]) -> int:
    degrees: float | None = None
    for side_data in stream.get("side_data_list", []):
        if "rotation" in side_data:
            # ffprobe reports the display matrix's rotation counter-clockwise.
            degrees = -float(side_data["rotation"])
            break
    if degrees is None and "rotate" in stream.get("tags", {}):
        degrees = float(stream["tags"]["rotate"])  # the old tag is clockwise
    if degrees is None:
        return 0
    return int(round(degrees / 90.0)) % 4 * 90


def _count_packets(path: str | os.PathLike, stream_index: int) -> int:
    result = subprocess.run(
        [
            ffprobe_binary(), "-v", "error", "-count_packets",
            "-select_streams", str(stream_index),
            "-show_entries", "stream=nb_read_packets", "-print_format", "json",
            os.fspath(path),
        ],
        capture_output=True, text=True, stdin=subprocess.DEVNULL,
    )
    if result.returncode != 0:
        raise InputError(path, f"not a readable video: {_first_error_line(result.stderr, path)}")
    streams = json.loads(result.stdout).get("streams", [])
    return int(streams[0].get("nb_read_packets", 0)) if streams else 0


def probe(path: str | os.PathLike) -> VideoInfo:
    """Read a video's metadata with ffprobe.

    Args:
        path: a video file.

    Returns:
        The first video stream's :class:`VideoInfo`.

    Raises:
        InputError: the file is missing (or a symlink loop), is not a readable video, has no video stream or
            no frames.
        StitchtimeError: ffprobe is not installed.
    """
    check_file(path)  # a missing file, a symlink loop, a folder: each named as such
    if os.path.getsize(path) == 0:
        raise InputError(path, "is empty (0 bytes)")
    result = subprocess.run(
        [
            ffprobe_binary(), "-v", "error", "-print_format", "json",
            "-show_streams", "-show_format", os.fspath(path),
        ],
        capture_output=True, text=True, stdin=subprocess.DEVNULL,
    )
    if result.returncode != 0:
        raise InputError(path, f"not a readable video: {_first_error_line(result.stderr, path)}")
    data = json.loads(result.stdout)
    streams = data.get("streams", [])
    video = next(
        (
            s for s in streams
            if s.get("codec_type") == "video" and not s.get("disposition", {}).get("attached_pic")
        ),
        None,
    )
    if video is None:
        raise InputError(path, "has no video stream")
    audio = next((s for s in streams if s.get("codec_type") == "audio"), None)

    r_rate = _parse_rate(video.get("r_frame_rate"))
    avg_rate = _parse_rate(video.get("avg_frame_rate"))
    rates = [rate for rate in (r_rate, avg_rate) if rate is not None]
    if not rates:
        raise InputError(path, "has no frame rate")
    variable = len(rates) == 2 and abs(float(rates[0] - rates[1])) > _VFR_TOLERANCE * float(rates[0])
    fps = rates[-1] if variable else rates[0]

    frame_count = int(video.get("nb_frames", 0) or 0)
    if frame_count <= 0:
        frame_count = _count_packets(path, int(video["index"]))
    if frame_count <= 0:
        raise InputError(path, "has no frames")

    duration_text = video.get("duration") or data.get("format", {}).get("duration")
    duration = float(duration_text) if duration_text else float(frame_count / fps)

    rotation = _rotation(video)
    width, height = int(video["width"]), int(video["height"])
    if rotation in (90, 270):
        width, height = height, width

    return VideoInfo(
        path=os.fspath(path),
        width=width,
        height=height,
        fps=fps,
        frame_count=frame_count,
        duration=duration,
        rotation=rotation,
        pix_fmt=str(video.get("pix_fmt", "")),
        codec=str(video.get("codec_name", "")),
        has_audio=audio is not None,
        audio_codec=str(audio["codec_name"]) if audio is not None else None,
        variable_frame_rate=variable,
    )


def _passthrough_timing() -> list[str]:
    # -fps_mode replaced -vsync in 5.1; newer versions (9.0) no longer accept -vsync.
    return ["-fps_mode" if _ffmpeg_at_least(5, 1) else "-vsync", "passthrough"]


def _read_exactly(stream: IO[bytes], buffer: memoryview) -> int:
    filled = 0
    while filled < len(buffer):
        n = stream.readinto(buffer[filled:])  # type: ignore[attr-defined]
        if not n:
            break
        filled += n
    return filled


def iter_frames(path: str | os.PathLike, info: VideoInfo | None = None) -> Iterator[np.ndarray]:
    """Decode a video's frames one at a time, streamed from an ffmpeg pipe.

    Exactly the stream's frames come out, in order (passthrough timing: no frame-rate conversion,
    duplicates or drops, also for variable-rate streams), turned to display orientation. At most
    the frame being filled and the one last yielded are held. Stopping the iteration early ends
    the ffmpeg process.

    Args:
        path: a video file.
        info: its :func:`probe` result, probed here when None.

    Yields:
        uint8 [info.height, info.width, 3] RGB frames, values in [0, 255], each a new writable array.

    Raises:
        InputError: the file cannot be probed or decoded, or fewer frames than ``info.frame_count``
            come out (a file cut short: its index lists frames whose data is missing). Raised
            once the frames that could be decoded have been yielded.
        StitchtimeError: ffmpeg is not installed.
    """
    if info is None:
        info = probe(path)
    width, height = info.width, info.height
    command = [
        ffmpeg_binary(), "-v", "error", "-nostdin", "-i", os.fspath(path),
        "-map", "0:V:0", *_passthrough_timing(),
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-",
    ]
    # stderr goes to a file, not a pipe: a pipe nobody reads could fill up and stall ffmpeg.
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr
        )
        assert process.stdout is not None
        decoded = 0
        try:
            while True:
                frame = np.empty((height, width, 3), dtype=np.uint8)
                filled = _read_exactly(process.stdout, memoryview(frame).cast("B"))
                if filled == 0:
                    break
                if filled < frame.nbytes:
                    process.wait()
                    raise InputError(
                        path,
                        f"decoded frames are not {width}x{height}: {_stderr_text(stderr, path)}",
                    )
                decoded += 1
                yield frame
            if process.wait() != 0 or decoded < info.frame_count:
                raise InputError(path, f"only {decoded} of its {info.frame_count} frames could be decoded, the "
                                       f"file is damaged or cut short: {_stderr_text(stderr, path)}")
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()
            process.stdout.close()


def _stderr_text(stderr: IO[bytes], path: str | os.PathLike) -> str:
    stderr.seek(0)
    return _first_error_line(stderr.read().decode(errors="replace"), path)


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file, however spelled: relative, through a symlink, a hard link."""
    a, b = Path(a), Path(b)
    try:
        if a.resolve() == b.resolve():
            return True
    except RuntimeError:  # a symlink loop (Python < 3.13): no file at all, so not the other one
        return False
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def _even_size(width: int, height: int, pix_fmt: str) -> tuple[int, int]:
    if "420" in pix_fmt or pix_fmt in ("nv12", "nv21"):
        return width + width % 2, height + height % 2
    if "422" in pix_fmt or "411" in pix_fmt:
        return width + width % 2, height
    return width, height


def check_encoding(out: str | os.PathLike, config: OutputConfig, *,
                   audio_source: str | os.PathLike | None = None) -> None:
    """Ask ffmpeg whether it can write the video ``out`` with ``config``, before any work: it encodes one
    black frame with the codec, crf, preset and pixel format (a Matroska file, which holds any codec), then
    copies that frame, and a moment of ``audio_source``'s audio, into a file of ``out``'s name (its
    extension picks the container), as :class:`VideoWriter` does. Two short ffmpeg runs in a temporary
    folder, deleted after; ``out`` itself is not touched.

    Raises:
        ValueError: ffmpeg cannot encode with ``config`` (an unknown codec, preset or pixel format, a crf
            out of the codec's range), or cannot write that container with this codec and audio; the
            message names the settings or the container, and gives ffmpeg's reason.
        StitchtimeError: ffmpeg is not installed.
    """
    with tempfile.TemporaryDirectory(prefix="stitchtime-encoding-") as folder:
        muxed = Path(folder, Path(out).name)
        encoded = Path(folder, f"{muxed.name}.encoded.mkv")
        suffix = muxed.suffix
        command = [ffmpeg_binary(), "-v", "error", "-nostdin", "-y", "-f", "lavfi", "-i", "color=c=black:s=64x64:r=25",
                   "-frames:v", "1", "-c:v", config.codec, "-crf", str(config.crf), "-preset", config.preset,
                   "-pix_fmt", config.pix_fmt, os.fspath(encoded)]
        result = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            raise ValueError(f"output.codec={config.codec}, output.crf={config.crf}, output.preset={config.preset}, "
                             f"output.pix_fmt={config.pix_fmt}: ffmpeg cannot encode with these settings "
                             f"({_first_error_line(result.stderr, encoded)})")
        command = [ffmpeg_binary(), "-v", "error", "-nostdin", "-y", "-i", os.fspath(encoded)]
        if audio_source is not None:
            command += ["-t", "0.1", "-i", os.fspath(audio_source), "-map", "0:v:0", "-map", "1:a?"]
        command += ["-c", "copy", os.fspath(muxed)]
        result = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if result.returncode != 0 or _output_failed(result.stderr):
            audio = " and the source's audio" if audio_source is not None else ""
            reason = _first_error_line(result.stderr, muxed).replace(os.fspath(muxed), muxed.name)
            raise ValueError(f"ffmpeg cannot write a {suffix or 'file without an extension'} file holding "
                             f"{config.codec} video{audio}: name the output .mp4, .mkv or .mov (ffmpeg: {reason})")


class VideoWriter:
    """Encode RGB frames into a video file atomically, copying the audio of a source video.

    Frames are piped raw to ffmpeg, which encodes them with ``config``'s codec, crf, preset and
    pixel format into a hidden temporary file beside the output (``.<name>.tmp-<uuid><ext>``,
    same extension so ffmpeg picks the same container). :meth:`close` renames it to ``path``;
    any failure, including KeyboardInterrupt inside a ``with`` block, kills ffmpeg and deletes it,
    so ``path`` only ever holds a complete video. The output is constant-rate at ``fps``: frame i
    is shown at i / fps (for variable-rate sources see the module docstring).

    Audio: every audio stream of ``audio_source`` is copied bit for bit (``-c:a copy``), not
    re-encoded and not cut to the video's length. The container must accept that codec (AAC in
    MP4 does); if it does not, :meth:`close` raises with ffmpeg's message.

    Display rotation: frames are always given upright, ``width`` x ``height`` being the display
    size (as :class:`VideoInfo` gives it). With ``rotation`` (clockwise degrees, as
    ``VideoInfo.rotation``) each frame is turned back to the coded orientation
    (``np.rot90(frame, rotation // 90)``; width and height swap for 90 and 270) and the output's
    video stream gets that display rotation, so a phone clip keeps its coded size and rotation.
    The rotation is written by a second, stream-copy pass over the encoded file (no re-encoding),
    with the option the running ffmpeg has (:func:`ffmpeg_version`):

    - ffmpeg 6 and later: the input option ``-display_rotation`` (counter-clockwise degrees).
    - ffmpeg 4 and 5: the stream tag ``-metadata:s:v:0 rotate=N``, which these versions turn into
      a display matrix only when copying a stream (an encoded stream gets none). ffmpeg 5.1 makes
      it a rotation of N degrees counter-clockwise, the opposite of the tag's historic meaning.

    Both therefore get 360 - rotation. The written rotation is then read back with ffprobe, and a
    mismatch raises instead of leaving a sideways video. Only the MP4/QuickTime family (``.mp4``,
    ``.m4v``, ``.mov``, ``.3gp``, ``.3g2``) stores a rotation with every ffmpeg version; in other
    containers the frames are encoded upright, untagged (coded size = display size, the picture
    plays the same), and :attr:`rotation` is 0.

    Odd sizes: 4:2:0 (and 4:2:2) chroma needs even widths and heights, so an odd frame gets its
    last column and/or row (in coded orientation) repeated once before encoding; the encoded video
    is then one pixel larger than the frames. Repeating edge pixels, rather than padding with
    black, leaves no visible seam.

    Example:
        >>> info = probe("in.mp4")
        >>> with VideoWriter("out.mp4", width=info.width, height=info.height, fps=info.fps,
        ...                  rotation=info.rotation, config=OutputConfig(),
        ...                  audio_source="in.mp4") as writer:
        ...     for frame in iter_frames("in.mp4", info):  # uint8 [info.height, info.width, 3]
        ...         writer.write(frame)

    Args:
        path: the output file; its extension picks the container.
        width: display width of the frames in pixels.
        height: display height of the frames in pixels.
        fps: frame rate.
        config: codec settings: ``codec`` (an ffmpeg encoder name), ``crf``, ``preset`` and
            ``pix_fmt`` go to ffmpeg as ``-c:v``, ``-crf``, ``-preset`` and ``-pix_fmt``.
        audio_source: a file whose audio streams are copied into the output; None for no audio.
        rotation: clockwise display rotation of the output, 0, 90, 180 or 270.

    Attributes:
        rotation: the display rotation the output gets: the argument, or 0 where the container
            cannot store one.

    Raises:
        InputError: the output folder is missing or not writable, the output has no extension,
            the audio source is missing, or the output would overwrite the audio source.
        ValueError: width, height or fps are not positive, or rotation is not a quarter turn.
        StitchtimeError: ffmpeg is not installed.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        width: int,
        height: int,
        fps: Fraction,
        config: OutputConfig,
        audio_source: str | os.PathLike | None = None,
        rotation: int = 0,
    ):
        if width <= 0 or height <= 0:
            raise ValueError(f"frame size must be positive, got {width}x{height}")
        fps = Fraction(fps)
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        if rotation not in (0, 90, 180, 270):
            raise ValueError(f"rotation must be 0, 90, 180 or 270 degrees, got {rotation}")
        self.path = Path(path)
        self.width = width
        self.height = height
        self.fps = fps
        self.config = config
        self.frames_written = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._temp_paths: list[Path] = []

        if not self.path.suffix:
            raise InputError(self.path, "has no file extension to choose a container")
        self.rotation = rotation if self.path.suffix.lower() in _ROTATION_CONTAINERS else 0
        folder = self.path.absolute().parent
        if not folder.is_dir():
            raise InputError(folder, "output folder does not exist")
        if audio_source is not None:
            if not os.path.isfile(audio_source):
                raise InputError(audio_source, "no such file")
            if same_file(self.path, audio_source):
                raise InputError(self.path, "output would overwrite its source")

        self._temp_path = self._reserve_temp(folder)
        self._rotated_path = self._reserve_temp(folder) if self.rotation else None

        coded_width, coded_height = (height, width) if self.rotation in (90, 270) else (width, height)
        self._encoded_width, self._encoded_height = _even_size(
            coded_width, coded_height, config.pix_fmt
        )
        command = [
            ffmpeg_binary(), "-v", "error", "-y",
            "-f", "rawvideo", "-pix_fmt", "rgb24",
            "-s", f"{self._encoded_width}x{self._encoded_height}",
            "-r", f"{fps.numerator}/{fps.denominator}", "-i", "-",
        ]
        if audio_source is not None:
            command += ["-i", os.fspath(audio_source)]
        command += ["-map", "0:v:0"]
        if audio_source is not None:
            command += ["-map", "1:a?", "-c:a", "copy"]
        command += [
            "-c:v", config.codec, "-crf", str(config.crf), "-preset", config.preset,
            "-pix_fmt", config.pix_fmt, os.fspath(self._temp_path),
        ]
        self._stderr = tempfile.TemporaryFile()
        try:
            self._process = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._stderr
            )
        except BaseException:
            self._cleanup()
            raise

    def _reserve_temp(self, folder: Path) -> Path:
        temp = folder / f".{self.path.stem}.tmp-{uuid.uuid4().hex}{self.path.suffix}"
        # Creating the temp file now both reserves its name and is the honest writability test
        # (os.access says yes to root even on read-only mounts).
        try:
            os.close(os.open(temp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except OSError as e:
            self._cleanup()
            raise InputError(folder, f"output folder is not writable ({e.strerror})") from e
        self._temp_paths.append(temp)
        return temp

    def __del__(self) -> None:
        # A writer dropped without close() must not leave ffmpeg running or a temp file behind.
        if getattr(self, "_process", None) is not None:
            self.abort()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, frame: np.ndarray) -> None:
        """Append one frame.

        Args:
            frame: uint8 [height, width, 3] RGB, values in [0, 255].

        Raises:
            ValueError: the frame has the wrong dtype or shape.
            StitchtimeError: the writer is closed, or ffmpeg stopped (its message included); the
                temporary file is then already deleted.
        """
        if self._process is None:
            raise StitchtimeError(f"{self.path}: writer is closed")
        if frame.dtype != np.uint8 or frame.shape != (self.height, self.width, 3):
            raise ValueError(
                f"expected a uint8 [{self.height}, {self.width}, 3] frame, "
                f"got {frame.dtype} {list(frame.shape)}"
            )
        if self.rotation:
            frame = np.rot90(frame, k=self.rotation // 90)  # display -> coded: counter-clockwise
        if (self._encoded_height, self._encoded_width) != frame.shape[:2]:
            pad = (
                (0, self._encoded_height - frame.shape[0]),
                (0, self._encoded_width - frame.shape[1]),
            )
            frame = np.pad(frame, pad + ((0, 0),), mode="edge")
        assert self._process.stdin is not None
        try:
            self._process.stdin.write(np.ascontiguousarray(frame).data)
        except BrokenPipeError:
            self._process.wait()
            error = self._ffmpeg_error("stopped while encoding")
            self.abort()
            raise error from None
        except BaseException:
            self.abort()
            raise
        self.frames_written += 1

    def close(self) -> None:
        """Finish encoding, write the display rotation if any, and move the video to its path.

        Raises:
            InputError: the output cannot be written: its disk is full, a quota or file size limit
                is reached, or it is read-only (the OS's message included).
            StitchtimeError: no frame was written, ffmpeg failed (its message included), or the
                display rotation read back is not :attr:`rotation`; the output path is then left
                as it was and no temporary file remains.
        """
        if self._process is None:
            return
        if self.frames_written == 0:
            self.abort()
            raise StitchtimeError(f"{self.path}: no frames were written")
        assert self._process.stdin is not None
        try:
            try:
                self._process.stdin.close()
            except BrokenPipeError:
                pass
            code = self._process.wait()
        except BaseException:
            self.abort()
            raise
        if code != 0 or _output_failed(self._ffmpeg_stderr()):
            error = self._ffmpeg_error("failed to encode")
            self.abort()
            raise error
        self._process = None
        finished = self._temp_path
        if self._rotated_path is not None:
            try:
                self._write_rotation(self._temp_path, self._rotated_path)
            except BaseException:
                self._cleanup()
                raise
            finished = self._rotated_path
        try:
            os.replace(finished, self.path)
        except OSError as e:
            self._cleanup()
            raise InputError(self.path, f"cannot be written ({e.strerror})") from e
        self._cleanup()  # the stderr file, and the encoded file a rotation was written from

    def abort(self) -> None:
        """Stop ffmpeg and delete the temporary file; the output path is left untouched."""
        if self._process is not None:
            if self._process.poll() is None:
                self._process.kill()
            self._process.wait()
            if self._process.stdin is not None:
                try:
                    self._process.stdin.close()
                except BrokenPipeError:
                    pass
            self._process = None
        self._cleanup()

    def _write_rotation(self, encoded: Path, rotated: Path) -> None:
        counter_clockwise = str((360 - self.rotation) % 360)
        new_ffmpeg = _ffmpeg_at_least(6)
        command = [ffmpeg_binary(), "-v", "error", "-nostdin", "-y"]
        if new_ffmpeg:
            command += ["-display_rotation:v:0", counter_clockwise]
        command += ["-i", os.fspath(encoded), "-map", "0", "-c", "copy"]
        if not new_ffmpeg:
            command += ["-metadata:s:v:0", f"rotate={counter_clockwise}"]
        command.append(os.fspath(rotated))
        result = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if result.returncode != 0 or _output_failed(result.stderr):
            if problem := _disk_error(result.stderr):
                raise InputError(self.path, f"cannot be written ({problem})")
            raise StitchtimeError(
                f"{self.path}: ffmpeg failed to write the display rotation: "
                f"{_first_error_line(result.stderr, rotated)}"
            )
        written = probe(rotated).rotation
        if written != self.rotation:
            version = ffmpeg_version()
            name = "a git build" if version is None else "%d.%d" % version
            raise StitchtimeError(
                f"{self.path}: ffmpeg {name} wrote a display rotation of {written} degrees "
                f"instead of {self.rotation}"
            )

    def _cleanup(self) -> None:
        for temp in getattr(self, "_temp_paths", ()):
            temp.unlink(missing_ok=True)
        if hasattr(self, "_stderr"):
            self._stderr.close()

    def _ffmpeg_stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def _ffmpeg_error(self, what: str) -> StitchtimeError:
        """The error to raise when ffmpeg (waited for) stopped: the OS's reason when the output could not
        be written (a full disk), else ffmpeg's first error line after ``what`` it did."""
        text = self._ffmpeg_stderr()
        code = self._process.returncode if self._process is not None else None
        signal_name = signal.Signals(-code).name if code is not None and code < 0 else None
        if signal_name == "SIGXFSZ":  # a file size limit (ulimit -f) stops ffmpeg with this signal
            text += os.strerror(errno.EFBIG)
        if problem := _disk_error(text):
            return InputError(self.path, f"cannot be written ({problem})")
        if signal_name and not text.strip():
            return StitchtimeError(f"{self.path}: ffmpeg {what}: killed by {signal_name}")
        return StitchtimeError(f"{self.path}: ffmpeg {what}: {_first_error_line(text, self._temp_path)}")
