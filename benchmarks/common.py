"""What every benchmark script shares: one measurement per child process, and the JSON report."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any


def run_child(command: list[str]) -> dict[str, Any]:
    """Run one measurement in a fresh process (so its peak memory is its own); its last stdout line is JSON.

    Exits with the child's error output when it fails.
    """
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{' '.join(command[1:])} failed:\n{result.stderr}")
    run = json.loads(result.stdout.strip().splitlines()[-1])
    print(json.dumps(run), file=sys.stderr)
    return run


def write_report(out: Path, benchmark: str, runs: list[dict[str, Any]], **extra: Any) -> None:
    """Write the runs, what was measured and the machine to ``out`` as JSON."""
    report = {"benchmark": benchmark,
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "python": platform.python_version()},
              "runs": runs, **extra}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
