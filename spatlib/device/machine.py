"""The machine a device tool's figures belong to, and how its peak memory is measured: one
home for both, used by ``spat doctor`` (:mod:`spatlib.device.doctor`) and ``spat bench``
(:mod:`spatlib.device.bench`).

* :func:`machine_info`: the kit's provenance record (:func:`spatlib.util.provenance`: code,
  torch and CUDA versions, device, host, date) and the hardware beside it (the CPU's name and
  cores, torch's threads, the GPUs, their memory, cuDNN);
* :func:`read_machine`: a machine block as this release names its keys, also from a bench JSON
  of an earlier release (``torch``, ``spatlib``, ``cuda``, ``cudnn``, ``gpu``);
* :class:`PeakMemory`: the peak memory of a block above what was in use before it (CUDA:
  ``max_memory_allocated``; CPU: the kernel's peak-RSS mark, reset at the start);
* :func:`sync` and :func:`timed`: wall time of device work (CUDA kernels are asynchronous).
"""
from __future__ import annotations

import contextlib
import platform
import resource
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..util import cpu_count, provenance

__all__ = ["OLD_KEYS", "cpu_name", "machine_info", "read_machine", "PeakMemory", "sync", "timed"]

# the names a bench JSON of an earlier release gave these keys
OLD_KEYS = {"torch": "torch_version", "spatlib": "spatlib_version", "cuda": "cuda_version",
            "cudnn": "cudnn_version", "gpu": "device_name"}


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info(device: torch.device, threads: int | None = None) -> dict:
    """:func:`~spatlib.util.provenance` of ``device`` and the hardware beside it: ``cpu``,
    ``cpu_count``, ``torch_threads`` (``threads``, default torch's current count), ``python``,
    ``platform``, ``gpu_count``; on CUDA also ``gpu_memory_gb`` and ``cudnn_version``."""
    info = {**provenance(device), "cpu": cpu_name(), "cpu_count": cpu_count(),
            "torch_threads": threads if threads is not None else torch.get_num_threads(),
            "python": platform.python_version(), "platform": platform.platform(),
            "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
        info["cudnn_version"] = torch.backends.cudnn.version()
    return info


def read_machine(info: dict) -> dict:
    """A machine block with this release's key names: an earlier bench JSON's ``torch``,
    ``spatlib``, ``cuda``, ``cudnn`` and ``gpu`` (the GPU's name, on CUDA only) read as
    ``torch_version``, ``spatlib_version``, ``cuda_version``, ``cudnn_version`` and
    ``device_name``; a block that has the new name keeps its value."""
    out = dict(info)
    for old, new in OLD_KEYS.items():
        if old in out:
            value = out.pop(old)
            out.setdefault(new, value)
    return out


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); a no-op elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], device: torch.device) -> float:
    """Seconds ``fn()`` takes on ``device``: work queued before it finishes before the clock
    starts, and the clock stops when the work it queued is done."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def _status_kb(field: str) -> int | None:
    """A ``/proc/self/status`` field in kB (``VmRSS``, ``VmHWM``), None where there is none."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process to its RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """The peak memory of a ``with`` block above what was in use when it began, in MB.

    After the block: ``mb`` (the figure; None where nothing could be measured), ``peak_mb``
    (the peak itself), ``before_mb`` and ``method`` (how, in words). CUDA:
    ``max_memory_allocated`` during the block minus ``memory_allocated`` before it (tensors
    only, the caching allocator's reserve excluded). CPU: the kernel's peak-RSS mark, reset at
    the start, minus the RSS before; where the mark cannot be reset (not Linux), the process's
    ``ru_maxrss`` before and after, a lower bound. On the CPU an allocator keeps freed pages,
    so a block after a bigger one in the same process shows less than it needs: a figure per
    configuration wants a fresh process.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.mb: float | None = None
        self.peak_mb: float | None = None
        self.before_mb: float | None = None
        self.method = ""

    def __enter__(self) -> PeakMemory:
        before: float | None
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device) / 2**10
            self._peak_kb = lambda: torch.cuda.max_memory_allocated(self.device) / 2**10
            self.method = "cuda: max_memory_allocated - memory_allocated before"
        elif _reset_peak_rss() and _status_kb("VmHWM") is not None:
            before = _status_kb("VmRSS")
            self._peak_kb = lambda: _status_kb("VmHWM")
            self.method = "cpu: peak RSS - RSS before"
        else:
            before = _max_rss_kb()
            self._peak_kb = _max_rss_kb
            self.method = "cpu: ru_maxrss after - before (a lower bound)"
        self._before_kb = before
        return self

    def __exit__(self, *exc) -> None:
        sync(self.device)
        peak = self._peak_kb()
        if peak is not None and self._before_kb is not None:
            self.before_mb, self.peak_mb = self._before_kb / 1024, peak / 1024
            self.mb = max(peak - self._before_kb, 0) / 1024


def _max_rss_kb() -> int:
    """The process's peak RSS so far (``ru_maxrss``: kB on Linux), which nothing resets."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
