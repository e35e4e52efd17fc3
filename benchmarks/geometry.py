"""Benchmark: probe + landmarks + alignment + crop on a 1080p clip.

Measures frames per second of each stage (the pipeline's own stage code, run without a Prefect
server) and the peak memory of the process at two clip lengths: streaming decode and chunked crop
storage should keep peak memory nearly the same when the clip is 4x longer.

    .venv/bin/python benchmarks/geometry.py [--frames 100 400] [--out benchmarks/results/geometry.json]

Each length runs in a fresh subprocess so that peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

from common import run_child, write_report

RESOLUTION = 1024  # the FFHQ crop size the ffhq profile uses
SIZE = (1920, 1080)


def measure(frames: int, workdir: Path) -> dict:
    """Run the three stages on a clip of ``frames`` 1080p frames; called inside the subprocess."""
    from stitchtime_core.config import AlignmentConfig
    from stitchtime_core.sample_clip import make_sample_clip
    from tasks import stages

    clip = workdir / f"clip-{frames}.mp4"
    make_sample_clip(clip, seconds=frames / 25, fps=Fraction(25), size=SIZE)
    store = (workdir / f"store-{frames}").as_uri()
    config = AlignmentConfig()
    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = {}
    start = time.perf_counter()
    probe = stages.call(stages.probe_video, store, str(clip))
    seconds["probe"] = time.perf_counter() - start
    start = time.perf_counter()
    landmarks = stages.call(stages.detect_landmarks, store, str(clip), probe, config)
    seconds["landmarks"] = time.perf_counter() - start
    start = time.perf_counter()
    align = stages.call(stages.align_faces, store, str(clip), probe, landmarks, config, RESOLUTION)
    seconds["align_and_crop"] = time.perf_counter() - start
    total = sum(seconds.values())
    return {
        "frames": probe.info["video"]["frame_count"],
        "edited_frames": align.info["edited_frames"],
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "frames_per_second": {k: round(frames / v, 2) for k, v in seconds.items() if v > 0} | {
            "probe_landmarks_align_crop": round(frames / total, 2)},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_before_stages_mb": round(baseline_kb / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[100, 400])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "geometry.json")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.child, args.workdir)))
        return
    with tempfile.TemporaryDirectory() as workdir:
        runs = [run_child([sys.executable, __file__, "--child", str(frames), "--workdir", workdir])
                for frames in args.frames]
    peaks = [r["peak_rss_mb"] for r in runs]
    write_report(args.out, "probe + landmarks + alignment + crop, 1080p, crops at 1024 px", runs,
                 peak_rss_ratio_longest_to_shortest=round(peaks[-1] / peaks[0], 3))

if __name__ == "__main__":
    main()
