"""What every benchmark script shares: one measurement per child process, peak memory, and the JSON report."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

CHANNELS = {"ffhq": dict(channel_base=32768, channel_max=512), "small": dict(channel_base=4096, channel_max=128),
            "tiny": dict(channel_base=1024, channel_max=64)}
"""StyleGAN2 channel layouts: the official network's, a narrower one for CPUs, and the tiny profile's."""


def run_child(command: list[str], *, keep_going: bool = False) -> dict[str, Any]:
    """Run one measurement in a fresh process (so its peak memory is its own); its last stdout line is JSON.

    Exits with the child's error output when it fails, or with ``keep_going`` returns ``{"failed": ...}``
    holding the end of that output, so that one failed measurement leaves the others' figures.
    """
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        if not keep_going:
            sys.exit(f"{' '.join(command[1:])} failed:\n{result.stderr}")
        run = {"command": command[2:], "failed": result.stderr[-3000:]}
    else:
        run = json.loads(result.stdout.strip().splitlines()[-1])
    print(json.dumps(run), file=sys.stderr)
    return run


def peak_memory(device: str) -> dict[str, float]:
    """This process's peak RSS and, on CUDA, the most memory torch has held on the GPU at once, in MB."""
    memory = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device == "cuda":
        import torch

        memory["peak_cuda_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return memory


def write_report(out: Path, benchmark: str, runs: list[dict[str, Any]], **extra: Any) -> None:
    """Write the runs, what was measured and the machine to ``out`` as JSON."""
    report = {"benchmark": benchmark,
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "python": platform.python_version()},
              "runs": runs, **extra}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
