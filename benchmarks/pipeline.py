"""Benchmark: the edit flow end to end (``stitchtime edit``), per stage and per frame, and stitching fan-out.

What it measures, all on sample clips (:func:`stitchtime_core.sample_clip.make_sample_clip`, 25 fps):

- For each clip length (``--frames``, default 25 50 100): one ``stitchtime edit CLIP --edit age=2 --json``
  run with a fresh store, so nothing is reused. From the run summary: seconds per frame of every stage
  (probe, landmarks, align, encode, pti; edit, stitch, render for the output) and end to end
  (``total_seconds``), the peak memory (RSS) of the process, and how each grows with the clip length
  (seconds per frame at the longest clip / at the shortest).
- Stitch workers (``--workers``, default 1 2): one clip (``--worker-frames``, default 50) whose shared
  stages (up to and including edit) are copied from its in-process run into a fresh store, stitched
  again through ``--fan-out`` by that many Prefect process workers (each OMP_NUM_THREADS=1, one chunk
  at a time); the stitch stage's seconds and the speed-up over one worker. Each chunk is a flow run in
  a fresh process, so its start-up (imports, model loading) is part of the stitch time.

Every run is the CLI (``flows.cli:main``, the ``stitchtime`` entry point) called in a fresh child
process, so that its peak memory is its own, against one Prefect server that this script starts on
loopback with its own PREFECT_HOME and stops, with the workers, when it ends, fails or is interrupted.
With the defaults the tiny profile takes about 20 minutes on 2 idle CPU cores (an hour on busy ones).
``--profile ffhq --models DIR --device cuda`` runs the official 1024 px networks (untested: no ffhq
files and no GPU were at hand when this was written; the workers are not pinned to GPUs, so on one
GPU they share it).

    .venv/bin/python benchmarks/pipeline.py [--device cpu|cuda] [--profile tiny|ffhq --models DIR]
        [--frames 25 50 100] [--workers 1 2] [--worker-frames 50] [--set STAGE.SETTING=VALUE ...]
        [--out benchmarks/results/pipeline-<device>.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from fractions import Fraction
from pathlib import Path

from common import run_child, write_report

ROOT = Path(__file__).resolve().parents[1]
SHARED_STAGES = ["probe", "landmarks", "align", "encode", "pti", "edit"]
"""Store folders the worker runs start from: only stitching and rendering are computed again."""
CHUNK_SIZE = 16
"""Frames per stitching chunk: edit_video's default, which the CLI does not change."""
SIZES = {"tiny": (384, 384), "ffhq": (1024, 1024)}
"""Sample clip size per profile: the demo's clip for tiny; for ffhq, a face about as large as its crops."""


def measure(cli_args: list[str]) -> dict:
    """Run ``stitchtime CLI_ARGS`` in this process (a child of the benchmark); the summary's timings, peak memory."""
    from flows.cli import main as stitchtime

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        stitchtime.main(cli_args, prog_name="stitchtime", standalone_mode=False)
    summary = json.loads(printed.getvalue())
    [output] = summary["outputs"]
    seconds = {**summary["seconds"], **output["seconds"]}
    frames = summary["frames"]
    import torch  # loaded by the run already

    result = {
        "frames": frames, "edited_frames": summary["edited_frames"], "size": summary["size"],
        "seconds": seconds, "total_seconds": summary["total_seconds"],
        "seconds_per_frame": {stage: round(s / frames, 4) for stage, s in seconds.items()}
                             | {"end_to_end": round(summary["total_seconds"] / frames, 4)},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "torch_threads": torch.get_num_threads(),
        "reused_stages": summary["reused_stages"], "stitching": summary["stitching"],
    }
    if summary["device"] == "cuda":
        result["peak_cuda_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        result["gpu"] = torch.cuda.get_device_name()
    return result


def edit_run(clip: Path, store: Path, options: list[str], fan_out: str | None = None) -> dict:
    """One ``stitchtime edit`` of ``clip`` into ``store`` in a fresh child process; see :func:`measure`."""
    cli = ["edit", str(clip), "--edit", "age=2", "--out", str(store.with_suffix(".mp4")), "--store", str(store),
           "--json", *options] + (["--fan-out", fan_out] if fan_out else [])
    print(f"pipeline: {' '.join(cli)}", file=sys.stderr)
    return run_child([sys.executable, __file__, "--child", json.dumps(cli)])


def stop(proc: subprocess.Popen) -> None:
    """Stop a process this script started (its own session), and whatever it started, for sure."""
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_for(ready, what: str, procs: list[subprocess.Popen], logs: list[Path], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            sys.exit(f"{what} did not start:\n" + "\n".join(log.read_text()[-3000:] for log in logs))
        time.sleep(0.5)


def start(stack: contextlib.ExitStack, args: list[str], log: Path,
          env: dict[str, str] | None = None) -> subprocess.Popen:
    """``python -m prefect ARGS`` in the background, logging to ``log``; stopped when ``stack`` closes."""
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", *args], cwd=log.parent, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    stack.callback(stop, proc)
    return proc


def start_server(stack: contextlib.ExitStack, workdir: Path) -> str:
    """A Prefect server on a free loopback port; its API URL. Sets this process's Prefect environment."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(PREFECT_HOME=str(workdir / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                      DO_NOT_TRACK="1", PREFECT_UI_ENABLED="false")
    log = workdir / "server.log"
    proc = start(stack, ["server", "start", "--host", "127.0.0.1", "--port", str(port)], log)

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=1):
                return True
        except OSError:
            return False

    wait_for(healthy, "the Prefect server", [proc], [log])
    os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
    return os.environ["PREFECT_API_URL"]


def deploy_stitch_chunk(name: str, device: str) -> str:
    """A process work pool ``name`` and a stitch-chunk deployment of the same name on it; the deployment."""
    env = {k: v for k, v in os.environ.items() if k != "STITCHTIME_ROOT"}  # the workers' to resolve
    for args in (["work-pool", "create", name, "--type", "process"],
                 ["deploy", "flows/stitch_chunk.py:stitch_chunk", "--name", name, "--pool", name,
                  "--param", f"device={device}", "--prefect-file", "deployments/prefect.yaml"]):
        result = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", *args], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=300)
        if result.returncode:
            sys.exit(f"prefect {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return f"stitch-chunk/{name}"


@contextlib.contextmanager
def workers(pool: str, count: int, workdir: Path):
    """``count`` process workers on ``pool``, one flow run at a time each, one thread each; stopped on exit."""
    env = {**os.environ, "STITCHTIME_ROOT": str(ROOT), "PREFECT_WORKER_QUERY_SECONDS": "1", "OMP_NUM_THREADS": "1"}
    with contextlib.ExitStack() as stack:
        logs = [workdir / f"worker-{count}-{i}.log" for i in range(count)]
        procs = [start(stack, ["worker", "start", "--pool", pool, "--type", "process", "--limit", "1",
                               "--name", log.stem], log, env) for log in logs]
        wait_for(lambda: all("started" in log.read_text() for log in logs), "the workers", procs, logs)
        yield


def growth_of(first: dict, last: dict) -> dict:
    """Seconds per frame of each stage and end to end, and peak RSS, of the ``last`` run over the ``first``."""
    short, long = ({**run["seconds"], "end_to_end": run["total_seconds"]} for run in (first, last))
    ratio = last["frames"] / first["frames"]
    return {f"seconds_per_frame_{last['frames']}_vs_{first['frames']}":
                {stage: round(long[stage] / (s * ratio), 2) if s else None for stage, s in short.items()},
            f"peak_rss_{last['frames']}_vs_{first['frames']}": round(last["peak_rss_mb"] / first["peak_rss_mb"], 3)}


def ideal_speedup(frames: int, count: int) -> float:
    """The speed-up of ``count`` workers if every frame took the same time and nothing else did."""
    loads = [0] * count
    for start in range(0, frames, CHUNK_SIZE):  # each chunk goes to the first free worker
        loads[loads.index(min(loads))] += min(CHUNK_SIZE, frames - start)
    return round(frames / max(loads), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--profile", default="tiny", choices=list(SIZES))
    parser.add_argument("--models", type=Path, help="folder of the ffhq model files (the ffhq profile)")
    parser.add_argument("--frames", type=int, nargs="+", default=[25, 50, 100], help="clip lengths")
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2], help="stitch worker counts; none: skip")
    parser.add_argument("--worker-frames", type=int, default=50, help="clip length of the worker runs")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="STAGE.SETTING=VALUE",
                        help="passed to every run, e.g. stitching.steps=100 (the paper's)")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/pipeline-<device>.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(json.loads(args.child))))
        return
    from stitchtime_core.sample_clip import make_sample_clip

    options = ["--profile", args.profile, "--device", args.device]
    options += ["--models", str(args.models.resolve())] if args.models else []  # workers run from the repo root
    options += [arg for setting in args.settings for arg in ("--set", setting)]
    size = SIZES[args.profile]
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)

        def clip(frames: int) -> Path:
            path = workdir / f"clip-{frames}.mp4"
            if not path.exists():
                make_sample_clip(path, seconds=frames / 25, fps=Fraction(25), size=size)
            return path

        start_server(stack, workdir)
        runs = [edit_run(clip(frames), workdir / f"store-{frames}", options) for frames in sorted(args.frames)]
        growth = growth_of(runs[0], runs[-1])

        fan_out = None
        if args.workers:
            frames = args.worker_frames
            in_process = next((run for run in runs if run["frames"] == frames), None)
            if in_process is None:  # the shared stages of that clip, computed once in-process
                in_process = edit_run(clip(frames), workdir / f"store-{frames}", options)
            pool = f"bench-{uuid.uuid4().hex[:8]}"
            deployment = deploy_stitch_chunk(pool, args.device)
            worker_runs = []
            for count in args.workers:
                store = workdir / f"store-{frames}-workers-{count}"
                for stage in SHARED_STAGES:
                    shutil.copytree(workdir / f"store-{frames}" / stage, store / stage)
                with workers(pool, count, workdir):
                    run = edit_run(clip(frames), store, options, fan_out=deployment)
                worker_runs.append({"workers": count, "stitch_seconds": run["seconds"]["stitch"],
                                    "ideal_speedup_vs_one_worker": ideal_speedup(frames, count), **run})
            one = next((r["stitch_seconds"] for r in worker_runs if r["workers"] == 1), None)
            fan_out = {
                "frames": frames, "chunk_size": CHUNK_SIZE, "deployment_device": args.device,
                "worker_env": {"OMP_NUM_THREADS": "1", "PREFECT_WORKER_QUERY_SECONDS": "1"},
                "in_process_stitch_seconds": in_process["seconds"]["stitch"],
                "in_process_torch_threads": in_process["torch_threads"],
                "stitch_speedup_vs_one_worker": {r["workers"]: round(one / r["stitch_seconds"], 2)
                                                 for r in worker_runs} if one else None,
                "runs": worker_runs,
                "note": "stitch_seconds includes each chunk run's process start-up and model loading and the "
                        "workers' 1 s polling; peak_rss_mb of these runs is the edit flow's process only, "
                        "not the workers' chunk runs",
            }
        write_report(args.out or Path(__file__).parent / "results" / f"pipeline-{args.device}.json",
                     "stitchtime edit end to end: seconds per frame per stage, peak RSS, growth with frames; "
                     "stitch fan-out over process workers", runs,
                     settings={"profile": args.profile, "device": args.device, "clip_size": list(size), "fps": 25,
                               "edit": "age=2", "set": args.settings},
                     growth=growth, stitch_workers=fan_out,
                     benchmark_seconds=round(time.perf_counter() - began, 1))


if __name__ == "__main__":
    main()
