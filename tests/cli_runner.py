"""Running the ``stitchtime`` command line as a user would, a process of its own per command, with its
own arguments, environment and working folder (shared by the flow tests).

Each command's process is forked from a server process that has already imported the heavy libraries
(torch, torchvision, numpy, OpenCV, dlib, pyarrow, boto3): a command then starts in about a second instead of three,
which over the suite's hundred commands is minutes. The server imports none of our packages and not
Prefect, which reads its settings from the environment when it is imported; each command imports them
afresh, in its own environment, and runs ``python -m flows.cli`` as the shell would.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

_PRELOAD = ["torch", "torch._dynamo", "torchvision", "numpy", "scipy.ndimage", "cv2", "dlib", "pyarrow.parquet",
            "safetensors.torch", "boto3", "botocore.session"]
"""What the server imports once: libraries that read nothing of a command's environment on import
(``torch._dynamo``: what ``torch.optim`` imports at its first step; torchvision: what ``lpips`` imports)."""

multiprocessing.set_forkserver_preload(_PRELOAD)
_FORKSERVER = multiprocessing.get_context("forkserver")


def run_cli(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m flows.cli ARGS`` in ``cwd`` with exactly ``env``; output captured as text.

    Raises:
        subprocess.TimeoutExpired: the command ran for longer than ``timeout`` seconds (it is killed).
    """
    command = [sys.executable, "-m", "flows.cli", *args]
    with tempfile.TemporaryDirectory(prefix="stitchtime-cli-") as folder:
        out, err = Path(folder, "stdout"), Path(folder, "stderr")
        process = _FORKSERVER.Process(target=_command, args=(args, dict(env), str(cwd), str(out), str(err)))
        process.start()
        process.join(timeout)
        if process.exitcode is None:
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired(command, timeout, out.read_text(errors="replace"),
                                            err.read_text(errors="replace"))
        return subprocess.CompletedProcess(command, process.exitcode, out.read_text(errors="replace"),
                                           err.read_text(errors="replace"))


def _command(args: list[str], env: dict[str, str], cwd: str, out: str, err: str) -> None:
    """In the forked process: become ``python -m flows.cli ARGS`` run from ``cwd`` with ``env``, then exit
    as the interpreter would (atexit handlers included, which a multiprocessing child skips)."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 - the process's own streams, open until it exits
    sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
    sys.argv = ["flows.cli", *args]
    sys.path.insert(0, cwd)  # as `python -m` does
    code = 0
    try:
        runpy.run_module("flows.cli", run_name="__main__", alter_sys=True)
    except SystemExit as exc:  # as the interpreter: a number is the status, anything else is printed, status 1
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - as the interpreter: a traceback and status 1
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
