"""Keep freed memory in the process on CPU: the CPU's counterpart of CUDA's caching allocator.

glibc's malloc serves a large block (an activation or gradient tensor: megabytes) with
``mmap`` and gives it back to the kernel when it is freed; a block freed at the top of the heap
is trimmed back as well. An attack step allocates and frees the same activations every step, so
every step pays page faults to touch fresh pages again. Raising the mmap threshold to its
maximum (32 MiB on 64-bit) and the trim threshold to 2 GiB keeps those pages in the process
for the next step. Measured on the 2-core development CPU (2 threads, two processes each way):
a PGD step 1.11x faster on PreActResNet-18 (batch 32) and 1.15x on SmallCNN (batch 128), the
10-class ``input_grad`` class evidence of SmallCNN 1.35x (docs/benchmarks.md).

The price: the process keeps its peak working memory after it is freed, as a CUDA process
keeps its cached blocks. :func:`keep_freed_memory` is process-wide and lasts until the process
ends; the trainer and the robustness evaluation call it on CPU. ``SPAT_KEEP_FREED_MEMORY=0`` in
the environment turns it off. Only glibc (Linux) has these settings; elsewhere it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

__all__ = ["keep_freed_memory", "ENV_VAR"]

ENV_VAR = "SPAT_KEEP_FREED_MEMORY"
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3      # glibc <malloc.h>
MMAP_THRESHOLD = 32 * 2**20                      # glibc's largest (DEFAULT_MMAP_THRESHOLD_MAX, 64-bit)
TRIM_THRESHOLD = 2**31 - 1                       # mallopt takes an int: trim only past 2 GiB free

_in_force: bool | None = None      # the outcome of the one mallopt attempt of this process


def _enabled() -> bool:
    value = os.environ.get(ENV_VAR, "1").strip().lower()
    if value in ("1", "true", "yes", "on", ""):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{ENV_VAR}: expected 1 or 0 (true/false), got {os.environ[ENV_VAR]!r}")


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed blocks in the process (see the module docstring).

    Idempotent. Returns True when the settings are in force, False when turned off by
    ``SPAT_KEEP_FREED_MEMORY=0`` or when the C library is not glibc. An invalid value of that
    variable raises ValueError naming it.
    """
    global _in_force
    if not _enabled():
        return False
    if _in_force is not None:
        return _in_force
    ok = False
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            ok = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
                bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
        except (OSError, AttributeError):
            ok = False
    _in_force = ok
    return ok
