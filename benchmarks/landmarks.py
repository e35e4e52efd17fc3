"""Benchmark: how steady the landmarks and crops are under each detector setting and each sigma unit.

Two settings where the paper is silent and stitchtime differed from the reference code:
``alignment.detector_upsample``, ``detect_max_side`` (the reference: dlib's HOG detector on the full frame,
upsample 0; ours: on a copy at most 960 px, upsample 1) and ``alignment.sigma_unit`` (the reference: the
smoothing sigmas in the clip's frames; ours: in frames at 25 fps, scaled with the clip's rate).

Clips with a known motion. A photo with a frontal face (scikit-image's astronaut and, unless ``--no-voc``, the
two PASCAL VOC photos of ``benchmarks/real_faces.py``, taken from ``--photos`` or fetched there from dlib's
pinned sdist) is scaled once so that the face's HOG box is the wanted width (area-averaged down, bicubic up);
then each frame places it by its own similarity transform, near the identity, into a frame of realistic size
(Lanczos-4, on the part of the frame the photo covers; the rest is the photo's mean colour): a smooth path in
seconds (translation of 0.1-0.2 face widths at 0.4-1.3 Hz, 4 % scale at 0.3 Hz, 3 degrees of roll at 0.7 Hz,
phases drawn per photo), then Gaussian sensor noise (``--noise``, 2 levels), new in every frame. Scaling first
keeps the per-frame warp near the identity, so that no frame is softer than another because of its sub-pixel
phase or its scale; the noise makes each frame's detection partly independent of its neighbours', as in video.

Detector settings. Every frame of each clip (``--frames``, 32, at 25 fps; frames of 720p, 1080p and 2160p, face
boxes of 48, 100, 200 and 400 px) goes through the real :class:`~stitchtime_core.faces.FaceLandmarker` under
both settings; the face kept is the one whose box centre is nearest the known face centre, within half a face
width. Its 68 landmarks are mapped back through the inverse of the frame's known transform into photo pixels,
where a perfect detector would give the same points in every frame. Per clip and setting: the fraction of frames
where the face is found; other boxes per frame (the VOC photos show two more people; the astronaut's are false
detections); landmark jitter (each landmark's standard deviation over the frames, the mean over the 68, in % of
the inter-ocular distance); the jitter of the FFHQ crop they make (:func:`~stitchtime_core.alignment.face_axes`:
the standard deviation of the quad's centre, and of its corners as their RMS, in pixels of a 1024 px crop); how
far the two settings' landmarks lie apart in the same frame; and seconds per frame of ``detect`` (detector and
predictor; indicative: the machine may be shared, and its load average is recorded).

Sigma units. For each of ``--rates`` (25, 30, 50, 60 fps) a clip of the same motion in seconds (``--seconds``, 4)
at ``SIGMA_SIZE`` with the face ``SIGMA_FACE`` px wide; landmarks by the reference detector setting, crops by the
pipeline's :func:`~stitchtime_core.alignment.track_quads` under each unit with the config's sigmas (centre 1,
axes 3). The true quad is the known transform applied to the quad of the landmarks found on the unmoved,
noiseless frame; every quad is compared with it in photo pixels (so a detector's constant bias stays constant)
and measured in pixels of a 1024 px crop. Per rate and unit, over the clip less ``TRIM`` s at each end: the lag
(the error the smoothing makes on the true quads), the noise it leaves (the standard deviation over the frames
of the error less the lag), the jitter (the RMS change of that noise from one frame to the next: the crop
shaking on the face), and the RMS error (bias, lag and noise together); unsmoothed quads for scale. At 25 fps
both units are the same by construction.

Results go to ``benchmarks/results/landmarks-cpu.json`` (dlib runs on the CPU) with markdown tables on stdout.
On two cores the full run takes about 17 minutes. ``--quick`` (the astronaut, a 720p frame, faces of 48 and
200 px, 4 frames; 25 and 50 fps for 1.2 s) checks the script in about ten seconds and writes into the temporary
folder unless ``--out`` says otherwise.

    .venv/bin/python benchmarks/landmarks.py [--photos DIR] [--no-voc] [--frame-sizes 720p 1080p 2160p]
        [--faces 48 100 200 400] [--frames 32] [--rates 25 30 50 60] [--seconds 4] [--noise 2] [--quick]
        [--out benchmarks/results/landmarks-cpu.json]
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import skimage.data

from common import write_report
from stitchtime_core.alignment import face_axes, fps_scaled_sigma, quad_from_axes, track_quads
from stitchtime_core.config import AlignmentConfig
from stitchtime_core.faces import FaceLandmarker, load_landmarker
from stitchtime_core.sample_clip import FACE_BOX

RESULTS = Path(__file__).parent / "results"
SETTINGS = {"reference": (0, 0), "ours": (1, 960)}
"""Each detector setting as (``detector_upsample``, ``detect_max_side``): the reference code's and ours."""
FRAME_SIZES = {"720p": (1280, 720), "1080p": (1920, 1080), "2160p": (3840, 2160)}
FACES = (48, 100, 200, 400)
"""Face widths in frame pixels (the width of the face's HOG box). dlib's HOG detector finds boxes down to about
55 px at upsample 0 and 30 px at upsample 1, counted in the image it searches: with ours, that is 40, 60 and 120
frame pixels in 720p, 1080p and 2160p frames, with the reference 55 px in all."""
RATES = (25, 30, 50, 60)
SIGMA_UNITS = ("frame-at-25fps", "frame")
SIGMA_SIZE, SIGMA_FACE, SIGMA_SETTING = "720p", 200, "reference"
"""The sigma-unit clips: frame size, face width and detector setting."""
DETECTOR_FPS = 25
TRIM = 0.5
"""Seconds at each end of a sigma clip left out of its figures, where the smoothing's reflected ends add lag
(the whole clip's figures are kept too, as ``clip_*``)."""
CROP = 1024
"""Crop jitter is in pixels of a crop this large (the ffhq profile's)."""


@dataclass(frozen=True)
class Photo:
    """A photo and its face as dlib finds it on the photo itself."""

    name: str
    image: np.ndarray
    """uint8 [H, W, 3] RGB."""
    box: tuple[int, int, int, int]
    """The face's HOG box (x0, y0, x1, y1), corners included."""
    landmarks: np.ndarray
    """float64 [68, 2] the face's landmarks on the photo: only for the inter-ocular distance and crop size."""

    @property
    def centre(self) -> np.ndarray:
        return np.array([(self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2])

    @property
    def width(self) -> float:
        return float(self.box[2] - self.box[0] + 1)

    @property
    def iod(self) -> float:
        """The inter-ocular distance (between the eyes' centres) in photo pixels."""
        return float(np.hypot(*(self.landmarks[42:48].mean(axis=0) - self.landmarks[36:42].mean(axis=0))))


def load_photos(voc_folder: Path | None) -> list[Photo]:
    """The astronaut and, with ``voc_folder``, the VOC photos of ``real_faces.py`` (fetched there once)."""
    middle = ((FACE_BOX[0] + FACE_BOX[2]) / 2, (FACE_BOX[1] + FACE_BOX[3]) / 2)
    found = [("astronaut", skimage.data.astronaut(), middle)]
    if voc_folder is not None:
        from real_faces import PHOTOS, fetch_photos, read_photo

        paths = fetch_photos(list(PHOTOS), voc_folder)
        found += [(name, read_photo(paths[name]), PHOTOS[name].point) for name in PHOTOS]
    landmarker = load_landmarker(upsample=1, max_side=0)
    photos = []
    for name, image, point in found:
        faces = [(r, lm) for r, lm in landmarker.detect(image)
                 if r[0] <= point[0] <= r[2] and r[1] <= point[1] <= r[3]]
        if not faces:
            raise RuntimeError(f"dlib's HOG detector finds no face at {point} in {name}")
        photos.append(Photo(name, image, *faces[0]))
    return photos


def motion(times: np.ndarray, seed: int) -> np.ndarray:
    """float64 [N, 4] per time in seconds: x and y offset in face widths, scale, rotation in radians."""
    phase = np.random.default_rng(seed).uniform(0, 2 * np.pi, 6)
    wave = [np.sin(2 * np.pi * hz * times + p) for hz, p in zip((0.5, 1.3, 0.4, 1.1, 0.3, 0.7), phase)]
    return np.stack([0.15 * wave[0] + 0.05 * wave[1], 0.08 * wave[2] + 0.04 * wave[3],
                     np.exp(0.04 * wave[4]), np.radians(3.0) * wave[5]], axis=1)


class Clip:
    """Frames of one photo scaled to a face width and moved along :func:`motion`; renders on demand."""

    def __init__(self, photo: Photo, frame_size: tuple[int, int], face: float, noise: float, seed: int) -> None:
        self.photo, self.size, self.face, self.noise = photo, frame_size, face, noise
        height, width = photo.image.shape[:2]
        scaled = (max(round(width * face / photo.width), 1), max(round(height * face / photo.width), 1))
        shrink = scaled[0] < width
        self.source = cv2.resize(photo.image, scaled, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
        fx, fy = scaled[0] / width, scaled[1] / height
        # cv2.resize maps pixel centre i to (i + 0.5) f - 0.5.
        self.prescale = np.array([[fx, 0, (fx - 1) / 2], [0, fy, (fy - 1) / 2], [0, 0, 1]])
        self.background = np.array(photo.image.reshape(-1, 3).mean(axis=0).round(), dtype=np.uint8)
        self.rng = np.random.default_rng(seed)

    def transform(self, pose: np.ndarray) -> np.ndarray:
        """float64 [3, 3] photo pixels to frame pixels for one row of :func:`motion`."""
        dx, dy, scale, angle = pose
        centre = (self.prescale @ [*self.photo.centre, 1])[:2]
        turn = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        target = np.array(self.size) / 2 + np.array([dx, dy]) * self.face
        place = np.eye(3)
        place[:2, :2], place[:2, 2] = turn, target - turn @ centre
        return place @ self.prescale

    def render(self, pose: np.ndarray, *, noisy: bool = True) -> np.ndarray:
        """uint8 [H, W, 3] the frame at one pose."""
        width, height = self.size
        place = self.transform(pose) @ np.linalg.inv(self.prescale)
        h, w = self.source.shape[:2]
        corners = place[:2, :2] @ np.array([[-0.5, -0.5], [w - 0.5, -0.5], [-0.5, h - 0.5], [w - 0.5, h - 0.5]]).T
        corners = corners.T + place[:2, 2]
        x0, y0 = np.clip(np.floor(corners.min(axis=0)).astype(int) - 2, 0, None)
        x1, y1 = np.minimum(np.ceil(corners.max(axis=0)).astype(int) + 3, (width, height))
        frame = np.empty((height, width, 3), np.uint8)
        frame[:] = self.background
        if x1 <= x0 or y1 <= y0:
            return frame
        # Only the part of the frame the photo covers is warped (a 4K frame costs 0.6 s whole).
        shifted = place[:2] - [[0, 0, x0], [0, 0, y0]]
        part = cv2.warpAffine(self.source, shifted, (int(x1 - x0), int(y1 - y0)), flags=cv2.INTER_LANCZOS4,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=self.background.tolist())
        if noisy and self.noise > 0:
            part = part + self.rng.standard_normal(part.shape, dtype=np.float32) * np.float32(self.noise)
            part = np.clip(np.rint(part), 0, 255).astype(np.uint8)
        frame[y0:y1, x0:x1] = part
        return frame


def find_face(landmarker: FaceLandmarker, frame: np.ndarray, centre: np.ndarray, width: float
              ) -> tuple[np.ndarray | None, int, float]:
    """(landmarks [68, 2] of the face nearest ``centre`` or None, how many other boxes, seconds)."""
    start = time.perf_counter()
    found = landmarker.detect(frame)
    seconds = time.perf_counter() - start
    if not found:
        return None, 0, seconds
    distances = [np.hypot((r[0] + r[2]) / 2 - centre[0], (r[1] + r[3]) / 2 - centre[1]) for r, _ in found]
    nearest = int(np.argmin(distances))
    if distances[nearest] >= 0.5 * width:
        return None, len(found), seconds
    return found[nearest][1], len(found) - 1, seconds


def to_photo(points: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """float64 [..., 2] frame points mapped back through ``transform`` (photo to frame)."""
    inverse = np.linalg.inv(transform)
    return points @ inverse[:2, :2].T + inverse[:2, 2]


def steadiness(landmarks: np.ndarray, photo: Photo) -> dict[str, float | None]:
    """Jitter of landmarks [N, 68, 2] in photo pixels (NaN where not found) and of their crops."""
    found = np.isfinite(landmarks).all(axis=(1, 2))
    result: dict[str, float | None] = {"found": round(float(found.mean()), 4), "landmark_jitter_iod_pct": None,
                                       "crop_centre_jitter_px": None, "crop_corner_jitter_px": None}
    if found.sum() < 3:
        return result
    crop_px = CROP / (2 * np.hypot(*face_axes(photo.landmarks)[1]))
    points = landmarks[found]
    spread = np.sqrt(points.var(axis=0, ddof=1).sum(axis=-1))  # [68]
    quads = np.stack([quad_from_axes(*face_axes(lm)) for lm in points])
    corners = np.sqrt(quads.var(axis=0, ddof=1).sum(axis=-1))  # [4]
    centres = quads.mean(axis=1)
    result.update(landmark_jitter_iod_pct=round(float(spread.mean() / photo.iod * 100), 3),
                  crop_centre_jitter_px=round(float(np.sqrt(centres.var(axis=0, ddof=1).sum()) * crop_px), 3),
                  crop_corner_jitter_px=round(float(np.sqrt((corners**2).mean()) * crop_px), 3))
    return result


def measure_detectors(photos: list[Photo], frame_sizes: list[str], faces: list[int], frames: int, noise: float
                      ) -> list[dict]:
    """One record per photo, frame size and face width: :func:`steadiness` and timing under each setting."""
    landmarkers = {name: load_landmarker(upsample=up, max_side=side) for name, (up, side) in SETTINGS.items()}
    runs = []
    for index, photo in enumerate(photos):
        poses = motion(np.arange(frames) / DETECTOR_FPS, seed=index)
        for size_name in frame_sizes:
            for face in faces:
                clip = Clip(photo, FRAME_SIZES[size_name], face, noise, seed=1000 * index + face)
                points = {name: np.full((frames, 68, 2), np.nan) for name in SETTINGS}
                others = {name: [] for name in SETTINGS}
                seconds = {name: [] for name in SETTINGS}
                for i, pose in enumerate(poses):
                    transform = clip.transform(pose)
                    frame = clip.render(pose)
                    centre = (transform @ [*photo.centre, 1])[:2]
                    for name, landmarker in landmarkers.items():
                        found, other, spent = find_face(landmarker, frame, centre, face * pose[2])
                        if found is not None:
                            points[name][i] = to_photo(found, transform)
                        others[name].append(other)
                        seconds[name].append(spent)
                both = np.isfinite(points["reference"] - points["ours"]).all(axis=(1, 2))
                apart = (np.linalg.norm(points["ours"][both] - points["reference"][both], axis=-1).mean()
                         / photo.iod * 100 if both.any() else None)
                run = {"photo": photo.name, "frame": size_name, "face_px": face, "frames": frames,
                       "settings_apart_iod_pct": None if apart is None else round(float(apart), 3)}
                for name in SETTINGS:
                    run[name] = {**steadiness(points[name], photo),
                                 "other_boxes_per_frame": round(float(np.mean(others[name])), 3),
                                 "seconds_per_frame": round(float(np.mean(seconds[name])), 4)}
                print(f"landmarks: {photo.name} {size_name} face {face}: "
                      + ", ".join(f"{name} found {run[name]['found']:.2f} {run[name]['seconds_per_frame']:.3f} s"
                                  for name in SETTINGS), flush=True)
                runs.append(run)
    return runs


def crop_errors(quads: np.ndarray, transforms: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """float64 [N, 4, 2] how far quads [N, 4, 2] (frame pixels) lie from the true quads, in crop pixels.

    Each frame's quad is mapped back through its transform [N, 3, 3] into photo pixels and compared there
    with ``reference``, the true quad [4, 2] in photo pixels: a detector's constant bias stays constant.
    """
    inverse = np.linalg.inv(transforms)
    in_photo = quads @ inverse[:, :2, :2].transpose(0, 2, 1) + inverse[:, None, :2, 2]
    return (in_photo - reference) * CROP / np.linalg.norm(reference[3] - reference[0])


def quad_figures(error: np.ndarray, lag: np.ndarray, inner: np.ndarray) -> dict[str, float]:
    """Figures of the crop errors [N, 4, 2] (:func:`crop_errors`) of smoothed quads, in crop pixels.

    ``lag`` is the error the smoothing makes on the true quads; ``error - lag`` is the detector's noise as the
    smoothing leaves it. Over the ``inner`` frames (bool [N]), and as ``clip_*`` over the whole clip: ``rms_px``
    of the error (bias, lag and noise), ``lag_rms_px``, ``noise_px`` (the noise's standard deviation over the
    frames, RMS over the corners) and ``jitter_px`` (the RMS change of the noise from one frame to the next).
    """
    noise = error - lag
    result = {}
    for prefix, keep in (("", inner), ("clip_", np.ones(len(error), bool))):
        valid = np.isfinite(error).all(axis=(1, 2)) & keep
        step = np.diff(noise, axis=0)[valid[1:] & valid[:-1]]
        result |= {prefix + "rms_px": np.sqrt((error[valid] ** 2).sum(-1).mean()),
                   prefix + "lag_rms_px": np.sqrt((lag[valid] ** 2).sum(-1).mean()),
                   prefix + "noise_px": np.sqrt(noise[valid].var(axis=0).sum(-1).mean()),
                   prefix + "jitter_px": np.sqrt((step**2).sum(-1).mean())}
    return {key: round(float(value), 4) for key, value in result.items()}


def measure_sigma_units(photos: list[Photo], rates: list[float], seconds: float, noise: float) -> list[dict]:
    """One record per photo and frame rate: :func:`quad_figures` of the quads unsmoothed and under each unit."""
    up, side = SETTINGS[SIGMA_SETTING]
    landmarker = load_landmarker(upsample=up, max_side=side)
    raw = AlignmentConfig(center_sigma=0.0, axes_sigma=0.0)
    runs = []
    for index, photo in enumerate(photos):
        clip = Clip(photo, FRAME_SIZES[SIGMA_SIZE], SIGMA_FACE, noise, seed=2000 + index)
        still = np.array([0.0, 0.0, 1.0, 0.0])
        transform = clip.transform(still)
        found, _, _ = find_face(landmarker, clip.render(still, noisy=False), (transform @ [*photo.centre, 1])[:2],
                                SIGMA_FACE)
        if found is None:
            raise RuntimeError(f"no face in {photo.name}'s unmoved frame")
        reference = to_photo(found, transform)
        true_quad = quad_from_axes(*face_axes(reference))
        for fps in rates:
            times = np.arange(round(seconds * fps)) / fps
            inner = (times >= TRIM) & (times <= times[-1] - TRIM)
            poses = motion(times, seed=index)
            transforms = np.stack([clip.transform(pose) for pose in poses])
            landmarks = np.full((len(poses), 68, 2), np.nan)
            for i, (pose, matrix) in enumerate(zip(poses, transforms)):
                face, _, _ = find_face(landmarker, clip.render(pose), (matrix @ [*photo.centre, 1])[:2],
                                       SIGMA_FACE * pose[2])
                if face is not None:
                    landmarks[i] = face
            found_mask = np.isfinite(landmarks).all(axis=(1, 2))
            true_landmarks = reference @ transforms[:, :2, :2].transpose(0, 2, 1) + transforms[:, None, :2, 2]
            no_lag = np.zeros((len(poses), 4, 2))
            run = {"photo": photo.name, "fps": fps, "frames": len(poses), "found": round(float(found_mask.mean()), 4),
                   "unsmoothed": quad_figures(
                       crop_errors(track_quads(landmarks, found_mask, config=raw, fps=fps)[0], transforms, true_quad),
                       no_lag, inner)}
            for unit in SIGMA_UNITS:
                config = AlignmentConfig(sigma_unit=unit)
                rate = fps if unit == "frame-at-25fps" else 25.0
                smoothed = track_quads(landmarks, found_mask, config=config, fps=fps)[0]
                lag = track_quads(true_landmarks, np.ones(len(poses), bool), config=config, fps=fps)[0]
                run[unit] = {"center_sigma": fps_scaled_sigma(config.center_sigma, rate),
                             "axes_sigma": fps_scaled_sigma(config.axes_sigma, rate),
                             **quad_figures(crop_errors(smoothed, transforms, true_quad),
                                            crop_errors(lag, transforms, true_quad), inner)}
            print(f"landmarks: {photo.name} {fps:g} fps: " + ", ".join(
                f"{unit} noise {run[unit]['noise_px']:.3f} lag {run[unit]['lag_rms_px']:.3f}" for unit in SIGMA_UNITS),
                flush=True)
            runs.append(run)
    return runs


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(float(np.mean(known)), 4) if known else None


def summarise_detectors(runs: list[dict]) -> list[dict]:
    """Per frame size and face width, each figure's mean over the photos."""
    keys = ("found", "landmark_jitter_iod_pct", "crop_centre_jitter_px", "crop_corner_jitter_px",
            "other_boxes_per_frame", "seconds_per_frame")
    cells = sorted({(r["frame"], r["face_px"]) for r in runs}, key=lambda c: (list(FRAME_SIZES).index(c[0]), c[1]))
    summary = []
    for frame, face in cells:
        group = [r for r in runs if (r["frame"], r["face_px"]) == (frame, face)]
        summary.append({"frame": frame, "face_px": face, "photos": len(group),
                        "settings_apart_iod_pct": _mean([r["settings_apart_iod_pct"] for r in group]),
                        **{name: {key: _mean([r[name][key] for r in group]) for key in keys} for name in SETTINGS}})
    return summary


def jitter_ratios(runs: list[dict]) -> dict[str, dict[str, float] | None]:
    """Ours over the reference's jitter in the clips where both found the face: geometric mean, least, most."""
    ratios = {}
    for key in ("landmark_jitter_iod_pct", "crop_centre_jitter_px", "crop_corner_jitter_px"):
        values = [r["ours"][key] / r["reference"][key] for r in runs if r["ours"][key] and r["reference"][key]]
        ratios[key] = {"geometric_mean": round(float(np.exp(np.mean(np.log(values)))), 3),
                       "least": round(min(values), 3), "most": round(max(values), 3), "clips": len(values)
                       } if values else None
    return ratios


def summarise_sigma_units(runs: list[dict]) -> list[dict]:
    """Per frame rate, each figure's mean over the photos, and the range over the photos of
    frame-at-25fps's noise and jitter over frame's."""
    ours, reference = SIGMA_UNITS
    summary = []
    for fps in sorted({r["fps"] for r in runs}):
        group = [r for r in runs if r["fps"] == fps]
        entry = {"fps": fps, "photos": len(group), "found": _mean([r["found"] for r in group])}
        for part in ("unsmoothed", *SIGMA_UNITS):
            entry[part] = {k: _mean([r[part][k] for r in group]) for k in group[0][part]}
        entry["ratio_range"] = {k: [round(min(values), 3), round(max(values), 3)] for k in ("noise_px", "jitter_px")
                                if (values := [r[ours][k] / r[reference][k] for r in group])}
        summary.append(entry)
    return summary


def _pair(a: float | None, b: float | None, digits: int) -> str:
    return " / ".join("—" if v is None else f"{v:.{digits}f}" for v in (a, b))


def detector_table(summary: list[dict]) -> str:
    """The detector settings' figures as a markdown table (reference / ours in each cell)."""
    lines = ["| frame | face px | found | landmark jitter, % IOD | crop centre jitter, px | crop corner jitter, px "
             "| apart, % IOD | other boxes/frame | s/frame |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for cell in summary:
        ref, ours = cell["reference"], cell["ours"]
        apart = cell["settings_apart_iod_pct"]
        lines.append(
            f"| {cell['frame']} | {cell['face_px']} | {_pair(ref['found'], ours['found'], 2)} "
            f"| {_pair(ref['landmark_jitter_iod_pct'], ours['landmark_jitter_iod_pct'], 2)} "
            f"| {_pair(ref['crop_centre_jitter_px'], ours['crop_centre_jitter_px'], 2)} "
            f"| {_pair(ref['crop_corner_jitter_px'], ours['crop_corner_jitter_px'], 2)} "
            f"| {'—' if apart is None else f'{apart:.2f}'} "
            f"| {_pair(ref['other_boxes_per_frame'], ours['other_boxes_per_frame'], 2)} "
            f"| {_pair(ref['seconds_per_frame'], ours['seconds_per_frame'], 3)} |")
    return "\n".join(lines)


def sigma_table(summary: list[dict]) -> str:
    """The sigma units' figures as a markdown table (unsmoothed; frame-at-25fps / frame in each cell)."""
    a, b = SIGMA_UNITS
    lines = [f"| fps | sigmas (centre, axes), frames: {a} / {b} | noise, px: unsmoothed; {a} / {b} "
             f"| jitter, px/frame: unsmoothed; {a} / {b} | {a} ÷ {b}, least-most: noise; jitter "
             f"| lag, px: {a} / {b} | RMS error, px: unsmoothed; {a} / {b} |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for entry in summary:
        raw, one, two, ratio = entry["unsmoothed"], entry[a], entry[b], entry["ratio_range"]
        lines.append(
            f"| {entry['fps']:g} | {one['center_sigma']:g}, {one['axes_sigma']:g} / {two['center_sigma']:g}, "
            f"{two['axes_sigma']:g} | {raw['noise_px']:.3f}; {_pair(one['noise_px'], two['noise_px'], 3)} "
            f"| {raw['jitter_px']:.3f}; {_pair(one['jitter_px'], two['jitter_px'], 3)} "
            f"| {'-'.join(f'{v:.2f}' for v in ratio['noise_px'])}; {'-'.join(f'{v:.2f}' for v in ratio['jitter_px'])} "
            f"| {_pair(one['lag_rms_px'], two['lag_rms_px'], 3)} "
            f"| {raw['rms_px']:.3f}; {_pair(one['rms_px'], two['rms_px'], 3)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    parser.add_argument("--photos", type=Path, default=cache / "stitchtime" / "dlib-19.5.0-faces",
                        help="where real_faces.py keeps the VOC photos (fetched there from dlib's sdist if missing)")
    parser.add_argument("--no-voc", action="store_true", help="the astronaut only")
    parser.add_argument("--frame-sizes", nargs="+", choices=list(FRAME_SIZES), default=list(FRAME_SIZES))
    parser.add_argument("--faces", type=int, nargs="+", default=list(FACES), help="face widths in frame pixels")
    parser.add_argument("--frames", type=int, default=32, help=f"frames per detector clip, at {DETECTOR_FPS} fps")
    parser.add_argument("--rates", type=float, nargs="+", default=list(RATES), help="frame rates of the sigma clips")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each sigma clip")
    parser.add_argument("--noise", type=float, default=2.0, help="sensor noise, standard deviation in 8-bit levels")
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds (see above)")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: benchmarks/results/landmarks-cpu.json (--quick: the temporary folder)")
    args = parser.parse_args()
    if args.quick:
        args.no_voc, args.frame_sizes, args.faces, args.frames = True, ["720p"], [48, 200], 4
        args.rates, args.seconds = [25, 50], 1.2
    out = args.out or (Path(tempfile.gettempdir()) / "landmarks-quick.json" if args.quick
                       else RESULTS / "landmarks-cpu.json")
    began, load_before = time.perf_counter(), os.getloadavg()
    photos = load_photos(None if args.no_voc else args.photos)
    detector_runs = measure_detectors(photos, args.frame_sizes, args.faces, args.frames, args.noise)
    sigma_runs = measure_sigma_units(photos, args.rates, args.seconds, args.noise)
    detectors, sigma_units = summarise_detectors(detector_runs), summarise_sigma_units(sigma_runs)
    ratios = jitter_ratios(detector_runs)
    write_report(out, "landmarks", detector_runs + sigma_runs,
                 summary={"detectors": detectors, "jitter_ours_over_reference": ratios, "sigma_units": sigma_units},
                 settings={"detector": {name: {"detector_upsample": up, "detect_max_side": side}
                                        for name, (up, side) in SETTINGS.items()},
                           "photos": [p.name for p in photos], "frames": args.frames, "detector_fps": DETECTOR_FPS,
                           "noise": args.noise, "sigma_clip": {"frame": SIGMA_SIZE, "face_px": SIGMA_FACE,
                                                               "detector": SIGMA_SETTING, "seconds": args.seconds},
                           "crop_px": CROP},
                 seconds=round(time.perf_counter() - began, 1),
                 load_average={"before": [round(v, 2) for v in load_before],
                               "after": [round(v, 2) for v in os.getloadavg()]})
    print(f"\nDetector settings, reference (upsample {SETTINGS['reference'][0]}, full frame) / ours (upsample "
          f"{SETTINGS['ours'][0]}, at most {SETTINGS['ours'][1]} px); means over {len(photos)} photo(s):\n")
    print(detector_table(detectors))
    print("\nOurs ÷ the reference's jitter where both found the face (geometric mean, least-most): " + "; ".join(
        f"{key} {r['geometric_mean']:.2f} ({r['least']:.2f}-{r['most']:.2f}, {r['clips']} clips)"
        for key, r in ratios.items() if r))
    print(f"\nSigma units ({SIGMA_SIZE}, face {SIGMA_FACE} px, {args.seconds:g} s per clip); crop pixels at {CROP}:\n")
    print(sigma_table(sigma_units))


if __name__ == "__main__":
    main()
