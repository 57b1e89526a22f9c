"""The trainer: standard, PGD-AT, TRADES, MART, SPAT-AT and SPAT-TRADES in one loop.

``train(config, run_dir)`` trains one run and writes its folder::

    config.yaml          the resolved config (RunConfig.to_yaml())
    history.csv          one row per epoch (HISTORY_COLUMNS)
    checkpoint_last.pt   every epoch, written atomically: everything an exact resume needs
    checkpoint_best.pt   the epoch of best validation accuracy (Rice et al. early stopping)
    metrics.json         at the end: test accuracy of the selected model + provenance

The six methods differ only in which attack crafts the training examples (none, PGD or SPAT),
what that attack ascends (cross-entropy or TRADES' KL) and the training loss: ``METHODS`` is that
table, and one loop runs all of them (DESIGN.md, "Trainer" and "The SPAT attack" step 5).

Resuming: a run folder that holds ``checkpoint_last.pt`` continues from the epoch after it (the
config must match, cosmetic keys aside); one that holds ``metrics.json`` is finished and is
returned as is. Batches, augmentation, attack noise and validation noise all come from explicit
generators seeded by ``config.seed``, so with ``train.deterministic`` a killed and resumed run
ends with exactly the metrics of an uninterrupted one. Under ``torchrun`` (``WORLD_SIZE`` > 1)
each process takes its slice of every global batch and DDP averages the gradients.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import datetime
import hashlib
import io
import json
import math
import os
import platform
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from . import allocator, attacks
from .config import ConfigError, RunConfig, TrainConfig, format_eps, from_dict, load_config, to_dict
from .data import (DataError, Dataset, DeviceLoader, augmentation_defaults, dataset_from_config,
                   split_validation)
from .models import model_from_config

__all__ = ["train", "load_checkpoint", "load_run_model", "main", "cli_main", "METHODS", "Method",
           "CheckpointError", "TrainingDivergedError", "lr_at", "eps_at", "trades_loss",
           "mart_loss", "kl_divergence", "config_diff", "HISTORY_COLUMNS"]

# --------------------------------------------------------------------------------------------
# file names and fixed settings
CHECKPOINT_FORMAT = "spatlib-checkpoint/1"
LAST, BEST = "checkpoint_last.pt", "checkpoint_best.pt"
HISTORY, METRICS, CONFIG = "history.csv", "metrics.json", "config.yaml"
VAL_FALLBACK = 512        # test images used for validation when data.val_size is 0
# Methods that never see f(x) (PGD-AT; SPAT-AT when its class evidence did not run f(x) in eval
# mode) measure the clean training accuracy with one more forward (eval mode, no grad) on every
# CLEAN_ACC_EVERY-th batch of an epoch, from the first: an unbiased estimate over a quarter of
# the batches, for a quarter of the cost (that forward was 4% of a PGD-10 step on CPU).
CLEAN_ACC_EVERY = 4
SYNC_EVERY = 50           # batches between host syncs (progress postfix + NaN check)
TEST_STEPS = 20           # final PGD-20 with alpha = eps / 4
# keys that do not change what a run computes: a resume may differ in them
# keys that do not change what is trained: a run resumes (or is reused) across them. "eval."
# covers the whole section: evaluation settings (03 re-evaluates with its own cache key) never
# change the weights
COSMETIC_KEYS = ("name", "train.progress", "train.device", "data.root", "data.download", "eval.")
HISTORY_COLUMNS = ["epoch", "lr", "eps", "train_loss", "train_clean_acc", "train_adv_acc",
                   "val_clean_acc", "val_robust_acc", "ema_val_clean_acc", "ema_val_robust_acc",
                   "val_source", "epoch_time_s", "images_per_s", "wall_time_s"]
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


class CheckpointError(ValueError):
    """A checkpoint (or run folder) is unreadable, not a spatlib checkpoint, does not fit the
    model, or belongs to a different config. The message names the file."""


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN or infinite; checkpoint_last.pt keeps the last good epoch."""


# --------------------------------------------------------------------------------------------
# the losses (logits (N, K), labels (N,)); computed in float32 even under autocast
def kl_divergence(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """KL(softmax(logits_p) || softmax(logits_q)) per example, (N,)."""
    log_p = F.log_softmax(logits_p.float(), dim=1)
    log_q = F.log_softmax(logits_q.float(), dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(1)


def trades_loss(clean: Tensor, adv: Tensor, y: Tensor, beta: float) -> Tensor:
    """TRADES (Zhang et al. 2019): CE(f(x), y) + beta * KL(f(x) || f(x_adv)), batch mean."""
    return F.cross_entropy(clean.float(), y) + beta * kl_divergence(clean, adv).mean()


def mart_loss(clean: Tensor, adv: Tensor, y: Tensor, beta: float) -> Tensor:
    """MART (Wang et al. 2020, eq. 6), batch mean of

    BCE(p(x'), y) + beta * KL(p(x) || p(x')) * (1 - p_y(x)),
    BCE(p(x'), y) = -log p_y(x') - log(1 - max_{k != y} p_k(x')).

    The 1e-4 inside the second log is the authors' (log(1.0001 - p)): it bounds the gradient
    when the strongest wrong class takes all the probability.
    """
    p_adv = F.softmax(adv.float(), dim=1)
    wrong_max = p_adv.scatter(1, y.view(-1, 1), 0.0).amax(1)
    bce = F.cross_entropy(adv.float(), y, reduction="none") - torch.log(1.0001 - wrong_max)
    p_true = F.softmax(clean.float(), dim=1).gather(1, y.view(-1, 1)).squeeze(1)
    return (bce + beta * kl_divergence(clean, adv) * (1.0 - p_true)).mean()


def _ce_adv(clean: Tensor | None, adv: Tensor | None, y: Tensor, beta: float) -> Tensor:
    return F.cross_entropy(adv.float(), y)


def _ce_clean(clean: Tensor | None, adv: Tensor | None, y: Tensor, beta: float) -> Tensor:
    return F.cross_entropy(clean.float(), y)


@dataclass(frozen=True)
class Method:
    """A training method: the attack that crafts its examples and the loss it minimizes."""
    attack: str | None      # None (clean training), "pgd" or "spat"
    attack_loss: str        # what the attack ascends: "ce", or "kl" (TRADES, from a 0.001 N(0,1) start)
    needs_clean: bool       # the loss uses f(x) (trained on, with gradient)
    loss: Callable[[Tensor | None, Tensor | None, Tensor, float], Tensor]  # (f(x), f(x_adv), y, beta)


METHODS: dict[str, Method] = {
    "standard": Method(None, "ce", True, _ce_clean),
    "pgd_at": Method("pgd", "ce", False, _ce_adv),            # Madry et al. 2018
    "trades": Method("pgd", "kl", True, trades_loss),         # Zhang et al. 2019
    "mart": Method("pgd", "ce", True, mart_loss),             # Wang et al. 2020
    "spat_at": Method("spat", "ce", False, _ce_adv),
    "spat_trades": Method("spat", "kl", True, trades_loss),
}


# --------------------------------------------------------------------------------------------
# schedules: pure functions of the global step, so a resumed run needs no scheduler state
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


# --------------------------------------------------------------------------------------------
# small helpers
def _derive_seed(seed: int, *tags) -> int:
    """A stable 63-bit seed for one random stream (same on every platform and process)."""
    text = ":".join([str(int(seed)), *map(str, tags)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def config_diff(old: dict, new: dict, ignore: tuple[str, ...] = COSMETIC_KEYS) -> list[str]:
    """Dotted keys whose values differ between two config dicts, as ``key: old -> new``."""
    a, b = _flatten(old or {}), _flatten(new or {})
    return [f"{k}: {a.get(k, '<missing>')!r} -> {b.get(k, '<missing>')!r}"
            for k in sorted(set(a) | set(b))
            if not any(k == i or (i.endswith(".") and k.startswith(i)) for i in ignore)
            and a.get(k) != b.get(k)]


def _check_same_run(saved: dict, requested: dict, path: Path) -> None:
    diff = config_diff(saved, requested)
    if diff:
        raise CheckpointError(
            f"{path} belongs to a run with a different config; differing keys: {'; '.join(diff)}. "
            f"Use another run folder, or delete {path.parent} to start this run afresh.")


def _as_config(config: RunConfig | dict) -> RunConfig:
    """Validate (again: a RunConfig may have been edited in place) and return a RunConfig."""
    if isinstance(config, RunConfig):
        return from_dict(to_dict(config))
    if isinstance(config, dict):
        return from_dict(config)
    raise TypeError(f"config: expected a RunConfig or a dict, got {type(config).__name__}")


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> cuda if available else cpu; ``cuda`` -> this process's GPU under torchrun."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {spec!r} requested but CUDA is not available here; "
                          f"use 'auto' or 'cpu'")
    if spec == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("train.device: 'mps' requested but it is not available here; use 'auto' or 'cpu'")
    if spec == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(spec)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 on CUDA, fp32 elsewhere."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def _autocast(precision: str, device: torch.device):
    dtype = AMP_DTYPES[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def _git_commit() -> str | None:
    """HEAD of the repository that holds the spatlib package, or None."""
    try:
        out = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()})"


def _spatlib_version() -> str | None:
    from . import __version__  # the package itself: no import cycle at call time
    return __version__


def _atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write through a temp file in the same folder, fsync, then os.replace: a reader (or a
    killed run) sees the old file or the new one, never a partial one."""
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (not on every OS)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda f: f.write(text.encode()))


def _remove_stale_temps(run_dir: Path) -> None:
    """Temp files of a run killed while writing (their pid is gone with it)."""
    for name in (LAST, BEST, HISTORY, METRICS, CONFIG):
        for p in run_dir.glob(f"{name}.tmp.*"):
            with contextlib.suppress(OSError):
                p.unlink()


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else repr(v)
    return str(v)


def _history_csv(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([_fmt(r.get(c, float("nan"))) for c in columns])
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# checkpoints
def _model_info(model: nn.Module) -> str:
    classifier = getattr(model, "classifier", None)
    k = classifier.out_features if isinstance(classifier, nn.Linear) else "?"
    return f"{type(model).__name__} with {k} classes"


def load_checkpoint(path: str | Path, model: nn.Module | None = None, *, weights: str = "model",
                    map_location: str | torch.device = "cpu") -> dict:
    """Read a spatlib checkpoint (``torch.load(weights_only=True)``) and optionally load weights.

    ``weights``: which state to load into ``model``: ``"model"`` (raw weights), ``"ema_model"``
    or ``"selected"`` (what model selection used: the EMA when the run kept one).
    Raises :class:`CheckpointError` naming the file when it is missing, truncated, corrupt, not a
    spatlib checkpoint, or when its weights do not fit ``model`` (architecture / classes).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, random bytes, a pickle of arbitrary objects, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: cannot be read as a checkpoint (truncated or corrupt file?): "
            f"{type(e).__name__}: {first}. Delete it to restart the run from scratch.") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or "model" not in ckpt:
        raise CheckpointError(f"{path}: not a spatlib checkpoint (expected a dict with "
                              f"format {CHECKPOINT_FORMAT!r} and model weights)")
    if model is not None:
        _load_weights(model, ckpt, weights, path)
    return ckpt


def _load_weights(model: nn.Module, ckpt: dict, weights: str, path: Path) -> None:
    key = ckpt.get("selected", "model") if weights == "selected" else weights
    state = ckpt.get(key)
    if state is None:
        raise CheckpointError(f"{path}: holds no {key!r} weights"
                              + (" (the run kept no EMA: train.ema was 0)" if key == "ema_model" else ""))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        saved = ckpt.get("model_info", {})
        lines = str(e).strip().splitlines()
        detail = "; ".join(ln.strip() for ln in lines[1:4]) or lines[0]
        raise CheckpointError(
            f"{path}: its weights do not fit this model. The checkpoint was saved for "
            f"{saved.get('name', '?')} ({saved.get('num_classes', '?')} classes, "
            f"{saved.get('in_channels', '?')} input channels); the model given is "
            f"{_model_info(model)}. Build the model from the checkpoint's config "
            f"(load_run_model). Details: {detail}") from None


# --------------------------------------------------------------------------------------------
# distributed (torchrun) plumbing; a single process is world size 1 and every call is a no-op
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: Tensor, op: str = "sum") -> Tensor:
        if self.world > 1:
            import torch.distributed as dist
            dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist
            dist.barrier()

    def broadcast_buffers(self, module: nn.Module) -> None:
        """Rank 0's BatchNorm statistics everywhere (DDP runs with broadcast_buffers=False)."""
        if self.world > 1:
            import torch.distributed as dist
            for b in module.buffers():
                dist.broadcast(b, 0)

    def gather_object(self, obj) -> list:
        if self.world == 1:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        if self.world == 1:
            return obj
        import torch.distributed as dist
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self, barrier: bool = True) -> None:
        """End the group we started; no barrier after an error (the others may never come)."""
        if self.owns_group:
            import torch.distributed as dist
            if barrier:
                dist.barrier()
            dist.destroy_process_group()


def _init_distributed(device_spec: str) -> tuple[_Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist(), resolve_device(device_spec)
    import torch.distributed as dist
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_spec, local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), owns), device


# --------------------------------------------------------------------------------------------
class _EMA:
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
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(list(self.module.parameters()),
                             [p.detach() for p in model.parameters()], 1.0 - d)
        for mine, theirs in zip(self.module.buffers(), model.buffers()):
            mine.copy_(theirs)


@contextlib.contextmanager
def _backend_flags(deterministic: bool, device: torch.device):
    """Deterministic kernels (or cuDNN autotuning) for the run; the caller's flags come back."""
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


class _Trainer:
    """One run: data, model, optimizer and the loop. Built fully (and checked) before any file
    is written or any step is taken."""

    def __init__(self, cfg: RunConfig, run_dir: Path, device: torch.device, dist: _Dist,
                 show_progress: bool):
        tc = self.tc = cfg.train
        self.cfg, self.run_dir, self.device, self.dist = cfg, run_dir, device, dist
        self.method = METHODS[tc.method]
        self.precision = resolve_precision(tc.precision, device)
        self.show = show_progress
        self.requested = to_dict(cfg)
        if tc.nesterov and tc.momentum == 0:
            raise ConfigError("train.nesterov: Nesterov momentum needs train.momentum > 0")
        if tc.batch_size < dist.world:
            raise ConfigError(f"train.batch_size: {tc.batch_size} is smaller than the number of "
                              f"processes ({dist.world}); the global batch is split across them")

        # data: a held-out validation slice of the training images (or the test prefix)
        ds = self.dataset = dataset_from_config(cfg.data)
        n_train = len(ds.y_train)
        if cfg.data.val_size > 0:
            if cfg.data.val_size >= n_train:
                raise ConfigError(f"data.val_size: {cfg.data.val_size} leaves no training images "
                                  f"({cfg.data.name} has {n_train} after train_limit)")
            x_tr, y_tr, self.x_val, self.y_val = split_validation(
                ds.x_train, ds.y_train, cfg.data.val_size, cfg.seed)
            self.val_source = "train_holdout"
        else:
            x_tr, y_tr = ds.x_train, ds.y_train
            self.x_val, self.y_val = ds.x_test[:VAL_FALLBACK], ds.y_test[:VAL_FALLBACK]
            self.val_source = f"test[:{len(self.y_val)}]"
        if len(self.y_val) == 0:
            raise ConfigError("data.val_size: 0 and the test split is empty: nothing to validate on")
        self.channels_last = tc.channels_last and device.type == "cuda"
        if device.type == "cpu":
            allocator.keep_freed_memory()   # attack steps reuse their pages (spatlib.allocator)
        aug = (augmentation_defaults(cfg.data.name, tuple(ds.x_train.shape[1:])) if cfg.data.augment
               else {"pad": 0, "flip": False})
        self.loader = DeviceLoader(x_tr, y_tr, tc.batch_size, device=device, shuffle=True,
                                   seed=cfg.seed, drop_last=False, channels_last=self.channels_last,
                                   pad=aug["pad"], flip=aug["flip"])
        n_batches = len(self.loader)
        tail = len(y_tr) % tc.batch_size
        if dist.world > 1 and 0 < tail < dist.world:
            n_batches -= 1  # a last batch too small to give every process an image
        if tc.max_batches is not None:
            n_batches = min(n_batches, tc.max_batches)
        if n_batches < 1:
            raise ConfigError(f"train.batch_size: {tc.batch_size} gives no full batch for "
                              f"{dist.world} processes from {len(y_tr)} training images")
        self.n_batches = n_batches

        # model: seeded init on the CPU, checked against the data before anything runs
        model = self._build_model()
        model.to(device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        self.ema = _EMA(model, tc.ema) if tc.ema > 0 else None
        self.opt = torch.optim.SGD(model.parameters(), lr=tc.lr, momentum=tc.momentum,
                                   weight_decay=tc.weight_decay, nesterov=tc.nesterov)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        # the training forward/backward goes through DDP and torch.compile; the attack and the
        # evaluation use the plain module (same parameters), so the attack loop stays eager
        fwd: nn.Module = model
        if dist.world > 1:
            import inspect

            from torch.nn.parallel import DistributedDataParallel as DDP
            # BN statistics are synced by hand before validation, not at every forward
            no_sync = ({"forward_sync_buffers": False}
                       if "forward_sync_buffers" in inspect.signature(DDP).parameters
                       else {"broadcast_buffers": False})
            fwd = DDP(model, device_ids=[device] if device.type == "cuda" else None, **no_sync)
        self.fwd = torch.compile(fwd) if tc.compile else fwd
        self.attack_gen = torch.Generator(device=device).manual_seed(
            _derive_seed(cfg.seed, "attack", dist.rank))
        self._rng_state: dict | None = None  # per-process RNG states to restore (resume)

        # run state (what a checkpoint holds besides the weights)
        self.epoch = 0              # completed epochs
        self.finished = False       # training loop done (all epochs, or early stop)
        self.stopped_early = False
        self.history: list[dict] = []
        self.best = {"epoch": 0, "metric": -1.0, "val_clean_acc": float("nan"),
                     "val_robust_acc": float("nan"), "evals_since_best": 0}
        self.elapsed_s = 0.0        # wall time of finished epochs, across sessions
        self.train_time_s = 0.0     # time inside the training loop only
        self.images_seen = 0
        self.started_at = _now()
        self.columns = [c for c in HISTORY_COLUMNS if self.ema or not c.startswith("ema_")]

    # -- checks ---------------------------------------------------------------------------
    def _build_model(self) -> nn.Module:
        """The seeded model, after one forward pass on two training images (on the CPU)."""
        ds, cfg = self.dataset, self.cfg
        x = ds.x_train[:2].float().div(255)
        try:
            model = model_from_config(cfg.model, ds, seed=cfg.seed)
            with torch.no_grad():
                model.eval()
                out = model(x)
                model.train()
        except (ValueError, RuntimeError) as e:
            raise ConfigError(f"model.name: {cfg.model.name!r} cannot take data.name "
                              f"{cfg.data.name!r} images of shape {tuple(x.shape[1:])}: {e}") from None
        if tuple(out.shape) != (len(x), ds.num_classes):
            raise ConfigError(f"model.name: {cfg.model.name!r} gives logits of shape {tuple(out.shape)} "
                              f"for {ds.num_classes} classes")
        return model

    # -- state ----------------------------------------------------------------------------
    def state(self, kind: str) -> dict:
        """The checkpoint dict (tensors, dicts, lists, numbers, strings only)."""
        rng = {"attack": self.attack_gen.get_state(), "torch_cpu": torch.get_rng_state(),
               "torch_cuda": (torch.cuda.get_rng_state(self.device)
                              if self.device.type == "cuda" else None)}
        ds = self.dataset
        state = {
            "format": CHECKPOINT_FORMAT, "kind": kind, "epoch": self.epoch,
            "finished": self.finished, "stopped_early": self.stopped_early,
            "model": self.model.state_dict(),
            "ema_model": self.ema.module.state_dict() if self.ema else None,
            "ema_updates": self.ema.updates if self.ema else 0,
            "selected": "ema_model" if self.ema else "model",
            "best": dict(self.best), "config": self.requested,
            "model_info": {"name": self.cfg.model.name, "num_classes": ds.num_classes,
                           "in_channels": ds.in_channels, "image_size": list(ds.image_size)},
            "spatlib_version": _spatlib_version(), "torch_version": str(torch.__version__),
        }
        if kind == "last":
            state.update({
                "optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict(),
                # one entry per process: each has its own attack noise stream
                "rng": self.dist.gather_object(rng), "history": self.history,
                "elapsed_s": self.elapsed_s, "train_time_s": self.train_time_s,
                "images_seen": self.images_seen, "started_at": self.started_at,
            })
        return state

    def restore(self, ckpt: dict, path: Path) -> None:
        """Continue from a checkpoint_last.pt dict (config already checked)."""
        _load_weights(self.model, ckpt, "model", path)
        if self.ema:
            _load_weights(self.ema.module, ckpt, "ema_model", path)
            self.ema.updates = int(ckpt["ema_updates"])
        try:
            self.opt.load_state_dict(ckpt["optimizer"])
            self.scaler.load_state_dict(ckpt["scaler"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: optimizer state does not fit this run: {e}") from None
        self.epoch, self.finished = int(ckpt["epoch"]), bool(ckpt["finished"])
        self.stopped_early = bool(ckpt.get("stopped_early", False))
        self.history = list(ckpt["history"])
        self.best = dict(ckpt["best"])
        self.elapsed_s, self.train_time_s = float(ckpt["elapsed_s"]), float(ckpt["train_time_s"])
        self.images_seen, self.started_at = int(ckpt["images_seen"]), ckpt["started_at"]
        rng = ckpt["rng"]
        if len(rng) == self.dist.world:
            self._rng_state = rng[self.dist.rank]
        else:
            warnings.warn(f"{path}: saved by {len(rng)} process(es), resumed by {self.dist.world}: "
                          f"attack noise is reseeded, so the result will differ from an "
                          f"uninterrupted run", stacklevel=3)

    # -- the loop -------------------------------------------------------------------------
    def amp(self):
        return _autocast(self.precision, self.device)

    def _batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """This process's slice of each global batch (all of it in a single process)."""
        d = self.dist
        for i, (x, y) in enumerate(self.loader):
            if i >= self.n_batches:
                return
            yield (x, y) if d.world == 1 else (x[d.rank::d.world], y[d.rank::d.world])

    def _attack(self, eps: float) -> attacks.PGD:
        a = self.cfg.attack
        alpha = a.alpha * eps / a.eps if a.eps > 0 else a.alpha   # eps warm-up scales alpha alike
        # TRADES starts at x + 0.001 N(0, 1) whatever attack.random_start says: at x itself the
        # KL to f(x) is at its minimum, its gradient is exactly 0 and sign steps never move
        start = "normal" if self.method.attack_loss == "kl" else a.random_start
        return attacks.make_attack("spat" if self.method.attack == "spat" else "pgd", self.model,
                                   eps=eps, alpha=alpha, steps=a.steps, random_start=start,
                                   loss=self.method.attack_loss, bn_mode=a.bn_mode,
                                   generator=self.attack_gen, rule=a.rule, saliency=a.saliency,
                                   gamma=a.gamma, classes=a.classes, class_chunk=a.class_chunk,
                                   refresh=a.refresh)

    def train_epoch(self, epoch: int, bar_factory) -> dict:
        tc, model, dev = self.tc, self.model, self.device
        self.loader.set_epoch(epoch)
        model.train()
        # device-side sums: the only host syncs are the periodic logging ones
        loss_sum = torch.zeros((), device=dev)
        clean_ok = torch.zeros((), device=dev, dtype=torch.long)
        adv_ok = torch.zeros((), device=dev, dtype=torch.long)
        bad_batch = torch.full((), -1, device=dev, dtype=torch.long)
        bad_loss = torch.zeros((), device=dev)
        n_seen = n_clean = 0
        lr = eps = 0.0
        bar = bar_factory(total=self.n_batches, leave=False, desc=f"epoch {epoch + 1}")
        t0 = time.perf_counter()
        for i, (x, y) in enumerate(self._batches()):
            step = epoch * self.n_batches + i
            lr = lr_at(tc, step, self.n_batches)
            for group in self.opt.param_groups:
                group["lr"] = lr
            x_adv = clean_logits = None
            if self.method.attack is not None:
                eps = eps_at(self.cfg.attack.eps, tc.eps_warmup_epochs, step, self.n_batches)
                attack = self._attack(eps)
                # SPAT's class evidence runs f(x) with BN in eval mode: its logits give the
                # clean accuracy at no cost; else one more forward, BN in eval mode, no grad
                with self.amp():
                    result = attack.run(x, y)
                x_adv = result.x_adv
                if not self.method.needs_clean:
                    clean_logits = result.clean_logits
                    if clean_logits is None and i % CLEAN_ACC_EVERY == 0:
                        model.eval()
                        with torch.no_grad(), self.amp():
                            clean_logits = model(x)
                        model.train()
            self.opt.zero_grad(set_to_none=True)
            with self.amp():
                if self.method.needs_clean:
                    clean_logits = self.fwd(x)
                adv_logits = self.fwd(x_adv) if x_adv is not None else None
                loss = self.method.loss(clean_logits, adv_logits, y, tc.beta)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
            if self.ema:
                self.ema.update(model)
            with torch.no_grad():
                loss_value = loss.detach().float()
                loss_sum += loss_value * len(y)
                if clean_logits is not None:
                    clean_ok += (clean_logits.detach().argmax(1) == y).sum()
                    n_clean += len(y)
                if adv_logits is not None:
                    adv_ok += (adv_logits.detach().argmax(1) == y).sum()
                first_bad = ~torch.isfinite(loss_value) & (bad_batch < 0)
                bad_batch = torch.where(first_bad, i, bad_batch)
                bad_loss = torch.where(first_bad, loss_value, bad_loss)
            n_seen += len(y)
            bar.update(1)
            if (i + 1) % SYNC_EVERY == 0 or i + 1 == self.n_batches:
                self._check_finite(epoch, bad_batch, bad_loss, lr)
                if self.show:
                    bar.set_postfix(loss=f"{(loss_sum / n_seen).item():.4f}")
        bar.close()
        sums = torch.stack([loss_sum, clean_ok.float(), adv_ok.float(),
                            torch.full((), float(n_seen), device=dev),
                            torch.full((), float(n_clean), device=dev)])
        loss_sum_, clean_ok_, adv_ok_, n_, n_clean_ = self.dist.all_reduce(sums).tolist()
        seconds = time.perf_counter() - t0
        self.train_time_s += seconds
        self.images_seen += int(n_)
        return {"lr": lr, "eps": eps, "train_loss": loss_sum_ / n_,
                "train_clean_acc": clean_ok_ / n_clean_ if n_clean_ else float("nan"),
                "train_adv_acc": adv_ok_ / n_ if self.method.attack else float("nan"),
                "images_per_s": n_ / seconds}

    def _check_finite(self, epoch: int, bad_batch: Tensor, bad_loss: Tensor, lr: float) -> None:
        flag = self.dist.all_reduce(bad_batch.clone(), op="max")
        batch, value, any_bad = torch.stack([bad_batch.float(), bad_loss, flag.float()]).tolist()
        if any_bad >= 0:
            where = f"batch {int(batch) + 1}" if batch >= 0 else "a batch on another process"
            last = self.run_dir / LAST
            kept = (f"{last} keeps the weights of epoch {self.epoch}" if self.epoch
                    else "no epoch had finished, so no checkpoint was written")
            raise TrainingDivergedError(
                f"training diverged in epoch {epoch + 1}, {where}: loss = {value}; {kept}. "
                f"Lower train.lr (now {self.tc.lr:g}, {lr:g} at that step) or ramp eps up with "
                f"train.eps_warmup_epochs (now {self.tc.eps_warmup_epochs:g}).")

    def evaluate(self, model: nn.Module, x_u8: Tensor, y: Tensor, *, eps: float, alpha: float,
                 steps: int, tag: str, amp: bool) -> tuple[float, float]:
        """(clean accuracy, PGD accuracy) on uint8 images; robust = clean-correct and adv-correct.

        The PGD noise comes from a fresh generator per call, so the numbers do not depend on
        what ran before (resume). Under torchrun each process takes a slice and counts add up.
        """
        d, dev, bs = self.dist, self.device, self.cfg.eval.batch_size
        x_u8, y = x_u8[d.rank::d.world], y[d.rank::d.world]
        gen = torch.Generator(device=dev).manual_seed(_derive_seed(self.cfg.seed, tag))
        attack = (attacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True,
                              loss="ce", bn_mode="eval", generator=gen)
                  if eps > 0 and steps > 0 else None)
        ctx = self.amp if amp else contextlib.nullcontext
        was_training = model.training
        model.eval()
        clean_ok = torch.zeros((), device=dev, dtype=torch.long)
        robust_ok = torch.zeros((), device=dev, dtype=torch.long)
        try:
            for i in range(0, len(y), bs):
                xb = x_u8[i:i + bs].to(dev).float().div_(255)
                yb = y[i:i + bs].to(dev)
                with torch.no_grad(), ctx():
                    ok = model(xb).argmax(1) == yb
                robust = ok
                if attack is not None:
                    with ctx():
                        x_adv = attack(xb, yb)
                    with torch.no_grad(), ctx():
                        robust = ok & (model(x_adv).argmax(1) == yb)
                clean_ok += ok.sum()
                robust_ok += robust.sum()
        finally:
            model.train(was_training)
        counts = torch.stack([clean_ok.float(), robust_ok.float(),
                              torch.full((), float(len(y)), device=dev, dtype=torch.float32)])
        clean, robust, n = d.all_reduce(counts).tolist()
        return (clean / n, robust / n) if n else (float("nan"), float("nan"))

    def validate(self) -> dict:
        a = self.cfg.attack
        out = {}
        models = [("", self.model)] + ([("ema_", self.ema.module)] if self.ema else [])
        for prefix, m in models:
            self.dist.broadcast_buffers(m)
            clean, robust = self.evaluate(m, self.x_val, self.y_val, eps=a.eps, alpha=a.alpha,
                                          steps=self.tc.val_steps, tag="val", amp=True)
            out[f"{prefix}val_clean_acc"], out[f"{prefix}val_robust_acc"] = clean, robust
        return out

    def _selection(self, row: dict) -> tuple[float, float, float]:
        """(selection metric, clean, robust) of the selected weights (EMA when kept).
        Robust accuracy selects (Rice et al.); a standard run has none to speak of: clean."""
        prefix = "ema_" if self.ema else ""
        clean, robust = row[f"{prefix}val_clean_acc"], row[f"{prefix}val_robust_acc"]
        return (clean if self.tc.method == "standard" else robust), clean, robust

    def save(self, improved: bool) -> None:
        """checkpoint_last (then best when improved), then history.csv; rank 0 only.
        Order matters for a kill between writes: see :func:`_repair_best`."""
        state = self.state("last")  # collective (gathers RNG states): every rank builds it
        if not self.dist.main:
            return
        _atomic_write(self.run_dir / LAST, lambda f: torch.save(state, f))
        if improved:
            self.save_best(state)
        _write_text(self.run_dir / HISTORY, _history_csv(self.history, self.columns))

    def save_best(self, state: dict) -> None:
        best = {k: v for k, v in state.items()
                if k not in ("optimizer", "scaler", "rng", "history")}
        best["kind"] = "best"
        _atomic_write(self.run_dir / BEST, lambda f: torch.save(best, f))

    def run(self, bar_factory) -> None:
        """The epoch loop (from ``self.epoch``), with validation, checkpoints, early stop."""
        tc = self.tc
        t_session = time.perf_counter()
        base_elapsed = self.elapsed_s
        epochs_bar = bar_factory(total=tc.epochs, initial=self.epoch, desc=self.cfg.name)
        try:
            while not self.finished and self.epoch < tc.epochs:
                epoch = self.epoch
                t0 = time.perf_counter()
                row = {"epoch": epoch + 1, **self.train_epoch(epoch, bar_factory)}
                evaluated = (epoch + 1) % tc.eval_every == 0 or epoch + 1 == tc.epochs
                val = self.validate() if evaluated else {}
                for c in self.columns:
                    if "val_" in c and c != "val_source":
                        row[c] = val.get(c, float("nan"))
                row["val_source"] = self.val_source
                improved = False
                if evaluated:
                    metric, clean, robust = self._selection(row)
                    if metric > self.best["metric"]:
                        improved = True
                        self.best = {"epoch": epoch + 1, "metric": metric, "val_clean_acc": clean,
                                     "val_robust_acc": robust, "evals_since_best": 0}
                    else:
                        self.best["evals_since_best"] += 1
                    if tc.patience and self.best["evals_since_best"] >= tc.patience:
                        self.stopped_early = True
                self.epoch = epoch + 1
                self.finished = self.stopped_early or self.epoch >= tc.epochs
                row["epoch_time_s"] = time.perf_counter() - t0
                self.elapsed_s = base_elapsed + (time.perf_counter() - t_session)
                row["wall_time_s"] = self.elapsed_s
                self.history.append(row)
                self.save(improved)
                epochs_bar.update(1)
                epochs_bar.set_postfix({k: f"{row[k]:.3f}" for k in ("train_loss", "val_clean_acc",
                                                                      "val_robust_acc")
                                        if not math.isnan(row[k])})
        finally:
            epochs_bar.close()

    def final_metrics(self) -> dict:
        """Clean and PGD-20 test accuracy of the selected (best) weights + provenance."""
        self.dist.barrier()  # rank 0 has written checkpoint_best.pt
        t0 = time.perf_counter()
        best_path = self.run_dir / BEST
        ckpt = load_checkpoint(best_path)
        model = copy.deepcopy(self.ema.module if self.ema else self.model)
        _load_weights(model, ckpt, "selected", best_path)
        model.to(self.device)
        ev, ds = self.cfg.eval, self.dataset
        eps = ev.eps if ev.eps is not None else self.cfg.attack.eps
        n = len(ds.y_test) if ev.n_examples is None else min(ev.n_examples, len(ds.y_test))
        clean, robust = self.evaluate(model, ds.x_test[:n], ds.y_test[:n], eps=eps, alpha=eps / 4,
                                      steps=TEST_STEPS, tag="test", amp=False)
        total = self.elapsed_s + (time.perf_counter() - t0)
        return {
            "run": self.cfg.name, "method": self.tc.method, "dataset": self.cfg.data.name,
            "model": self.cfg.model.name, "eps": format_eps(eps),
            "test_clean_acc": clean, "test_pgd20_acc": robust, "n_test": n,
            "selected": "ema" if self.ema else "raw", "best_epoch": int(ckpt["epoch"]),
            "best_val_clean_acc": self.best["val_clean_acc"],
            "best_val_robust_acc": self.best["val_robust_acc"],
            "selection_metric": "val_clean_acc" if self.tc.method == "standard" else "val_robust_acc",
            "val_source": self.val_source, "epochs_trained": self.epoch,
            "stopped_early": self.stopped_early, "total_time_s": total,
            "train_time_s": self.train_time_s,
            "images_per_s": self.images_seen / self.train_time_s if self.train_time_s else float("nan"),
            "spatlib_version": _spatlib_version(), "git_commit": _git_commit(),
            "torch_version": str(torch.__version__), "device": str(self.device),
            "device_name": _device_name(self.device), "world_size": self.dist.world,
            "precision": self.precision, "deterministic": self.tc.deterministic,
            "seed": self.cfg.seed, "hostname": socket.gethostname(),
            "started_at": self.started_at, "finished_at": _now(),
        }


def _repair_best(run_dir: Path, last: dict) -> None:
    """A kill between writing checkpoint_last.pt and checkpoint_best.pt of the same epoch
    leaves a stale (or no) best file: rewrite it from the last checkpoint, which then holds
    exactly the best weights. Any other mismatch is an error."""
    best_epoch = int(last["best"]["epoch"])
    path = run_dir / BEST
    if best_epoch == 0:
        return
    if best_epoch == int(last["epoch"]):
        best = {k: v for k, v in last.items() if k not in ("optimizer", "scaler", "rng", "history")}
        best["kind"] = "best"
        _atomic_write(path, lambda f: torch.save(best, f))
        return
    saved = load_checkpoint(path)
    if int(saved["epoch"]) != best_epoch:
        raise CheckpointError(f"{path}: holds epoch {saved['epoch']} but {run_dir / LAST} "
                              f"records epoch {best_epoch} as the best")


def _progress_factory(enabled: bool):
    if not enabled:
        class _Null:
            def __init__(self, *a, **k): pass
            def update(self, n=1): pass
            def set_postfix(self, *a, **k): pass
            def close(self): pass
        return _Null
    from tqdm.auto import tqdm
    return tqdm


def train(config: RunConfig | dict, run_dir: str | Path, *, progress: bool | None = None) -> dict:
    """Train one run into ``run_dir`` and return its metrics (also written to metrics.json).

    Resumes from ``run_dir/checkpoint_last.pt`` when present (same config required, else
    :class:`CheckpointError` naming the differing keys); a finished run (metrics.json) is
    returned without retraining. Every check (config, data, model, checkpoint) runs before
    the first file is written. ``progress``: tqdm bars; None shows them on a terminal only,
    and ``train.progress: false`` hides them always.
    Raises ConfigError, DataError, CheckpointError, TrainingDivergedError.
    """
    cfg = _as_config(config)
    requested = to_dict(cfg)
    run_dir = Path(run_dir)

    saved_cfg_path = run_dir / CONFIG
    if saved_cfg_path.is_file():  # a run folder: it must be this run
        try:
            saved_cfg = yaml.safe_load(saved_cfg_path.read_text()) or {}
        except yaml.YAMLError as e:
            raise CheckpointError(f"{saved_cfg_path}: not valid YAML ({e})") from None
        _check_same_run(saved_cfg, requested, saved_cfg_path)
    metrics_path = run_dir / METRICS
    if metrics_path.is_file():  # a finished run is not retrained
        try:
            return json.loads(metrics_path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{metrics_path}: not valid JSON ({e}); delete it to redo the "
                                  f"final evaluation") from None
    last = None
    if (run_dir / LAST).is_file():
        last = load_checkpoint(run_dir / LAST)
        _check_same_run(last["config"], requested, run_dir / LAST)

    if cfg.train.deterministic and "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # cuBLAS reads it at first use
    dist, device = _init_distributed(cfg.train.device)
    try:
        show = (cfg.train.progress and dist.main
                and (progress if progress is not None else sys.stderr.isatty()))
        trainer = _Trainer(cfg, run_dir, device, dist, bool(show))
        if last is not None:
            trainer.restore(last, run_dir / LAST)
        if dist.main:
            run_dir.mkdir(parents=True, exist_ok=True)
            _remove_stale_temps(run_dir)
            if last is not None:
                _repair_best(run_dir, last)
                # a kill between the checkpoint and history.csv: the checkpoint is the truth
                _write_text(run_dir / HISTORY, _history_csv(trainer.history, trainer.columns))
            _write_text(saved_cfg_path, cfg.to_yaml())
        del last

        # the global RNG (dropout) is forked, seeded from the config and restored on exit
        rng_devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=rng_devices), \
                _backend_flags(cfg.train.deterministic, device):
            rng = trainer._rng_state
            if rng is None:  # this process's generators only (torch.manual_seed seeds every GPU)
                seed = _derive_seed(cfg.seed, "global", dist.rank)
                torch.default_generator.manual_seed(seed)
                if device.type == "cuda":
                    with torch.cuda.device(device):
                        torch.cuda.manual_seed(seed)
            else:
                trainer.attack_gen.set_state(rng["attack"])
                torch.set_rng_state(rng["torch_cpu"])
                if device.type == "cuda" and rng["torch_cuda"] is not None:
                    torch.cuda.set_rng_state(rng["torch_cuda"], device)
            trainer.run(_progress_factory(bool(show)))
            metrics = trainer.final_metrics()
        if dist.main:
            _write_text(metrics_path, json.dumps(metrics, indent=2) + "\n")
        metrics = dist.broadcast_object(metrics)
    except BaseException:
        dist.close(barrier=False)
        raise
    dist.close()
    return metrics


def load_run_model(run_dir: str | Path, which: str = "best",
                   device: str | torch.device = "cpu") -> tuple[nn.Module, RunConfig, Dataset]:
    """(model in eval mode on ``device``, its RunConfig, its Dataset) from a run folder.

    ``which``: ``best`` (the selected weights of checkpoint_best.pt: the EMA when the run kept
    one), ``last`` (raw weights of checkpoint_last.pt) or ``ema`` (EMA of checkpoint_last.pt).
    """
    choices = {"best": (BEST, "selected"), "last": (LAST, "model"), "ema": (LAST, "ema_model")}
    if which not in choices:
        raise ValueError(f"which: expected one of {', '.join(choices)}, got {which!r}")
    name, weights = choices[which]
    path = Path(run_dir) / name
    ckpt = load_checkpoint(path)
    cfg = from_dict(ckpt["config"])
    dataset = dataset_from_config(cfg.data)
    model = model_from_config(cfg.model, dataset, seed=cfg.seed)  # seeded: the caller's RNG is untouched
    _load_weights(model, ckpt, weights, path)
    return model.to(device).eval(), cfg, dataset


# --------------------------------------------------------------------------------------------
# command line: python -m spatlib.train params.yaml --run-dir DIR [--set key=value ...]
def main(argv: list[str] | None = None) -> int:
    """Train from a params file; works under ``torchrun --nproc_per_node N -m spatlib.train``."""
    parser = argparse.ArgumentParser(prog="python -m spatlib.train",
                                     description="Train one spat-kit run into a run folder "
                                                 "(resumes from its last checkpoint).")
    parser.add_argument("params", nargs="?", help="run params YAML (defaults when omitted)")
    parser.add_argument("--run-dir", required=True, help="the run folder")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[],
                        metavar="KEY=VALUE", help="override params, e.g. train.epochs=2")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bars (default: only on a terminal)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.params, args.overrides)
        metrics = train(cfg, args.run_dir, progress=args.progress)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDivergedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(metrics, indent=2))
    return 0


cli_main = main

if __name__ == "__main__":
    sys.exit(main())
