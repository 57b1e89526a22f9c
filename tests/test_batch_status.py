"""What a batch folder says after an interrupt, whichever launcher ran it, and what a rerun does.

`spat status` reads the run folders (done with metrics.json's date / interrupted at epoch k of
n / not started) besides the launchers' records; a job's log keeps every attempt, each opened
by a dated line; `--dry-run` marks each job done (skipped) / resume at epoch k of n / new and
resolves every job's data; bad data is one line naming the run (or the section) and the key
before anything is written or submitted; notebook 01 trains on the experiment's data.

Run folders are made by hand (a metrics.json, a checkpoint_last.pt holding epoch 5 of 8): the
state is read from the files, whatever wrote them.
"""
import json
import re
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
import yaml

from spatlib import launch
from spatlib.launch import cli, local, status
from spatlib.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent
PARAMS = ROOT / "params"
NOTEBOOKS = ROOT / "notebooks"
FINISHED_AT = "2026-12-06T10:31:02+00:00"


def finished_run(run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text("name: x\n")
    (run_dir / "metrics.json").write_text(json.dumps({"test_clean_acc": 0.9, "finished_at": FINISHED_AT}))


def interrupted_run(run_dir: Path, epoch: int, epochs: int) -> None:
    """A run folder killed after ``epoch`` of ``epochs`` epochs: its last checkpoint, no metrics."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text("name: x\n")
    torch.save({"format": "spatlib-checkpoint/1", "kind": "last", "epoch": epoch, "finished": False,
                "config": {"train": {"epochs": epochs}}, "model": {"w": torch.zeros(3)}},
               run_dir / "checkpoint_last.pt")


def executed_notebook(path: Path, *, ended: bool, error: bool = False) -> None:
    """A notebook as papermill leaves it: ended (with or without an error) or killed midway."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["papermill"] = {"start_time": "2026-12-06T10:00:00", "exception": True if error else None,
                                "end_time": "2026-12-06T10:05:00" if ended else None}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(path))


def write_params(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def smoke_doc(**changes) -> dict:
    doc = yaml.safe_load((PARAMS / "smoke.yaml").read_text())
    doc.update(changes)
    return doc


# --------------------------------------------------------------------------------------------
# spat status
def interrupted_smoke_batch(tmp_path: Path) -> launch.Plan:
    """A local smoke batch stopped by Ctrl-C: one run finished, one at epoch 5 of 8 (train.epochs
    8), notebook 01 killed while its model was at epoch 1 of 2, notebook 03 never started; no
    launcher record of any of it (the summary is written as jobs end)."""
    plan = launch.plan_experiment(PARAMS / "smoke.yaml", ["train.epochs=8"], out_root=tmp_path)
    launch.write_experiment_file(plan)
    finished_run(plan.run_dir("standard-digits-s0"))
    interrupted_run(plan.run_dir("spat_at-digits-s0"), 5, 8)
    executed_notebook(plan.out_dir / "01_hypothesis.ipynb", ended=False)
    interrupted_run(plan.out_dir / "hypothesis_model", 1, 2)
    return plan


def test_status_after_an_interrupted_local_batch_reads_the_run_folders(tmp_path, capsys):
    plan = interrupted_smoke_batch(tmp_path)
    rows = {r["job"]: (r["state"], r["detail"]) for r in status.status_rows(plan.out_dir)}
    assert rows == {
        "01_hypothesis": ("interrupted", "its model: interrupted at epoch 1 of 2"),
        "standard-digits-s0": ("done", f"metrics.json of {FINISHED_AT}"),
        "spat_at-digits-s0": ("interrupted at epoch 5 of 8", ""),
        "03_robustness": ("not started", ""),
    }
    assert cli.status_main([str(plan.out_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split() == ["spat_at-digits-s0", "interrupted", "at", "epoch", "5", "of", "8"]
    assert lines[1].split() == ["standard-digits-s0", "done", "metrics.json", "of", FINISHED_AT]


def test_status_adds_the_launchers_failures_to_the_folder_state(tmp_path, capsys):
    plan = interrupted_smoke_batch(tmp_path)
    log = plan.out_dir / "logs" / "spat_at-digits-s0.log"
    (plan.out_dir / status.SUMMARY).write_text(json.dumps({"jobs": {
        "spat_at-digits-s0": {"status": "failed", "error": "TrainingDivergedError: loss = nan",
                              "log": str(log)},
        "standard-digits-s0": {"status": "failed", "error": "an older attempt", "log": str(log)}}}))
    rows = {r["job"]: r for r in status.status_rows(plan.out_dir)}
    assert rows["spat_at-digits-s0"]["state"] == "failed at epoch 5 of 8"
    assert rows["spat_at-digits-s0"]["detail"] == "TrainingDivergedError: loss = nan"
    assert rows["standard-digits-s0"]["state"] == "done"          # its folder: finished since
    assert cli.status_main([str(plan.out_dir)]) == 1
    assert f"log: {log}" in capsys.readouterr().out


def test_a_papermill_record_says_whether_a_notebook_ran_to_its_end(tmp_path):
    nb = tmp_path / "nb.ipynb"
    assert status.notebook_state(nb) == ("not started", None)
    executed_notebook(nb, ended=False)
    assert status.notebook_state(nb) == ("interrupted", None)
    executed_notebook(nb, ended=True)
    assert status.notebook_state(nb) == ("done", "2026-12-06T10:05:00")
    executed_notebook(nb, ended=True, error=True)
    assert status.notebook_state(nb)[0] == "failed"


def test_the_run_state_is_read_from_the_folder(tmp_path):
    assert launch.run_state(tmp_path / "none", 8).describe() == "not started"
    started = tmp_path / "started"
    started.mkdir()
    (started / "config.yaml").write_text("name: x\n")        # killed before its first epoch ended
    assert launch.run_state(started, 8).describe() == "interrupted at epoch 0 of 8"
    interrupted_run(tmp_path / "r", 5, 8)
    assert launch.run_state(tmp_path / "r", epochs=99) == launch.RunState("interrupted", 5, 8)
    (tmp_path / "r" / "checkpoint_last.pt").write_bytes(b"PK\x03\x04truncated")
    assert launch.run_state(tmp_path / "r", 8).describe().startswith(
        "interrupted at an unknown epoch (checkpoint_last.pt unreadable: ")
    finished_run(tmp_path / "r")
    assert launch.run_state(tmp_path / "r", 8).describe() == f"done (metrics.json of {FINISHED_AT})"


# --------------------------------------------------------------------------------------------
# logs: appended, a dated line per attempt
def test_a_rerun_appends_to_the_jobs_log_with_a_dated_line(tmp_path):
    plan = launch.plan_experiment(PARAMS / "smoke.yaml", ["train.epochs=8"], out_root=tmp_path)
    job = launch.build_jobs(plan, NOTEBOOKS, threads=1, hypothesis=False)[1]
    job.notebook = tmp_path / "missing.ipynb"       # papermill fails at once: the log is the point
    first = local.run_job(job, kernel="python3", env=local.job_env(1, None))
    assert first.status == "failed"
    interrupted_run(job.run_dir, 5, 8)
    local.run_job(job, kernel="python3", env=local.job_env(1, None))
    status.skipped_result(job)
    log = job.log.read_text()
    heads = [ln for ln in log.splitlines() if ln.startswith("=== ")]
    assert [h.rsplit(" (", 1)[0] for h in heads] == [
        "=== started", "=== resumed at epoch 5 of 8", "=== already finished, skipped"]
    assert all(h.endswith("+00:00)") and h.rsplit(" (", 1)[1][:2] == "20" for h in heads)
    assert log.count("missing.ipynb") >= 2          # the first attempt's output is still there


# --------------------------------------------------------------------------------------------
# --dry-run
def test_dry_run_marks_each_job_done_resume_or_new(tmp_path, capsys):
    plan = launch.plan_experiment(PARAMS / "smoke.yaml", out_root=tmp_path)
    jobs = {j.name: j for j in launch.build_jobs(plan, NOTEBOOKS, threads=None)}
    done = jobs["standard-digits-s0"]
    finished_run(done.run_dir)
    executed_notebook(done.output, ended=True)
    (plan.out_dir / status.SUMMARY).write_text(json.dumps(
        {"jobs": {done.name: {"status": "ok", "fingerprint": done.fingerprint()}}}))
    interrupted_run(plan.run_dir("spat_at-digits-s0"), 1, 2)
    assert cli.batch_main([str(PARAMS / "smoke.yaml"), "--out", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    marks = dict(m.groups() for ln in out.splitlines()
                 if (m := re.fullmatch(r"  (\S+)\s+(.+?)\s{2,}\S+\.ipynb -> \S+", ln)))
    assert marks == {"01_hypothesis": "new", "standard-digits-s0": "done (skipped)",
                     "spat_at-digits-s0": "resume at epoch 1 of 2", "03_robustness": "after the runs"}
    assert ("data: digits: 1347 train + 450 test images of 1x8x8, 10 classes; for standard-digits-s0, "
            "spat_at-digits-s0, 01_hypothesis (from the experiment's base)") in out


# --------------------------------------------------------------------------------------------
# data checked before any work
def test_missing_data_is_one_line_naming_the_run_and_the_key_before_anything_is_written(tmp_path, capsys):
    doc = smoke_doc()
    doc["base"]["data"] = {"name": "npz", "path": "/nonexistent/cifar.npz"}
    params = write_params(tmp_path / "p.yaml", doc)
    out = tmp_path / "out"
    for extra in (["--dry-run"], []):
        assert cli.batch_main([str(params), "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert err == ("error: run 'standard-npz-s0' (and 2 more job(s) with this data): "
                       "data.path: /nonexistent/cifar.npz: file not found\n")
    assert not out.exists()
    # the Slurm launcher checks the data before it asks for the cluster (no sbatch needed here)
    plan = launch.plan_experiment(params, out_dir=out / "slurm")
    with pytest.raises(ConfigError, match=r"run 'standard-npz-s0'.*data.path: /nonexistent/cifar.npz"):
        launch.run_slurm_batch(plan, launch.launcher_config({}), notebooks=NOTEBOOKS)
    assert not out.exists()


def test_each_bad_data_section_is_named_with_its_key(tmp_path):
    doc = smoke_doc()
    doc["hypothesis"]["data"] = {"name": "npz", "path": str(tmp_path / "gone.npz")}
    doc["variants"]["spat_at"]["data"] = {"val_size": 5000}
    plan = launch.plan_experiment(write_params(tmp_path / "p.yaml", doc), out_root=tmp_path)
    with pytest.raises(ConfigError) as e:
        launch.check_jobs_data(launch.build_jobs(plan, NOTEBOOKS, threads=None))
    assert str(e.value).splitlines() == [
        "run 'spat_at-digits-s0': data.val_size: 5000 leaves no training images (digits has 1347 "
        "after train_limit)",
        f"section 'hypothesis': data.path: {tmp_path / 'gone.npz'}: file not found"]
    bad = tmp_path / "bad.npz"
    np.savez(bad, x_train=np.zeros((4, 6, 6, 3), np.float32), y_train=np.arange(4),
             x_test=np.zeros((2, 6, 6, 3), np.uint8), y_test=np.arange(2))
    doc = smoke_doc()
    doc["base"]["data"] = {"name": "npz", "path": str(bad)}
    plan = launch.plan_experiment(write_params(tmp_path / "p.yaml", doc), out_root=tmp_path)
    with pytest.raises(ConfigError, match=r"^run 'standard-npz-s0' .*: data.path: .*bad.npz: "
                                          r"x_train has dtype float32; images must be uint8"):
        launch.check_jobs_data(launch.build_jobs(plan, NOTEBOOKS, threads=None))


# --------------------------------------------------------------------------------------------
# notebook 01's data
def test_notebook_01_trains_on_the_experiments_data_unless_its_section_names_other(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    doc = smoke_doc()
    doc["base"]["data"] = {"name": "npz", "path": "data/cifar.npz", "val_size": 10}
    doc["base"]["train"]["method"] = "pgd_at"               # the runs' method, not the attacked model's
    plan = launch.plan_experiment(write_params(tmp_path / "p.yaml", doc), ["train.lr=0.02"], out_root="out")
    hyp = launch.build_jobs(plan, NOTEBOOKS, threads=1)[0].parameters
    assert plan.configs["standard-npz-s0"]["data"] == hyp["data"]   # the runs' data, path made absolute
    assert hyp["data"]["path"] == str(tmp_path / "data" / "cifar.npz") and hyp["data"]["val_size"] == 10
    assert hyp["data_origin"] == "the experiment's base"
    assert hyp["train"]["epochs"] == 2                     # the section's own key wins
    assert hyp["train"]["lr"] == 0.02                      # the runs' override reaches it
    assert hyp["train"]["method"] == "standard"
    # a section that names its data keeps it, and says so
    doc["hypothesis"]["data"] = {"name": "digits"}
    plan = launch.plan_experiment(write_params(tmp_path / "p.yaml", doc), out_root="out")
    hyp = launch.build_jobs(plan, NOTEBOOKS, threads=1)[0].parameters
    assert hyp["data"]["name"] == "digits" and hyp["data_origin"] == "the hypothesis section"
    # an experiment over several datasets: the first
    doc = smoke_doc(datasets=["mnist", "digits"])
    plan = launch.plan_experiment(write_params(tmp_path / "p.yaml", doc), out_root="out")
    hyp = launch.build_jobs(plan, NOTEBOOKS, threads=1)[0].parameters
    assert hyp["data"]["name"] == "mnist"
    assert hyp["data_origin"] == "the experiment's base and its first dataset (mnist)"
