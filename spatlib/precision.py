"""A run's arithmetic on its device: the precision, autocast, and deterministic kernels.

``train.precision: auto`` is bf16 on CUDA and fp32 elsewhere (:func:`resolve_precision`);
:func:`autocast` is ``torch.autocast`` at that precision and a ``nullcontext`` in fp32 (the
attacks keep their own arithmetic in float32 either way: :mod:`spatlib.attacks`);
:func:`backend_flags` turns deterministic kernels on (``train.deterministic``) or lets cuDNN
autotune, and gives the caller's flags back afterwards. The trainer, ``spat bench`` and
``spat doctor`` all take a run's precision from here, so the three measure the same thing.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import ContextManager

import torch

__all__ = ["AMP_DTYPES", "resolve_precision", "autocast", "backend_flags"]

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 on CUDA, fp32 elsewhere."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast(precision: str, device: torch.device) -> ContextManager:
    """Autocast at ``precision`` (a resolved one: bf16, fp16 or fp32) on ``device``'s type; a
    no-op context in fp32."""
    dtype = AMP_DTYPES[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


@contextlib.contextmanager
def backend_flags(deterministic: bool, device: torch.device) -> Iterator[None]:
    """Deterministic kernels (or cuDNN autotuning on CUDA) inside the block; the caller's
    flags come back after."""
    prev = (torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.benchmark)
    try:
        if deterministic:
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        elif device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        yield
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
        torch.backends.cudnn.benchmark = prev[2]
