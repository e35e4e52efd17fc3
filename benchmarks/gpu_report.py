"""The GPU check's JSON as Markdown tables, for the README and a note.

    python benchmarks/gpu_report.py [benchmarks/results/gpu-check.json]

Prints: the machine; each part's status and seconds (with the last line of its log where it did not end
ok); stitching and PTI per frame by size and option, with each run's peak memory (GPU memory where
measured, else RSS) and the speed-ups against the reference (or naive) loop; synthesis per image; and the
pipeline's seconds per frame per stage. Reads only the JSON; runs nothing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


TASK_KEYS = ("part", "size", "method", "frames", "batch")
"""What names one of method.py's measurements (a failed one has nothing else)."""


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("" if cell is None else str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def memory(run: dict[str, Any]) -> str:
    if "peak_cuda_memory_mb" in run:
        return f"{run['peak_cuda_memory_mb']:.0f} MB GPU"
    return f"{run['peak_rss_mb']:.0f} MB RSS" if "peak_rss_mb" in run else ""


def option(run: dict[str, Any]) -> str:
    """How a run was made: fp32, bf16, channels_last, compile (several joined by +)."""
    flags = [run.get("dtype", "fp32")] + [name for name in ("channels_last", "compile") if run.get(name)]
    return "+".join(flags)


def last_line(log: str | None) -> str:
    lines = [line.strip() for line in (log or "").splitlines() if line.strip()]
    return lines[-1][:160].replace("|", "/") if lines else ""


def report(check: dict[str, Any]) -> str:
    machine = check["machine"]
    out = [f"Device `{check['device']}`: {machine.get('gpu', 'no GPU')}"
           + (f" ({machine['gpu_memory_mb'] / 1024:.0f} GiB)" if "gpu_memory_mb" in machine else "")
           + f", {machine.get('cores')} cores, Python {machine.get('python')}, torch {machine.get('torch')}"
           + (f", CUDA {machine['cuda']}" if machine.get("cuda") else "") + "."]
    parts = check["parts"]
    out.append(table(["part", "status", "s", "last log line where not ok"],
                     [[name, part["status"], part["seconds"], "" if part["status"] == "ok" else last_line(part["log"])]
                      for name, part in parts.items()]))
    methods = [part["result"] for name, part in parts.items() if name.startswith(("method-", "reference-"))
               and part["result"]]
    failed = [[name, ", ".join(f"{key} {value}" for key, value in run.items() if key in TASK_KEYS) or
               " ".join(run.get("command", [])), last_line(run["failed"])]
              for name, part in parts.items() if part["result"] for run in part["result"]["runs"] if "failed" in run]
    if failed:
        out.append("Measurements that failed (the last line of each one's error):")
        out.append(table(["part", "measurement", "error"], failed))
    measured = [run for result in methods for run in result["runs"] if "failed" not in run]
    stitch = [run for run in measured if run["part"] == "stitch"]
    if stitch:
        out.append("Stitching tuning, per frame (`benchmarks/method.py`):")
        out.append(table(["px", "method", "option", "frames", "batch", "steps", "s/frame", "boundary before → after",
                          "peak memory"],
                         [[run["size"], run["method"], option(run), run["frames"], run["batch"], run["steps"],
                           run["seconds_per_frame"],
                           f"{run['boundary_error_before']:.4f} → {run['boundary_error_after']:.4f}", memory(run)]
                          for run in stitch]))
    pti = [run for run in measured if run["part"] == "pti"]
    if pti:
        out.append("PTI, per frame seen:")
        out.append(table(["px", "method", "option", "frames", "batch", "s/frame seen", "peak memory"],
                         [[run["size"], run["method"], option(run), run["frames"], run["batch"],
                           run["seconds_per_frame_seen"], memory(run)] for run in pti]))
    speedups = [[summary["resolution"], kind.split("_")[0], name, value] for result in methods
                for summary in result["summary"] for kind in ("stitch_speedup", "pti_speedup")
                for name, value in (summary.get(kind) or {}).items() if value is not None]
    if speedups:
        out.append("Speed-ups (the first loop's seconds per frame over the second's, fp32):")
        out.append(table(["px", "", "loops", "×"], speedups))
    growth = [[summary["resolution"], kind.split("_")[0], " → ".join(map(str, by_frames["frames"])),
               " → ".join(map(str, by_frames["peak_mb"])), by_frames["growth_past_clip"]]
              for result in methods for summary in result["summary"]
              for kind in ("stitch_memory_by_frames", "pti_memory_by_frames")
              if (by_frames := summary.get(kind)) and by_frames.get("growth_past_clip") is not None]
    if growth:
        out.append("Peak memory as the clip grows (growth beyond the clip's own frames; 1.0 is flat):")
        out.append(table(["px", "", "frames", "peak MB", "growth"], growth))
    generator = [run for name, part in parts.items() if name.startswith("generator-") and part["result"]
                 for run in part["result"]["runs"] if "forward_seconds_per_image" in run]
    if generator:
        out.append("Synthesis, per image (`benchmarks/generator.py`):")
        out.append(table(["px", "option", "batch", "forward s", "forward+backward s", "peak memory"],
                         [[run["resolution"], option(run), run.get("batch", 1), run["forward_seconds_per_image"],
                           run["forward_backward_seconds_per_image"], memory(run)] for run in generator]))
    pipeline = (parts.get("pipeline") or {}).get("result")
    if pipeline:
        runs = [run for run in pipeline["runs"] if "seconds_per_frame" in run and "failed" not in run]
        stages = list(runs[0]["seconds_per_frame"]) if runs else []
        out.append("`stitchtime edit` end to end, seconds per frame (`benchmarks/pipeline.py`):")
        out.append(table(["frames", *stages, "peak memory"],
                         [[run["frames"], *(run["seconds_per_frame"].get(stage) for stage in stages), memory(run)]
                          for run in runs]))
    return "\n\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("check", type=Path, nargs="?", default=Path("benchmarks/results/gpu-check.json"))
    args = parser.parse_args()
    try:
        check = json.loads(args.check.read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"Error: {args.check}: cannot read the GPU check's JSON ({exc})") from None
    print(report(check), end="")


if __name__ == "__main__":
    main()
