"""Deploy stitchtime's flows (``deployments/prefect.yaml``) to the Prefect server at ``PREFECT_API_URL``.

    python deployments/deploy.py [PREFECT DEPLOY OPTIONS...]

Creates the work pools the deployments name (``cpu`` and ``gpu``) as process pools when they do not
exist yet (an existing pool, e.g. a Kubernetes one, is left as it is) and the automations of
``deployments/automations.yaml`` that are not there yet (by name), then runs
``prefect --no-prompt deploy --all --prefect-file deployments/prefect.yaml`` from the repository root
with any further options passed on (e.g. ``--version 2026-05``). The pull step's ``$STITCHTIME_ROOT`` is
left for each worker to fill in: the folder of its stitchtime checkout.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml
from prefect.client.orchestration import get_client
from prefect.events.schemas.automations import AutomationCore

ROOT = Path(__file__).resolve().parents[1]
PREFECT_FILE = ROOT / "deployments" / "prefect.yaml"
AUTOMATIONS_FILE = ROOT / "deployments" / "automations.yaml"


def work_pools(prefect_file: Path = PREFECT_FILE) -> list[str]:
    """The work pools the deployments in ``prefect_file`` use, in order."""
    deployments = yaml.safe_load(prefect_file.read_text())["deployments"]
    return list(dict.fromkeys(d["work_pool"]["name"] for d in deployments))


def prefect(*args: str, quiet: bool = False) -> int:
    """Run the ``prefect`` command line from the repository root; its exit status.

    ``prefect deploy`` fills in ``{{ $STITCHTIME_ROOT }}`` from its own environment when it is set
    there; without it the placeholder is kept, and each worker fills it in from its environment.
    """
    env = {name: value for name, value in os.environ.items() if name != "STITCHTIME_ROOT"}
    return subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", *args], cwd=ROOT, env=env,
                          capture_output=quiet).returncode


def create_automations(automations_file: Path = AUTOMATIONS_FILE) -> None:
    """Create each automation of ``automations_file`` that the server has no automation of that name for."""
    with get_client(sync_client=True) as client:
        for data in yaml.safe_load(automations_file.read_text())["automations"]:
            automation = AutomationCore.model_validate(data)
            if not client.read_automations_by_name(automation.name):
                print(f"creating automation {automation.name!r}", file=sys.stderr)
                client.create_automation(automation)


def main(argv: list[str]) -> int:
    for pool in work_pools():
        if prefect("work-pool", "inspect", pool, quiet=True) != 0:
            print(f"creating work pool {pool!r} (process)", file=sys.stderr)
            if prefect("work-pool", "create", pool, "--type", "process") != 0:
                return 1
    create_automations()
    return prefect("deploy", "--all", "--prefect-file", str(PREFECT_FILE.relative_to(ROOT)), *argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
