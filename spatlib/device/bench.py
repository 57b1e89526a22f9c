"""Benchmarks (``spat bench``, ``bench/throughput.py``): figures printed side by side, never timed tests.

One run measures, on the current device (the configurations it times, runners of one slice
each, are :mod:`spatlib.device.slices`):

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

Peak memory is the working memory of training, above what was allocated before the slice
(:class:`spatlib.device.machine.PeakMemory`):

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
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ..config import MODELS
from ..precision import backend_flags, resolve_precision
from ..util import check_choices, check_out_path, comma_list, cpu_count, progress_log, resolve_device
from .machine import PeakMemory, machine_info, read_machine, timed
from .slices import (ALPHA, AWP_GAMMA, BENCH_METHODS, EPS, FLOOR, IMAGE_SHAPE, REFERENCE, Case,
                     ReferenceProcess, build_runner, cpu_memory, write_data)

__all__ = ["BenchSettings", "run_benchmark", "markdown_report", "compute_ratios", "cli_main",
           "MANY_CLASSES", "TOPK", "DEFAULTS", "OtherLoad", "build_parser",
           "settings_from_args", "write_result", "bench_machine", "device_tag"]

# --------------------------------------------------------------------------------------------
# settings (units in comments); --flags override the per-device defaults
MANY_CLASSES = 100                   # the many-class SPAT overhead case (CIFAR-100-like)
TOPK = "topk:10"                     # its cheap class set
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
PRECISIONS = ("fp32", "bf16", "fp16")


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
# the machine
def bench_machine(device: torch.device, threads: int) -> dict:
    """Where and with what the figures were taken: :func:`~spatlib.device.machine.machine_info`
    and what a benchmark's figures also depend on (torchvision, for the reference loop; the
    allocator settings: on the CPU freed activations go back to the OS and fault in again)."""
    info = machine_info(device, threads)
    with contextlib.suppress(ImportError):
        import torchvision
        info["torchvision"] = torchvision.__version__
    info["allocator_env"] = {k: v for k, v in os.environ.items()
                             if k.startswith("MALLOC_") or k in ("LD_PRELOAD", "OMP_NUM_THREADS")}
    if device.type == "cpu":
        from .. import allocator
        kept = allocator.keep_freed_memory()   # what the trainer does on CPU (spatlib.allocator)
        info["cpu_allocator"] = (("trainer: malloc keeps freed memory (spatlib.allocator)" if kept
                                  else "trainer: malloc defaults") +
                                 "; reference: malloc defaults, in a process of its own")
    return info


def device_tag(machine: dict) -> str:
    """File-name tag of a result's machine: ``cpu-2core``, or the GPU's name, e.g.
    ``nvidia-h100-80gb-hbm3``."""
    m = read_machine(machine)
    if str(m["device"]).startswith("cuda"):
        name = m.get("device_name") or "cuda"
    else:
        name = f"{torch.device(m['device']).type}-{m['cpu_count']}core"
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


# --------------------------------------------------------------------------------------------
# measuring
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
    """The settings with every None filled from the device's defaults; a bad one is a
    ValueError (a ConfigError) naming its option."""
    device = resolve_device(s.device, key="--device")
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
                threads=s.threads or cpu_count(),
                max_other_load=(0.1 if device.type == "cpu" else 1.0)
                if s.max_other_load is None else s.max_other_load,
                workers=(0 if device.type == "cpu" else min(4, cpu_count()))
                if s.workers is None else s.workers)
    check_choices("--models", s.models, MODELS, "model")
    check_choices("--overhead-models", s.overhead_models, MODELS, "model")
    check_choices("--methods", s.methods, BENCH_METHODS, "method")
    check_choices("--floor-precision", s.floor_precisions or [], PRECISIONS, "precision")
    if s.floor_precisions and not (s.floor and "pgd_at" in s.methods):
        raise ValueError("--floor-precision: the floor is timed beside pgd_at; add pgd_at to "
                         "--methods (and leave out --no-floor)")
    if min(s.steps, s.batches, s.repeats) < 1 or s.warmup < 0:
        raise ValueError("--steps, --batches, --repeats must be >= 1 and --warmup >= 0")
    return s, device


def plan_cases(s: BenchSettings, device: torch.device) -> list[Case]:
    """The configurations of a run: method x model (+ reference), then the overhead cases."""
    run_precision = resolve_precision(s.precision, device)   # the trainer's, in this run

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
    info = bench_machine(device, s.threads)
    # backend_flags: cuDNN autotuning on CUDA, as a training run has it
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
                memory[c.key] = cpu_memory(c, data[c.num_classes][0], s.threads,
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
                # on the CPU a fresh process measures the memory (run_benchmark)
                mem = PeakMemory(device) if device.type == "cuda" else contextlib.nullcontext()
                with mem:
                    load.mark()
                    t = timed(lambda: runners[c.key].run(r + 1, c.batches), device)
                other = load.fraction(getattr(runners[c.key], "child_cpu_s", 0.0))
                if other < s.max_other_load or attempt == s.retries:
                    break
                rec["redone"] += 1
                log(f"round {r + 1}/{s.repeats} {c.key}: {t:.2f} s beside other jobs "
                    f"({100 * other:.0f}% of the machine): redone")
            rec["times_s"].append(t)
            rec["other_load"].append(other)
            if isinstance(mem, PeakMemory) and "memory" not in rec:
                rec["memory"] = {"peak_mem_mb": mem.mb, "peak_allocated_mb": mem.peak_mb,
                                 "memory_method": f"{mem.method}, during a slice"}
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
    m, s = read_machine(result["machine"]), result["settings"]
    cuda = str(m["device"]).startswith("cuda")
    where = m["device_name"] if cuda else f"{m['cpu']}, {m['cpu_count']} cores"
    lines = [f"### spat bench: {where}",
             "",
             f"torch {m['torch_version']}, device {m['device']}, {m['torch_threads']} threads, "
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
def _methods(text: str) -> list[str]:
    out = []
    for t in comma_list(text):
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
    p.add_argument("--models", type=comma_list, default=None,
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
    p.add_argument("--overhead-models", type=comma_list, default=None,
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
    p.add_argument("--floor-precision", dest="floor_precisions", type=comma_list, default=None,
                   help="comma list of fp32, bf16, fp16: time the floor at these precisions too "
                        "(e.g. bf16 on a CPU that runs fp32: what bf16 would save; the trainer "
                        "stays at --precision)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    """The settings of parsed ``build_parser()`` arguments."""
    return BenchSettings(**{k: v for k, v in vars(args).items() if k != "quiet"})


def write_result(result: dict, report: str, out: str | None = None) -> Path:
    """Write ``result`` as JSON to ``out`` (default ``bench/results/<device>.json``) and the
    markdown ``report`` beside it (``.md``); returns the JSON path."""
    path = Path(out) if out else Path("bench/results") / f"{device_tag(result['machine'])}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    path.with_suffix(".md").write_text(report)
    return path


def cli_main(argv: list[str] | None = None, *, prog: str = "spat bench",
             judge: Callable[[dict], str] | None = None) -> int:
    """``spat bench``: run the benchmark, print the markdown report, write JSON and markdown;
    0 done, 2 a bad setting (one error line). ``judge(result)``: markdown printed and written
    below the figures; it may add to ``result`` before it is written (``bench/throughput.py``
    adds the targets' verdicts)."""
    parser = build_parser()
    parser.prog = prog
    args = parser.parse_args(argv)
    try:
        check_out_path(args.out)      # before the minutes of measuring, not after
        result = run_benchmark(settings_from_args(args), progress_log(args.quiet))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = markdown_report(result)
    if judge is not None:
        report += "\n" + judge(result)
    print(report)
    out = write_result(result, report, args.out)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
