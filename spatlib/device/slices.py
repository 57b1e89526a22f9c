"""What ``spat bench`` times (:mod:`spatlib.device.bench`): one configuration (:class:`Case`)
built as a runner whose ``run(epoch, batches)`` is one timed slice.

* :class:`TrainerSlice`: the trainer's own code (:class:`spatlib.train.Trainer`, built from a
  RunConfig without a run folder), a slice is ``train_epoch(epoch, max_batches=batches)``;
* :class:`FloorSlice`: the arithmetic of the PGD-AT step alone, on the pgd_at trainer's model;
* :class:`ReferenceSlice`: PGD-AT as public adversarial-training code writes it (a
  torchvision-style Dataset -> PIL transforms -> DataLoader, float32 NCHW, Rice et al.'s PGD
  loop), and :class:`ReferenceProcess`, the same in a child process of its own (CPU);
* :func:`cpu_memory`: a configuration's peak memory on the CPU, in a fresh process.

The child processes run this module: ``python -m spatlib.device.slices reference|probe SPEC``.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attacks import compute_layout
from ..config import AttackConfig, DataConfig, ModelConfig, RunConfig, TrainConfig
from ..data import Dataset, load_dataset
from ..models import build_model
from ..train import Trainer
from ..util import eval_mode
from .machine import PeakMemory

__all__ = ["EPS", "ALPHA", "IMAGE_SHAPE", "CLASSES", "BENCH_METHODS", "AWP_GAMMA", "REFERENCE",
           "FLOOR", "Case", "write_data", "TrainerSlice", "FloorSlice", "reference_pgd",
           "ReferenceSlice", "ReferenceProcess", "build_runner", "cpu_memory"]

# --------------------------------------------------------------------------------------------
# what every configuration shares (units in comments)
EPS, ALPHA = 8 / 255, 2 / 255        # L-inf budget and PGD step, pixel units (CIFAR's)
IMAGE_SHAPE = (3, 32, 32)            # CIFAR-shaped synthetic data (C, H, W)
CLASSES = 10                         # classes of the main table
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4   # SGD of both loops (the trainer's defaults)
# the child processes (the reference loop on CPU, the CPU memory probe) run this module
CHILD = [sys.executable, "-m", "spatlib.device.slices"]
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
        self.trainer = Trainer(self.config, device=device)
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
    last slice, which :class:`spatlib.device.bench.OtherLoad` counts as the benchmark's own.
    """

    def __init__(self, case: Case, data_path: Path, threads: int, workers: int = 0):
        spec = {"case": asdict(case), "data": str(data_path), "threads": threads, "workers": workers}
        self.proc = subprocess.Popen([*CHILD, "reference", json.dumps(spec)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
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


def _reference_worker(spec: dict) -> int:
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
# peak memory on the CPU: a fresh process per configuration
def _probe_cpu_memory(spec: dict) -> dict:
    """In a fresh process: build ``spec["case"]``, run one batch, return its peak memory."""
    torch.set_num_threads(spec["threads"])
    case = Case(**spec["case"])
    path = Path(spec["data"])
    runner = build_runner(case, path, load_dataset("npz", path=str(path)), torch.device("cpu"),
                          precision=spec["precision"], compile=spec["compile"])
    with PeakMemory(torch.device("cpu")) as mem:
        runner.run(0, 1)
    return {"peak_mem_mb": mem.mb, "rss_before_mb": mem.before_mb,
            "memory_method": f"{mem.method}, one batch in a fresh process"}


def cpu_memory(case: Case, data_path: Path, threads: int, precision: str, compile: bool) -> dict:
    """The peak memory of one batch of ``case`` on the CPU, measured in a fresh process (an
    allocator keeps freed pages: in one process an earlier configuration's peak would hide a
    later one's): ``{"peak_mem_mb", "rss_before_mb", "memory_method"}``, or ``peak_mem_mb``
    NaN with ``memory_error`` (the child's last stderr line)."""
    spec = {"case": asdict(case), "data": str(data_path), "threads": threads,
            "precision": precision, "compile": compile}
    out = subprocess.run([*CHILD, "probe", json.dumps(spec)],
                         capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["?"])[-1]
        return {"peak_mem_mb": float("nan"), "memory_error": tail}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _main(argv: list[str]) -> int:
    """The child processes' entry: ``reference SPEC`` serves reference slices, ``probe SPEC``
    prints one configuration's CPU memory as JSON."""
    role, spec = argv
    if role == "probe":
        print(json.dumps(_probe_cpu_memory(json.loads(spec))))
        return 0
    return _reference_worker(json.loads(spec))


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
