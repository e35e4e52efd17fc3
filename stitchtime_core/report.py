"""The self-contained HTML report of a run: inputs, settings, timings, keyframes, masks and metrics.

:func:`render_report` turns a :class:`ReportData` into one HTML document that opens from disk with no
server and no network: images are inline ``data:`` URIs (JPEG, downscaled to at most
:data:`THUMBNAIL_SIDE` px) and the identity plot is inline SVG drawn here. Every user-controlled
string (file names, edit names, settings, stage names) is escaped. Pure: no file is read or written.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, TypedDict

import cv2
import numpy as np

THUMBNAIL_SIDE = 256
"""Longest side, in pixels, of the keyframe images embedded in a report (keeps the file small)."""
JPEG_QUALITY = 85
MASK_COLOUR = (40, 110, 255)
"""RGB tint of the face mask m in the mask overlay (blue, as in the paper's Fig. 3)."""
BOUNDARY_COLOUR = (255, 40, 40)
"""RGB tint of the stitching boundary b = m XOR m^d (red, as in the paper's Fig. 3)."""
TO_SOURCE_COLOUR = "#1f5fbf"
ADJACENT_COLOUR = "#d9480f"


@dataclass(frozen=True, eq=False)
class Keyframe:
    """One frame shown side by side at every step of the method; all images are aligned crops of side S.

    Attributes:
        frame: index of the frame in the video, >= 0.
        source: uint8 [S, S, 3] RGB, the aligned source crop x_i.
        inversion: uint8 [S, S, 3] RGB, the PTI inversion G(w_i; θ_p).
        raw_edit: uint8 [S, S, 3] RGB, the edit before stitching e_i = G(w_i + δw; θ_p).
        stitched: uint8 [S, S, 3] RGB, the stitching-tuned result s_i.
        mask: float or uint8 [S, S] in [0, 1], the face mask m_i.
        boundary: float or uint8 [S, S] in [0, 1], the stitching boundary b_i = m_i XOR m^d_i.

    Raises:
        ValueError: a negative frame, an image that is not uint8 [S, S, 3], or a mask that is not
            [S, S] with values in [0, 1].
    """

    frame: int
    source: np.ndarray
    inversion: np.ndarray
    raw_edit: np.ndarray
    stitched: np.ndarray
    mask: np.ndarray
    boundary: np.ndarray

    def __post_init__(self) -> None:
        if self.frame < 0:
            raise ValueError(f"keyframe index must be >= 0, got {self.frame}")
        size = self.source.shape[0]
        for name in ("source", "inversion", "raw_edit", "stitched"):
            image = getattr(self, name)
            if image.dtype != np.uint8 or image.shape != (size, size, 3):
                raise ValueError(f"keyframe {self.frame}: {name} must be uint8 [{size}, {size}, 3] like source, "
                                 f"got {image.dtype} {list(image.shape)}")
        for name in ("mask", "boundary"):
            region = getattr(self, name)
            if region.shape != (size, size) or region.min() < 0 or region.max() > 1:
                raise ValueError(f"keyframe {self.frame}: {name} must be [{size}, {size}] in [0, 1], "
                                 f"got {list(region.shape)} in [{region.min()}, {region.max()}]")


class _IdentityOptional(TypedDict, total=False):
    source_similarity: float | None


class IdentitySection(_IdentityOptional):
    """The identity metrics of the edited video (paper section 4.2); N is the number of frames.

    ``stitchtime_core.metrics.IdentityMetrics.to_dict()`` fits as it is (its other keys are not shown).
    None or NaN stands for a value that was not measured (no face in a frame, a pair left out).

    Keys:
        tl_id: TL-ID, the mean of ``adjacent`` (1 = as coherent as the source video).
        tg_id: TG-ID, the same normalised similarity averaged over all pairs of frames.
        network: which identity network measured it (its ``IdentityNet.name``).
        adjacent: N-1 values, the normalised identity similarity of edited frames (i, i+1), i.e. the
            scores TL-ID averages; plotted at the time between the two frames.
        to_source: N values in [-1, 1], the cosine similarity of edited frame i to source frame i.
        source_similarity: optional, the mean of ``to_source`` over the frames with a face (how much of
            the source's identity the edit keeps); a run measured before it existed has none.
    """

    tl_id: float | None
    tg_id: float | None
    network: str
    adjacent: list[float | None]
    to_source: list[float | None]


class StitchingSection(TypedDict):
    """How well the edited crops meet the frame at the boundary b (mean over frames).

    Keys:
        boundary_error_before: mean |e_i - x_i| on b for the raw edits, in [-1, 1] pixel units, so in [0, 2].
        boundary_error_after: mean |s_i - x_i| on b for the stitched crops, in the same units.
    """

    boundary_error_before: float
    boundary_error_after: float


class _PTIOptional(TypedDict, total=False):
    reconstruction_lpips_before: float | None
    reconstruction_lpips_after: float | None
    reconstruction_frames: list[int]
    reconstruction_mse: float | None


class PTISection(_PTIOptional):
    """How well the generator reproduces the source crops at the pivots, before and after PTI.

    The PTI stage's info fits as it is (its other keys are not shown). A stage made before these
    numbers were measured lacks the optional keys; they then read as not measured.

    Keys:
        method: "pti", or "none" when the generator was not tuned (the "w/o PTI" ablation).
        steps: PTI's optimisation steps.
        reconstruction_lpips_before: optional, mean LPIPS of G(w_i) to the source crops with the original
            generator: the pivots' own reconstruction (lower is better).
        reconstruction_lpips_after: optional, the same with the tuned generator G(w_i; θ_p).
        reconstruction_frames: optional, the frames those two were measured on.
        reconstruction_mse: optional, mean squared error of the tuned reconstructions over all frames, in
            [-1, 1] pixel units.
    """

    method: str
    steps: int


class AblationRow(TypedDict):
    """One variant of an ablation run; a number is None where the variant did not measure it.

    Keys:
        variant: its name, e.g. "full", "no-e4e", "no-pti", "no-stitching", "poisson".
        tl_id: TL-ID of the variant's output.
        tg_id: TG-ID of the variant's output.
        boundary_error: mean boundary error of its final crops, in [0, 2] (see :class:`StitchingSection`).
        seconds: wall time of the variant's run.
    """

    variant: str
    tl_id: float | None
    tg_id: float | None
    boundary_error: float | None
    seconds: float | None


@dataclass(frozen=True, eq=False, kw_only=True)
class ReportData:
    """Everything a report shows. The seconds, keyframes, identity, stitching and PTI sections read
    "Not measured." when their field is empty or None; the ablation section is left out when
    ``ablations`` is None.

    Attributes:
        title: heading of the report, e.g. "in.mp4 - age=-4".
        inputs: what the run read, name -> value (e.g. "video" -> "in.mp4", "edit" -> "age=-4").
        settings: the resolved configuration, stage -> setting -> value (any JSON value).
        seconds: wall time of each stage in seconds, stage -> seconds >= 0, in run order.
        keyframes: frames to show side by side, in frame order (see :func:`choose_keyframes`).
        identity: the identity metrics, or None when they were not measured.
        stitching: boundary errors before and after stitching, or None when not measured.
        pti: the PTI stage's reconstruction numbers, or None when not measured.
        ablations: one row per variant of an ablation run, or None for a plain run.
        fps: frame rate of the video, > 0; turns frame indices into seconds.

    Raises:
        ValueError: fps <= 0, a section missing one of its keys, or identity series of mismatched lengths.
    """

    title: str
    inputs: dict[str, str]
    settings: dict[str, dict[str, Any]]
    seconds: dict[str, float]
    keyframes: list[Keyframe] = field(default_factory=list)
    identity: IdentitySection | None = None
    stitching: StitchingSection | None = None
    pti: PTISection | None = None
    ablations: list[AblationRow] | None = None
    fps: float

    def __post_init__(self) -> None:
        if not self.fps > 0:
            raise ValueError(f"fps must be > 0, got {self.fps}")
        _require_keys("identity", self.identity, IdentitySection)
        _require_keys("stitching", self.stitching, StitchingSection)
        _require_keys("pti", self.pti, PTISection)
        for row in self.ablations or []:
            _require_keys("ablation row", row, AblationRow)
        if self.identity is not None:
            to_source, adjacent = self.identity["to_source"], self.identity["adjacent"]
            if len(adjacent) != max(len(to_source) - 1, 0):
                raise ValueError(f"identity: adjacent must hold one value per pair of frames, "
                                 f"got {len(adjacent)} for {len(to_source)} frames")


def _require_keys(name: str, section: dict | None, kind: type) -> None:
    if section is None:
        return
    missing = sorted(kind.__required_keys__ - set(section))
    if missing:
        raise ValueError(f"{name} lacks {', '.join(missing)}")


def choose_keyframes(n_frames: int, count: int = 4) -> list[int]:
    """Frame indices spread evenly over a video, the first and the last included.

    Args:
        n_frames: frames in the video, >= 0.
        count: how many to choose, >= 1; fewer come back when the video is shorter.

    Returns:
        min(count, n_frames) unique indices in increasing order, in [0, n_frames - 1].

    Raises:
        ValueError: a negative n_frames or a count below 1.

    Example:
        >>> choose_keyframes(10)
        [0, 3, 6, 9]
    """
    if n_frames < 0 or count < 1:
        raise ValueError(f"need n_frames >= 0 and count >= 1, got {n_frames} and {count}")
    count = min(count, n_frames)
    if count <= 1:
        return list(range(count))
    # Exact integer rounding of i * (n - 1) / (count - 1): steps are >= 1, so no index repeats.
    return [(2 * i * (n_frames - 1) + count - 1) // (2 * (count - 1)) for i in range(count)]


def image_data_uri(image: np.ndarray, *, max_side: int = THUMBNAIL_SIDE) -> str:
    """An image as a ``data:image/jpeg;base64,...`` URI, downscaled so its longest side is at most max_side.

    Args:
        image: uint8 [H, W, 3] RGB.
        max_side: longest side of the embedded image in pixels, >= 1; smaller images keep their size.

    Returns:
        the URI, ASCII.

    Raises:
        ValueError: an image that is not uint8 [H, W, 3].
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {list(image.shape)}")
    height, width = image.shape[:2]
    scale = max_side / max(height, width)
    if scale < 1:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    ok, jpeg = cv2.imencode(".jpg", np.ascontiguousarray(image[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise ValueError(f"OpenCV could not encode a {list(image.shape)} image as JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(jpeg.tobytes()).decode("ascii")


def overlay_masks(source: np.ndarray, mask: np.ndarray, boundary: np.ndarray, *, alpha: float = 0.45) -> np.ndarray:
    """The source crop with the face mask tinted blue and the boundary band tinted red.

    Args:
        source: uint8 [S, S, 3] RGB.
        mask: [S, S] in [0, 1], the face mask m.
        boundary: [S, S] in [0, 1], the boundary b; drawn over the mask where they overlap.
        alpha: opacity of a tint where the mask is 1, in [0, 1].

    Returns:
        uint8 [S, S, 3] RGB.
    """
    out = source.astype(np.float32)
    for region, colour in ((mask, MASK_COLOUR), (boundary, BOUNDARY_COLOUR)):
        weight = alpha * np.asarray(region, dtype=np.float32)[:, :, None]
        out = out * (1 - weight) + weight * np.asarray(colour, dtype=np.float32)
    return out.round().clip(0, 255).astype(np.uint8)


def similarity_plot(to_source: list[float | None], adjacent: list[float | None], fps: float, *,
                    width: int = 640, height: int = 240) -> str:
    """An SVG line plot of identity similarity against time; a None or NaN value leaves a gap.

    Args:
        to_source: N values, the similarity of each edited frame to its source frame, plotted at i / fps.
        adjacent: N-1 values, the similarity of edited frames (i, i+1), plotted at (i + 0.5) / fps.
        fps: frames per second, > 0.
        width: of the drawing, in CSS pixels.
        height: of the drawing, in CSS pixels.

    Returns:
        an ``<svg>`` element with one ``<path>`` per series (classes "to-source" and "adjacent"),
        axes with five ticks each, and a legend.
    """
    left, right, top, bottom = 52, 16, 28, 40
    t_max = max(len(to_source) - 1, 1) / fps
    values = [v for v in [*to_source, *adjacent] if _measured(v)]
    y_low = math.floor(min(values, default=0) * 10) / 10
    y_high = max(math.ceil(max(values, default=1) * 10) / 10, y_low + 0.1)

    def x(t: float) -> float:
        return left + (width - left - right) * t / t_max

    def y(v: float) -> float:
        return top + (height - top - bottom) * (y_high - v) / (y_high - y_low)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="identity similarity against time">']
    t_digits = 0 if t_max >= 10 else 1 if t_max >= 1 else 2
    for tick in np.linspace(0, t_max, 5):
        at = f"{x(tick):.1f}"
        parts.append(f'<line class="grid" x1="{at}" y1="{top}" x2="{at}" y2="{height - bottom}"/>'
                     f'<text x="{at}" y="{height - bottom + 16}" text-anchor="middle">{tick:.{t_digits}f}</text>')
    for tick in np.linspace(y_low, y_high, 5):
        parts.append(f'<line class="grid" x1="{left}" y1="{y(tick):.1f}" x2="{width - right}" y2="{y(tick):.1f}"/>'
                     f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" text-anchor="end">{tick:.2f}</text>')
    middle = (top + height - bottom) / 2
    parts.append(f'<text x="{(left + width - right) / 2}" y="{height - 6}" text-anchor="middle">time (s)</text>'
                 f'<text x="14" y="{middle}" transform="rotate(-90 14 {middle})" text-anchor="middle">'
                 "similarity</text>")
    series = (("to-source", "edited frame vs its source frame", TO_SOURCE_COLOUR, to_source, 0.0),
              ("adjacent", "adjacent edited frames (TL-ID scores)", ADJACENT_COLOUR, adjacent, 0.5))
    for row, (name, label, colour, data, offset) in enumerate(series):
        points = [(x((i + offset) / fps), y(v)) if _measured(v) else None for i, v in enumerate(data)]
        parts.append(f'<path class="{name}" fill="none" stroke="{colour}" stroke-width="1.5" '
                     f'stroke-linecap="round" d="{_path_data(points)}"/>')
        legend_x = left + 8 + 300 * row
        parts.append(f'<line x1="{legend_x}" y1="12" x2="{legend_x + 20}" y2="12" stroke="{colour}" stroke-width="2"/>'
                     f'<text x="{legend_x + 26}" y="16">{label}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _measured(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _path_data(points: list[tuple[float, float] | None]) -> str:
    """SVG path data through the points, broken where a point is None."""
    commands, drawing = [], False
    for point in points:
        if point is None:
            drawing = False
        else:
            # Each run starts with a zero-length segment, which the round line cap shows as a dot:
            # a measured value between two gaps stays visible.
            commands.append(f"L{point[0]:.1f},{point[1]:.1f}" if drawing else f"M{point[0]:.1f},{point[1]:.1f}h0")
            drawing = True
    return " ".join(commands)


STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; color: #222; max-width: 1200px; margin: 2em auto; padding: 0 1em; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .5em 0; }
th, td { padding: .3em .8em; border-bottom: 1px solid #eee; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.keyframes img { display: block; width: 160px; height: 160px; }
.bar { display: inline-block; height: .8em; background: #8aa9db; }
.swatch { display: inline-block; width: .9em; height: .9em; vertical-align: middle; }
.missing { color: #777; font-style: italic; }
svg { max-width: 100%; height: auto; }
svg text { font: 11px system-ui, sans-serif; fill: #444; }
svg .grid { stroke: #e4e4e4; }
"""


NOT_MEASURED = '<p class="missing">Not measured.</p>'


def _text(value: Any) -> str:
    """Escaped HTML text of a value: a string as it is, anything else as JSON."""
    return html.escape(value if isinstance(value, str) else json.dumps(value, default=str))


def _number(value: float | None, digits: int) -> str:
    return f"{value:.{digits}f}" if _measured(value) else "—"


def _table(header: list[str], rows: list[list[str]], *, numeric: Collection[int] = (), cls: str = "") -> str:
    """A table from cells that are already HTML; columns in ``numeric`` are right-aligned."""
    head = "".join(f"<th>{cell}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f'<td class="num">{cell}</td>' if i in numeric else f"<td>{cell}</td>"
                                    for i, cell in enumerate(row)) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _section(title: str, body: str | None) -> str:
    return f"<section><h2>{title}</h2>{body or NOT_MEASURED}</section>"


def _settings_table(settings: dict[str, dict[str, Any]]) -> str:
    rows = [[_text(stage) if i == 0 else "", _text(name), _text(value)]
            for stage, values in settings.items() for i, (name, value) in enumerate(values.items())]
    return _table(["stage", "setting", "value"], rows)


def _seconds_table(seconds: dict[str, float]) -> str | None:
    if not seconds:
        return None
    total = sum(seconds.values())
    bar_px = 200 / max(total, 1e-9)  # the whole run is 200 px long
    rows = [[_text(stage), f"{s:.1f}", f'<span class="bar" style="width: {bar_px * s:.0f}px"></span>']
            for stage, s in seconds.items()]
    rows.append(["<strong>total</strong>", f"<strong>{total:.1f}</strong>", ""])
    return _table(["stage", "seconds", ""], rows, numeric={1})


def _keyframes_table(keyframes: list[Keyframe], fps: float) -> str | None:
    if not keyframes:
        return None
    columns = ("source crop", "PTI inversion", "raw edit", "stitched", "masks over source")
    rows = []
    for key in keyframes:
        images = (key.source, key.inversion, key.raw_edit, key.stitched,
                  overlay_masks(key.source, key.mask, key.boundary))
        rows.append([f"frame {key.frame}<br>{key.frame / fps:.2f} s"]
                    + [f'<img src="{image_data_uri(image)}" alt="{name}, frame {key.frame}">'
                       for name, image in zip(columns, images)])
    legend = (f'<p><span class="swatch" style="background: rgb{MASK_COLOUR}"></span> face mask m &nbsp; '
              f'<span class="swatch" style="background: rgb{BOUNDARY_COLOUR}"></span> stitching boundary b</p>')
    return _table(["frame", *columns], rows, cls="keyframes") + legend


def _identity_body(identity: IdentitySection | None, fps: float) -> str | None:
    if identity is None:
        return None
    numbers = _table(["TL-ID", "TG-ID", "similarity to the source", "identity network"],
                     [[_number(identity["tl_id"], 4), _number(identity["tg_id"], 4),
                       _number(identity.get("source_similarity"), 4), _text(identity["network"])]],
                     numeric={0, 1, 2})
    note = ("<p>TL-ID and TG-ID: the edited video's identity consistency over adjacent and over all pairs of "
            "frames, relative to the source's (1 = as consistent). Similarity to the source: the cosine "
            "similarity of each edited frame to its source frame, averaged over the frames with a face "
            "(the blue line below).</p>")
    return numbers + note + similarity_plot(identity["to_source"], identity["adjacent"], fps)


def _stitching_body(stitching: StitchingSection | None) -> str | None:
    if stitching is None:
        return None
    before, after = stitching["boundary_error_before"], stitching["boundary_error_after"]
    change = f"{100 * (after - before) / before:+.1f} %" if before > 0 else "—"
    return (_table(["boundary error", "before stitching (raw edit)", "after stitching", "change"],
                   [["mean |crop − source| on b", f"{before:.4f}", f"{after:.4f}", change]], numeric={1, 2, 3})
            + "<p>In [-1, 1] pixel units; lower is better.</p>")


def _pti_body(pti: PTISection | None) -> str | None:
    if pti is None:
        return None
    if pti["method"] == "none":
        return "<p>The generator was not tuned (w/o PTI): the edits come from the original generator.</p>"
    before, after = pti.get("reconstruction_lpips_before"), pti.get("reconstruction_lpips_after")
    change = "—"
    if _measured(before) and _measured(after) and before > 0:
        change = f"{100 * (after - before) / before:+.1f} %"
    frames = pti.get("reconstruction_frames") or []
    measured_on = f" on {len(frames)} frames spread over the clip" if frames else ""
    return (_table(["reconstruction", "pivots, original generator", "after PTI", "change"],
                   [["LPIPS to the source crop", _number(before, 4), _number(after, 4), change]], numeric={1, 2, 3})
            + f"<p>Mean LPIPS{measured_on}, lower is better; before PTI it measures the pivots themselves. "
              f"PTI took {int(pti['steps'])} steps; mean squared error after it, over every frame: "
              f"{_number(pti.get('reconstruction_mse'), 4)} (in [-1, 1] pixel units).</p>")


def _ablations_table(ablations: list[AblationRow]) -> str:
    rows = [[_text(row["variant"]), _number(row["tl_id"], 4), _number(row["tg_id"], 4),
             _number(row["boundary_error"], 4), _number(row["seconds"], 1)] for row in ablations]
    return _table(["variant", "TL-ID", "TG-ID", "boundary error", "seconds"], rows, numeric={1, 2, 3, 4})


def render_report(data: ReportData) -> str:
    """The report as one self-contained HTML document (inline CSS, images and SVG; no script, no network).

    Args:
        data: what to show.

    Returns:
        the HTML text, to be written as UTF-8.
    """
    # What came out first; how it was made last.
    sections = [
        _section("Keyframes", _keyframes_table(data.keyframes, data.fps)),
        _section("Identity", _identity_body(data.identity, data.fps)),
        _section("Stitching", _stitching_body(data.stitching)),
        _section("Inversion (PTI)", _pti_body(data.pti)),
    ]
    if data.ablations is not None:
        sections.append(_section("Ablation", _ablations_table(data.ablations)))
    sections += [
        _section("Seconds per stage", _seconds_table(data.seconds)),
        _section("Inputs", _table(["input", "value"], [[_text(k), _text(v)] for k, v in data.inputs.items()])),
        _section("Settings", _settings_table(data.settings)),
    ]
    title = _text(data.title)
    head = f'<meta charset="utf-8">\n<title>{title}</title>\n<style>{STYLE}</style>'
    body = f"<h1>{title}</h1>\n" + "\n".join(sections)
    return f'<!DOCTYPE html>\n<html lang="en">\n<head>\n{head}\n</head>\n<body>\n{body}\n</body>\n</html>\n'
