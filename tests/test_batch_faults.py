"""spat batch under faults: a second batch on a locked folder, an unwritable or full output
folder, SIGKILL mid-run (no process left, the rerun gives the uninterrupted table), the live
status line, and the one-GPU-per-job placement with the device count faked.

Everything runs for real: papermill and kernels in subprocesses, flock in the kernel, /proc.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import torch
import yaml

from spatlib import launch
from spatlib.config import ConfigError
from spatlib.launch import local, status

ROOT = Path(__file__).resolve().parent.parent
PARAMS = ROOT / "params"
SPAT = [sys.executable, "-m", "spatlib.cli", "batch"]


def spat_batch(*args, cwd, timeout=600):
    return subprocess.run([*SPAT, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def processes_under(folder: Path) -> list[tuple[int, str]]:
    """Live processes whose command line names ``folder`` or whose working folder is inside it:
    found without the batch's own bookkeeping (its environment marker)."""
    folder = str(folder)
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    continue
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(f"/proc/{d}/cwd")
        except (OSError, IndexError):
            continue
        if folder in cmd or cwd == folder or cwd.startswith(folder + "/"):
            found.append((int(d), cmd))
    return found


# --------------------------------------------------------------------------------------------
# the lock
HOLD = """
import sys, time
from spatlib.launch import local
lock = local.lock_experiment(sys.argv[1], ["spat", "batch", "holder-command"])
print("locked", flush=True)
time.sleep(120)
"""


@pytest.mark.slow
def test_a_second_batch_on_a_locked_folder_fails_naming_the_holder(tmp_path):
    exp = tmp_path / "out" / "smoke"
    with local.lock_experiment(exp, ["spat", "batch", "params/smoke.yaml"]) as lock:
        holder = json.loads((exp / ".batch.lock").read_text())
        assert holder["pid"] == os.getpid() and holder["command"] == "spat batch params/smoke.yaml"
        with pytest.raises(local.BatchLocked, match=rf"pid {os.getpid()} on .*started .*: "
                                                    r"spat batch params/smoke\.yaml"):
            local.lock_experiment(exp)
        assert lock.fd >= 0
    local.lock_experiment(exp).release()          # released: free again

    # another process holds it; once SIGKILLed, the kernel has dropped its flock
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(exp)], stdout=subprocess.PIPE,
                              text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(local.BatchLocked, match=rf"pid {holder.pid} .*holder-command"):
            local.lock_experiment(exp)
        # the command line: one error line, exit 2, no notebook executed
        out = spat_batch(PARAMS / "smoke.yaml", "--out", tmp_path / "out", cwd=tmp_path, timeout=120)
        assert out.returncode == 2, out.stdout + out.stderr
        assert f"another spat batch is running on {exp} (pid {holder.pid}" in out.stderr
        assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
        assert not (exp / "logs").exists() and not (exp / "experiment.yaml").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    with local.lock_experiment(exp) as lock:        # a dead holder's lock is free
        assert json.loads((exp / ".batch.lock").read_text())["pid"] == os.getpid()


# --------------------------------------------------------------------------------------------
# unwritable and full output folders
@pytest.mark.slow
def test_an_unwritable_output_folder_is_one_error_line_before_any_notebook(tmp_path):
    # root writes through chmod 0o555: a regular file where a folder is expected stops anyone
    (tmp_path / "blocker").write_text("a file, not a folder")
    out = spat_batch(PARAMS / "smoke.yaml", "--out", tmp_path / "blocker" / "out", cwd=tmp_path,
                     timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.strip() == (
        f"error: cannot write to {tmp_path / 'blocker' / 'out' / 'smoke'}: Not a directory "
        "(errno 20); choose another --out or fix the folder")
    assert out.stdout == ""

    # a full disk: the experiment file lands on /dev/full (ENOSPC on write, as on a full disk)
    exp = tmp_path / "full" / "smoke"
    exp.mkdir(parents=True)
    (exp / "experiment.yaml").symlink_to("/dev/full")
    out = spat_batch(PARAMS / "smoke.yaml", "--out", tmp_path / "full", cwd=tmp_path, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    line, = out.stderr.strip().splitlines()
    assert line.startswith(f"error: cannot write to {exp}: No space left on device (errno 28)")
    assert not (exp / "logs").exists() and not list(tmp_path.rglob("*.ipynb"))


# --------------------------------------------------------------------------------------------
# the live view
def test_the_status_line_counts_jobs_and_reads_each_running_runs_epoch(tmp_path):
    plan = launch.plan_experiment(PARAMS / "smoke.yaml", out_root=tmp_path)
    j01, j_std, j_spat = launch.build_jobs(plan, ROOT / "notebooks", threads=1)
    progress = local.Progress()
    for job in (j01, j_std, j_spat):
        progress.queued(job)
    assert progress.line().endswith("] 0 done, 0 running, 3 queued, 0 failed")
    progress.skipped(j01.name)
    progress.started(j_std)
    progress.started(j_spat)
    j_std.run_dir.mkdir(parents=True)
    # epoch 1 of smoke's 2 saved: the checkpoint counts (history.csv is written after it)
    torch.save({"epoch": 1, "config": {"train": {"epochs": 2}}}, j_std.run_dir / "checkpoint_last.pt")
    assert re.fullmatch(r"\[status 0m0\ds\] 1 done, 2 running, 0 queued, 0 failed; running: "
                        r"standard-digits-s0 epoch 1/2, spat_at-digits-s0 epoch 0/2", progress.line())
    progress.finished(launch.JobResult(j_std.name, "failed"))
    assert ", 1 failed; running: spat_at-digits-s0 epoch 0/2" in progress.line()


@pytest.mark.slow
def test_spat_batch_prints_a_status_line_with_the_running_runs_epoch(tmp_path):
    out = spat_batch(PARAMS / "smoke.yaml", "--only", "standard-digits-s0", "--no-hypothesis",
                     "--set", "train.epochs=12", "eval.suite=[clean]", "eval.eps_curve=[]",
                     "--status-every", "0.5", "--out", tmp_path / "out", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("[status ")]
    epochs = [int(m.group(1)) for ln in lines
              if (m := re.search(r"0 done, 1 running, 0 queued, 0 failed; running: "
                                 r"standard-digits-s0 epoch (\d+)/12$", ln))]
    assert epochs and max(epochs) >= 1, out.stdout        # seen while it trained
    assert epochs == sorted(epochs)
    assert re.search(r"1 done, 1 running, 0 queued, 0 failed; running: 03_robustness$", out.stdout, re.M)


# --------------------------------------------------------------------------------------------
# one GPU per job, the device count faked (no GPU needed; nothing of torch is mocked)
def sleeper_notebook(path: Path) -> Path:
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "language": "python",
                                                           "display_name": "Python 3"},
                                            "language_info": {"name": "python"}})
    params = nbformat.v4.new_code_cell('record = ""\nname = ""')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(
        "import json, os, time\n"
        "start = time.time()\n"
        "time.sleep(1.0)\n"
        "with open(record, 'a') as f:\n"
        "    f.write(json.dumps({'name': name, 'device': os.environ.get('CUDA_VISIBLE_DEVICES'),\n"
        "                        'start': start, 'end': time.time()}) + '\\n')\n")]
    nbformat.write(nb, str(path))
    return path


def test_the_fake_gpu_count_is_a_documented_test_hook(monkeypatch):
    monkeypatch.setenv(local.FAKE_GPUS_ENV, "3")
    assert local.gpu_count() == 3
    assert local.gpu_count(override=2) == 2
    monkeypatch.setenv(local.FAKE_GPUS_ENV, "two")
    with pytest.raises(ConfigError, match="SPAT_FAKE_GPUS='two'"):
        local.gpu_count()


@pytest.mark.slow
def test_each_running_job_holds_a_gpu_of_its_own_and_frees_it(tmp_path, monkeypatch):
    monkeypatch.setenv(local.FAKE_GPUS_ENV, "2")
    gpus = list(range(local.gpu_count()))
    assert gpus == [0, 1]
    nb = sleeper_notebook(tmp_path / "sleeper.ipynb")
    record = tmp_path / "record.jsonl"
    jobs = [launch.Job(f"j{i}", "robustness", nb, tmp_path / f"j{i}.ipynb",
                       {"record": str(record), "name": f"j{i}"}, tmp_path / "logs" / f"j{i}.log",
                       tmp_path) for i in range(5)]
    # asked for 5 at once: only 2 devices, so at most 2 run
    results = local.run_jobs(jobs, n_parallel=5, kernel=local.kernel_name(), threads=None, gpus=gpus)
    assert [r.status for r in results] == ["ok"] * 5, [r.error for r in results]
    rows = [json.loads(ln) for ln in record.read_text().splitlines()]
    assert sorted(r["name"] for r in rows) == [f"j{i}" for i in range(5)]          # all 5 ran
    assert {r["device"] for r in rows} == {"0", "1"}
    assert {r.name: r.device for r in results} == {r["name"]: f"cuda:{r['device']}" for r in rows}
    for a in rows:
        overlapping = [b for b in rows if b["start"] < a["end"] and a["start"] < b["end"]]
        assert len(overlapping) <= 2                                  # a itself and at most one
        assert len({b["device"] for b in overlapping}) == len(overlapping), overlapping


# --------------------------------------------------------------------------------------------
# SIGKILL mid-run
@pytest.mark.slow
def test_sigkill_mid_run_leaves_no_process_and_the_rerun_gives_the_uninterrupted_table(tmp_path):
    args = [PARAMS / "smoke.yaml", "--jobs", "2", "--no-hypothesis", "--set", "train.epochs=8",
            "--status-every", "0"]
    clean = spat_batch(*args, "--out", tmp_path / "clean", cwd=tmp_path)
    assert clean.returncode == 0, clean.stdout + clean.stderr

    out_root = tmp_path / "killed"
    exp = out_root / "smoke"
    proc = subprocess.Popen([*SPAT, *map(str, args), "--out", str(out_root)], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    histories = [exp / "runs" / r / "history.csv" for r in ("standard-digits-s0", "spat_at-digits-s0")]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        rows = [len(h.read_text().splitlines()) - 1 if h.is_file() else 0 for h in histories]
        if max(rows) >= 2:                 # a notebook 02 is training: 2 of its 8 epochs done
            break
        time.sleep(0.1)
    assert proc.poll() is None and max(rows) < 8, rows
    ours = processes_under(out_root)
    assert len(ours) >= 2, ours            # papermill and kernels of the running jobs
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10       # kernels notice the lost parent within a second
    while (left := processes_under(out_root)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left == [] and status.leftover_processes(exp) == []
    assert not (exp / "runs" / "spat_at-digits-s0" / "metrics.json").is_file() or \
        not (exp / "runs" / "standard-digits-s0" / "metrics.json").is_file()
    # spat status reads the killed batch's run folders: the epochs its checkpoints hold
    shown = subprocess.run([sys.executable, "-m", "spatlib.cli", "status", str(exp)], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    killed = {m.group(1): int(m.group(2)) for m in
              re.finditer(r"^(\S+-digits-s0)\s+interrupted at epoch (\d+) of 8$", shown.stdout, re.M)}
    assert killed and max(killed.values()) >= 2, shown.stdout

    again = spat_batch(*args, "--out", out_root, cwd=tmp_path)   # at once: the lock is free
    assert again.returncode == 0, again.stdout + again.stderr
    for run, epoch in killed.items():               # its log: both attempts, the second dated
        log = (exp / "logs" / f"{run}.log").read_text()
        second = f"resumed at epoch {epoch} of 8" if epoch else "started"     # no epoch saved: anew
        assert log.startswith("=== started (") and f"\n=== {second} (" in log
    table = pd.read_csv(exp / "results.csv")
    expected = pd.read_csv(tmp_path / "clean" / "smoke" / "results.csv")
    pd.testing.assert_frame_equal(table, expected)
    for run in ("standard-digits-s0", "spat_at-digits-s0"):
        got = pd.read_csv(exp / "runs" / run / "history.csv")
        want = pd.read_csv(tmp_path / "clean" / "smoke" / "runs" / run / "history.csv")
        cols = ["epoch", "lr", "train_loss", "val_clean_acc", "val_robust_acc"]
        pd.testing.assert_frame_equal(got[cols], want[cols])
    assert yaml.safe_load((exp / "experiment.yaml").read_text())["experiment"] == "smoke"
