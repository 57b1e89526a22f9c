"""``spat batch --launcher slurm`` against a real Slurm: the single-node cluster of
scripts/local_slurm.sh (started here when it is not up and we may start it; skipped, with the
reason, where the Slurm binaries are absent). The settings' validation runs without a cluster."""
from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from spatlib.launch import slurm as S
from spatlib.launch.plan import plan_experiment
from spatlib.launch.status import JOBS_FILE
from spatlib.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SPAT = [sys.executable, "-m", "spatlib.cli"]
SCRIPT = ROOT / "scripts" / "local_slurm.sh"
# tiny runs: one epoch, a cheap suite on 60 test images
FAST = ["--set", "train.epochs=1", "eval.n_examples=60", "eval.suite=[clean,fgsm,pgd20]",
        "eval.eps_curve=[0.0]"]


def env() -> dict:
    """The worktree's spatlib first, in the driver and (exported by sbatch) in the jobs."""
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def spat(*args: str, cwd: Path, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*SPAT, *args], cwd=cwd, env=env(), capture_output=True, text=True,
                          timeout=timeout, **kw)


def _cluster_answers() -> bool:
    try:
        return subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                              timeout=15).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def cluster():
    """A Slurm that answers; the local one is started (and stopped after) when needed."""
    if shutil.which("sbatch") is None or shutil.which("slurmctld") is None:
        pytest.skip("Slurm not installed (apt-get install slurm-wlm munge, or bash scripts/local_slurm.sh start)")
    started = False
    if not _cluster_answers():
        if os.geteuid() != 0:
            pytest.skip("no Slurm cluster answers, and starting the local one needs root")
        out = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=180)
        if out.returncode != 0 or not _cluster_answers():
            pytest.skip(f"the local Slurm cluster did not start: {out.stderr[-500:]}")
        started = True
    yield
    if started:
        subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, timeout=60)


def write_experiment(path: Path, name: str, variants: dict, base: dict | None = None) -> Path:
    base = base or {
        "data": {"name": "digits", "val_size": 100},
        "model": {"name": "small_cnn"},
        "attack": {"eps": 0.1, "alpha": 0.025, "steps": 3},
        "train": {"epochs": 1, "batch_size": 64, "lr": 0.05, "schedule": "onecycle", "val_steps": 3},
        "eval": {"suite": ["clean", "fgsm", "pgd20"], "n_examples": 60, "eps_curve": [0.0]},
    }
    path.write_text(yaml.safe_dump({"experiment": name, "base": base, "variants": variants,
                                    "seeds": [0]}, sort_keys=False))
    return path


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def history(run_dir: Path) -> list[dict]:
    return read_csv(run_dir / "history.csv")


def slurm_jobs_from(cwd: Path) -> list[str]:
    """Ids of the Slurm jobs (array tasks) submitted from ``cwd``: Slurm's own account."""
    out = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-o", "%i|%Z"], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    return [line.split("|")[0] for line in out.splitlines() if line.split("|")[-1] == str(cwd)]


# --------------------------------------------------------------------------------------------
# settings, without a cluster
def test_time_limits_in_slurms_formats():
    assert S.parse_time_minutes("90") == 90
    assert S.parse_time_minutes("1:30") == 2               # M:S, rounded up
    assert S.parse_time_minutes("2:00:00") == 120
    assert S.parse_time_minutes("1-0") == 1440
    assert S.parse_time_minutes("1-02:03:04") == math.ceil((86400 + 2 * 3600 + 3 * 60 + 4) / 60)
    assert S.parse_time_minutes("infinite") == 0
    for bad in ("2h", "1:61", "1:2:3:4", "-5", ""):
        with pytest.raises(ConfigError, match="launcher.time"):
            S.parse_time_minutes(bad)


def test_launcher_section_is_strict_and_flags_override_it():
    with pytest.raises(ConfigError, match=r"unknown key 'launcher.partiton' \(did you mean 'partition'\?\)"):
        S.launcher_config({"partiton": "gpu"})
    with pytest.raises(ConfigError, match="launcher.gpus_per_run: expected an integer"):
        S.launcher_config({"gpus_per_run": "two"})
    with pytest.raises(ConfigError, match="launcher.mem_per_run"):
        S.launcher_config({"mem_per_run": "lots"})
    with pytest.raises(ConfigError, match="launcher.sbatch_extra"):
        S.launcher_config({"sbatch_extra": ["constraint a100"]})
    with pytest.raises(ConfigError, match="do not split over 2 node"):
        S.launcher_config({"gpus_per_run": 3, "nodes": 2})
    cfg = S.launcher_config({"partition": "a", "time": 30, "setup": ["module load cuda"], "gpus_per_run": 2},
                            {"partition": "b", "setup": ["source .venv/bin/activate"], "qos": None})
    assert (cfg.partition, cfg.time_minutes, cfg.tasks) == ("b", 30, 2)
    assert cfg.setup == ["module load cuda", "source .venv/bin/activate"]


def test_unknown_key_in_the_params_files_launcher_section(tmp_path):
    params = write_experiment(tmp_path / "e.yaml", "bad", {"standard": {"train": {"method": "standard"}}})
    doc = yaml.safe_load(params.read_text())
    doc["launcher"] = {"partition": "debug", "cpus": 4}
    params.write_text(yaml.safe_dump(doc))
    plan = plan_experiment(params, out_dir=tmp_path / "bad")
    assert plan.experiment.launcher == {"partition": "debug", "cpus": 4}
    with pytest.raises(ConfigError, match=r"unknown key 'launcher.cpus'; allowed: partition, .*cpus_per_run"):
        S.launcher_config(plan.experiment.launcher)


def test_no_sbatch_on_path_fails_before_anything(tmp_path, monkeypatch):
    plan = plan_experiment(ROOT / "params/smoke.yaml", out_dir=tmp_path / "smoke")
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(ConfigError, match="no 'sbatch' on PATH"):
        S.run_slurm_batch(plan, S.launcher_config({}))
    assert not plan.out_dir.exists()


# --------------------------------------------------------------------------------------------
# the cluster refuses bad settings before submission
@pytest.mark.parametrize("settings, message", [
    ({"partition": "gpuz"}, "no partition 'gpuz' on this cluster; sinfo lists: debug"),
    ({"time": "2 hours"}, "launcher.time: '2 hours' is not a Slurm time limit"),
    ({"gpus_per_run": 1}, "partition 'debug' has no GPUs (sinfo Gres: (null))"),
])
def test_bad_settings_fail_before_submission(cluster, tmp_path, settings, message):
    plan = plan_experiment(ROOT / "params/smoke.yaml", out_dir=tmp_path / "smoke")
    with pytest.raises(ConfigError) as err:
        S.run_slurm_batch(plan, S.launcher_config(settings))
    assert message in str(err.value)
    assert not plan.out_dir.exists()          # nothing written, nothing submitted
    assert slurm_jobs_from(tmp_path) == []


def test_a_locked_folder_is_refused_by_the_library_call_too(cluster, tmp_path):
    # run_slurm_batch takes the experiment's batch lock itself (not only `spat batch`): a
    # script calling it beside a running local batch stops at once, nothing submitted
    from spatlib.launch.local import BatchLocked, lock_experiment
    plan = plan_experiment(ROOT / "params/smoke.yaml", out_dir=tmp_path / "smoke")
    with lock_experiment(plan.out_dir, ["spat", "batch", "params/smoke.yaml"]):
        with pytest.raises(BatchLocked, match="spat batch params/smoke.yaml"):
            S.run_slurm_batch(plan, S.launcher_config({}), command=["a", "script"])
    assert not (plan.out_dir / "experiment.yaml").exists()
    assert slurm_jobs_from(tmp_path) == []


# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smoke_batch_on_slurm_matches_the_local_launcher(cluster, tmp_path):
    # one thread per notebook on both sides: the same arithmetic, the same numbers
    local = spat("batch", str(ROOT / "params/smoke.yaml"), "--out", "local", "--jobs", "2",
                 "--no-hypothesis", *FAST, cwd=tmp_path)
    assert local.returncode == 0, local.stdout[-3000:] + local.stderr[-3000:]
    t0 = time.perf_counter()
    out = spat("batch", str(ROOT / "params/smoke.yaml"), "--launcher", "slurm", "--out", "slurm",
               "--cpus-per-run", "1", "--time", "20:00", *FAST, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    exp = tmp_path / "slurm" / "smoke"
    jobs = json.loads((exp / JOBS_FILE).read_text())["jobs"]
    assert set(jobs) == {"01_hypothesis", "standard-digits-s0", "spat_at-digits-s0", "03_robustness"}
    assert sorted(slurm_jobs_from(tmp_path)) == sorted(r["job_id"] for r in jobs.values())
    for run in ("standard-digits-s0", "spat_at-digits-s0"):   # executed notebooks in the run folders
        assert (exp / "runs" / run / "02_training.ipynb").is_file()
    assert (exp / "01_hypothesis.ipynb").is_file() and (exp / "03_robustness.ipynb").is_file()
    a, b = read_csv(tmp_path / "local" / "smoke" / "results.csv"), read_csv(exp / "results.csv")
    assert len(a) == len(b) >= 2
    assert a == b
    status = spat("status", str(exp), cwd=tmp_path, timeout=60)
    assert status.returncode == 0
    assert [ln.split()[1] for ln in status.stdout.splitlines()] == ["done"] * 4
    # a rerun finds everything finished: nothing is submitted
    n = len(slurm_jobs_from(tmp_path))
    again = spat("batch", str(ROOT / "params/smoke.yaml"), "--launcher", "slurm", "--out", "slurm",
                 "--cpus-per-run", "1", *FAST, cwd=tmp_path)
    assert again.returncode == 0
    assert "0 job(s) to submit" in again.stdout
    assert len(slurm_jobs_from(tmp_path)) == n + 1          # 03 only, reading the finished runs
    print(f"slurm smoke batch: {time.perf_counter() - t0:.0f} s")


@pytest.mark.slow
def test_requeued_run_resumes_and_ends_like_an_uninterrupted_run(cluster, tmp_path):
    from spatlib.train import train
    params = write_experiment(tmp_path / "e.yaml", "requeue", {"pgd_at": {"train": {"method": "pgd_at"}}})
    args = ["batch", str(params), "--launcher", "slurm", "--no-hypothesis", "--set", "train.epochs=4"]
    driver = subprocess.Popen([*SPAT, *args], cwd=tmp_path, env=env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    exp = tmp_path / "outputs" / "requeue"
    run_dir = exp / "runs" / "pgd_at-digits-s0"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not ((run_dir / "history.csv").is_file()
                                                   and 1 <= len(history(run_dir)) < 3):
            time.sleep(0.5)
        rows_before = (run_dir / "history.csv").read_text().splitlines()
        done_before = len(rows_before) - 1
        assert 1 <= done_before < 3
        job_id = json.loads((exp / JOBS_FILE).read_text())["jobs"]["pgd_at-digits-s0"]["job_id"]
        subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=30)
        # the restarted job: `spat status` shows its epoch (history.csv counts the ended ones)
        shown = None
        while shown is None and driver.poll() is None and time.monotonic() < deadline:
            before = len(history(run_dir))
            text = spat("status", str(exp), cwd=tmp_path, timeout=60).stdout
            m = re.search(r"pgd_at-digits-s0\s+running \(epoch (\d+) of 4\)", text)
            if m:
                shown = (before, int(m.group(1)), len(history(run_dir)))
        assert shown is not None, "the requeued job was never seen running again"
        assert shown[0] + 1 <= shown[1] <= shown[2] + 1
        rest, _ = driver.communicate(timeout=600)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, rest[-3000:]
    log = (exp / "slurm" / f"{job_id}_0_log.out").read_text()
    assert log.count("Starting with JobEnvironment") >= 2         # the job ran twice: requeued
    # resumed, not restarted: the epochs before the requeue keep their rows, timings included
    assert (run_dir / "history.csv").read_text().splitlines()[:len(rows_before)] == rows_before
    # the same run, uninterrupted, in this process (one thread, like the job)
    plan = plan_experiment(params, ["train.epochs=4"], out_dir=tmp_path / "ref")
    ref = train(plan.configs["pgd_at-digits-s0"], tmp_path / "ref_run", progress=False)
    got = json.loads((run_dir / "metrics.json").read_text())
    for key in ("best_val_clean_acc", "best_val_robust_acc", "best_epoch", "epochs_trained"):
        assert got[key] == ref[key], key
    a, b = history(tmp_path / "ref_run"), history(run_dir)
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]


@pytest.mark.slow
def test_broken_run_is_reported_with_its_log_and_the_others_finish(cluster, tmp_path):
    params = write_experiment(tmp_path / "e.yaml", "broken", {
        "standard": {"train": {"method": "standard"}},
        # valid settings that fail at runtime, in the job (bad data fails before any submission)
        "diverging": {"train": {"method": "standard", "lr": 1.0e+30}},
    })
    out = spat("batch", str(params), "--launcher", "slurm", "--no-hypothesis", cwd=tmp_path)
    assert out.returncode == 1, out.stdout[-3000:]
    exp = tmp_path / "outputs" / "broken"
    assert (exp / "runs" / "standard-digits-s0" / "metrics.json").is_file()
    assert (exp / "results.csv").is_file()                    # 03 read the run that finished
    failed_log = exp / "logs" / "diverging-digits-s0.log"
    assert "1 job(s) FAILED" in out.stdout
    assert "diverging-digits-s0: " in out.stdout and f"log: {failed_log}" in out.stdout
    assert "TrainingDivergedError" in failed_log.read_text()
    status = spat("status", str(exp), cwd=tmp_path, timeout=60)
    assert status.returncode == 1
    lines = status.stdout.splitlines()
    assert any(ln.startswith("diverging-digits-s0") and " failed" in ln for ln in lines), status.stdout
    assert f"log: {failed_log}" in status.stdout
    assert any(ln.split()[:2] == ["standard-digits-s0", "done"] for ln in lines)


@pytest.mark.slow
def test_driver_killed_after_submitting_and_rerun_submits_nothing_twice(cluster, tmp_path):
    args = ["batch", str(ROOT / "params/smoke.yaml"), "--launcher", "slurm", "--no-hypothesis", *FAST]
    driver = subprocess.Popen([*SPAT, *args], cwd=tmp_path, env=env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    jobs_path = tmp_path / "outputs" / "smoke" / JOBS_FILE
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (jobs_path.is_file()
                                               and len(json.loads(jobs_path.read_text())["jobs"]) == 2):
        time.sleep(0.2)
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=30)
    first = json.loads(jobs_path.read_text())["jobs"]
    assert len(first) == 2
    out = spat(*args, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    jobs = json.loads(jobs_path.read_text())["jobs"]
    for run in first:
        assert jobs[run]["submissions"] == [first[run]["job_id"]]
    # Slurm's own account: the two runs and one 03, nothing more
    assert sorted(slurm_jobs_from(tmp_path)) == sorted([first[r]["job_id"] for r in first]
                                                       + [jobs["03_robustness"]["job_id"]])
    assert (tmp_path / "outputs" / "smoke" / "results.csv").is_file()


@pytest.mark.slow
def test_two_tasks_under_slurm_follow_the_single_process_loss_curve(cluster, tmp_path):
    from spatlib.train import train
    # as tests/test_train.py's torchrun test: no random start, no BatchNorm, 17 batches of 64
    # split 32/32, so the two ranks compute the single process's gradients
    base = {"data": {"name": "digits", "val_size": 200}, "model": {"name": "small_cnn"},
            "attack": {"eps": 0.1, "alpha": 0.04, "steps": 2, "random_start": False},
            "train": {"epochs": 3, "batch_size": 64, "lr": 0.05, "schedule": "cosine", "max_batches": 17},
            "eval": {"suite": ["clean"], "n_examples": 60, "eps_curve": [0.0]}}
    params = write_experiment(tmp_path / "e.yaml", "ddp", {"pgd_at": {"train": {"method": "pgd_at"}}}, base)
    out = spat("batch", str(params), "--launcher", "slurm", "--no-hypothesis", "--tasks-per-run", "2",
               cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run_dir = tmp_path / "outputs" / "ddp" / "runs" / "pgd_at-digits-s0"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["epochs_trained"] == 3
    plan = plan_experiment(params, [], out_dir=tmp_path / "ref")
    train(plan.configs["pgd_at-digits-s0"], tmp_path / "single", progress=False)
    a, b = history(tmp_path / "single"), history(run_dir)
    assert [float(r["train_loss"]) for r in b] == pytest.approx([float(r["train_loss"]) for r in a], abs=1e-3)
    assert [float(r["train_adv_acc"]) for r in b] == pytest.approx([float(r["train_adv_acc"]) for r in a], abs=0.01)
    assert float(b[-1]["train_loss"]) < float(b[0]["train_loss"])
