"""glibc's malloc told to keep the memory torch frees, for the tensors that follow.

On a CPU, torch takes each tensor's memory from the C library's ``malloc``. glibc serves every block over
32 MB (a 1024 px activation is 256 MB) with a fresh ``mmap`` and hands it back to the kernel when the tensor
is freed, so the next step's tensors fault in and zero their pages again. With ``mmap`` off for ``malloc``
(``M_MMAP_MAX`` 0) and the heap's free top kept (``M_TRIM_THRESHOLD`` 2 GB), freed blocks are reused as they
are. ``benchmarks/malloc.py`` (the demo on a 2-core VM, twice each): the run 284 → 219 s, PTI 148 → 106 s,
stitching 115 → 93 s, kernel time 158 → 4.5 s, the same video; peak RSS 3.7 → 4.2 GB (the heap holds its
high-water mark, and torch's aligned requests leave some freed blocks a little too small to reuse; the heap
stayed flat through 96 PTI steps). The heap still grows by ``mmap`` where ``brk`` cannot.
``STITCHTIME_KEEP_FREED_MEMORY=0`` leaves malloc as it is; on a GPU it is left as it is anyway.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1
"""Free memory at the heap's top is given back to the kernel only past this (``mallopt`` takes an int)."""


@functools.cache
def keep_freed_memory() -> bool:
    """Set glibc's malloc, once per process, to keep freed memory for reuse (the module docstring says why).

    Returns:
        True where the C library took both settings (glibc on Linux); False elsewhere, where nothing changes,
        and with ``STITCHTIME_KEEP_FREED_MEMORY=0``.
    """
    if not sys.platform.startswith("linux") or os.environ.get("STITCHTIME_KEEP_FREED_MEMORY") == "0":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # a C library without mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
