"""spat bench at minimal sizes: it runs end to end and reports finite figures.

Speed is never asserted here (bench/throughput.py prints it); these tests check that the
benchmark measures what it says: every configuration, the ratios, the targets' verdicts
(bench/targets.py), a memory figure, and a reference PGD that stays in the threat model.
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spatlib.device import bench, slices
from spatlib.device.slices import Case
from spatlib.models import build_model

BENCH = Path(__file__).resolve().parents[1] / "bench"
TINY = ["--device", "cpu", "--models", "small_cnn", "--batch-size", "4", "--steps", "1",
        "--batches", "1", "--repeats", "1", "--warmup", "0", "--threads", "1",
        "--max-other-load", "1", "--quiet"]


@pytest.fixture
def bench_scripts(monkeypatch):
    """bench/throughput.py and bench/targets.py, imported as the script imports them."""
    monkeypatch.syspath_prepend(str(BENCH))
    import targets
    import throughput
    return throughput, targets


def test_bench_reports_finite_throughput_ratios_and_targets(tmp_path, capsys, bench_scripts):
    throughput, _ = bench_scripts
    out = tmp_path / "bench.json"
    rc = throughput.main(TINY + ["--methods", "pgd_at,spat_at", "--no-memory", "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    keys = {r["key"] for r in result["rows"]}
    assert keys == {"small_cnn/pgd_at/k10", "small_cnn/spat_at:cam/k10/all",
                    "small_cnn/spat_at:input_grad/k10/all", "small_cnn/reference/k10",
                    "small_cnn/floor/k10",
                    "small_cnn/pgd_at/k100", "small_cnn/spat_at:input_grad/k100/all",
                    "small_cnn/spat_at:input_grad/k100/topk:10"}
    for r in result["rows"]:
        assert len(r["times_s"]) == 1 and math.isfinite(r["images_per_s"]) and r["images_per_s"] > 0
    ratios = {(q["name"], q["num_classes"]) for q in result["ratios"]}
    assert ratios == {("trainer/reference", 10), ("pgd_at/floor", 10), ("reference/floor", 10),
                      ("spat_overhead:cam", 10),
                      ("spat_overhead:input_grad", 10), ("spat_overhead:input_grad", 100),
                      ("spat_overhead:input_grad:topk:10", 100)}
    assert all(math.isfinite(q["ratio"]) and q["ratio"] > 0 for q in result["ratios"])
    measured = [t for t in result["targets"] if t["measured"] is not None]
    assert {t["target"] for t in measured} >= {"spat_overhead:cam", "trainer/reference"}
    assert all(t["met"] in (True, False) for t in measured)
    assert result["machine"]["torch_version"] == torch.__version__
    printed = capsys.readouterr().out
    assert "| small_cnn | spat_at (input_grad, topk:10) | 100 (topk:10) |" in printed
    assert "| trainer/reference | CPU (small_cnn, preact_resnet18) | small_cnn | >= 1.5 |" in printed
    assert "| small_cnn | floor (PGD-AT arithmetic) | 10 | 4 | 1 | fp32 |" in printed
    assert "| pgd_at/floor | small_cnn | 10 |" in printed
    assert out.with_suffix(".md").read_text() in printed
    assert torch.get_num_threads() == 1      # the benchmark gives the thread count back


def test_spat_bench_prints_figures_without_verdicts(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = bench.cli_main(TINY + ["--methods", "standard", "--no-reference", "--no-overhead",
                                    "--no-memory", "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert [r["key"] for r in result["rows"]] == ["small_cnn/standard/k10"]
    assert "targets" not in result
    printed = capsys.readouterr().out
    assert "| small_cnn | standard | 10 | 4 |" in printed and "| target |" not in printed


def test_targets_give_each_verdict_against_its_threshold(bench_scripts):
    _, targets = bench_scripts
    result = {"settings": {"device": "cpu"}, "machine": {}, "rows": [], "ratios": [
        {"name": "spat_overhead:cam", "model": "small_cnn", "num_classes": 10, "ratio": 1.2},
        {"name": "spat_overhead:cam", "model": "preact_resnet18", "num_classes": 10, "ratio": 1.1},
        {"name": "trainer/reference", "model": "small_cnn", "num_classes": 10, "ratio": 1.5},
        {"name": "trainer/reference", "model": "wide_resnet", "num_classes": 10, "ratio": 9.0},
        {"name": "spat_overhead:input_grad", "model": "small_cnn", "num_classes": 100, "ratio": 1.0},
    ]}
    verdicts = {(t["target"], t.get("model")): t["met"] for t in targets.check_targets(result)}
    assert verdicts[("spat_overhead:cam", "small_cnn")] is False          # 1.2 > 1.15
    assert verdicts[("spat_overhead:cam", "preact_resnet18")] is True
    assert verdicts[("trainer/reference", "small_cnn")] is True           # >= 1.5 includes 1.5
    assert ("trainer/reference", "wide_resnet") not in verdicts           # not a CPU target model
    assert verdicts[("spat_overhead:input_grad", None)] is None           # the 100-class row is not it
    assert verdicts[("images_per_s:pgd_at:preact_resnet18", None)] is None   # needs an H100


def test_targets_read_the_gpu_of_this_and_the_previous_release(bench_scripts):
    _, targets = bench_scripts
    row = {"model": "preact_resnet18", "method": "pgd_at", "num_classes": 10, "steps": 10,
           "images_per_s": 9000.0}
    for machine in ({"device": "cuda:0", "device_name": "NVIDIA H100 80GB HBM3"},
                    {"device": "cuda:0", "gpu": "NVIDIA H100 80GB HBM3"}):     # the old key
        result = {"settings": {"device": "cuda:0"}, "machine": machine, "rows": [row], "ratios": []}
        verdicts = {(t["target"], t.get("model")): t["met"] for t in targets.check_targets(result)}
        assert verdicts[("images_per_s:pgd_at:preact_resnet18", "preact_resnet18")] is True


def test_cpu_memory_probe_measures_a_fresh_process(tmp_path):
    path, _ = slices.write_data(tmp_path, 10, 8)
    case = Case(model="small_cnn", method="spat_at:input_grad", batch_size=8, steps=1, batches=1)
    mem = slices.cpu_memory(case, path, threads=1, precision="auto", compile=False)
    assert "memory_error" not in mem, mem
    assert math.isfinite(mem["peak_mem_mb"]) and mem["peak_mem_mb"] >= 0
    assert mem["rss_before_mb"] > 0


def test_cpu_reference_runs_in_a_process_of_its_own(tmp_path):
    # the trainer's malloc setting is process-wide; the reference must run without it
    path, ds = slices.write_data(tmp_path, 10, 8)
    case = Case(model="small_cnn", method="reference", batch_size=4, steps=1, batches=1)
    runner = slices.build_runner(case, path, ds, torch.device("cpu"), threads=1)
    assert isinstance(runner, slices.ReferenceProcess)
    try:
        runner.run(1, 2)
        assert runner.child_cpu_s > 0          # counted as the benchmark's own load
        assert runner.proc.poll() is None      # the worker serves the next slice
        runner.run(2, 1)
    finally:
        runner.close()
    assert runner.proc.returncode == 0


def test_reference_worker_failure_is_reported(tmp_path):
    case = Case(model="small_cnn", method="reference", batch_size=4, steps=1, batches=1)
    with pytest.raises(RuntimeError, match="reference worker.*missing.npz"):
        slices.ReferenceProcess(case, tmp_path / "missing.npz", threads=1)


def test_reference_pgd_stays_in_the_threat_model():
    model = build_model("small_cnn", 10, 3, image_size=32, seed=0).eval()
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    x[:, :, :4] = 0.0   # pixels at the box edges: the projection must keep x + delta in [0, 1]
    y = torch.arange(6) % 10
    eps = 8 / 255
    delta = slices.reference_pgd(model, x, y, eps, 2 / 255, steps=3)
    assert delta.abs().max() <= eps + 1e-6
    assert (x + delta).min() >= 0 and (x + delta).max() <= 1
    assert not delta.requires_grad and delta.abs().sum() > 0


def test_bench_help_documents_the_options():
    out = subprocess.run([sys.executable, "-m", "spatlib.cli", "bench", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for option in ("--models", "--methods", "--batch-size", "--steps", "--batches", "--repeats",
                   "--device", "--out", "--no-reference", "--no-memory", "--no-floor",
                   "--floor-precision"):
        assert option in out.stdout
    assert "--probe" not in out.stdout


class _Counted(torch.nn.Module):
    """A model that counts its forwards, its backwards (any gradient through its input) and
    the backwards that reach its weights."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.forwards = self.backwards = self.weight_backwards = 0
        model.register_full_backward_hook(lambda *_: setattr(self, "backwards", self.backwards + 1))
        first = next(model.parameters())
        first.register_hook(lambda g: setattr(self, "weight_backwards", self.weight_backwards + 1))

    def forward(self, x):
        self.forwards += 1
        return self.model(x)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_the_floor_is_k_plus_1_forwards_k_input_backwards_and_1_full_backward(tmp_path):
    path, ds = slices.write_data(tmp_path, 10, 8)
    case = Case(model="small_cnn", method="floor", batch_size=4, steps=3, batches=1)
    runner = slices.build_runner(case, path, ds, torch.device("cpu"), threads=1)
    assert isinstance(runner, slices.FloorSlice) and runner.precision == "fp32"
    counted = _Counted(runner.trainer.model)
    runner.trainer.model = runner.trainer.fwd = counted
    before = [p.detach().clone() for p in counted.parameters()]
    runner.run(1, 2)
    # per batch: 3 attack forwards + 1 update forward, 4 backwards, only the last one to weights
    assert (counted.forwards, counted.backwards, counted.weight_backwards) == (8, 8, 2)
    assert all(torch.equal(a, b) for a, b in zip(before, counted.parameters()))   # no update
    assert all(p.grad is None for p in counted.parameters())
    bf16 = slices.build_runner(Case(model="small_cnn", method="floor", batch_size=4, steps=1,
                                       batches=1, floor_precision="bf16"),
                                  path, ds, torch.device("cpu"), threads=1)
    assert bf16.precision == "bf16"


def test_floor_precision_is_checked(capsys):
    assert bench.cli_main(TINY + ["--floor-precision", "int8"]) == 2
    assert "--floor-precision: unknown precision 'int8'; allowed: fp32, bf16, fp16" in capsys.readouterr().err
    assert bench.cli_main(TINY + ["--methods", "standard", "--floor-precision", "bf16"]) == 2
    assert "add pgd_at to --methods" in capsys.readouterr().err


def test_unknown_model_or_method_is_an_error_naming_the_allowed_ones(capsys):
    assert bench.cli_main(TINY + ["--models", "resnet50"]) == 2
    assert "small_cnn" in capsys.readouterr().err
    assert bench.cli_main(TINY + ["--methods", "mart"]) == 2
    assert "spat_at:cam" in capsys.readouterr().err


def test_spat_bench_reports_the_awp_overhead(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = bench.cli_main(TINY + ["--methods", "pgd_at,pgd_at:awp,trades,trades:awp",
                                    "--no-reference", "--no-overhead", "--no-floor", "--no-memory",
                                    "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    ratios = {q["name"]: q["ratio"] for q in result["ratios"]}
    assert set(ratios) == {"awp_overhead:pgd_at", "awp_overhead:trades"}
    assert all(math.isfinite(v) and v > 0 for v in ratios.values())
    printed = capsys.readouterr().out
    assert "| small_cnn | pgd_at + AWP (gamma 0.01) | 10 | 4 |" in printed
    assert "| small_cnn | trades + AWP (gamma 0.005) | 10 | 4 |" in printed
    assert "| awp_overhead:trades | small_cnn | 10 |" in printed


@pytest.mark.parametrize("out, why", [("/proc/x/cpu.json", "cannot create the folder /proc/x"),
                                      ("{tmp}", "a folder, not a file")])
def test_an_unwritable_out_is_refused_before_any_measurement(out, why, tmp_path, monkeypatch, capsys):
    def never(*a, **k):
        raise AssertionError("the benchmark ran before --out was checked")
    monkeypatch.setattr(bench, "run_benchmark", never)
    out = out.format(tmp=tmp_path)
    assert bench.cli_main(["--device", "cpu", "--out", out]) == 2
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    assert captured.out == "" and line.startswith(f"error: --out {out}: ") and why in line, captured
