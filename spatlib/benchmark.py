"""Benchmarks (``spat bench``, ``bench/throughput.py``): figures printed side by side, never timed tests.

One run measures, on the current device:

* **throughput**: images/s of one training epoch-slice (``--batches`` batches) for each method x
  model, through the trainer's own code (``spatlib.train.Trainer.train_epoch``: DeviceLoader,
  attack, update), after warm-up, the median of ``--repeats`` slices;
* a **reference loop** on the same model, data and attack settings, written the way public
  adversarial-training code usually is (a torchvision-style Dataset of uint8 images -> PIL ->
  RandomCrop/RandomHorizontalFlip/ToTensor in a DataLoader, float32, NCHW, the PGD loop of
  Rice et al.'s ``attack_pgd`` written out, no compile), so trainer / reference is one run's ratio;
* the **SPAT overhead**: spat_at step time / pgd_at step time at equal steps, for 10 classes
  (cam and input_grad) and for a 100-class model (input_grad, classes all and topk:10);
* the **AWP overhead**: step time with adversarial weight perturbation over the step without
  (``pgd_at:awp`` / ``pgd_at`` at the AT-AWP authors' gamma 0.01, ``trades:awp`` / ``trades`` at
  TRADES-AWP's 0.005; the authors report about 8% for their AT-AWP);
* **peak memory** of every configuration;
* the **floor** of the PGD-AT step: the arithmetic of a PGD-k step alone (k + 1 forwards, k
  backwards to the input only and 1 full backward, on the trainer's model, layout and
  precision, one fixed batch already on the device; no data loading, no projection, no
  optimizer step), so ``pgd_at/floor`` says how far the trainer sits from what its arithmetic
  costs, and ``reference/floor`` the same for the reference loop. ``--floor-precision bf16``
  times the floor at other precisions too (``floor:fp32/floor:bf16``: what bf16 would save).

Every configuration runs once per round, rounds alternate the order (ABBA), so drift on a shared
machine hits all of them alike; the spread of the slices and of the per-round ratios is reported.
The figures are printed, never judged here: the acceptance targets live with the benchmark
script (``bench/targets.py``, used by ``bench/throughput.py``).

Peak memory is the working memory of training, above what was allocated before the slice:

* CUDA: ``torch.cuda.max_memory_allocated`` during a timed slice minus ``memory_allocated``
  before it (model, optimizer state and data excluded; they exist after the warm-up);
* CPU: a fresh process per configuration builds it, resets the kernel's peak-RSS mark
  (``/proc/self/clear_refs``) and runs one batch; the figure is peak RSS minus RSS before the
  batch (the optimizer's momentum buffers, created at that first step, are included). A fresh
  process, because an allocator keeps freed pages: in one process an earlier configuration's
  peak would hide a later one's.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import MODELS, AttackConfig, DataConfig, ModelConfig, RunConfig, TrainConfig
from .attacks import compute_layout
from .data import Dataset, load_dataset
from .models import build_model
from .util import eval_mode, git_commit, resolve_device, utc_now

__all__ = ["Case", "BenchSettings", "run_benchmark", "markdown_report", "reference_pgd",
           "cli_main", "BENCH_METHODS", "AWP_GAMMA", "CLASSES", "MANY_CLASSES", "TOPK", "build_parser",
           "settings_from_args", "progress_log", "write_result"]

# --------------------------------------------------------------------------------------------
# settings (units in comments); --flags override the per-device defaults
EPS, ALPHA = 8 / 255, 2 / 255        # L-inf budget and PGD step, pixel units (CIFAR's)
IMAGE_SHAPE = (3, 32, 32)            # CIFAR-shaped synthetic data (C, H, W)
CLASSES = 10                         # classes of the main table
MANY_CLASSES = 100                   # the many-class SPAT overhead case (CIFAR-100-like)
TOPK = "topk:10"                     # its cheap class set
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4   # SGD of both loops (the trainer's defaults)
DEFAULTS = {
    # CPU: minutes in total on 2 cores; PreAct-18 at batch 32 keeps one PGD-10 batch ~ 5 s
    "cpu": dict(batch_size={"small_cnn": 128, "preact_resnet18": 32, "wide_resnet": 8},
                steps=10, batches=2, warmup=1, repeats=3,
                models=["small_cnn", "preact_resnet18"], overhead_models=["small_cnn"]),
    "cuda": dict(batch_size={"small_cnn": 512, "preact_resnet18": 512, "wide_resnet": 256},
                 steps=10, batches=20, warmup=3, repeats=5,
                 models=["small_cnn", "preact_resnet18", "wide_resnet"],
                 overhead_models=["preact_resnet18"]),
}
# benchmark method -> (train.method, attack.saliency)
BENCH_METHODS = {
    "standard": ("standard", None),
    "pgd_at": ("pgd_at", None),
    "trades": ("trades", None),
    "spat_at:cam": ("spat_at", "cam"),
    "spat_at:input_grad": ("spat_at", "input_grad"),
    "pgd_at:awp": ("pgd_at", None),
    "trades:awp": ("trades", None),
}
# benchmark method -> train.awp_gamma (the AWP authors': AT-AWP 0.01, TRADES-AWP 0.005)
AWP_GAMMA = {"pgd_at:awp": 0.01, "trades:awp": 0.005}
REFERENCE = "reference"              # the reference loop's "method" (PGD-AT)
FLOOR = "floor"                      # the arithmetic of the PGD-AT step alone
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Case:
    """One configuration: a model trained by a method (or the reference loop) at given sizes."""
    model: str
    method: str                 # a key of BENCH_METHODS, or "reference"
    batch_size: int
    steps: int                  # PGD steps of the training attack
    batches: int                # batches per timed slice
    num_classes: int = CLASSES
    classes: str = "all"        # SPAT class set
    class_chunk: int | None = None   # None: the config default
    floor_precision: str | None = None   # floor cases: None = the run's precision, else this one

    @property
    def key(self) -> str:
        parts = [self.model, self.method, f"k{self.num_classes}"]
        if self.method.startswith("spat"):
            parts.append(self.classes)
        if self.floor_precision is not None:
            parts.append(self.floor_precision)
        return "/".join(parts)

    @property
    def label(self) -> str:
        """The method as the table shows it, e.g. ``spat_at (input_grad, topk:10)``."""
        if self.method == REFERENCE:
            return "reference PGD-AT"
        if self.method == FLOOR:
            return "floor (PGD-AT arithmetic)"
        name, saliency = BENCH_METHODS[self.method]
        if self.method in AWP_GAMMA:
            return f"{name} + AWP (gamma {AWP_GAMMA[self.method]:g})"
        if saliency is None:
            return name
        return f"{name} ({saliency})" if self.classes == "all" else f"{name} ({saliency}, {self.classes})"


@dataclass
class BenchSettings:
    """Everything one benchmark run needs; ``resolve_settings`` fills the device defaults."""
    device: str = "auto"
    models: list[str] | None = None
    methods: list[str] | None = None
    batch_size: int | None = None     # None: per model, DEFAULTS[device]["batch_size"]
    steps: int | None = None
    batches: int | None = None
    warmup: int | None = None         # warm-up batches per configuration (not timed)
    repeats: int | None = None
    reference: bool = True
    overhead: bool = True
    overhead_models: list[str] | None = None
    memory: bool = True
    class_chunk: int | None = None
    threads: int | None = None        # torch intra-op threads; None: every core
    workers: int | None = None        # reference DataLoader workers; None: 0 on CPU, 4 on CUDA
    max_other_load: float | None = None   # redo slices beside other jobs; None: 0.1 on CPU, off on CUDA
    retries: int = 3                  # redone slices per timed slice at most
    max_wait: float = 1800.0          # seconds spent waiting for a quiet machine, in all
    precision: str = "auto"           # the trainer's train.precision
    compile: bool = False             # the trainer's train.compile
    floor: bool = True                # time the PGD-AT step's arithmetic alone (with pgd_at)
    floor_precisions: list[str] | None = None   # the floor at these precisions too
    out: str | None = None            # JSON path; None: bench/results/<device>.json


# --------------------------------------------------------------------------------------------
# machine and provenance
def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info(device: torch.device, threads: int) -> dict:
    """Where and with what the figures were taken."""
    from . import __version__
    info = {
        "device": str(device), "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
        "torch_threads": threads, "torch": str(torch.__version__), "python": platform.python_version(),
        "platform": platform.platform(), "spatlib": __version__, "git_commit": git_commit(),
        "date": utc_now(),
    }
    with contextlib.suppress(ImportError):
        import torchvision
        info["torchvision"] = torchvision.__version__
    # the allocator matters on CPU (freed activations go back to the OS and fault in again)
    info["allocator_env"] = {k: v for k, v in os.environ.items()
                             if k.startswith("MALLOC_") or k in ("LD_PRELOAD", "OMP_NUM_THREADS")}
    if device.type == "cpu":
        from . import allocator
        kept = allocator.keep_freed_memory()   # what the trainer does on CPU (spatlib.allocator)
        info["cpu_allocator"] = (("trainer: malloc keeps freed memory (spatlib.allocator)" if kept
                                  else "trainer: malloc defaults") +
                                 "; reference: malloc defaults, in a process of its own")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return info


def device_tag(device: torch.device, info: dict) -> str:
    """File-name tag of the machine: ``cpu-2core`` or the GPU's name, e.g. ``nvidia-h100-80gb-hbm3``."""
    if device.type == "cuda":
        name = info.get("gpu", "cuda")
    else:
        name = f"{device.type}-{info['cpu_count']}core"
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


# --------------------------------------------------------------------------------------------
# data: synthetic CIFAR-shaped uint8 images in an npz, so the trainer augments them as CIFAR
# (npz of 3x32x32 gets pad 4 + flip) and the reference loop reads the same images
def write_data(folder: Path, num_classes: int, n_train: int, n_test: int = 16) -> tuple[Path, Dataset]:
    """Write ``synthetic-k{num_classes}.npz`` (NHWC uint8) and return its path and Dataset."""
    ds = load_dataset("synthetic", num_classes=num_classes, shape=IMAGE_SHAPE, n_train=n_train,
                      n_test=n_test, seed=0)
    path = folder / f"synthetic-k{num_classes}.npz"
    np.savez(path, x_train=ds.x_train.permute(0, 2, 3, 1).numpy(), y_train=ds.y_train.numpy(),
             x_test=ds.x_test.permute(0, 2, 3, 1).numpy(), y_test=ds.y_test.numpy(),
             class_names=np.array(ds.class_names))
    return path, load_dataset("npz", path=str(path))


# --------------------------------------------------------------------------------------------
# the trainer's step
class TrainerSlice:
    """A configuration run through the trainer's own code: a :class:`spatlib.train.Trainer`
    built from a RunConfig (without a run folder: it writes nothing), a slice is
    ``train_epoch(epoch, max_batches=batches)``."""

    def __init__(self, case: Case, data_path: Path, device: torch.device, *, precision: str = "auto",
                 compile: bool = False, epochs: int = 100):
        from . import train  # train imports attacks; the benchmark sits outside both
        method, saliency = BENCH_METHODS[case.method]
        attack = AttackConfig(eps=EPS, alpha=ALPHA, steps=case.steps, saliency=saliency or "input_grad",
                              classes=case.classes)
        if case.class_chunk is not None:
            attack.class_chunk = case.class_chunk
        self.config = RunConfig(
            name=f"bench-{case.key}", seed=0,
            # every training image trains (slices never validate: no hold-out to take out)
            data=DataConfig(name="npz", path=str(data_path), download=False, val_split="test",
                            augment=True),
            model=ModelConfig(name=case.model, depth=34, width=10),
            attack=attack,
            # epochs: the lr schedule spans every slice the benchmark runs (no decay to ~0);
            # share_every 0: the manipulation check is a measurement, not the step being timed
            train=TrainConfig(method=method, epochs=epochs, batch_size=case.batch_size,
                              lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                              device=str(device), precision=precision, compile=compile,
                              awp_gamma=AWP_GAMMA.get(case.method, 0.0), progress=False,
                              share_every=0))
        self.trainer = train.Trainer(self.config, device=device)
        self.precision = self.trainer.precision

    def run(self, epoch: int, batches: int) -> None:
        self.trainer.train_epoch(epoch, max_batches=batches)


class FloorSlice:
    """The arithmetic of one PGD-AT step alone, ``batches`` times: PGD-k's k forwards with a
    backward to the input only (the model in eval mode, as the attack's ``bn_mode: eval``),
    the forward of the update (train mode, through ``train.compile`` when set; the fixed batch
    stands in for the last iterate, at the same cost) and one full backward through the
    weights, all on one fixed batch of the
    trainer's loader. The model, its layout (the attack's :func:`~spatlib.attacks.compute_layout`
    for the k attack passes, the loader's for the update), autocast and ``train.compile`` are
    the trainer's: a :class:`TrainerSlice` of pgd_at is built and its parts reused. What the
    step does besides (random start, sign and projection, loader, optimizer, logging) is left
    out, so step time / floor time is the trainer's distance to its floor."""

    def __init__(self, case: Case, data_path: Path, device: torch.device, *, precision: str = "auto",
                 compile: bool = False):
        pgd = replace(case, method="pgd_at", floor_precision=None)
        self.trainer = TrainerSlice(pgd, data_path, device, precision=case.floor_precision or precision,
                                    compile=compile).trainer
        self.precision = self.trainer.precision
        self.steps = case.steps
        x, y = next(iter(self.trainer.loader))   # one augmented batch, already on the device
        self.x, self.y = x, y
        self.x_attack = compute_layout(self.trainer.model, x)   # the layout the attack computes in

    def run(self, epoch: int, batches: int) -> None:
        t, model, y = self.trainer, self.trainer.model, self.y
        for _ in range(batches):
            with eval_mode(model), t.amp():
                for _ in range(self.steps):
                    x_in = self.x_attack.detach().requires_grad_(True)
                    loss = F.cross_entropy(model(x_in).float(), y)
                    torch.autograd.grad(loss, x_in)
            model.train()
            with t.amp():
                loss = F.cross_entropy(t.fwd(self.x), y)
            loss.backward()
            model.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------------------------
# the reference loop: how public adversarial-training code is usually written
class _PILImages(torch.utils.data.Dataset):
    """Like ``torchvision.datasets.CIFAR10``: uint8 HWC numpy images -> PIL -> transform."""

    def __init__(self, x_hwc: np.ndarray, y: np.ndarray, transform: Callable):
        self.x, self.y, self.transform = x_hwc, y, transform

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        from PIL import Image
        return self.transform(Image.fromarray(self.x[i])), int(self.y[i])


def reference_pgd(model: nn.Module, x: Tensor, y: Tensor, eps: float, alpha: float, steps: int) -> Tensor:
    """The PGD of Rice et al.'s ``attack_pgd`` (``loss.backward()`` on the model, ``delta.grad``),
    without early stopping. x (N, C, H, W) in [0, 1] -> delta (N, C, H, W)."""
    delta = torch.zeros_like(x).uniform_(-eps, eps)
    delta = torch.clamp(delta, -x, 1 - x)
    delta.requires_grad = True
    for _ in range(steps):
        loss = F.cross_entropy(model(x + delta), y)
        loss.backward()
        grad = delta.grad.detach()
        d = torch.clamp(delta + alpha * torch.sign(grad), -eps, eps)
        delta.data = torch.clamp(d, -x, 1 - x)
        delta.grad.zero_()
    return delta.detach()


class ReferenceSlice:
    """PGD-AT as public code writes it: DataLoader with PIL transforms, float32 NCHW, the PGD loop
    of :func:`reference_pgd` (BatchNorm in eval mode while attacking, as the trainer's
    ``bn_mode: eval``), a ``.item()`` per batch for the running loss and accuracy, no compile."""

    def __init__(self, case: Case, data_path: Path, dataset: Dataset, device: torch.device,
                 workers: int = 0):
        from torchvision import transforms
        with np.load(data_path) as f:
            x_hwc, y = f["x_train"], f["y_train"].astype(np.int64)
        self.case, self.device = case, device
        self.model = build_model(case.model, dataset.num_classes, dataset.in_channels, dataset.mean,
                                 dataset.std, image_size=dataset.image_size, seed=0).to(device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=LR, momentum=MOMENTUM,
                                   weight_decay=WEIGHT_DECAY)
        transform = transforms.Compose([transforms.RandomCrop(IMAGE_SHAPE[1], padding=4),
                                        transforms.RandomHorizontalFlip(), transforms.ToTensor()])
        # persistent workers: their start-up is paid once in the warm-up, as a real run pays it
        # once per epoch of hundreds of batches, not once per short slice
        self.loader = torch.utils.data.DataLoader(
            _PILImages(x_hwc, y, transform), batch_size=case.batch_size, shuffle=True,
            num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0)
        self.precision = "fp32"

    def run(self, epoch: int, batches: int) -> None:
        model, dev = self.model, self.device
        train_loss = train_acc = n = 0.0
        for i, (x, y) in enumerate(self.loader):
            if i >= batches:
                break
            x, y = x.to(dev), y.to(dev)
            model.eval()
            delta = reference_pgd(model, x, y, EPS, ALPHA, self.case.steps)
            model.train()
            out = model(torch.clamp(x + delta, 0, 1))
            loss = F.cross_entropy(out, y)
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            train_loss += loss.item() * y.size(0)
            train_acc += (out.max(1)[1] == y).sum().item()
            n += y.size(0)


class ReferenceProcess:
    """The reference loop in a child process of its own (CPU).

    The trainer keeps freed memory in its process on CPU (:mod:`spatlib.allocator`), a
    process-wide malloc setting; public code runs under glibc's defaults, so the reference must
    not inherit the trainer's setting. The child builds a :class:`ReferenceSlice` and runs a
    slice per request (JSON lines on its stdin/stdout); ``child_cpu_s`` is the CPU time of its
    last slice, which :class:`OtherLoad` counts as the benchmark's own.
    """

    def __init__(self, case: Case, data_path: Path, threads: int, workers: int = 0):
        spec = {"case": asdict(case), "data": str(data_path), "threads": threads, "workers": workers}
        self.proc = subprocess.Popen([sys.executable, "-m", "spatlib.benchmark", "--reference-worker",
                                      json.dumps(spec)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)
        self.precision = "fp32"
        self.child_cpu_s = 0.0
        self._reply()          # "ready" once the model and the DataLoader exist

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise RuntimeError(f"reference worker exited (code {code}) before replying; "
                               f"its traceback is above")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"reference worker: {reply['error']}")
        return reply

    def run(self, epoch: int, batches: int) -> None:
        self.proc.stdin.write(json.dumps({"epoch": epoch, "batches": batches}) + "\n")
        self.child_cpu_s = float(self._reply()["cpu_s"])

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def reference_worker(spec: dict) -> int:
    """The child of :class:`ReferenceProcess`: serve slices until stdin closes."""
    torch.set_num_threads(spec["threads"])
    case, path = Case(**spec["case"]), Path(spec["data"])
    out = sys.stdout
    sys.stdout = sys.stderr    # the protocol owns stdout; anything printed goes to stderr
    try:
        runner = ReferenceSlice(case, path, load_dataset("npz", path=str(path)), torch.device("cpu"),
                                spec["workers"])
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
        out.write(json.dumps({"error": f"{type(e).__name__}: {e}"}) + "\n")
        out.flush()
        return 1
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        t0 = os.times()
        try:
            runner.run(int(req["epoch"]), int(req["batches"]))
        except Exception as e:  # noqa: BLE001
            out.write(json.dumps({"error": f"{type(e).__name__}: {e}"}) + "\n")
            out.flush()
            return 1
        t1 = os.times()
        out.write(json.dumps({"cpu_s": (t1.user + t1.system) - (t0.user + t0.system)}) + "\n")
        out.flush()
    return 0


def build_runner(case: Case, data_path: Path, dataset: Dataset, device: torch.device, *,
                 precision: str = "auto", compile: bool = False, workers: int = 0,
                 threads: int | None = None):
    """A runner for ``case``. On CPU with ``threads`` given, the reference loop runs in a
    :class:`ReferenceProcess` (glibc's default malloc, as public code runs); else in process."""
    if case.method == REFERENCE:
        if device.type == "cpu" and threads is not None:
            return ReferenceProcess(case, data_path, threads, workers)
        return ReferenceSlice(case, data_path, dataset, device, workers)
    if case.method == FLOOR:
        return FloorSlice(case, data_path, device, precision=precision, compile=compile)
    return TrainerSlice(case, data_path, device, precision=precision, compile=compile)


# --------------------------------------------------------------------------------------------
# measuring
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


class OtherLoad:
    """How much of the machine other processes used since the last ``mark()``, as a fraction
    of all cores: busy CPU time of the whole machine (/proc/stat, steal included) minus this
    process's own. On a shared machine a slice that ran beside another job is not a figure of
    the code: the benchmark waits for a quiet machine and repeats such slices (Linux only;
    elsewhere ``fraction`` is 0 and nothing is waited for)."""

    def __init__(self):
        self.available = self._busy() is not None
        self.mark()

    @staticmethod
    def _busy() -> float | None:
        try:
            fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        except (OSError, IndexError):
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    def mark(self) -> None:
        t = os.times()
        self._t = (time.perf_counter(), self._busy() or 0.0, t.user + t.system)

    def fraction(self, own_children_s: float = 0.0) -> float:
        """``own_children_s``: CPU seconds that the benchmark's own child processes (the
        reference worker) used since the mark; they are not others' load."""
        if not self.available:
            return 0.0
        wall0, busy0, own0 = self._t
        t = os.times()
        wall = time.perf_counter() - wall0
        others = (self._busy() or 0.0) - busy0 - (t.user + t.system - own0) - own_children_s
        return max(0.0, others / max(wall * (os.cpu_count() or 1), 1e-9))

    def wait_quiet(self, threshold: float, timeout: float, window: float = 1.0) -> float:
        """Block until others used under ``threshold`` of the machine for ``window`` seconds,
        or ``timeout`` seconds passed. Returns the seconds waited."""
        t0 = time.perf_counter()
        while self.available and time.perf_counter() - t0 < timeout:
            self.mark()
            time.sleep(window)
            if self.fraction() < threshold:
                break
        return time.perf_counter() - t0


def _rss_kb(field: str) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def probe_cpu_memory(spec: dict) -> dict:
    """In a fresh process: build ``spec["case"]``, run one batch, return the peak RSS increase."""
    torch.set_num_threads(spec["threads"])
    case = Case(**spec["case"])
    path = Path(spec["data"])
    runner = build_runner(case, path, load_dataset("npz", path=str(path)), torch.device("cpu"),
                          precision=spec["precision"], compile=spec["compile"])
    exact = _reset_peak_rss() and _rss_kb("VmHWM") is not None
    before = _rss_kb("VmRSS") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    runner.run(0, 1)
    peak = _rss_kb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mem_mb": (peak - before) / 1024, "rss_before_mb": before / 1024,
            "memory_method": "cpu: peak RSS - RSS before one batch, fresh process"
                             + ("" if exact else " (ru_maxrss: a lower bound)")}


def _cpu_memory_subprocess(case: Case, data_path: Path, threads: int, precision: str,
                           compile: bool) -> dict:
    spec = {"case": asdict(case), "data": str(data_path), "threads": threads,
            "precision": precision, "compile": compile}
    out = subprocess.run([sys.executable, "-m", "spatlib.benchmark", "--probe", json.dumps(spec)],
                         capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["?"])[-1]
        return {"peak_mem_mb": float("nan"), "memory_error": tail}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _median(v: list[float]) -> float:
    return statistics.median(v) if v else float("nan")


def _ratio_stats(num: list[float], den: list[float]) -> dict:
    """Median-over-median ratio (the figure), fastest-over-fastest (``best``: noise on a shared
    machine only ever slows a slice down) and the range of the per-round (paired) ratios."""
    nan = float("nan")
    paired = [a / b for a, b in zip(num, den) if b > 0]
    ok = bool(num and den and min(den) > 0)
    return {"ratio": _median(num) / _median(den) if ok else nan,
            "best": min(num) / min(den) if ok else nan,
            "round_min": min(paired) if paired else nan,
            "round_max": max(paired) if paired else nan}


def resolve_settings(s: BenchSettings) -> tuple[BenchSettings, torch.device]:
    """The settings with every None filled from the device's defaults."""
    device = resolve_device(s.device, key="--device")   # a ConfigError is a ValueError
    if device.type not in DEFAULTS:
        raise ValueError(f"--device {s.device}: expected cpu or cuda[:N]")
    d = DEFAULTS[device.type]
    s = replace(s, device=str(device),
                models=list(s.models or d["models"]),
                methods=list(s.methods or BENCH_METHODS),
                steps=d["steps"] if s.steps is None else s.steps,
                batches=d["batches"] if s.batches is None else s.batches,
                warmup=d["warmup"] if s.warmup is None else s.warmup,
                repeats=d["repeats"] if s.repeats is None else s.repeats,
                overhead_models=list(s.overhead_models or d["overhead_models"]),
                threads=s.threads or os.cpu_count() or 1,
                max_other_load=(0.1 if device.type == "cpu" else 1.0)
                if s.max_other_load is None else s.max_other_load,
                workers=(0 if device.type == "cpu" else min(4, os.cpu_count() or 1))
                if s.workers is None else s.workers)
    for m in s.models + s.overhead_models:
        if m not in MODELS:
            raise ValueError(f"--models: unknown model {m!r}; allowed: {', '.join(MODELS)}")
    for m in s.methods:
        if m not in BENCH_METHODS:
            raise ValueError(f"--methods: unknown method {m!r}; allowed: {', '.join(BENCH_METHODS)}")
    for p in s.floor_precisions or []:
        if p not in PRECISIONS:
            raise ValueError(f"--floor-precision: unknown precision {p!r}; allowed: {', '.join(PRECISIONS)}")
    if s.floor_precisions and not (s.floor and "pgd_at" in s.methods):
        raise ValueError("--floor-precision: the floor is timed beside pgd_at; add pgd_at to "
                         "--methods (and leave out --no-floor)")
    if min(s.steps, s.batches, s.repeats) < 1 or s.warmup < 0:
        raise ValueError("--steps, --batches, --repeats must be >= 1 and --warmup >= 0")
    return s, device


def plan_cases(s: BenchSettings, device: torch.device) -> list[Case]:
    """The configurations of a run: method x model (+ reference), then the overhead cases."""
    from .train import resolve_precision   # the trainer's precision of this run
    run_precision = resolve_precision(s.precision, device)

    def batch(model: str) -> int:
        return s.batch_size or DEFAULTS[device.type]["batch_size"][model]

    cases = []
    for model in s.models:
        common = dict(model=model, batch_size=batch(model), steps=s.steps, batches=s.batches,
                      class_chunk=s.class_chunk)
        cases += [Case(method=m, **common) for m in s.methods]
        if s.reference:
            cases.append(Case(method=REFERENCE, **common))
        if s.floor and "pgd_at" in s.methods:
            cases.append(Case(method=FLOOR, **common))
            cases += [Case(method=FLOOR, floor_precision=p, **common)
                      for p in dict.fromkeys(s.floor_precisions or []) if p != run_precision]
    if s.overhead:
        for model in s.overhead_models:
            common = dict(model=model, batch_size=batch(model), steps=s.steps, batches=s.batches,
                          num_classes=MANY_CLASSES, class_chunk=s.class_chunk)
            cases += [Case(method="pgd_at", **common),
                      Case(method="spat_at:input_grad", classes="all", **common),
                      Case(method="spat_at:input_grad", classes=TOPK, **common)]
    return cases


def run_benchmark(settings: BenchSettings, log: Callable[[str], None] = print) -> dict:
    """Measure every case of ``settings`` and return the result dict (see ``markdown_report``)."""
    s, device = resolve_settings(settings)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(s.threads)
    try:
        return _run(s, device, log)
    finally:
        torch.set_num_threads(threads_before)


def _run(s: BenchSettings, device: torch.device, log: Callable[[str], None]) -> dict:
    cases = plan_cases(s, device)
    info = machine_info(device, s.threads)
    from .train import backend_flags  # cuDNN autotuning on CUDA, as a training run has it

    with tempfile.TemporaryDirectory(prefix="spat-bench-") as tmp, backend_flags(False, device):
        data = {}
        for k in sorted({c.num_classes for c in cases}):
            n = max(c.batch_size * max(c.batches, s.warmup, 1) for c in cases if c.num_classes == k)
            data[k] = write_data(Path(tmp), k, n)
        runners = {}
        for c in cases:
            log(f"building {c.key}")
            path, ds = data[c.num_classes]
            runners[c.key] = build_runner(c, path, ds, device, precision=s.precision,
                                          compile=s.compile, workers=s.workers, threads=s.threads)
        precision = {k: r.precision for k, r in runners.items()}
        try:
            timing = _time_cases(cases, runners, s, device, log)
        finally:
            for r in runners.values():
                if isinstance(r, ReferenceProcess):
                    r.close()
        runners.clear()
        memory = {k: t.pop("memory") for k, t in timing.items() if "memory" in t}
        if s.memory and device.type == "cpu":
            for c in cases:
                if c.method == FLOOR:
                    continue           # the floor's memory is not a figure of the trainer
                log(f"memory {c.key}")
                memory[c.key] = _cpu_memory_subprocess(c, data[c.num_classes][0], s.threads,
                                                       s.precision, s.compile)

    rows = []
    for c in cases:
        t = timing[c.key]["times_s"]
        med = _median(t)
        rows.append({**asdict(c), "key": c.key, "label": c.label,
                     "impl": {REFERENCE: "reference", FLOOR: "floor"}.get(c.method, "trainer"),
                     "precision": precision[c.key], **timing[c.key],
                     "images_per_s": c.batch_size * c.batches / med,
                     "best_images_per_s": c.batch_size * c.batches / min(t),
                     "step_ms": 1000 * med / c.batches,
                     "spread": (max(t) - min(t)) / med if med > 0 else float("nan"),
                     **memory.get(c.key, {})})
    result = {"machine": info, "settings": {**asdict(s), "eps": EPS, "alpha": ALPHA,
                                            "image_shape": list(IMAGE_SHAPE)},
              "rows": rows}
    result["ratios"] = compute_ratios(rows)
    return result


def _time_cases(cases: list[Case], runners: dict, s: BenchSettings, device: torch.device,
                log: Callable[[str], None]) -> dict[str, dict]:
    """Warm every case up, then ``s.repeats`` rounds that run each case once, in alternating
    order (ABBA: no case always first). A slice during which other processes used more than
    ``s.max_other_load`` of the machine is redone (at most ``s.retries`` times), after waiting
    for a quiet machine (at most ``s.max_wait`` seconds over the run). On CUDA the first kept
    slice also gives the peak memory."""
    for c in cases:
        if s.warmup:
            log(f"warm-up {c.key}")
            runners[c.key].run(0, s.warmup)
    out = {c.key: {"times_s": [], "other_load": [], "redone": 0} for c in cases}
    load, wait_left = OtherLoad(), float(s.max_wait)
    for r in range(s.repeats):
        for c in (cases if r % 2 == 0 else cases[::-1]):
            rec = out[c.key]
            for attempt in range(s.retries + 1):
                if s.max_other_load < 1 and wait_left > 0:
                    waited = load.wait_quiet(s.max_other_load, wait_left)
                    wait_left -= waited
                    if waited > 5:
                        log(f"waited {waited:.0f} s for a quiet machine ({wait_left:.0f} s of "
                            f"--max-wait left)")
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                    base = torch.cuda.memory_allocated(device)
                load.mark()
                t = _timed(lambda: runners[c.key].run(r + 1, c.batches), device)
                other = load.fraction(getattr(runners[c.key], "child_cpu_s", 0.0))
                if other < s.max_other_load or attempt == s.retries:
                    break
                rec["redone"] += 1
                log(f"round {r + 1}/{s.repeats} {c.key}: {t:.2f} s beside other jobs "
                    f"({100 * other:.0f}% of the machine): redone")
            rec["times_s"].append(t)
            rec["other_load"].append(other)
            if device.type == "cuda" and "memory" not in rec:
                peak = torch.cuda.max_memory_allocated(device)
                rec["memory"] = {"peak_mem_mb": (peak - base) / 2**20, "peak_allocated_mb": peak / 2**20,
                                 "memory_method": "cuda: max_memory_allocated during a slice - "
                                                  "memory_allocated before it"}
            log(f"round {r + 1}/{s.repeats} {c.key}: {t:.2f} s")
    return out


def compute_ratios(rows: list[dict]) -> list[dict]:
    """trainer / reference (pgd_at), SPAT and AWP overheads, memory ratios, and the distances
    to the floor (pgd_at / floor, reference / floor, floor / floor at another precision), per model."""
    by_key = {r["key"]: r for r in rows}
    out = []

    def add(name: str, model: str, k: int, num: dict, den: dict, times: bool = True) -> None:
        if times:
            st = _ratio_stats(num["times_s"], den["times_s"])
        else:
            v = num.get("peak_mem_mb", float("nan")) / den.get("peak_mem_mb", float("nan"))
            st = {"ratio": v, "best": float("nan"), "round_min": float("nan"), "round_max": float("nan")}
        out.append({"name": name, "model": model, "num_classes": k, **st})

    for r in rows:
        model, k = r["model"], r["num_classes"]
        if r["method"] in AWP_GAMMA:   # with AWP over the same method without it
            plain = BENCH_METHODS[r["method"]][0]
            base = by_key.get(f"{model}/{plain}/k{k}")
            if base is not None:
                add(f"awp_overhead:{plain}", model, k, r, base)
            continue
        pgd = by_key.get(f"{model}/pgd_at/k{k}")
        if pgd is None or r is pgd:
            continue
        if r["method"] == REFERENCE:
            # speed-up: reference time over trainer time
            add("trainer/reference", model, k, r, pgd)
            floor = by_key.get(f"{model}/{FLOOR}/k{k}")
            if floor is not None:
                add("reference/floor", model, k, r, floor)
        elif r["method"] == FLOOR and r["floor_precision"] is None:
            add("pgd_at/floor", model, k, pgd, r)
        elif r["method"] == FLOOR:
            floor = by_key.get(f"{model}/{FLOOR}/k{k}")
            if floor is not None:
                add(f"floor:{floor['precision']}/floor:{r['precision']}", model, k, floor, r)
        elif r["method"].startswith("spat"):
            saliency = BENCH_METHODS[r["method"]][1]
            suffix = "" if r["classes"] == "all" else f":{r['classes']}"
            add(f"spat_overhead:{saliency}{suffix}", model, k, r, pgd)
            if saliency == "input_grad" and r["classes"] == "all" and "peak_mem_mb" in r:
                add("memory:spat_at:input_grad/pgd_at", model, k, r, pgd, times=False)
    return out


# --------------------------------------------------------------------------------------------
# report
def _f(v, fmt: str = ".2f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, fmt)


def markdown_report(result: dict) -> str:
    """The throughput table, the ratios and the machine, as markdown."""
    m, s = result["machine"], result["settings"]
    where = m.get("gpu") or f"{m['cpu']}, {m['cpu_count']} cores"
    lines = [f"### spat bench: {where}",
             "",
             f"torch {m['torch']}, device {m['device']}, {m['torch_threads']} threads, "
             f"eps {EPS * 255:.0f}/255, alpha {ALPHA * 255:.0f}/255, CIFAR-shaped synthetic data "
             f"{IMAGE_SHAPE[0]}x{IMAGE_SHAPE[1]}x{IMAGE_SHAPE[2]}, median of {s['repeats']} slices of "
             f"{s['batches']} batches after {s['warmup']} warm-up batches, reference DataLoader "
             f"workers {s['workers']}." + (f" CPU allocator: {m['cpu_allocator']}."
                                            if m.get("cpu_allocator") else ""),
             "",
             "| model | method | classes | batch | PGD steps | precision | images/s | step ms | spread "
             "| others | peak MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        classes = str(r["num_classes"]) if r["classes"] == "all" else f"{r['num_classes']} ({r['classes']})"
        steps = r["steps"] if r["method"] != "standard" else "-"
        others = f"{100 * max(r['other_load']):.0f}%" + (f" ({r['redone']} redone)" if r["redone"] else "")
        lines.append(f"| {r['model']} | {r['label']} | {classes} | {r['batch_size']} | {steps} | "
                     f"{r['precision']} | {_f(r['images_per_s'], '.1f')} | {_f(r['step_ms'], '.0f')} | "
                     f"{_f(100 * r['spread'], '.0f')}% | {others} | {_f(r.get('peak_mem_mb'), '.0f')} |")
    lines += ["", "spread: (slowest - fastest) / median slice. others: the most of the machine that "
              "other processes used during a kept slice (slices beside other jobs are redone)."]
    if any(r["method"] == FLOOR for r in result["rows"]):
        lines += ["floor: the PGD-AT step's arithmetic alone (k + 1 forwards, k backwards to the "
                  "input only, 1 full backward; one fixed batch, no data loading, projection or "
                  "optimizer step). pgd_at/floor = the trainer's step time over it: 1 means the "
                  "step costs no more than its arithmetic; floor:A/floor:B = the floor's time at "
                  "precision A over its time at B (above 1: B is faster)."]
    lines += ["",
              "| ratio | model | classes | median | fastest slices | per-round range |",
              "|---|---|---|---|---|---|"]
    for q in result["ratios"]:
        rng = ("-" if math.isnan(q["round_min"]) else f"{q['round_min']:.2f} - {q['round_max']:.2f}")
        lines.append(f"| {q['name']} | {q['model']} | {q['num_classes']} | {_f(q['ratio'])} | "
                     f"{_f(q['best'])} | {rng} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# command line
def _list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _methods(text: str) -> list[str]:
    out = []
    for t in _list(text):
        out += ["spat_at:cam", "spat_at:input_grad"] if t == "spat_at" else [t]
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spat bench",
        description="Trainer throughput (images/s, peak memory) per method x model, the same PGD-AT "
                    "in a reference loop written like public adversarial-training code, the SPAT "
                    "overhead (spat_at / pgd_at step time at equal steps), the AWP overhead "
                    "(pgd_at:awp / pgd_at, trades:awp / trades) and the PGD-AT step's "
                    "distance to its floor (step time / its arithmetic timed alone), on "
                    "CIFAR-shaped synthetic data. Prints a markdown table and writes JSON (+ .md beside it).",
        epilog="Defaults (CPU): small_cnn batch 128 and preact_resnet18 batch 32, PGD-10, slices of 2 "
               "batches, 1 warm-up batch, median of 3; wide_resnet (34-10) only with --models. "
               "Defaults (CUDA): all three models, batch 512 (WRN 256), PGD-10, 20 batches, 3 warm-up, "
               "median of 5. Timings are figures, never assertions.")
    p.add_argument("--models", type=_list, default=None,
                   help=f"comma list of {', '.join(MODELS)} (default: small_cnn,preact_resnet18 on "
                        "CPU; all three on CUDA)")
    p.add_argument("--methods", type=_methods, default=None,
                   help=f"comma list of {', '.join(BENCH_METHODS)}; spat_at means both saliencies "
                        "(default: all)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size for every model "
                   "(default: per model and device, see below)")
    p.add_argument("--steps", type=int, default=None, help="PGD steps of every attack (default 10)")
    p.add_argument("--batches", type=int, default=None,
                   help="batches per timed slice (default: 2 on CPU, 20 on CUDA)")
    p.add_argument("--repeats", type=int, default=None, help="timed slices per configuration; the "
                   "median is reported (default: 3 on CPU, 5 on CUDA)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed warm-up batches per configuration (default: 1 on CPU, 3 on CUDA)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--out", default=None, help="JSON output path (default: "
                   "bench/results/<device>.json, e.g. cpu-2core.json); a .md copy of the table is "
                   "written beside it")
    p.add_argument("--no-reference", dest="reference", action="store_false",
                   help="skip the reference loop")
    p.add_argument("--no-overhead", dest="overhead", action="store_false",
                   help=f"skip the {MANY_CLASSES}-class SPAT overhead cases")
    p.add_argument("--overhead-models", type=_list, default=None,
                   help=f"models of the {MANY_CLASSES}-class overhead cases (default: small_cnn on "
                        "CPU, preact_resnet18 on CUDA)")
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip peak memory (on CPU it costs one fresh process per configuration)")
    p.add_argument("--class-chunk", type=int, default=None,
                   help="SPAT attack.class_chunk (default: the config default)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: every core)")
    p.add_argument("--workers", type=int, default=None,
                   help="reference DataLoader workers (default: 0 on CPU, where workers would take "
                        "the cores the training needs; 4 on CUDA)")
    p.add_argument("--max-other-load", type=float, default=None,
                   help="a timed slice during which other processes used more than this fraction "
                        "of the machine is redone, after waiting for a quiet machine (default: 0.1 "
                        "on CPU; 1 = off, the default on CUDA)")
    p.add_argument("--retries", type=int, default=3, help="times a slice is redone at most (default 3)")
    p.add_argument("--max-wait", type=float, default=1800.0,
                   help="seconds to wait for a quiet machine over the whole run; then slices run "
                        "as they come, their other_load recorded (default 1800)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="the trainer's train.precision (auto: bf16 on CUDA, fp32 on CPU); the "
                        "reference loop is always float32")
    p.add_argument("--compile", action="store_true", help="the trainer's train.compile (the training "
                   "forward/backward; the attack stays eager)")
    p.add_argument("--no-floor", dest="floor", action="store_false",
                   help="skip the floor (the PGD-AT step's arithmetic timed alone, beside pgd_at)")
    p.add_argument("--floor-precision", dest="floor_precisions", type=_list, default=None,
                   help="comma list of fp32, bf16, fp16: time the floor at these precisions too "
                        "(e.g. bf16 on a CPU that runs fp32: what bf16 would save; the trainer "
                        "stays at --precision)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # internal: CPU memory probe
    p.add_argument("--reference-worker", default=None, help=argparse.SUPPRESS)  # internal
    return p


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    """The settings of parsed ``build_parser()`` arguments."""
    return BenchSettings(**{k: v for k, v in vars(args).items()
                            if k not in ("quiet", "probe", "reference_worker")})


def progress_log(quiet: bool) -> Callable[[str], None]:
    """Progress lines on stderr (nothing when ``quiet``)."""
    return (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))


def write_result(result: dict, report: str, out: str | None = None) -> Path:
    """Write ``result`` as JSON to ``out`` (default ``bench/results/<device>.json``) and the
    markdown ``report`` beside it (``.md``); returns the JSON path."""
    dev = torch.device(result["settings"]["device"])
    path = Path(out) if out else Path("bench/results") / f"{device_tag(dev, result['machine'])}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    path.with_suffix(".md").write_text(report)
    return path


def cli_main(argv: list[str] | None = None) -> int:
    """``spat bench``: run the benchmark, print the markdown report, write JSON and markdown."""
    args = build_parser().parse_args(argv)
    if args.probe is not None:
        print(json.dumps(probe_cpu_memory(json.loads(args.probe))))
        return 0
    if args.reference_worker is not None:
        return reference_worker(json.loads(args.reference_worker))
    try:
        result = run_benchmark(settings_from_args(args), progress_log(args.quiet))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = markdown_report(result)
    print(report)
    out = write_result(result, report, args.out)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
