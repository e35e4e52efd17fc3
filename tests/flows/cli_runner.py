"""Running the ``stitchtime`` command line in a subprocess, as a user would (shared by the flow tests)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def run_cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    """``python -m flows.cli ARGS`` in ``cwd`` with ``env``; output captured as text, 10 minutes at most."""
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)
