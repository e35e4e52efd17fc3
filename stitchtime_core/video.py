"""Video I/O through the ffmpeg and ffprobe programs: probe, streamed decoding, atomic encoding.

The source video is the frame store (DESIGN.md, artifacts): frames are decoded on demand, one at a
time, from an ffmpeg pipe, never all held in memory. Frames are uint8 [H, W, 3] RGB arrays in
display orientation (ffmpeg applies the stream's rotation while decoding).

The binaries are found through the environment variables ``STITCHTIME_FFMPEG`` and
``STITCHTIME_FFPROBE``, else on ``PATH``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
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

_VFR_TOLERANCE = 0.005
"""Relative difference between r_frame_rate and avg_frame_rate above which a stream counts as
variable frame rate (containers with millisecond timestamps put small errors in avg_frame_rate)."""

_COMPONENT_PREFIX = re.compile(r"^\[[^\]]* @ 0x[0-9a-fA-F]+\] ")


def _binary(name: str, env_var: str) -> str:
    chosen = os.environ.get(env_var)
    if chosen:
        found = shutil.which(chosen)
        if not found:
            raise StitchtimeError(f"{env_var}={chosen} is not an executable {name} program")
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
    """Frame rate: r_frame_rate for constant-rate streams, avg_frame_rate for variable-rate ones
    (so that frame_count / fps keeps the duration and the audio in sync when re-encoded)."""
    frame_count: int
    """Exact number of frames: the container's count, else counted packets."""
    duration: float
    """Seconds."""
    rotation: int
    """Clockwise degrees (0, 90, 180 or 270) that the stored frames are turned to be displayed."""
    pix_fmt: str
    codec: str
    has_audio: bool
    audio_codec: str | None
    """Codec of the first audio stream, None without audio."""
    variable_frame_rate: bool

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
        return "no error message"
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
        InputError: the file is missing, is not a readable video, has no video stream or no frames.
        StitchtimeError: ffprobe is not installed.
    """
    if not os.path.exists(path):
        raise InputError(path, "no such file")
    if not os.path.isfile(path):
        raise InputError(path, "not a file")
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

    Exactly the stream's frames come out (no frame-rate conversion, duplicates or drops), turned to
    display orientation. Stopping the iteration early ends the ffmpeg process.

    Args:
        path: a video file.
        info: its :func:`probe` result, probed here when None.

    Yields:
        uint8 [info.height, info.width, 3] RGB frames, values in [0, 255], each a new writable array.

    Raises:
        InputError: the file cannot be probed or decoded.
        StitchtimeError: ffmpeg is not installed.
    """
    if info is None:
        info = probe(path)
    width, height = info.width, info.height
    command = [
        ffmpeg_binary(), "-v", "error", "-nostdin", "-i", os.fspath(path),
        "-map", "0:V:0", "-vsync", "passthrough",
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-",
    ]
    # stderr goes to a file, not a pipe: a pipe nobody reads could fill up and stall ffmpeg.
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr
        )
        assert process.stdout is not None
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
                yield frame
            if process.wait() != 0:
                raise InputError(path, f"could not be decoded: {_stderr_text(stderr, path)}")
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()
            process.stdout.close()


def _stderr_text(stderr: IO[bytes], path: str | os.PathLike) -> str:
    stderr.seek(0)
    return _first_error_line(stderr.read().decode(errors="replace"), path)


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
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


class VideoWriter:
    """Encode RGB frames into a video file atomically, copying the audio of a source video.

    Frames are piped raw to ffmpeg, which encodes them with ``config``'s codec, crf, preset and
    pixel format into a hidden temporary file beside the output (``.<name>.tmp-<uuid><ext>``,
    same extension so ffmpeg picks the same container). :meth:`close` renames it to ``path``;
    any failure, including KeyboardInterrupt inside a ``with`` block, kills ffmpeg and deletes it,
    so ``path`` only ever holds a complete video.

    Audio: every audio stream of ``audio_source`` is copied bit for bit (``-c:a copy``), not
    re-encoded and not cut to the video's length. The container must accept that codec (AAC in
    MP4 does); if it does not, :meth:`close` raises with ffmpeg's message.

    Odd sizes: 4:2:0 (and 4:2:2) chroma needs even widths and heights, so an odd frame gets its
    last column and/or row repeated once before encoding; the encoded video is then one pixel
    larger than the frames. Repeating edge pixels, rather than padding with black, leaves no
    visible seam.

    Example:
        >>> with VideoWriter("out.mp4", width=64, height=48, fps=Fraction(25),
        ...                  config=OutputConfig(), audio_source="in.mp4") as writer:
        ...     for frame in frames:  # uint8 [48, 64, 3]
        ...         writer.write(frame)

    Args:
        path: the output file; its extension picks the container.
        width: frame width in pixels.
        height: frame height in pixels.
        fps: frame rate.
        config: codec settings.
        audio_source: a file whose audio streams are copied into the output; None for no audio.

    Raises:
        InputError: the output folder is missing or not writable, the output has no extension,
            the audio source is missing, or the output would overwrite the audio source.
        ValueError: width, height or fps are not positive.
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
    ):
        if width <= 0 or height <= 0:
            raise ValueError(f"frame size must be positive, got {width}x{height}")
        fps = Fraction(fps)
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.path = Path(path)
        self.width = width
        self.height = height
        self.fps = fps
        self.config = config
        self.frames_written = 0
        self._process: subprocess.Popen[bytes] | None = None

        if not self.path.suffix:
            raise InputError(self.path, "has no file extension to choose a container")
        folder = self.path.absolute().parent
        if not folder.is_dir():
            raise InputError(folder, "output folder does not exist")
        if audio_source is not None:
            if not os.path.isfile(audio_source):
                raise InputError(audio_source, "no such file")
            if _same_file(self.path, Path(audio_source)):
                raise InputError(self.path, "output would overwrite its source")

        self._temp_path = folder / f".{self.path.stem}.tmp-{uuid.uuid4().hex}{self.path.suffix}"
        # Creating the temp file now both reserves its name and is the honest writability test
        # (os.access says yes to root even on read-only mounts).
        try:
            os.close(os.open(self._temp_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except OSError as e:
            raise InputError(folder, f"output folder is not writable ({e.strerror})") from e

        self._encoded_width, self._encoded_height = _even_size(width, height, config.pix_fmt)
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
        if (self._encoded_height, self._encoded_width) != frame.shape[:2]:
            pad = ((0, self._encoded_height - self.height), (0, self._encoded_width - self.width))
            frame = np.pad(frame, pad + ((0, 0),), mode="edge")
        assert self._process.stdin is not None
        try:
            self._process.stdin.write(np.ascontiguousarray(frame).data)
        except BrokenPipeError:
            self._process.wait()
            message = self._ffmpeg_message()
            self.abort()
            raise StitchtimeError(f"{self.path}: ffmpeg stopped while encoding: {message}") from None
        except BaseException:
            self.abort()
            raise
        self.frames_written += 1

    def close(self) -> None:
        """Finish encoding and move the video to its path.

        Raises:
            StitchtimeError: no frame was written or ffmpeg failed (its message included); nothing
                is left at the output path or in the folder.
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
        if code != 0:
            message = self._ffmpeg_message()
            self.abort()
            raise StitchtimeError(f"{self.path}: ffmpeg failed to encode: {message}")
        self._process = None
        try:
            os.replace(self._temp_path, self.path)
        except OSError as e:
            self._cleanup()
            raise InputError(self.path, f"cannot be written ({e.strerror})") from e
        self._stderr.close()

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

    def _cleanup(self) -> None:
        self._temp_path.unlink(missing_ok=True)
        if hasattr(self, "_stderr"):
            self._stderr.close()

    def _ffmpeg_message(self) -> str:
        self._stderr.seek(0)
        return _first_error_line(self._stderr.read().decode(errors="replace"), self._temp_path)
