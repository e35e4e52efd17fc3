"""The Prefect set-up of a ``stitchtime`` command: its settings, and the Prefect server it reports to.

A command reports to the server ``PREFECT_API_URL`` names, else to a temporary one of its own.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import IO

import click

from flows.edit_spec import check_deployment_name
from stitchtime_core.errors import StitchtimeError


def prepare_environment(store: str | None, verbose: bool) -> None:
    """Settings Prefect reads when it is imported: no telemetry, results under the data folder, quiet console."""
    from tasks.store import DEFAULT_STORE_DIR

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    local = DEFAULT_STORE_DIR if not store or store.startswith("s3://") else store.removeprefix("file://")
    os.environ.setdefault("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(Path(local, "prefect-results").resolve()))
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "stitchtime")
    logger = logging.getLogger("stitchtime")
    logger.setLevel(logging.INFO)
    if verbose:
        return  # Prefect's console handler prints everything, ours included
    # Prefect's own console lines (and its tracebacks for input errors we report in one line) are
    # hidden; they still reach the Prefect server's logs. Our stage lines go to stderr.
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("stitchtime: %(message)s"))
    logger.addHandler(handler)


_API_SETTINGS = contextlib.ExitStack()
"""Holds the temporary server's API URL as Prefect's setting until the process ends (never closed)."""


def use_prefect_api() -> None:
    """Report to the configured Prefect server, else to a temporary one of this command's own.

    Prefect would start a temporary server itself, but in the command's process group, where a
    terminal's Ctrl-C stops it too; the command then waited minutes to report the interrupted run to
    a dead server. This one is Prefect's own app under uvicorn with the UI off, as Prefect starts it,
    in a session of its own. It is stopped at exit, after Prefect has sent its last logs (atexit runs
    Prefect's later-registered handlers first), and on Linux also when the command is killed.
    """
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    if get_current_settings().api.url:
        return
    with socket.socket() as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        port = probe_socket.getsockname()[1]
    log = tempfile.TemporaryFile()
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app", "--host",
         "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"],
        env={**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1"},
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, preexec_fn=_die_with_parent)
    atexit.register(stop_process, server)
    url = f"http://127.0.0.1:{port}/api"
    _wait_for(url, server, log)
    _API_SETTINGS.enter_context(temporary_settings(updates={PREFECT_API_URL: url}))


def _wait_for(url: str, server: subprocess.Popen, log: IO[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and server.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    log.seek(0)
    last = log.read().decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
    raise click.ClickException(f"could not start a temporary Prefect server ({last[0]}); set PREFECT_API_URL "
                               "to a running one")


def _die_with_parent() -> None:
    """In the server's process, before it runs: SIGTERM when the command's process ends (Linux only)."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def stop_process(server: subprocess.Popen) -> None:
    """Ask a child process to end, and kill it after 10 s."""
    server.terminate()
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def check_deployment(name: str, *, otherwise: str) -> None:
    """Fail before any work when the deployment ``FLOW/NAME`` is not on the server this command reports to.

    Raises:
        StitchtimeError: no such deployment; the message ends with ``otherwise``, what the user can do instead.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    try:
        check_deployment_name(name)
    except ValueError as exc:
        raise StitchtimeError(f"{exc}; {otherwise}") from None
    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(name)
        except ObjectNotFound:
            server = PREFECT_API_URL.value() or "Prefect's temporary local server (PREFECT_API_URL is not set)"
            raise StitchtimeError(f"no deployment {name!r} on {server}; deploy it (see deployments/README.md) "
                                  f"or {otherwise}") from None
