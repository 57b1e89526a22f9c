"""The trainer: standard, PGD-AT, TRADES, MART, SPAT-AT and SPAT-TRADES in one loop.

``train(config, run_dir)`` trains one run and writes its folder (the files:
:mod:`spatlib.runfolder`). What each method is (its attack and its loss) lives in
:mod:`spatlib.methods`; :class:`Trainer` is the loop that runs all of them: small setup steps,
one :meth:`Trainer.train_step` per batch, :meth:`Trainer.train_epoch`, :meth:`Trainer.validate`
and :meth:`Trainer.fit`, the epoch loop with checkpoints and early stopping. Beside it: the
schedules and the EMA (:mod:`spatlib.schedules`), the precision (:mod:`spatlib.precision`), what
a run shows (:mod:`spatlib.trainlog`) and ``spat train`` (:mod:`spatlib.train_cli`).

Resuming: a run folder that holds ``checkpoint_last.pt`` continues from the epoch after it (the
config must match, cosmetic keys aside); one that holds ``metrics.json`` is finished and is
returned as is. Batches, augmentation, attack noise and validation noise all come from explicit
generators seeded by ``config.seed``, so with ``train.deterministic`` a killed and resumed run
ends with exactly the metrics of an uninterrupted one. Under ``torchrun`` (``WORLD_SIZE`` > 1)
each process takes its slice of every global batch and DDP averages the gradients
(:mod:`spatlib.distributed`).
"""
from __future__ import annotations

import importlib.util
import os
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from . import allocator, attacks
from . import runfolder as rf
from .awp import WeightPerturbation
from .config import ConfigError, RunConfig, from_dict, to_dict
from .data import DeviceLoader, augmentation_defaults, dataset_from_config, select_validation
from .distributed import Distributed, init_distributed
from .methods import (METHODS, Method, kl_divergence, mart_loss, shared_share_sums, trades_loss,
                      training_attack)
from .models import model_from_config
from .precision import AMP_DTYPES, autocast, backend_flags, resolve_precision
from .runfolder import (HISTORY_COLUMNS, CheckpointError, config_diff, load_checkpoint,
                        load_run_model)
from .schedules import EMA, eps_at, lr_at
from .trainlog import display_mode, progress_bar, show_epoch, tensorboard_writer, write_scalars
from .util import derive_seed, eval_mode, provenance, resolve_device, utc_now

__all__ = ["train", "Trainer", "StepStats", "EMA", "load_checkpoint", "load_run_model",
           "METHODS", "Method", "CheckpointError", "TrainingDivergedError", "lr_at", "eps_at",
           "trades_loss", "mart_loss", "kl_divergence", "config_diff", "HISTORY_COLUMNS",
           "AMP_DTYPES", "backend_flags", "resolve_precision"]

# Methods that never see f(x) (PGD-AT; SPAT-AT when its class evidence did not run f(x) in eval
# mode) measure the clean training accuracy with one more forward (eval mode, no grad) on every
# CLEAN_ACC_EVERY-th batch of an epoch, from the first: an unbiased estimate over a quarter of
# the batches, for a quarter of the cost (that forward was 4% of a PGD-10 step on CPU).
CLEAN_ACC_EVERY = 4
SYNC_EVERY = 50           # batches between host syncs (progress postfix + NaN check)


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN or infinite; checkpoint_last.pt keeps the last good epoch."""


def _as_config(config: RunConfig | dict) -> RunConfig:
    """Validate (again: a RunConfig may have been edited in place) and return a RunConfig."""
    if isinstance(config, RunConfig):
        return from_dict(to_dict(config))
    if isinstance(config, dict):
        return from_dict(config)
    raise TypeError(f"config: expected a RunConfig or a dict, got {type(config).__name__}")


@dataclass
class StepStats:
    """What one training step measured, on the device (no host sync): the loss, and the
    number of clean / adversarial examples classified correctly where the step saw them."""
    loss: Tensor                    # float32 scalar, detached
    n: int                          # examples in the batch (this process's slice)
    clean_correct: Tensor | None    # None: f(x) was not computed this step
    adv_correct: Tensor | None      # None: clean training
    lr: float
    eps: float
    # the manipulation check when this step ran it (:func:`methods.shared_share_sums`): sums of
    # the shared shares of the training examples and of PGD's, and how many examples they cover
    shares: tuple[Tensor, Tensor, Tensor] | None = None


# --------------------------------------------------------------------------------------------
class Trainer:
    """One run: data, model, optimizer and the loop.

    Built fully (and checked) before any file is written or any step is taken; building one
    writes nothing, so ``Trainer(cfg)`` is also the way to time the trainer's own steps
    (``train_epoch(epoch, max_batches=n)``, as ``spat bench`` does). ``run_dir`` is needed by
    :meth:`fit` only. ``device``: None resolves ``train.device``; ``dist``: None is a single
    process; ``progress``: tqdm bars; ``epoch_lines``: a line per epoch on stderr
    (:func:`epoch_line`).
    """

    def __init__(self, cfg: RunConfig | dict, run_dir: str | Path | None = None, *,
                 device: torch.device | None = None, dist: Distributed | None = None,
                 progress: bool = False, epoch_lines: bool = False):
        self.cfg = _as_config(cfg)
        self.tc = self.cfg.train
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.dist = dist if dist is not None else Distributed()
        self.device = device if device is not None else resolve_device(self.tc.device,
                                                                        key="train.device")
        self.method: Method = METHODS[self.tc.method]
        self.precision = resolve_precision(self.tc.precision, self.device)
        self.show = progress
        self.epoch_lines = epoch_lines   # one line per epoch to stderr (epoch_line)
        self._bar = progress_bar(progress)
        self.requested = to_dict(self.cfg)
        self._check_settings()
        self._setup_data()
        self._setup_model()
        self._setup_optimizer()
        self._setup_forward()
        self._setup_awp()
        self._setup_generators()
        self._init_run_state()

    # -- setup ----------------------------------------------------------------------------
    def _check_settings(self) -> None:
        tc = self.tc
        if tc.nesterov and tc.momentum == 0:
            raise ConfigError("train.nesterov: Nesterov momentum needs train.momentum > 0")
        if tc.batch_size < self.dist.world:
            raise ConfigError(f"train.batch_size: {tc.batch_size} is smaller than the number of "
                              f"processes ({self.dist.world}); the global batch is split across them")
        if tc.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise ConfigError("train.tensorboard: needs the tensorboard package: pip install "
                              "'spatlib[tensorboard]' (or pip install tensorboard), or set "
                              "train.tensorboard false")

    def _setup_data(self) -> None:
        """The dataset, the validation images (a hold-out of the training images, or with
        ``data.val_split: test`` the first test images: :func:`data.select_validation`), the
        device loader."""
        cfg, tc, device, world = self.cfg, self.tc, self.device, self.dist.world
        ds = self.dataset = dataset_from_config(cfg.data)
        self.validation = select_validation(cfg.data, ds, cfg.seed)
        self.val_source = self.validation.source
        x_tr, y_tr, self.x_val, self.y_val = self.validation.images(ds)
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
        if world > 1 and 0 < tail < world:
            n_batches -= 1  # a last batch too small to give every process an image
        if tc.max_batches is not None:
            n_batches = min(n_batches, tc.max_batches)
        if n_batches < 1:
            raise ConfigError(f"train.batch_size: {tc.batch_size} gives no full batch for "
                              f"{world} processes from {len(y_tr)} training images")
        self.n_batches = n_batches   # batches of an epoch: the unit of the schedules

    def _setup_model(self) -> None:
        """The seeded model, checked against the data with one forward pass on two training
        images (on the CPU, before anything runs), then moved to the device; its EMA."""
        ds, cfg = self.dataset, self.cfg
        x = ds.x_train[:2].float().div(255)
        try:
            model = model_from_config(cfg.model, ds, seed=cfg.seed)
            with torch.no_grad(), eval_mode(model):
                out = model(x)
        except (ValueError, RuntimeError) as e:
            raise ConfigError(f"model.name: {cfg.model.name!r} cannot take data.name "
                              f"{cfg.data.name!r} images of shape {tuple(x.shape[1:])}: {e}") from None
        if tuple(out.shape) != (len(x), ds.num_classes):
            raise ConfigError(f"model.name: {cfg.model.name!r} gives logits of shape {tuple(out.shape)} "
                              f"for {ds.num_classes} classes")
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        self.ema = EMA(model, self.tc.ema) if self.tc.ema > 0 else None

    def _setup_optimizer(self) -> None:
        tc = self.tc
        self.opt = torch.optim.SGD(self.model.parameters(), lr=tc.lr, momentum=tc.momentum,
                                   weight_decay=tc.weight_decay, nesterov=tc.nesterov)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def _setup_forward(self) -> None:
        """The training forward/backward goes through DDP and torch.compile; the attack and
        the evaluation use the plain module (same parameters), so the attack loop stays eager."""
        fwd: nn.Module = self.model
        if self.dist.world > 1:
            import inspect

            from torch.nn.parallel import DistributedDataParallel as DDP
            # BN statistics are synced by hand before validation, not at every forward
            no_sync = ({"forward_sync_buffers": False}
                       if "forward_sync_buffers" in inspect.signature(DDP).parameters
                       else {"broadcast_buffers": False})
            device = self.device
            fwd = DDP(self.model, device_ids=[device] if device.type == "cuda" else None, **no_sync)
        self.fwd = torch.compile(fwd) if self.tc.compile else fwd

    def _setup_awp(self) -> None:
        """Adversarial weight perturbation (:mod:`spatlib.awp`) when ``train.awp_gamma`` > 0;
        under torchrun the ascent gradients are summed over the processes, so every replica adds
        the same perturbation."""
        def reduce(grads: list[Tensor]) -> None:
            for g in grads:
                self.dist.all_reduce(g)
        self.awp = (WeightPerturbation(self.model, self.tc.awp_gamma,
                                       reduce=reduce if self.dist.world > 1 else None)
                    if self.tc.awp_gamma > 0 else None)

    def _setup_generators(self) -> None:
        """The attack noise stream of this process (batches and augmentation: the loader's)."""
        self.attack_gen = torch.Generator(device=self.device).manual_seed(
            derive_seed(self.cfg.seed, "attack", self.dist.rank))
        # the manipulation check's PGD draws from its own stream: the check never moves the
        # training attack's noise, so a run trains the same with it on or off
        self.share_gen = torch.Generator(device=self.device).manual_seed(
            derive_seed(self.cfg.seed, "share", self.dist.rank))
        self._rng_state: dict | None = None  # per-process RNG states to restore (resume)

    def _init_run_state(self) -> None:
        """What a checkpoint holds besides the weights."""
        self.epoch = 0              # completed epochs
        self.finished = False       # training loop done (all epochs, or early stop)
        self.stopped_early = False
        self.history: list[dict] = []
        self.best = {"epoch": 0, "metric": -1.0, "val_clean_acc": float("nan"),
                     "val_robust_acc": float("nan"), "evals_since_best": 0}
        self.elapsed_s = 0.0        # wall time of finished epochs, across sessions
        self.train_time_s = 0.0     # time inside the training loop only
        self.images_seen = 0
        self.started_at = utc_now()
        self.columns = [c for c in HISTORY_COLUMNS if self.ema or not c.startswith("ema_")]

    # -- state ----------------------------------------------------------------------------
    def state(self) -> dict:
        """The checkpoint_last.pt dict: tensors, dicts, lists, numbers and strings only, with
        everything an exact resume needs (its best checkpoint: :func:`runfolder.best_of`).
        Collective under torchrun (it gathers every process's RNG states): every rank calls it."""
        rng = {"attack": self.attack_gen.get_state(), "share": self.share_gen.get_state(),
               "torch_cpu": torch.get_rng_state(),
               "torch_cuda": (torch.cuda.get_rng_state(self.device)
                              if self.device.type == "cuda" else None)}
        ds = self.dataset
        return {
            "format": rf.CHECKPOINT_FORMAT, "kind": "last", "epoch": self.epoch,
            "finished": self.finished, "stopped_early": self.stopped_early,
            "model": self.model.state_dict(),
            "ema_model": self.ema.module.state_dict() if self.ema else None,
            "ema_updates": self.ema.updates if self.ema else 0,
            "selected": "ema_model" if self.ema else "model",
            "best": dict(self.best), "config": self.requested,
            "model_info": {"name": self.cfg.model.name, "num_classes": ds.num_classes,
                           "in_channels": ds.in_channels, "image_size": list(ds.image_size)},
            **provenance(self.device),
            "optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict(),
            # one entry per process: each has its own attack noise stream
            "rng": self.dist.gather_object(rng), "history": self.history,
            "elapsed_s": self.elapsed_s, "train_time_s": self.train_time_s,
            "images_seen": self.images_seen, "started_at": self.started_at,
        }

    def restore(self, ckpt: dict, path: Path) -> None:
        """Continue from a checkpoint_last.pt dict (config already checked)."""
        rf.load_weights(self.model, ckpt, "model", path)
        if self.ema:
            rf.load_weights(self.ema.module, ckpt, "ema_model", path)
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

    def save(self, improved: bool) -> None:
        """checkpoint_last (then best when improved), then history.csv; rank 0 writes.
        Order matters for a kill between writes: see :func:`spatlib.runfolder.repair_best`."""
        state = self.state()  # collective: every rank builds it
        if not self.dist.main:
            return
        rf.save_checkpoint(self.run_dir / rf.LAST, state)
        if improved:
            rf.save_checkpoint(self.run_dir / rf.BEST, rf.best_of(state))
        rf.write_history(self.run_dir, self.history, self.columns)

    # -- one step -------------------------------------------------------------------------
    def amp(self):
        """Autocast at the run's precision (a no-op context in fp32)."""
        return autocast(self.precision, self.device)

    def attack(self, eps: float) -> attacks.PGD:
        """The training attack of this run at budget ``eps`` (:func:`methods.training_attack`)."""
        return training_attack(self.model, self.cfg.attack, self.method, eps, self.attack_gen)

    def awp_perturb(self, x: Tensor, x_adv: Tensor, y: Tensor, step: int) -> list[Tensor] | None:
        """Move the weights to w + v (:mod:`spatlib.awp`) for the step ``step``: one ascent
        step of the method's own loss at (x, x_adv), the model in train mode; returns v for
        ``self.awp.restore``, or None (nothing moved) when AWP is off or still warming up
        (``train.awp_warmup`` epochs)."""
        if self.awp is None or step // self.n_batches < self.tc.awp_warmup:
            return None
        model, method = self.model, self.method

        def ascent_loss() -> Tensor:
            with self.amp():
                clean = model(x) if method.needs_clean else None
                # scaled under fp16 (a no-op otherwise): the rescaling to gamma ||w|| cancels it
                return self.scaler.scale(method.loss(clean, model(x_adv), y, self.tc.beta))
        return self.awp.perturb(ascent_loss)

    def train_step(self, x: Tensor, y: Tensor, step: int, *, check: bool = False) -> StepStats:
        """One update on the batch (x, y) at global step ``step``: the schedules' lr and eps,
        the training attack, the adversarial weight perturbation (when on), the method's loss,
        the optimizer step (at the perturbed weights, as the AWP authors' code), the weights
        restored, and the EMA. ``check``: also run the manipulation check
        (:func:`spatlib.methods.shared_share_sums`) on this batch's examples."""
        tc, model, method = self.tc, self.model, self.method
        lr = lr_at(tc, step, self.n_batches)
        for group in self.opt.param_groups:
            group["lr"] = lr
        eps = 0.0
        x_adv = clean_logits = shares = None
        if method.attack is not None:
            eps = eps_at(self.cfg.attack.eps, tc.eps_warmup_epochs, step, self.n_batches)
            with self.amp():
                result = self.attack(eps).run(x, y)
            x_adv = result.x_adv
            if check:   # the manipulation check (methods.shared_share_sums): own noise stream
                with self.amp():
                    shares = shared_share_sums(model, self.cfg.attack, method, x, y, x_adv, eps,
                                               self.share_gen)
            if not method.needs_clean:
                # SPAT's class evidence ran f(x) with BN in eval mode: its logits give the clean
                # accuracy at no cost; else one more forward (eval mode, no grad) on every
                # CLEAN_ACC_EVERY-th batch of the epoch
                clean_logits = result.clean_logits
                if clean_logits is None and step % self.n_batches % CLEAN_ACC_EVERY == 0:
                    with torch.no_grad(), eval_mode(model), self.amp():
                        clean_logits = model(x)
        awp = self.awp_perturb(x, x_adv, y, step) if x_adv is not None else None
        self.opt.zero_grad(set_to_none=True)
        with self.amp():
            if method.needs_clean:
                clean_logits = self.fwd(x)
            adv_logits = self.fwd(x_adv) if x_adv is not None else None
            loss = method.loss(clean_logits, adv_logits, y, tc.beta)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        if awp is not None:
            self.awp.restore(awp)
        if self.ema:
            self.ema.update(model)
        with torch.no_grad():
            return StepStats(
                loss=loss.detach().float(), n=len(y), lr=lr, eps=eps,
                clean_correct=(None if clean_logits is None
                               else (clean_logits.detach().argmax(1) == y).sum()),
                adv_correct=(None if adv_logits is None
                             else (adv_logits.detach().argmax(1) == y).sum()),
                shares=shares)

    # -- an epoch -------------------------------------------------------------------------
    def _batches(self, n: int) -> Iterator[tuple[Tensor, Tensor]]:
        """This process's slice of each of the first ``n`` global batches (all of it in a
        single process)."""
        d = self.dist
        for i, (x, y) in enumerate(self.loader):
            if i >= n:
                return
            yield (x, y) if d.world == 1 else (x[d.rank::d.world], y[d.rank::d.world])

    def train_epoch(self, epoch: int, max_batches: int | None = None) -> dict:
        """Train epoch ``epoch`` (0-based); ``max_batches``: stop after that many batches (a
        timed slice: the schedules still count the epoch's full ``n_batches``). Returns the
        history fields it measured; a NaN or infinite loss raises TrainingDivergedError."""
        dev = self.device
        n_run = self.n_batches if max_batches is None else min(max_batches, self.n_batches)
        self.loader.set_epoch(epoch)
        self.model.train()
        # device-side sums: the only host syncs are the periodic logging ones
        loss_sum = torch.zeros((), device=dev)
        clean_ok = torch.zeros((), device=dev, dtype=torch.long)
        adv_ok = torch.zeros((), device=dev, dtype=torch.long)
        bad_batch = torch.full((), -1, device=dev, dtype=torch.long)
        bad_loss = torch.zeros((), device=dev)
        share_sums = torch.zeros(3, device=dev)      # the manipulation check: shares, PGD's, count
        every = self.tc.share_every
        n_seen = n_clean = 0
        lr = eps = 0.0
        bar = self._bar(total=n_run, leave=False, desc=f"epoch {epoch + 1}")
        t0 = time.perf_counter()
        for i, (x, y) in enumerate(self._batches(n_run)):
            s = self.train_step(x, y, epoch * self.n_batches + i,
                                check=bool(every) and i % every == 0)
            lr, eps = s.lr, s.eps
            with torch.no_grad():
                loss_sum += s.loss * s.n
                if s.clean_correct is not None:
                    clean_ok += s.clean_correct
                    n_clean += s.n
                if s.adv_correct is not None:
                    adv_ok += s.adv_correct
                if s.shares is not None:
                    share_sums += torch.stack([v.float() for v in s.shares])
                first_bad = ~torch.isfinite(s.loss) & (bad_batch < 0)
                bad_batch = torch.where(first_bad, i, bad_batch)
                bad_loss = torch.where(first_bad, s.loss, bad_loss)
            n_seen += s.n
            bar.update(1)
            if (i + 1) % SYNC_EVERY == 0 or i + 1 == n_run:
                self._check_finite(epoch, bad_batch, bad_loss, lr)
                if self.show:
                    bar.set_postfix(loss=f"{(loss_sum / n_seen).item():.4f}")
        bar.close()
        sums = torch.cat([torch.stack([loss_sum, clean_ok.float(), adv_ok.float(),
                                       torch.full((), float(n_seen), device=dev),
                                       torch.full((), float(n_clean), device=dev)]), share_sums])
        (loss_sum_, clean_ok_, adv_ok_, n_, n_clean_,
         share_, share_pgd_, n_share_) = self.dist.all_reduce(sums).tolist()
        seconds = time.perf_counter() - t0
        self.train_time_s += seconds
        self.images_seen += int(n_)
        return {"lr": lr, "eps": eps, "train_loss": loss_sum_ / n_,
                "train_clean_acc": clean_ok_ / n_clean_ if n_clean_ else float("nan"),
                "train_adv_acc": adv_ok_ / n_ if self.method.attack else float("nan"),
                "shared_share": share_ / n_share_ if n_share_ else float("nan"),
                "shared_share_pgd": share_pgd_ / n_share_ if n_share_ else float("nan"),
                "images_per_s": n_ / seconds}

    def _check_finite(self, epoch: int, bad_batch: Tensor, bad_loss: Tensor, lr: float) -> None:
        flag = self.dist.all_reduce(bad_batch.clone(), op="max")
        batch, value, any_bad = torch.stack([bad_batch.float(), bad_loss, flag.float()]).tolist()
        if any_bad >= 0:
            where = f"batch {int(batch) + 1}" if batch >= 0 else "a batch on another process"
            if self.epoch and self.run_dir is not None:
                kept = f"{self.run_dir / rf.LAST} keeps the weights of epoch {self.epoch}"
            else:
                kept = "no epoch had finished, so no checkpoint was written"
            raise TrainingDivergedError(
                f"training diverged in epoch {epoch + 1}, {where}: loss = {value}; {kept}. "
                f"Lower train.lr (now {self.tc.lr:g}, {lr:g} at that step) or ramp eps up with "
                f"train.eps_warmup_epochs (now {self.tc.eps_warmup_epochs:g}).")

    # -- evaluation -----------------------------------------------------------------------
    def evaluate(self, model: nn.Module, x_u8: Tensor, y: Tensor, *, eps: float, alpha: float,
                 steps: int, tag: str) -> tuple[float, float]:
        """(clean accuracy, PGD accuracy) on uint8 images; robust = clean-correct and adv-correct.

        The PGD noise comes from a fresh generator per call, so the numbers do not depend on
        what ran before (resume). Under torchrun each process takes a slice and counts add up.
        """
        d, dev, bs = self.dist, self.device, self.cfg.eval.batch_size
        x_u8, y = x_u8[d.rank::d.world], y[d.rank::d.world]
        gen = torch.Generator(device=dev).manual_seed(derive_seed(self.cfg.seed, tag))
        attack = (attacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True,
                              loss="ce", bn_mode="eval", generator=gen)
                  if eps > 0 and steps > 0 else None)
        ctx = self.amp
        clean_ok = torch.zeros((), device=dev, dtype=torch.long)
        robust_ok = torch.zeros((), device=dev, dtype=torch.long)
        with eval_mode(model):
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
        counts = torch.stack([clean_ok.float(), robust_ok.float(),
                              torch.full((), float(len(y)), device=dev, dtype=torch.float32)])
        clean, robust, n = d.all_reduce(counts).tolist()
        return (clean / n, robust / n) if n else (float("nan"), float("nan"))

    def validate(self) -> dict:
        """Clean and PGD-``val_steps`` accuracy on the validation slice, of the raw weights
        and (``ema_`` fields) of the EMA when the run keeps one."""
        a = self.cfg.attack
        out = {}
        models = [("", self.model)] + ([("ema_", self.ema.module)] if self.ema else [])
        for prefix, m in models:
            self.dist.broadcast_buffers(m)
            clean, robust = self.evaluate(m, self.x_val, self.y_val, eps=a.eps, alpha=a.alpha,
                                          steps=self.tc.val_steps, tag="val")
            out[f"{prefix}val_clean_acc"], out[f"{prefix}val_robust_acc"] = clean, robust
        return out

    def selection(self, row: dict) -> tuple[float, float, float]:
        """(selection metric, clean, robust) of the selected weights (EMA when kept).
        Robust accuracy selects (Rice et al.); a standard run has none to speak of: clean."""
        prefix = "ema_" if self.ema else ""
        clean, robust = row[f"{prefix}val_clean_acc"], row[f"{prefix}val_robust_acc"]
        return (clean if self.tc.method == "standard" else robust), clean, robust

    # -- the run --------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train from ``self.epoch`` to the end (or early stop), checkpointing every epoch into
        ``run_dir``; returns :meth:`final_metrics`. The global RNG (dropout) is forked, seeded
        from the config (or restored on resume) and given back to the caller afterwards."""
        if self.run_dir is None:
            raise ValueError("Trainer.fit: the trainer was built without a run_dir to write to")
        device = self.device
        rng_devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=rng_devices), \
                backend_flags(self.tc.deterministic, device):
            self._seed_global_rng()
            self.run()
            return self.final_metrics()

    def _seed_global_rng(self) -> None:
        rng = self._rng_state
        device = self.device
        if rng is None:  # this process's generators only (torch.manual_seed seeds every GPU)
            seed = derive_seed(self.cfg.seed, "global", self.dist.rank)
            torch.default_generator.manual_seed(seed)
            if device.type == "cuda":
                with torch.cuda.device(device):
                    torch.cuda.manual_seed(seed)
        else:
            self.attack_gen.set_state(rng["attack"])
            if "share" in rng:    # checkpoints of older releases have no such stream
                self.share_gen.set_state(rng["share"])
            torch.set_rng_state(rng["torch_cpu"])
            if device.type == "cuda" and rng["torch_cuda"] is not None:
                torch.cuda.set_rng_state(rng["torch_cuda"], device)

    def run(self) -> None:
        """The epoch loop (from ``self.epoch``), with validation, checkpoints, early stop, and
        the history's TensorBoard events when ``train.tensorboard``."""
        tc = self.tc
        t_session = time.perf_counter()
        base_elapsed = self.elapsed_s
        epochs_bar = self._bar(total=tc.epochs, initial=self.epoch, desc=self.cfg.name)
        writer = (tensorboard_writer(self.run_dir, self.epoch)   # the history as events too
                  if self.tc.tensorboard and self.dist.main and self.run_dir is not None else None)
        try:
            while not self.finished and self.epoch < tc.epochs:
                epoch = self.epoch
                t0 = time.perf_counter()
                row = {"epoch": epoch + 1, **self.train_epoch(epoch)}
                evaluated = (epoch + 1) % tc.eval_every == 0 or epoch + 1 == tc.epochs
                val = self.validate() if evaluated else {}
                for c in self.columns:
                    if "val_" in c and c != "val_source":
                        row[c] = val.get(c, float("nan"))
                row["val_source"] = self.val_source
                improved = evaluated and self._record_selection(row, epoch)
                self.epoch = epoch + 1
                self.finished = self.stopped_early or self.epoch >= tc.epochs
                row["epoch_time_s"] = time.perf_counter() - t0
                self.elapsed_s = base_elapsed + (time.perf_counter() - t_session)
                row["wall_time_s"] = self.elapsed_s
                self.history.append(row)
                if writer is not None:   # before the checkpoint: a kill between them retrains it
                    write_scalars(writer, row, self.columns)
                self.save(improved)
                show_epoch(epochs_bar, row, tc.epochs, self.cfg.name, self.epoch_lines)
        finally:
            epochs_bar.close()
            if writer is not None:
                writer.close()

    def _record_selection(self, row: dict, epoch: int) -> bool:
        """Update the best epoch and the early-stopping count; True when this one is the best."""
        metric, clean, robust = self.selection(row)
        if metric > self.best["metric"]:
            self.best = {"epoch": epoch + 1, "metric": metric, "val_clean_acc": clean,
                         "val_robust_acc": robust, "evals_since_best": 0}
            improved = True
        else:
            self.best["evals_since_best"] += 1
            improved = False
        if self.tc.patience and self.best["evals_since_best"] >= self.tc.patience:
            self.stopped_early = True
        return improved

    def final_metrics(self) -> dict:
        """What the run's training did (metrics.json): the selected epoch, its validation
        accuracies and where they were measured, times, provenance. No test numbers: those
        come from the robustness suite (``spat eval RUN_DIR``, notebook 02), one per setting."""
        return {
            "run": self.cfg.name, "method": self.tc.method, "dataset": self.cfg.data.name,
            "model": self.cfg.model.name,
            "selected": "ema" if self.ema else "raw", "best_epoch": self.best["epoch"],
            "best_val_clean_acc": self.best["val_clean_acc"],
            "best_val_robust_acc": self.best["val_robust_acc"],
            "selection_metric": "val_clean_acc" if self.tc.method == "standard" else "val_robust_acc",
            "val_source": self.val_source, "n_val": len(self.y_val),
            "selection": self.validation.label, "epochs_trained": self.epoch,
            "stopped_early": self.stopped_early, "total_time_s": self.elapsed_s,
            "train_time_s": self.train_time_s,
            "images_per_s": self.images_seen / self.train_time_s if self.train_time_s else float("nan"),
            **provenance(self.device), "world_size": self.dist.world,
            "precision": self.precision, "deterministic": self.tc.deterministic,
            "seed": self.cfg.seed, "started_at": self.started_at, "finished_at": utc_now(),
        }


# --------------------------------------------------------------------------------------------
def train(config: RunConfig | dict, run_dir: str | Path, *, progress: bool | None = None) -> dict:
    """Train one run into ``run_dir`` and return its metrics (also written to metrics.json).

    Resumes from ``run_dir/checkpoint_last.pt`` when present (same config required, else
    :class:`CheckpointError` naming the differing keys). A finished run (metrics.json) is not
    retrained: its metrics are returned as they are, and nothing is written (its ``eval``
    settings may differ: they change no weight). The metrics hold no test numbers: the
    robustness suite gives them (:func:`spatlib.report.evaluate_run`, ``spat eval RUN_DIR``).
    Every check (config, data, model, checkpoint) runs before the first file is written, and
    config.yaml is written before the first step (an unwritable folder fails there, as an
    OSError).

    What it shows: ``progress`` True/False forces the tqdm bars on or off; None shows them on a
    terminal and in a Jupyter kernel (widgets); ``train.progress: false`` hides them always.
    Wherever no bar shows, and in a kernel too (papermill's ``--log-output`` log of a batch
    gets it), one line per epoch goes to stderr (:func:`epoch_line`).
    Raises ConfigError, DataError, CheckpointError, TrainingDivergedError, OSError.
    """
    cfg = _as_config(config)
    requested = to_dict(cfg)
    run_dir = Path(run_dir)

    saved = rf.read_saved_config(run_dir)
    if saved is not None:  # a run folder: it must be this run
        rf.check_same_run(saved, requested, run_dir / rf.CONFIG)
    finished = rf.read_finished_metrics(run_dir)
    if finished is not None:
        return finished   # a finished run is not retrained
    last = None
    if (run_dir / rf.LAST).is_file():
        last = load_checkpoint(run_dir / rf.LAST)
        rf.check_same_run(last["config"], requested, run_dir / rf.LAST)

    if cfg.train.deterministic and "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # cuBLAS reads it at first use
    dist, device = init_distributed(cfg.train.device)
    try:
        show, lines = display_mode(progress, cfg.train.progress, dist.main)
        trainer = Trainer(cfg, run_dir, device=device, dist=dist, progress=show,
                          epoch_lines=lines)
        if last is not None:
            trainer.restore(last, run_dir / rf.LAST)
        if dist.main:
            run_dir.mkdir(parents=True, exist_ok=True)
            rf.clean_temps(run_dir)
            if last is not None:
                rf.repair_best(run_dir, last)
                # a kill between the checkpoint and history.csv: the checkpoint is the truth
                rf.write_history(run_dir, trainer.history, trainer.columns)
            rf.write_config(run_dir, cfg)
        del last
        metrics = trainer.fit()
        if dist.main:
            rf.write_metrics(run_dir, metrics)
        metrics = dist.broadcast_object(metrics)
    except BaseException:
        dist.close(barrier=False)
        raise
    dist.close()
    return metrics


if __name__ == "__main__":   # not silently nothing: the command line lives in spatlib.train_cli
    sys.exit("python -m spatlib.train: spat train's command line is python -m spatlib.train_cli "
             "(or spat train; under torchrun: torchrun ... -m spatlib.train_cli)")
