"""The small helpers every layer shares: one home for each (the leaf of the import order).

Nothing here imports another spatlib module. What lives here:

* :class:`ConfigError` (re-exported by :mod:`spatlib.config`) and :func:`did_you_mean`;
* :func:`derive_seed`: every random stream of the kit is seeded from (seed, tags) this way;
* :func:`resolve_device`, :func:`device_of`, :func:`device_name`;
* :func:`eval_mode`: eval mode for a block, every submodule's own flag restored after;
* :func:`atomic_write_bytes` / :func:`atomic_write_text`: a reader (or a killed process) sees
  the old file or the new one, never half of one;
* provenance: :func:`utc_now`, :func:`git_commit`, :func:`sha256_file`.
"""
from __future__ import annotations

import contextlib
import datetime
import difflib
import hashlib
import os
import platform
import subprocess
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import torch
from torch import nn


class ConfigError(ValueError):
    """A parameter is unknown, of the wrong type, or out of range. The message names the key."""


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """``" (did you mean 'lr'?)"`` for the closest option, or ``""`` when none is close."""
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def derive_seed(seed: int, *tags) -> int:
    """A stable 63-bit seed for one random stream, from a seed and tags (names or numbers):
    the same on every platform, process and Python run (no ``hash()``)."""
    text = ":".join([str(int(seed)), *map(str, tags)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)


# --------------------------------------------------------------------------------------------
# devices
def resolve_device(spec: str | torch.device = "auto", local_rank: int = 0,
                   key: str = "device") -> torch.device:
    """``auto`` -> CUDA when available, else CPU (decided at call time, never at import);
    ``cuda`` -> this process's GPU (``local_rank`` under torchrun); ``cpu``, ``cuda:N``, ``mps``.
    A device that is not there is a :class:`ConfigError` naming ``key``."""
    if isinstance(spec, torch.device):
        return spec
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{key}: {spec!r} requested but CUDA is not available here; "
                          f"use 'auto' or 'cpu'")
    if spec == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{key}: 'mps' requested but it is not available here; use 'auto' or 'cpu'")
    if spec == "cuda":
        return torch.device("cuda", local_rank)
    try:
        return torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"{key}: {spec!r} is not a device; expected auto, cpu, cuda, cuda:N "
                          f"or mps") from None


def device_of(model: nn.Module) -> torch.device:
    """Where a model's parameters (or, without any, its buffers) live; CPU for an empty one."""
    t = next(iter(model.parameters()), None)
    if t is None:
        t = next(iter(model.buffers()), None)
    return t.device if t is not None else torch.device("cpu")


def device_name(device: torch.device) -> str:
    """The GPU's name, or ``cpu (x86_64)``: what provenance records."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()})"


@contextlib.contextmanager
def eval_mode(*models: nn.Module, train: bool = False) -> Iterator[None]:
    """Eval mode (or train mode with ``train=True``) inside the block; afterwards every
    submodule gets back its own flag, so a model in train mode with frozen BatchNorm stays so."""
    modes = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.train(train)
        yield
    finally:
        for m, training in modes:
            m.training = training


# --------------------------------------------------------------------------------------------
# files
def atomic_write_bytes(path: str | Path, data: bytes | Callable[[BinaryIO], None], *,
                       fsync: bool = True) -> None:
    """Write ``data`` (bytes, or a function that writes to the open file) through a temp file
    in the same folder, then ``os.replace``. ``fsync``: make it durable (checkpoints); caches
    that can be recomputed may skip it."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if fsync:
        with contextlib.suppress(OSError):  # make the rename itself durable (not on every OS)
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def atomic_write_text(path: str | Path, text: str, *, fsync: bool = True) -> None:
    """:func:`atomic_write_bytes` for text (UTF-8)."""
    atomic_write_bytes(path, text.encode(), fsync=fsync)


def remove_stale_temps(folder: str | Path, names: Iterable[str]) -> None:
    """Temp files that a process killed while writing left behind (``NAME.tmp.PID``)."""
    for name in names:
        for p in Path(folder).glob(f"{name}.tmp.*"):
            with contextlib.suppress(OSError):
                p.unlink()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# provenance
def utc_now() -> str:
    """Now, UTC, ISO 8601 to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def git_commit() -> str | None:
    """HEAD of the repository that holds the spatlib package, or None."""
    try:
        out = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None
