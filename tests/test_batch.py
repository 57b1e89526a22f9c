"""spat batch: validation before execution, job planning, parallel execution, failures, resume.

The end-to-end tests run the real command (`python -m spatlib.cli batch ...`) in a temporary
folder: papermill executes the notebooks in kernels, exactly as `make reproduce` does.
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import yaml

from spatlib import config, experiment, launch
from spatlib.config import ConfigError
from spatlib.launch import local, status
from spatlib.launch.plan import experiment_document, notebook_parameters, robustness_job

ROOT = Path(__file__).resolve().parent.parent
PARAMS = ROOT / "params"
NOTEBOOKS = ROOT / "notebooks"


def spat_batch(*args, cwd, timeout=600):
    return subprocess.run([sys.executable, "-m", "spatlib.cli", "batch", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def write_params(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def notebook_errors(path: Path) -> list[str]:
    nb = nbformat.read(str(path), as_version=4)
    return [f"{o.ename}: {o.evalue}" for c in nb.cells for o in c.get("outputs", [])
            if o.get("output_type") == "error"]


# tiny runs for the failure test: one epoch of 2 batches, a 2-attack suite on 20 images
TINY_BASE = {"data": {"name": "digits", "val_size": 50},
             "attack": {"eps": 0.1, "alpha": 0.05, "steps": 1},
             "train": {"method": "standard", "epochs": 1, "batch_size": 64, "max_batches": 2,
                       "val_steps": 1},
             "eval": {"suite": ["clean", "fgsm"], "n_examples": 20, "eps_curve": []}}


# --------------------------------------------------------------------------------------------
# validation: before anything executes
@pytest.mark.slow
def test_a_params_typo_fails_before_any_notebook_executes_naming_the_key(tmp_path):
    doc = yaml.safe_load((PARAMS / "smoke.yaml").read_text())
    doc["base"]["train"]["epohcs"] = 3
    bad = write_params(tmp_path / "typo.yaml", doc)
    out = spat_batch(bad, "--out", tmp_path / "out", cwd=tmp_path, timeout=120)
    assert out.returncode == 2
    assert "epohcs" in out.stderr and "did you mean 'epochs'" in out.stderr
    assert not (tmp_path / "out").exists()                # nothing written, nothing executed

    doc = yaml.safe_load((PARAMS / "smoke.yaml").read_text())
    doc["hypothesis"]["eps_lst"] = [0.1]                  # a notebook section is checked too
    bad = write_params(tmp_path / "typo2.yaml", doc)
    out = spat_batch(bad, "--out", tmp_path / "out", cwd=tmp_path, timeout=120)
    assert out.returncode == 2
    assert "hypothesis.eps_lst" in out.stderr and "eps_list" in out.stderr
    out = spat_batch(PARAMS / "smoke.yaml", "--set", "train.lr=fast", "--out", tmp_path / "out",
                     cwd=tmp_path, timeout=120)
    assert out.returncode == 2 and "train.lr" in out.stderr
    assert not list(tmp_path.rglob("*.ipynb"))


def test_notebook_sections_are_checked_by_config_before_anything_runs(tmp_path):
    doc = yaml.safe_load((PARAMS / "smoke.yaml").read_text())
    for section, value, match in [("hypothesis", {"n_examples": "many"}, "hypothesis.n_examples"),
                                  ("hypothesis", {"model_dir": "x"}, "set by spat batch"),
                                  ("robustness", {"whih": "last"}, "did you mean 'which'")]:
        d = {**doc, section: value}
        with pytest.raises(ConfigError, match=match):
            launch.plan_experiment(write_params(tmp_path / "p.yaml", d), out_root=tmp_path)
    with pytest.raises(ConfigError, match="did you mean 'spat_at-digits-s0'"):
        launch.plan_experiment(PARAMS / "smoke.yaml", out_root=tmp_path, only=["spat_at-digit-s0"])


def test_every_params_file_validates_and_expands_as_documented(tmp_path):
    expected = {"smoke": 2, "digits": 35, "cifar10_quick": 6, "mnist": 18,
                "cifar10_paper": 48, "cifar100_paper": 48}
    for name, n_runs in expected.items():
        plan = launch.plan_experiment(PARAMS / f"{name}.yaml", out_root=tmp_path)
        assert plan.name == name and len(plan.runs) == n_runs, name
    digits = launch.plan_experiment(PARAMS / "digits.yaml", out_root=tmp_path)
    variants = {lab["variant"] for lab in digits.labels.values()}
    assert variants == {"standard", "pgd_at", "trades", "spat_at", "spat_random", "spat_radius",
                        "spat_radius_random"}
    assert digits.configs["spat_random-digits-s2"]["attack"]["rule"] == "random"
    assert digits.configs["spat_random-digits-s2"]["train"]["method"] == "spat_at"
    assert "autoattack" in digits.configs["pgd_at-digits-s0"]["eval"]["suite"]
    paper = launch.plan_experiment(PARAMS / "cifar10_paper.yaml", out_root=tmp_path)
    models = {(c["model"]["name"], c["model"]["depth"], c["model"]["width"]) for c in paper.configs.values()}
    assert ("wide_resnet", 34, 10) in models and any(m[0] == "preact_resnet18" for m in models)
    run = paper.configs["trades.wrn34-cifar10-s0"]
    assert run["attack"]["eps"] == pytest.approx(8 / 255) and run["train"]["beta"] == 6.0
    assert paper.labels["trades.wrn34-cifar10-s0"] == {"variant": "trades.wrn34", "dataset": "cifar10", "seed": 0}
    # TRADES-AWP, the method SPAT had to beat, with the authors' gamma and warm-up
    awp = paper.configs["trades_awp.prn18-cifar10-s2"]["train"]
    assert (awp["method"], awp["awp_gamma"], awp["awp_warmup"]) == ("trades", 0.005, 9)
    assert paper.configs["spat_trades_awp.wrn34-cifar10-s0"]["train"]["awp_gamma"] == 0.005
    assert paper.configs["trades.wrn34-cifar10-s0"]["train"]["awp_gamma"] == 0.0
    mnist = launch.plan_experiment(PARAMS / "mnist.yaml", out_root=tmp_path)
    assert {c["attack"]["eps"] for c in mnist.configs.values()} == {0.3}
    quick = launch.plan_experiment(PARAMS / "cifar10_quick.yaml", out_root=tmp_path)
    assert {(c["data"]["train_limit"], c["model"]["name"]) for c in quick.configs.values()} == {(5000, "small_cnn")}


def test_overrides_point_real_data_files_at_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = launch.plan_experiment(PARAMS / "cifar10_quick.yaml", out_root="out",
                                  overrides=["data.name=npz", "data.path=data/prefix.npz"])
    for cfg in plan.configs.values():
        assert cfg["data"]["name"] == "npz"
        assert cfg["data"]["path"] == str(tmp_path / "data" / "prefix.npz")
    # notebook 03 re-reads the experiment from another folder: it gets the absolute path
    assert plan.overrides == ["data.name=npz", f"data.path={tmp_path / 'data' / 'prefix.npz'}"]
    job = robustness_job(plan, NOTEBOOKS, threads=1)
    assert job.parameters["overrides"] == plan.overrides and job.parameters["train_missing"] is False
    assert plan.out_dir == tmp_path / "out" / "cifar10_quick"
    # an override to npz keeps the file's dataset label (the published rows match on it)
    assert all(lab["dataset"] == "cifar10" for lab in plan.labels.values())


def test_notebook_03_replans_relative_data_paths_from_where_the_batch_was_typed(tmp_path, monkeypatch):
    # a params file with a relative data path: the batch plans in the user's folder, notebook 03
    # re-plans in the experiment's folder with the base_dir the batch hands it
    params = tmp_path / "rel.yaml"
    doc = config.read_yaml(PARAMS / "smoke.yaml")
    doc["base"].setdefault("data", {}).update({"name": "npz", "path": "data/prefix.npz"})
    params.write_text(yaml.safe_dump(doc))
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.chdir(home)
    plan = launch.plan_experiment(params, out_root="out")
    assert {c["data"]["path"] for c in plan.configs.values()} == {str(home / "data" / "prefix.npz")}
    job = robustness_job(plan, NOTEBOOKS, threads=1)
    assert job.parameters["base_dir"] == str(home)
    job.cwd.mkdir(parents=True)              # as the launcher makes it before papermill's --cwd
    monkeypatch.chdir(job.cwd)
    again = launch.plan_experiment(job.parameters["params"], job.parameters["overrides"],
                                   out_dir=job.parameters["out_dir"], base_dir=job.parameters["base_dir"])
    assert again.configs == plan.configs
    assert experiment_document(again) == experiment_document(plan)
    # without it the same file would point at the experiment's folder
    assert launch.plan_experiment(params, out_dir=plan.out_dir).configs != plan.configs


def test_02_parameters_cell_lists_every_key_of_every_section():
    params = notebook_parameters(NOTEBOOKS / "02_training.ipynb")
    sections = {"data": config.DataConfig, "model": config.ModelConfig, "attack": config.AttackConfig,
                "train": config.TrainConfig, "eval": config.EvalConfig}
    import dataclasses
    for name, cls in sections.items():
        assert list(params[name]) == [f.name for f in dataclasses.fields(cls)], name
    cfg = config.from_dict({k: params[k] for k in ("name", "seed", *sections)})
    digits = experiment.load_experiment(PARAMS / "digits.yaml").runs["pgd_at-digits-s0"].to_dict()
    digits["eval"]["suite"].remove("autoattack")          # the notebook's nbval-sized default
    assert cfg.to_dict() == digits


def test_section_dicts_are_laid_over_the_notebook_defaults(tmp_path):
    plan = launch.plan_experiment(PARAMS / "smoke.yaml", out_root=tmp_path)
    jobs = launch.build_jobs(plan, NOTEBOOKS, threads=1)
    hyp = jobs[0]
    assert hyp.name == "01_hypothesis"
    assert hyp.parameters["train"]["epochs"] == 2                 # from smoke.yaml
    assert hyp.parameters["train"]["method"] == "standard"        # kept from the notebook
    assert hyp.parameters["model_dir"] == str(plan.out_dir / "hypothesis_model")
    runs = {j.name: j for j in jobs[1:]}
    job = runs["spat_at-digits-s0"]
    assert job.output == plan.out_dir / "runs" / "spat_at-digits-s0" / "02_training.ipynb"
    cfg = config.from_dict({k: job.parameters[k] for k in ("name", "seed", "data", "model", "attack",
                                                           "train", "eval")})
    assert cfg.train.method == "spat_at" and cfg.train.epochs == 2


def test_is_done_needs_the_same_parameters_and_the_outputs(tmp_path):
    plan = launch.plan_experiment(PARAMS / "smoke.yaml", out_root=tmp_path)
    job = launch.build_jobs(plan, NOTEBOOKS, threads=1, hypothesis=False)[0]
    summary = {"jobs": {job.name: {"status": "ok", "fingerprint": job.fingerprint()}}}
    assert not status.is_done(job, summary)                          # no executed notebook yet
    job.output.parent.mkdir(parents=True)
    job.output.write_text("{}")
    assert not status.is_done(job, summary)                          # no metrics.json
    (job.run_dir / "metrics.json").write_text("{}")
    assert status.is_done(job, summary)
    job.parameters["threads"] = 8                                   # threads change nothing computed
    assert status.is_done(job, summary)
    job.parameters["train"] = {**job.parameters["train"], "epochs": 3}
    assert not status.is_done(job, summary)
    assert not status.is_done(job, {"jobs": {job.name: {"status": "failed", "fingerprint": job.fingerprint()}}})


def test_a_job_environment_has_its_threads_its_gpu_and_its_batch(tmp_path):
    env = local.job_env(threads=3, gpu=None)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "3"
    assert local.job_env(threads=None, gpu=1)["CUDA_VISIBLE_DEVICES"] == "1"
    assert local.job_env(None, None, tmp_path)[status.BATCH_DIR_ENV] == str(tmp_path)
    # the placement itself (one GPU per running job, freed at its end) runs real notebooks:
    # tests/test_batch_faults.py::test_each_running_job_holds_a_gpu_of_its_own_and_frees_it


def test_kernel_falls_back_to_python3():
    assert local.kernel_name("no-such-kernel-xyz") == "python3"


def test_notebooks_are_committed_without_outputs_but_the_checked_cells():
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = nbformat.read(str(path), as_version=4)
        assert nb.metadata["kernelspec"]["name"] == "spat"  # the kit's kernel (make install)
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, path.name
        checked = 0
        for cell in nb.cells:
            if cell.cell_type != "code":
                continue
            if "NBVAL_CHECK_OUTPUT" in cell.source:      # nbval compares these: they keep theirs
                checked += 1
                assert cell.outputs and all(o.output_type == "stream" for o in cell.outputs)
            else:
                assert cell.outputs == [] and cell.execution_count is None, path.name
        assert checked == 1, path.name


# --------------------------------------------------------------------------------------------
# execution
@pytest.mark.slow
def test_smoke_batch_end_to_end_and_a_rerun_retrains_nothing(tmp_path):
    out = spat_batch(PARAMS / "smoke.yaml", "--jobs", "2", "--out", tmp_path / "out", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    exp = tmp_path / "out" / "smoke"
    for nb in [exp / "01_hypothesis.ipynb", exp / "03_robustness.ipynb",
               *(exp / "runs").glob("*/02_training.ipynb")]:
        assert nb.is_file() and notebook_errors(nb) == [], nb
    runs = sorted(p.name for p in (exp / "runs").iterdir())
    assert runs == ["spat_at-digits-s0", "standard-digits-s0"]
    for run in runs:
        run_dir = exp / "runs" / run
        for name in ("config.yaml", "history.csv", "checkpoint_best.pt", "metrics.json",
                     "eval_0.1.json", "02_training.ipynb"):
            assert (run_dir / name).is_file(), (run, name)
        history = pd.read_csv(run_dir / "history.csv")
        assert len(history) == 2 and history["train_loss"].map(math.isfinite).all()
        assert (exp / "logs" / f"{run}.log").stat().st_size > 0
    results = pd.read_csv(exp / "results.csv")
    assert list(results["method"]) == ["standard", "spat_at"]
    for col in ("clean_mean", "fgsm_mean", "pgd20_mean", "cw_mean"):
        assert results[col].map(math.isfinite).all() and results[col].between(0, 100).all(), col
    for fig in ("accuracy_vs_eps", "per_class_accuracy"):
        assert (exp / "figures" / f"{fig}.png").stat().st_size > 1000
    assert "| standard | digits | SmallCNN |" in out.stdout            # the table is printed
    assert f"report: {exp / '03_robustness.ipynb'}" in out.stdout
    summary = json.loads((exp / "batch_summary.json").read_text())
    assert summary["failures"] == []
    assert yaml.safe_load((exp / "experiment.yaml").read_text())["runs"]["spat_at-digits-s0"]["variant"] == "spat_at"

    stamps = {p: p.stat().st_mtime_ns for p in exp.rglob("*") if p.suffix in (".pt", ".csv") or
              p.name in ("metrics.json", "02_training.ipynb", "01_hypothesis.ipynb")
              if "figures" not in p.parts and p.parent != exp}
    again = spat_batch(PARAMS / "smoke.yaml", "--jobs", "2", "--out", tmp_path / "out", cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "0 job(s) to execute, 3 already finished" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps          # nothing retrained or re-run
    jobs = json.loads((exp / "batch_summary.json").read_text())["jobs"]
    assert {n: j["status"] for n, j in jobs.items() if n != "03_robustness"} == {
        "01_hypothesis": "skipped", "standard-digits-s0": "skipped", "spat_at-digits-s0": "skipped"}
    assert jobs["03_robustness"]["status"] == "ok"

    # an unfinished run (no metrics.json) is executed again and resumes from its checkpoint:
    # no epoch is retrained (checkpoint_last.pt untouched); the finished run is skipped
    run_dir = exp / "runs" / "spat_at-digits-s0"
    (run_dir / "metrics.json").unlink()
    resumed = spat_batch(PARAMS / "smoke.yaml", "--jobs", "2", "--out", tmp_path / "out", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "1 job(s) to execute, 2 already finished" in resumed.stdout
    assert (run_dir / "metrics.json").is_file()
    assert (run_dir / "checkpoint_last.pt").stat().st_mtime_ns == stamps[run_dir / "checkpoint_last.pt"]
    jobs = json.loads((exp / "batch_summary.json").read_text())["jobs"]
    assert jobs["spat_at-digits-s0"]["status"] == "ok" and jobs["standard-digits-s0"]["status"] == "skipped"
    # each log keeps every attempt, each opened by a dated line
    heads = lambda run: [ln.rsplit(" (", 1)[0] for ln in (exp / "logs" / f"{run}.log").read_text().splitlines()
                         if ln.startswith("=== ")]                                   # noqa: E731
    assert heads("standard-digits-s0") == ["=== started"] + ["=== already finished, skipped"] * 2
    assert heads("spat_at-digits-s0") == ["=== started", "=== already finished, skipped",
                                          "=== resumed at epoch 2 of 2"]
    assert "Ending Cell" in (exp / "logs" / "standard-digits-s0.log").read_text()   # the first run's output


@pytest.mark.slow
def test_a_broken_run_fails_alone_and_is_reported(tmp_path):
    # valid settings that fail at runtime, in the notebook (bad data fails before any work:
    # tests/test_batch_status.py)
    doc = {"experiment": "broken", "base": TINY_BASE,
           "variants": {"good": {}, "bad": {"train": {"lr": 1.0e+30}}}, "seeds": [0]}
    params = write_params(tmp_path / "broken.yaml", doc)
    out = spat_batch(params, "--jobs", "2", "--no-hypothesis", "--out", tmp_path / "out", cwd=tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    exp = tmp_path / "out" / "broken"
    assert "1 job(s) FAILED" in out.stdout and "bad-digits-s0: TrainingDivergedError" in out.stdout
    summary = json.loads((exp / "batch_summary.json").read_text())
    assert [f["job"] for f in summary["failures"]] == ["bad-digits-s0"]
    assert "train.lr" in summary["failures"][0]["error"]
    assert (exp / "logs" / "bad-digits-s0.log").is_file()
    assert (exp / "runs" / "good-digits-s0" / "metrics.json").is_file()   # the other run finished
    assert summary["jobs"]["03_robustness"]["status"] == "ok"            # and was reported
    assert list(pd.read_csv(exp / "results.csv")["method"]) == ["good"]
