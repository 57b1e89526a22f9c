"""scripts/device_check.sh, the prepared device check (spat doctor, then spat bench, each under
a time limit), rehearsed on the CPU at tiny sizes: both steps' files land in OUT, and a step
that runs past its limit is recorded without stopping the next one."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spatlib.util import PROVENANCE_KEYS

ROOT = Path(__file__).resolve().parents[1]
TINY_BENCH = ("--models small_cnn --methods pgd_at --batch-size 4 --steps 1 --batches 1 "
              "--repeats 1 --warmup 0 --threads 1 --no-overhead --no-memory --max-other-load 1")


def _check(out: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "scripts/device_check.sh", str(out), "cpu"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHON": sys.executable,
                               "SPAT_BENCH_ARGS": TINY_BENCH, **env})


@pytest.mark.slow
def test_device_check_runs_doctor_then_bench_into_one_folder(tmp_path):
    proc = _check(tmp_path / "check")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "check"
    assert (out / "status.txt").read_text().split("\n")[:2] == ["doctor 0", "bench 0"]
    doctor = json.loads((out / "doctor.json").read_text())
    assert doctor["ok"] and doctor["rows"] and all(r["ok"] for r in doctor["rows"])
    bench = json.loads((out / "bench.json").read_text())
    assert {r["key"] for r in bench["rows"]} == {"small_cnn/pgd_at/k10", "small_cnn/reference/k10",
                                                 "small_cnn/floor/k10"}
    assert "pgd_at/floor" in {q["name"] for q in bench["ratios"]}
    machine = json.loads((out / "machine.json").read_text())
    assert machine["device"] == "cpu" and machine["torch_version"] == torch.__version__
    assert set(PROVENANCE_KEYS) <= set(machine) and machine["gpu_count"] >= 0
    assert "| pgd_at/floor | small_cnn | 10 |" in proc.stdout


@pytest.mark.slow
def test_a_step_past_its_limit_is_recorded_and_the_next_still_runs(tmp_path):
    proc = _check(tmp_path / "check", SPAT_DOCTOR_LIMIT="1")
    assert proc.returncode == 1
    assert "doctor ran past 1 s" in proc.stderr
    status = (tmp_path / "check" / "status.txt").read_text().split("\n")
    assert status[0] in ("doctor 124", "doctor 137") and status[1] == "bench 0"
    assert (tmp_path / "check" / "bench.json").is_file()
