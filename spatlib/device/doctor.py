"""``spat doctor``: prove the trainer's device path on this machine in minutes, before a long run.

Every check runs the kit's own code (:class:`spatlib.train.Trainer`, its training attack, the
checkpoint files of :mod:`spatlib.runfolder`, :func:`spatlib.semantics.class_evidence`) on the
device at hand, at CIFAR shape (synthetic 3x32x32 images, 10 classes), with the paper params'
precision (bf16 autocast; on the CPU too, as a check of the CPU autocast path), layout
(``train.channels_last``) and, with ``--compile``, ``torch.compile`` for one model. Checks, one
named row each, PASS or FAIL with a detail:

* ``attack under autocast``: each method's training attack, run under autocast, returns
  float32 images inside the eps-ball and [0, 1] (:func:`spatlib.attacks.check_threat_model`)
  at which the model's logits are finite (NaN gradients would leave x_adv at its random start);
* ``loss finite`` and ``loss decreasing``: ``--steps`` training steps of every method on ONE
  fixed batch (a fixed batch at a moderate lr makes "the last loss is below the first" a
  reliable check in 2-3 steps, which fresh batches are not); the row also gives images/s and
  peak memory (:class:`spatlib.device.machine.PeakMemory`; on the CPU a lower bound after the
  first method, since the allocator keeps pages);
* ``batched VJPs = per-class loop``: the vmapped class-evidence backward equals the per-class
  loop on this device (relative tolerance);
* ``channels_last = NCHW``: the logits and input gradients of the model in channels_last
  layout equal those of the NCHW model;
* ``AWP step``: adversarial weight perturbation (:mod:`spatlib.awp`) on one TRADES step (or the
  first adversarial method checked): the ascent adds exactly ``gamma ||w||`` to each perturbed
  weight tensor and leaves every other parameter and every buffer (BatchNorm statistics)
  bit-equal, the restore brings the weights back to float rounding, and a full training step
  with AWP gives a finite loss;
* ``checkpoint resume bit-equal``: a ``checkpoint_last.pt`` state saved and restored on this
  device (weights, EMA, optimizer, RNG states) gives the bit-equal next step (loss and weights)
  under deterministic kernels;
* ``DDP world size 1``: ``torch.distributed`` initialises with this device's backend (gloo on
  CPU, NCCL on CUDA) through a file store, an all_reduce is exact and a DDP backward gives
  the plain gradients; the group is destroyed after;
* ``torch.compile = eager`` (``--compile``): the compiled trainer's losses match eager ones.

Exit status 0 when every row passes, 1 when any fails (the table names the check), 2 on bad
arguments. :func:`run_doctor`'s ``model_hook`` is called on every model the doctor builds
before any check runs it: the place to instrument a model (the tests break the bf16 path there).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import runfolder as rf
from ..attacks import check_threat_model
from ..config import MODELS, ConfigError, RunConfig, from_dict
from ..methods import METHODS
from ..semantics import class_evidence
from ..precision import AMP_DTYPES, backend_flags
from ..train import Trainer
from ..util import (atomic_write_text, check_choices, check_out_path, comma_list, eval_mode,
                    progress_log, resolve_device)
from .machine import PeakMemory, machine_info, sync

__all__ = ["DoctorSettings", "CheckRow", "DEFAULTS", "run_doctor", "resolve_settings", "doctor_config",
           "format_table", "build_parser", "cli_main"]

IMAGE_SHAPE = [3, 32, 32]       # CIFAR's (C, H, W)
NUM_CLASSES = 10
# a fixed batch at lr 0.02 with the paper's momentum 0.9: the loss falls step after step for
# every method (measured on SmallCNN and PreActResNet-18 at batch 8-16); lr 0.05 or 0.1 overshoot
# on the second or third step, even without momentum
LR = 0.02
# per device. CPU: SmallCNN at CIFAR shape, about a minute on 2 cores; PreActResNet-18 is
# --models preact_resnet18 (its bf16 forward+backward measured ~15 s at batch 8 on a 2-core
# CPU without AVX512-BF16, ~5x its fp32 time, so all six methods take half an hour there).
# CUDA: the paper's batch and attack, both architectures, compile on.
DEFAULTS = {
    "cpu": dict(models=["small_cnn"], batch_size=8, steps=3, attack_steps=2, compile=False),
    "cuda": dict(models=["preact_resnet18", "wide_resnet"], batch_size=128, steps=3,
                 attack_steps=10, compile=True),
}
# relative tolerances of the equality checks: fp32 on the CPU; CUDA convolutions run TF32 by
# default (10-bit mantissa), so different kernels of the same math differ in the 3rd digit
TOLERANCE = {"cpu": 1e-4, "cuda": 5e-3}
COMPILE_TOLERANCE = 2e-2        # compiled vs eager loss under bf16 autocast (fusion reorders sums)
AWP_GAMMA = 0.01                # the AT-AWP authors' gamma
AWP_RESTORE_TOLERANCE = 1e-6    # (w + v) - v vs w, relative to max |w|: float32 rounding is ~1e-7


@dataclass
class DoctorSettings:
    """What to check; None takes the device's entry of :data:`DEFAULTS`."""
    device: str = "auto"
    models: list[str] | None = None
    methods: list[str] | None = None         # None: every method of METHODS
    batch_size: int | None = None
    steps: int | None = None                 # training steps per method (>= 2)
    attack_steps: int | None = None
    compile: bool | None = None
    precision: str = "bf16"                  # the paper's CUDA precision, forced on the CPU too


@dataclass
class CheckRow:
    """One check: PASS (ok) or FAIL, what it looked at, and why."""
    check: str
    subject: str
    ok: bool
    detail: str
    seconds: float = 0.0
    images_per_s: float | None = None
    peak_memory_mb: float | None = None
    values: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# helpers
def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _rel_err(a: Tensor, b: Tensor) -> float:
    """max |a - b| / max |b| (0 when both are 0); NaN anywhere gives NaN."""
    a, b = a.detach().float(), b.detach().float()
    scale = float(b.abs().max()) if b.numel() else 0.0
    err = float((a - b).abs().max()) if b.numel() else 0.0
    if math.isnan(err) or math.isnan(scale):
        return float("nan")
    return err / scale if scale > 0 else err


def doctor_config(model: str, method: str, *, batch_size: int, attack_steps: int,
                  precision: str, compile: bool = False, ema: float = 0.0,
                  awp_gamma: float = 0.0) -> RunConfig:
    """The run config of one doctor case: the paper's attack and optimizer at CIFAR shape on
    synthetic data, a constant lr (LR) over the few steps taken."""
    return from_dict({
        "name": f"doctor-{model}-{method}", "seed": 0,
        "data": {"name": "synthetic", "synthetic_shape": IMAGE_SHAPE,
                 "synthetic_classes": NUM_CLASSES, "synthetic_train": 4 * batch_size,
                 "synthetic_test": batch_size, "augment": False},
        "model": {"name": model, "depth": 34, "width": 10},
        "attack": {"eps": 8 / 255, "alpha": 2 / 255, "steps": attack_steps, "random_start": True,
                   "bn_mode": "eval", "rule": "intersection", "saliency": "input_grad",
                   "class_chunk": 10},
        # epochs 100: the few steps taken stay far before the piecewise schedule's milestones
        "train": {"method": method, "epochs": 100, "batch_size": batch_size, "lr": LR,
                  "momentum": 0.9, "weight_decay": 5e-4, "beta": 6.0, "precision": precision,
                  "channels_last": True, "compile": compile, "ema": ema, "awp_gamma": awp_gamma,
                  "progress": False},
    })


# --------------------------------------------------------------------------------------------
# the checks
class _Doctor:
    def __init__(self, s: DoctorSettings, device: torch.device,
                 model_hook: Callable[[nn.Module], None] | None,
                 log: Callable[[str], None]):
        self.s, self.device, self.hook, self.log = s, device, model_hook, log
        self.tol = TOLERANCE["cuda" if device.type == "cuda" else "cpu"]
        self.rows: list[CheckRow] = []

    def trainer(self, model: str, method: str, **kw) -> Trainer:
        s = self.s
        cfg = doctor_config(model, method, batch_size=s.batch_size, attack_steps=s.attack_steps,
                            precision=s.precision, **kw)
        t = Trainer(cfg, device=self.device)
        if self.hook is not None:
            self.hook(t.model)
        return t

    def built(self, model: str, method: str) -> Trainer | None:
        """A trainer, or None after a FAIL row ``build trainer`` saying why it cannot be built."""
        try:
            return self.trainer(model, method)
        except Exception as e:  # e.g. a model that cannot take CIFAR-shaped images
            r = CheckRow("build trainer", f"{model} {method}", ok=False, detail=_first_line(e))
            self.rows.append(r)
            self.log(f"  FAIL  build trainer ({r.subject}): {r.detail}")
            return None

    @contextlib.contextmanager
    def row(self, check: str, subject: str) -> Iterator[CheckRow]:
        """A row that fails with the error's first line when its block raises."""
        r = CheckRow(check, subject, ok=False, detail="")
        t0 = time.perf_counter()
        try:
            yield r
        except Exception as e:  # a doctor reports every failure and goes on to the next check
            r.ok, r.detail = False, _first_line(e)
        r.seconds = time.perf_counter() - t0
        self.rows.append(r)
        self.log(f"  {'PASS' if r.ok else 'FAIL'}  {check} ({subject}): {r.detail}")

    # -- per model and method ---------------------------------------------------------------
    def method_checks(self, model: str, method: str) -> None:
        subject = f"{model} {method}"
        t = self.built(model, method)
        if t is None:
            return
        x, y = next(iter(t.loader))                        # the one fixed batch
        eps = t.cfg.attack.eps
        if METHODS[method].attack is not None:
            with self.row("attack under autocast", subject) as r:
                with t.amp():
                    x_adv = t.attack(eps).run(x, y).x_adv
                    with torch.no_grad(), eval_mode(t.model):
                        # NaN gradients do not show in x_adv (sign(NaN) is 0): the attack would
                        # silently return its random start; the logits at x_adv show them
                        finite = bool(torch.isfinite(t.model(x_adv)).all())
                tm = check_threat_model(x, x_adv, eps)
                r.ok = x_adv.dtype == torch.float32 and tm["ok"] and finite
                r.values = {"dtype": str(x_adv.dtype).replace("torch.", ""), "logits_finite": finite, **tm}
                r.detail = (f"{t.precision}: x_adv {r.values['dtype']}, max |x_adv - x| "
                            f"{tm['max_linf']:.5f} (eps {eps:.5f}), NaN {tm['n_nan']}, pixels "
                            f"[{tm['min_pixel']:.3f}, {tm['max_pixel']:.3f}], logits at x_adv "
                            f"{'finite' if finite else 'NOT finite'}")
        losses: list[float] = []
        times: list[float] = []
        with self.row("loss finite", subject) as r:
            with PeakMemory(self.device) as mem:
                for i in range(self.s.steps):
                    sync(self.device)
                    t0 = time.perf_counter()
                    stats = t.train_step(x, y, i)
                    losses.append(float(stats.loss))          # a host sync: the step is done
                    times.append(time.perf_counter() - t0)
            timed = times[1:] or times                        # the first step warms up
            r.images_per_s = len(y) * len(timed) / sum(timed)
            r.peak_memory_mb = mem.mb
            r.values = {"losses": losses, "step_seconds": times}
            r.ok = all(math.isfinite(v) for v in losses)
            r.detail = (f"{t.precision} autocast, channels_last {'on' if t.channels_last else 'off'}: "
                        "losses " + " -> ".join(f"{v:.4f}" for v in losses))
        with self.row("loss decreasing", subject) as r:
            r.values = {"losses": losses}
            r.ok = (len(losses) >= 2 and all(math.isfinite(v) for v in losses)
                    and losses[-1] < losses[0])
            r.detail = (f"{self.s.steps} steps on one fixed batch at lr {LR:g}: "
                        f"{losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "no step ran")

    # -- per model ----------------------------------------------------------------------------
    def model_checks(self, model_name: str) -> None:
        """On a fresh model: each check stands alone, whatever the training checks did."""
        t = self.built(model_name, "standard")
        if t is None:
            return
        model = t.model
        x, y = next(iter(t.loader))
        xs, ys = x[:4], y[:4]
        with self.row("batched VJPs = per-class loop", model_name) as r:
            with eval_mode(model):
                batched = class_evidence(model, xs, ys, "all", "input_grad", class_chunk=10,
                                         batched=True)
                loop = class_evidence(model, xs, ys, "all", "input_grad", class_chunk=10,
                                      batched=False)
            err = _rel_err(batched.grads, loop.grads)
            r.values = {"rel_err": err, "tolerance": self.tol}
            r.ok = err <= self.tol
            r.detail = (f"{NUM_CLASSES} classes x {len(xs)} images: max rel. difference of "
                        f"dz_k/dx {err:.2e} (tolerance {self.tol:g})")
        with self.row("channels_last = NCHW", model_name) as r:
            cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
            outs = []
            for m, xin in ((model, xs.contiguous()), (cl, xs.contiguous(memory_format=torch.channels_last))):
                xg = xin.detach().clone().requires_grad_(True)
                with eval_mode(m):
                    logits = m(xg).float()
                (g,) = torch.autograd.grad(logits.sum(), xg)
                outs.append((logits.detach(), g))
            err = max(_rel_err(outs[1][0], outs[0][0]), _rel_err(outs[1][1], outs[0][1]))
            r.values = {"rel_err": err, "tolerance": self.tol}
            r.ok = err <= self.tol
            r.detail = f"logits and input gradients: max rel. difference {err:.2e} (tolerance {self.tol:g})"

    def awp_check(self, model: str, method: str) -> None:
        subject = f"{model} {method}"
        with self.row("AWP step", subject) as r:
            t = self.trainer(model, method, awp_gamma=AWP_GAMMA)
            x, y = next(iter(t.loader))
            with t.amp():
                x_adv = t.attack(t.cfg.attack.eps).run(x, y).x_adv
            t.model.train()
            before = {k: v.clone() for k, v in t.model.state_dict().items()}
            v = dict(zip(t.awp.names, t.awp_perturb(x, x_adv, y, 0)))
            moved = t.model.state_dict()
            untouched = [k for k in before if k not in v and not torch.equal(moved[k], before[k])]
            size_err = max(abs(float(d.norm()) / (AWP_GAMMA * float(before[k].norm())) - 1.0)
                           for k, d in v.items())
            add_err = max(_rel_err(moved[k], before[k] + d) for k, d in v.items())
            t.awp.restore(list(v.values()))
            restore_err = max(_rel_err(t.model.state_dict()[k], before[k]) for k in v)
            loss = float(t.train_step(x, y, 0).loss)
            n_buffers = sum(1 for _ in t.model.buffers())
            r.values = {"gamma": AWP_GAMMA, "perturbed": len(v), "size_rel_err": size_err,
                        "add_rel_err": add_err, "restore_rel_err": restore_err,
                        "changed_besides": untouched[:5], "loss": loss}
            r.ok = (not untouched and size_err <= self.tol and add_err <= AWP_RESTORE_TOLERANCE
                    and restore_err <= AWP_RESTORE_TOLERANCE and math.isfinite(loss))
            r.detail = (f"gamma {AWP_GAMMA:g}: {len(v)} weight tensors moved by gamma ||w|| "
                        f"(rel. error {size_err:.1e}), "
                        + (f"changed besides: {', '.join(untouched[:3])}" if untouched else
                           f"other parameters and {n_buffers} buffers bit-equal")
                        + f"; restored to {restore_err:.1e}; AWP step loss {loss:.4f}")

    # -- once per device ----------------------------------------------------------------------
    def resume_check(self, model: str) -> None:
        method = "pgd_at"   # the attack's noise stream makes the RNG state part of the step
        with self.row("checkpoint resume bit-equal", f"{model} {method}") as r, \
                backend_flags(True, self.device), tempfile.TemporaryDirectory() as tmp:
            a = self.trainer(model, method, ema=0.99)
            x, y = next(iter(a.loader))
            a.train_step(x, y, 0)
            path = Path(tmp) / rf.LAST
            rf.save_checkpoint(path, a.state())
            ckpt = rf.load_checkpoint(path)
            b = self.trainer(model, method, ema=0.99)
            b.restore(ckpt, path)
            # what Trainer.fit does with a restored state before its first step; the
            # uninterrupted trainer steps from the same global RNG state
            rng = ckpt["rng"][0]
            b.attack_gen.set_state(rng["attack"])

            def next_loss(t: Trainer) -> float:
                torch.set_rng_state(rng["torch_cpu"])
                if self.device.type == "cuda":
                    torch.cuda.set_rng_state(rng["torch_cuda"], self.device)
                return float(t.train_step(x, y, 1).loss)

            loss_b, loss_a = next_loss(b), next_loss(a)
            pairs = [("weights", a.model.state_dict(), b.model.state_dict()),
                     ("EMA", a.ema.module.state_dict(), b.ema.module.state_dict())]
            differ = [f"{what} {k}" for what, sa, sb in pairs for k in sa
                      if not torch.equal(sa[k], sb[k])]
            mom_a = [s["momentum_buffer"] for s in a.opt.state_dict()["state"].values()]
            mom_b = [s["momentum_buffer"] for s in b.opt.state_dict()["state"].values()]
            if len(mom_a) != len(mom_b) or not all(torch.equal(p, q) for p, q in zip(mom_a, mom_b)):
                differ.append("optimizer momentum")
            same_loss = loss_a == loss_b   # bit-equal (NaN never is)
            r.values = {"loss_uninterrupted": loss_a, "loss_resumed": loss_b, "differ": differ[:5]}
            r.ok = same_loss and not differ
            r.detail = (f"next step after save + restore on {self.device.type}: loss "
                        f"{loss_a!r} vs {loss_b!r}" + (f"; differ: {', '.join(differ[:3])}"
                                                        if differ else "; weights, EMA, momentum equal"))

    def ddp_check(self, model_name: str) -> None:
        import torch.distributed as dist
        cuda = self.device.type == "cuda"
        backend = "nccl" if cuda else "gloo"
        with self.row("DDP world size 1", backend) as r:
            if not dist.is_available():
                raise RuntimeError("torch.distributed is not available in this torch build")
            if dist.is_initialized():
                raise RuntimeError("a process group is already initialised (run the doctor "
                                   "outside torchrun)")
            t = self.trainer(model_name, "standard")
            x, _ = next(iter(t.loader))
            x = x[:4]
            plain = copy.deepcopy(t.model)
            wrapped = copy.deepcopy(t.model)
            with tempfile.TemporaryDirectory() as tmp:
                dist.init_process_group(backend, init_method=f"file://{tmp}/store", rank=0,
                                        world_size=1)
                try:
                    from torch.nn.parallel import DistributedDataParallel as DDP
                    v = torch.arange(4.0, device=self.device)
                    dist.all_reduce(v)
                    reduce_ok = torch.equal(v, torch.arange(4.0, device=self.device))
                    ddp = DDP(wrapped, device_ids=[self.device] if cuda else None)
                    ddp(x).float().square().mean().backward()
                    plain(x).float().square().mean().backward()
                    err = max(_rel_err(p.grad, q.grad) for p, q in
                              zip(wrapped.parameters(), plain.parameters()) if q.grad is not None)
                    group_backend = str(dist.get_backend())
                finally:
                    dist.destroy_process_group()
            r.values = {"backend": group_backend, "all_reduce_ok": reduce_ok, "grad_rel_err": err}
            r.ok = reduce_ok and err <= self.tol and group_backend == backend
            r.detail = (f"{group_backend} via a file store: all_reduce {'exact' if reduce_ok else 'WRONG'}, "
                        f"DDP gradients vs plain: max rel. difference {err:.2e}; group destroyed")

    def compile_check(self, model: str) -> None:
        method = "pgd_at"
        with self.row("torch.compile = eager", f"{model} {method}") as r:
            eager = self.trainer(model, method)
            compiled = self.trainer(model, method, compile=True)
            x, y = next(iter(eager.loader))
            le, lc, tc = [], [], []
            for i in range(2):
                le.append(float(eager.train_step(x, y, i).loss))
                t0 = time.perf_counter()
                lc.append(float(compiled.train_step(x, y, i).loss))
                tc.append(time.perf_counter() - t0)
            err = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(le, lc))
            r.values = {"eager": le, "compiled": lc, "rel_err": err, "seconds": tc}
            r.ok = all(map(math.isfinite, lc)) and err <= COMPILE_TOLERANCE
            r.detail = (f"2 steps: losses {', '.join(f'{v:.4f}' for v in le)} eager vs "
                        f"{', '.join(f'{v:.4f}' for v in lc)} compiled (rel. {err:.1e}, tolerance "
                        f"{COMPILE_TOLERANCE:g}); first compiled step {tc[0]:.0f} s")


# --------------------------------------------------------------------------------------------
def resolve_settings(s: DoctorSettings) -> tuple[DoctorSettings, torch.device]:
    """Fill the device's defaults in and check every setting (ConfigError naming it)."""
    device = resolve_device(s.device, key="--device")
    d = DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    models = s.models if s.models is not None else list(d["models"])
    methods = s.methods if s.methods is not None else list(METHODS)
    check_choices("--models", models, MODELS, "model")
    check_choices("--methods", methods, METHODS, "method")
    if not models or not methods:
        raise ConfigError("--models / --methods: nothing to check")
    out = DoctorSettings(
        device=str(device), models=models, methods=methods,
        batch_size=s.batch_size if s.batch_size is not None else d["batch_size"],
        steps=s.steps if s.steps is not None else d["steps"],
        attack_steps=s.attack_steps if s.attack_steps is not None else d["attack_steps"],
        compile=s.compile if s.compile is not None else d["compile"], precision=s.precision)
    if out.batch_size < 4:
        raise ConfigError(f"--batch-size: expected an integer >= 4, got {out.batch_size}")
    if out.steps < 2:
        raise ConfigError(f"--steps: expected an integer >= 2 (a decrease needs two losses), got {out.steps}")
    if out.attack_steps < 1:
        raise ConfigError(f"--attack-steps: expected an integer >= 1, got {out.attack_steps}")
    check_choices("--precision", [out.precision], AMP_DTYPES, "precision")
    return out, device


def run_doctor(settings: DoctorSettings | None = None, *,
               model_hook: Callable[[nn.Module], None] | None = None,
               log: Callable[[str], None] = lambda line: None) -> dict:
    """Run every check; returns ``{"ok", "machine", "settings", "rows", "seconds"}``.

    ``model_hook(model)`` is called on every model the doctor builds, before any check runs
    it (e.g. to register a forward hook). ``log`` receives one line per finished check.
    Raises ConfigError on bad settings (before any check runs).
    """
    s, device = resolve_settings(settings or DoctorSettings())
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (resume check)
        torch.cuda.set_device(device)
    doc = _Doctor(s, device, model_hook, log)
    t0 = time.perf_counter()
    for model in s.models:
        log(f"{model}:")
        for method in s.methods:
            doc.method_checks(model, method)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        adversarial = [m for m in s.methods if METHODS[m].attack is not None]
        if adversarial:
            doc.awp_check(model, "trades" if "trades" in adversarial else adversarial[0])
        doc.model_checks(model)
    log(f"{device.type}:")
    doc.resume_check(s.models[0])
    doc.ddp_check(s.models[0])
    if s.compile:
        doc.compile_check(s.models[0])
    rows = [asdict(r) for r in doc.rows]
    return {"ok": all(r["ok"] for r in rows), "machine": machine_info(device),
            "settings": asdict(s), "rows": rows, "seconds": time.perf_counter() - t0}


def format_table(result: dict) -> str:
    """The pass/fail table: one line per check, then the verdict naming the failed checks."""
    rows = result["rows"]
    w_check = max(len(r["check"]) for r in rows)
    w_subj = max(len(r["subject"]) for r in rows)
    head = f"{'':4}  {'check':<{w_check}}  {'on':<{w_subj}}  {'img/s':>7}  {'peak MB':>7}  detail"
    lines = [head, "-" * len(head)]
    for r in rows:
        ips = f"{r['images_per_s']:.1f}" if r["images_per_s"] is not None else ""
        mem = f"{r['peak_memory_mb']:.0f}" if r["peak_memory_mb"] is not None else ""
        lines.append(f"{'PASS' if r['ok'] else 'FAIL':4}  {r['check']:<{w_check}}  "
                     f"{r['subject']:<{w_subj}}  {ips:>7}  {mem:>7}  {r['detail']}")
    m = result["machine"]
    failed = [f"{r['check']} ({r['subject']})" for r in rows if not r["ok"]]
    verdict = (f"all {len(rows)} checks passed" if not failed else
               f"{len(failed)} of {len(rows)} checks FAILED: {'; '.join(failed)}")
    lines += ["", f"{m['device_name']}, torch {m['torch_version']}, {result['seconds']:.0f} s: {verdict}"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """``spat doctor``'s arguments."""
    p = argparse.ArgumentParser(
        prog="spat doctor",
        description="Check this machine's training path in minutes: every method for a few "
                    "steps at CIFAR shape with the paper's precision and layout, attacks under "
                    "autocast, batched class VJPs, checkpoint resume, DDP, throughput and memory. "
                    "Prints a PASS/FAIL table; exit status 0 when all pass, 1 when any fails.")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--out", default="doctor.json", help="the JSON report (default: doctor.json)")
    p.add_argument("--steps", type=int, default=None, help="training steps per method (default 3)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also check torch.compile on the first model (default: on CUDA only)")
    p.add_argument("--models", type=comma_list, default=None,
                   help="comma-separated models (default: small_cnn on CPU; preact_resnet18 and "
                        "wide_resnet (WRN-34-10) on CUDA)")
    p.add_argument("--methods", type=comma_list, default=None, help="comma-separated methods (default: all)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 8 on CPU, 128 on CUDA")
    p.add_argument("--attack-steps", type=int, default=None,
                   help="steps of the training attack (default: 2 on CPU, the paper's 10 on CUDA)")
    p.add_argument("--precision", default="bf16", help="autocast precision: bf16 (default), fp16, fp32")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def cli_main(argv: list[str] | None = None) -> int:
    """``spat doctor``: 0 all checks passed, 1 a check failed, 2 bad arguments."""
    args = build_parser().parse_args(argv)
    settings = DoctorSettings(device=args.device, models=args.models, methods=args.methods,
                              batch_size=args.batch_size, steps=args.steps,
                              attack_steps=args.attack_steps, compile=args.compile,
                              precision=args.precision)
    try:
        check_out_path(args.out, error=ConfigError)   # before the checks' minutes, not after
        result = run_doctor(settings, log=progress_log(args.quiet))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(result))
    atomic_write_text(args.out, json.dumps(result, indent=2, default=str) + "\n", fsync=False)
    print(f"wrote {args.out}")
    return 0 if result["ok"] else 1
