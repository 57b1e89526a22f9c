"""What follows the global step of a run: the learning rate, the training eps, the weights' EMA.

:func:`lr_at` and :func:`eps_at` are pure functions of the global step (0-based, counted in
batches of the epoch), so a resumed run needs no scheduler state and a timed slice of an epoch
(``spat bench``) still sees the epoch's schedule. :class:`EMA` is the exponential moving
average of the weights, its decay ramping with the number of updates (the count a checkpoint
keeps).
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from .config import ConfigError, TrainConfig

__all__ = ["lr_at", "eps_at", "EMA"]


def lr_at(tc: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Learning rate of global step ``step`` (0-based): schedule x linear warm-up."""
    total = tc.epochs * steps_per_epoch
    p = step / total                                   # fraction of training done
    if tc.schedule == "piecewise":                     # milestones are fractions of the epochs
        factor = tc.lr_decay ** sum(p >= m for m in tc.milestones)
    elif tc.schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * p))
    elif tc.schedule == "onecycle":                    # linear 0 -> lr over 30%, then -> 0
        factor = min((step + 1) / (0.3 * total), (total - step) / (0.7 * total))
    else:
        raise ConfigError(f"train.schedule: unknown schedule {tc.schedule!r}")
    if tc.warmup_epochs > 0:
        factor *= min(1.0, (step + 1) / (tc.warmup_epochs * steps_per_epoch))
    return tc.lr * factor


def eps_at(eps: float, warmup_epochs: float, step: int, steps_per_epoch: int) -> float:
    """Training eps at global step ``step``: linear from ~0 to ``eps`` over ``warmup_epochs``."""
    if warmup_epochs <= 0:
        return eps
    return eps * min(1.0, (step + 1) / (warmup_epochs * steps_per_epoch))


class EMA:
    """Exponential moving average of the weights; BatchNorm buffers copied from the model.

    The decay ramps up as min(decay, (1 + t) / (10 + t)) (TensorFlow's num_updates rule), so
    the average of a short run is not dominated by the random initialization.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step of the average towards ``model``'s weights."""
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(list(self.module.parameters()),
                             [p.detach() for p in model.parameters()], 1.0 - d)
        for mine, theirs in zip(self.module.buffers(), model.buffers()):
            mine.copy_(theirs)
