"""Malloc keeps the memory torch frees: tensors the size of a 1024 px activation, freed and made again, find
their pages already there instead of faulting them in anew (Linux with glibc)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = """
import json, resource
import torch
from stitchtime_core.malloc import keep_freed_memory
kept = keep_freed_memory()
faults = []
for _ in range(24):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(64, 1024, 1024)  # 256 MB, touched
    y = x * 2
    del x, y
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": kept, "faults": faults}))
"""


def probe(**env: str) -> dict:
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    return json.loads(result.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_tensors_are_reused_without_faulting_their_pages_in_again() -> None:
    pages = 2 * 64 * 1024 * 1024 * 4 // os.sysconf("SC_PAGE_SIZE")  # x and y
    kept = probe()
    assert kept["kept"] is True
    assert kept["faults"][0] > pages / 2  # the first time, the pages come from the kernel
    # The heap grows in a few rounds (torch asks for aligned blocks, a little larger than the freed ones: 2 to 5.5
    # rounds' worth of pages in 30 tries here, sometimes as late as round 19); every other round is served from
    # pages the heap already holds.
    assert sum(faults < pages / 100 for faults in kept["faults"]) >= 16, kept
    default = probe(STITCHTIME_KEEP_FREED_MEMORY="0")
    assert default["kept"] is False
    assert min(default["faults"]) > pages / 2, default  # malloc as it is: mapped and unmapped every time
    assert sum(kept["faults"]) < sum(default["faults"]) / 3
