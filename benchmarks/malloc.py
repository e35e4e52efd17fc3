"""Benchmark: glibc's malloc keeping the memory torch frees (:mod:`stitchtime_core.malloc`) against its default.

Runs ``stitchtime edit`` on the demo clip (the mobile profile at ``preview`` quality, ``--edit smile=4``, a fresh
store each time) with ``STITCHTIME_KEEP_FREED_MEMORY`` unset (kept, the default) and ``=0`` (malloc as it is),
alternating, ``--repeat`` times each. Per run: the summary's seconds per stage, the wall seconds, and of the
command's process (with what it waited for) the CPU seconds in user and kernel mode, the minor page faults and
the peak RSS, from ``os.wait4``. Both settings must make the same video.

    .venv/bin/python benchmarks/malloc.py [--models models] [--repeat 1] [--out FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import write_report

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"kept": {}, "default": {"STITCHTIME_KEEP_FREED_MEMORY": "0"}}


def run(clip: Path, folder: Path, models: Path, name: str) -> dict:
    out = folder / f"{name}.mp4"
    command = [sys.executable, "-m", "flows.cli", "edit", str(clip), "--profile", "mobile", "--models", str(models),
               "--edit", "smile=4", "--out", str(out), "--store", str(folder / f"{name}-store"), "--json"]
    env = {**os.environ, "STITCHTIME_PROGRESS": "0", **SETTINGS[name.split("-")[0]]}
    started = time.perf_counter()
    with open(folder / f"{name}.log", "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
        stdout = process.stdout.read()
        _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"{' '.join(command)} failed:\n{(folder / f'{name}.log').read_text()[-3000:]}")
    summary = json.loads(stdout)
    return {"setting": name.split("-")[0], "wall_seconds": round(time.perf_counter() - started, 1),
            "stage_seconds": {**summary["seconds"], **summary["outputs"][0]["seconds"]},
            "user_seconds": round(usage.ru_utime, 1), "kernel_seconds": round(usage.ru_stime, 1),
            "minor_page_faults": usage.ru_minflt, "peak_rss_mb": round(usage.ru_maxrss / 1024),
            "video_sha256": hashlib.sha256(out.read_bytes()).hexdigest()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "malloc-cpu.json")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from flows.cli import DEMO_FPS, DEMO_SECONDS
    from tasks.commands import make_demo_clip

    with tempfile.TemporaryDirectory(prefix="stitchtime-malloc-") as temp:
        folder = Path(temp)
        clip = folder / "sample.mp4"
        make_demo_clip(clip, seconds=DEMO_SECONDS, fps=DEMO_FPS)
        runs = []
        for repeat in range(args.repeat):
            for setting in SETTINGS:
                runs.append(run(clip, folder, args.models.resolve(), f"{setting}-{repeat}"))
                print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    if len({run["video_sha256"] for run in runs}) != 1:
        sys.exit("the two settings made different videos: " + json.dumps(runs))
    summary = {}
    for setting in SETTINGS:
        mine = [run for run in runs if run["setting"] == setting]
        summary[setting] = {key: round(sum(run[key] for run in mine) / len(mine), 1)
                            for key in ("wall_seconds", "user_seconds", "kernel_seconds", "peak_rss_mb")}
        for stage in ("pti", "stitch"):
            seconds = [run["stage_seconds"][stage] for run in mine]
            summary[setting][f"{stage}_seconds"] = round(sum(seconds) / len(seconds), 1)
    write_report(args.out, "stitchtime edit on the demo clip with malloc keeping freed memory and with its default",
                 runs, summary=summary)


if __name__ == "__main__":
    main()
