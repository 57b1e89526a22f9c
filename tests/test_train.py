"""The trainer: every method trains, adversarial training buys robustness, runs resume exactly,
checkpoints are atomic and checked, bad params fail before any work, torchrun matches one
process. CPU only, on the bundled digits (and the CIFAR-10 prefix when shared/ has it)."""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import spatlib.train as T
from spatlib.config import ConfigError, RunConfig, deep_merge, from_dict
from spatlib.models import build_model
from spatlib.train import (METHODS, CheckpointError, TrainingDivergedError, eps_at,
                           load_checkpoint, load_run_model, lr_at, mart_loss, train, trades_loss)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RUN_FILES = ("config.yaml", "history.csv", "checkpoint_last.pt", "checkpoint_best.pt", "metrics.json")




def digits_config(**sections) -> dict:
    """A small digits run (seconds on a CPU); ``sections`` are merged in, e.g. train={...}."""
    base = {
        "name": "test", "seed": 0,
        "data": {"name": "digits", "val_size": 200},
        "model": {"name": "small_cnn"},
        "attack": {"eps": 0.1, "alpha": 0.04, "steps": 2},
        "train": {"method": "pgd_at", "epochs": 3, "batch_size": 64, "lr": 0.05,
                  "schedule": "cosine", "progress": False},
        "eval": {"n_examples": 200},
    }
    return deep_merge(base, sections)


def read_history(run_dir: Path) -> list[dict]:
    with open(run_dir / "history.csv") as f:
        return [{k: (v if k == "val_source" else float(v)) for k, v in row.items()}
                for row in csv.DictReader(f)]


def leftover_temps(run_dir: Path) -> list[str]:
    return [p.name for p in run_dir.iterdir() if ".tmp" in p.name or p.name not in RUN_FILES]


def subprocess_env() -> dict:
    """One thread per process (see conftest.single_thread); spatlib importable without installing it."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


# --------------------------------------------------------------------------------------------
# the losses and schedules, against hand-computed values
def test_mart_loss_matches_the_paper_formula():
    clean = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    adv = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 2.0]])
    y = torch.tensor([0, 2])
    beta = 6.0
    p_nat, p_adv = clean.softmax(1), adv.softmax(1)
    total = 0.0
    for i in range(2):
        k = int(y[i])
        wrong = max(float(p_adv[i, j]) for j in range(3) if j != k)
        bce = -math.log(float(p_adv[i, k])) - math.log(1.0001 - wrong)
        kl = sum(float(p_nat[i, j]) * math.log(float(p_nat[i, j] / p_adv[i, j])) for j in range(3))
        total += bce + beta * kl * (1 - float(p_nat[i, k]))
    assert mart_loss(clean, adv, y, beta).item() == pytest.approx(total / 2, rel=1e-5)


def test_trades_loss_is_ce_plus_beta_kl():
    clean = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    adv = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    y = torch.tensor([0, 1])
    ce = torch.nn.functional.cross_entropy(clean, y).item()
    p, q = clean.softmax(1), adv.softmax(1)
    kl = (p * (p / q).log()).sum(1).mean().item()
    assert trades_loss(clean, adv, y, 2.0).item() == pytest.approx(ce + 2.0 * kl, rel=1e-6)
    assert trades_loss(clean, clean, y, 2.0).item() == pytest.approx(ce, rel=1e-6)


def test_schedules_per_iteration():
    tc = from_dict(digits_config(train={"epochs": 4, "lr": 0.1, "schedule": "piecewise",
                                        "milestones": [0.5, 0.75], "lr_decay": 0.1})).train
    assert [lr_at(tc, s, 10) for s in (0, 19, 20, 29, 30, 39)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    tc.schedule = "cosine"
    assert lr_at(tc, 0, 10) == pytest.approx(0.1)
    assert lr_at(tc, 20, 10) == pytest.approx(0.05)
    tc.schedule = "onecycle"       # up over the first 30% of the 40 steps, then down to ~0
    lrs = [lr_at(tc, s, 10) for s in range(40)]
    assert max(lrs) == pytest.approx(0.1) and lrs.index(max(lrs)) == 11
    assert lrs[0] < 0.01 and lrs[-1] < 0.01
    tc.schedule, tc.warmup_epochs = "cosine", 1.0
    assert lr_at(tc, 4, 10) == pytest.approx(0.5 * 0.1 * 0.5 * (1 + math.cos(math.pi * 4 / 40)))
    assert eps_at(0.3, 2.0, 9, 10) == pytest.approx(0.15)
    assert eps_at(0.3, 2.0, 19, 10) == eps_at(0.3, 2.0, 500, 10) == 0.3
    assert eps_at(0.3, 0.0, 0, 10) == 0.3


# --------------------------------------------------------------------------------------------
# every method trains
@pytest.mark.parametrize("method, cls, loss, start", [
    ("pgd_at", "PGD", "ce", False), ("mart", "PGD", "ce", "normal"), ("trades", "PGD", "kl", "normal"),
    ("spat_at", "SPAT", "ce", False), ("spat_trades", "SPAT", "kl", "normal"),
])
def test_each_method_crafts_with_its_attack(method, cls, loss, start, tmp_path):
    cfg = from_dict(digits_config(train={"method": method, "eps_warmup_epochs": 1},
                                  attack={"random_start": False, "rule": "equality"}))
    trainer = T.Trainer(cfg, tmp_path, device=torch.device("cpu"))
    attack = trainer.attack(0.05)       # mid warm-up: alpha scales with eps
    assert type(attack).__name__ == cls and attack.loss == loss
    assert attack.random_start == start  # TRADES and MART: the authors' 0.001 N(0,1) start
    assert attack.eps == 0.05 and attack.alpha == pytest.approx(0.02)
    assert attack.generator is trainer.attack_gen and attack.bn_mode == "eval"
    if cls == "SPAT":
        assert attack.rule == "equality"
    assert list(tmp_path.iterdir()) == []  # building a trainer writes nothing


def test_trainer_without_a_run_folder_times_a_slice_of_an_epoch(tmp_path, monkeypatch):
    # what spat bench does: build a Trainer without a run folder, train a few batches of an
    # epoch; the schedules keep counting the full epoch, and nothing is written anywhere
    monkeypatch.chdir(tmp_path)
    cfg = digits_config(train={"method": "pgd_at", "epochs": 2, "schedule": "piecewise",
                               "milestones": [0.5]})
    trainer = T.Trainer(cfg)
    assert trainer.run_dir is None and trainer.n_batches == 18   # 1347 - 200 images / 64
    row = trainer.train_epoch(1, max_batches=3)
    assert trainer.images_seen == 3 * 64 and trainer.epoch == 0
    assert row["lr"] == pytest.approx(0.005)   # epoch 2 of 2: past the milestone at half
    assert math.isfinite(row["train_loss"]) and 0 <= row["train_adv_acc"] <= 1
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="run_dir"):
        trainer.fit()


def test_training_attack_is_the_methods_attack():
    from spatlib.config import AttackConfig
    from spatlib.methods import METHODS as table
    from spatlib.methods import training_attack
    model = build_model("small_cnn", num_classes=10, in_channels=1, image_size=8)
    cfg = AttackConfig(eps=0.2, alpha=0.05, steps=3, random_start=True)
    gen = torch.Generator().manual_seed(0)
    trades = training_attack(model, cfg, table["trades"], 0.1, gen)
    assert (type(trades).__name__, trades.loss, trades.random_start) == ("PGD", "kl", "normal")
    assert trades.eps == 0.1 and trades.alpha == pytest.approx(0.025) and trades.steps == 3
    spat = training_attack(model, cfg, table["spat_at"], 0.2, gen)
    assert (type(spat).__name__, spat.loss, spat.random_start) == ("SPAT", "ce", True)
    assert spat.alpha == pytest.approx(0.05) and spat.generator is gen
    with pytest.raises(ValueError, match="clean"):
        training_attack(model, cfg, table["standard"], 0.1, gen)


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_trains_and_loss_decreases(method, tmp_path):
    run_dir = tmp_path / method
    metrics = train(digits_config(train={"method": method}), run_dir)
    rows = read_history(run_dir)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    losses = [r["train_loss"] for r in rows]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0], losses
    assert math.isnan(rows[0]["train_adv_acc"]) == (method == "standard")
    assert all(0 <= r["val_clean_acc"] <= 1 and 0 <= r["val_robust_acc"] <= r["val_clean_acc"]
               for r in rows)
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(RUN_FILES)
    assert json.loads((run_dir / "metrics.json").read_text()) == metrics
    assert metrics["method"] == method and metrics["epochs_trained"] == 3
    assert metrics["eps"] == "0.1" and metrics["n_test"] == 200
    assert 0 <= metrics["test_pgd20_acc"] <= metrics["test_clean_acc"] <= 1
    assert metrics["best_epoch"] in (1, 2, 3)
    for key in ("spatlib_version", "git_commit", "torch_version", "device_name", "seed",
                "started_at", "finished_at", "hostname", "total_time_s", "images_per_s"):
        assert key in metrics
    # checkpoints hold plain data only
    ckpt = torch.load(run_dir / "checkpoint_last.pt", weights_only=True)
    assert ckpt["epoch"] == 3 and ckpt["config"]["train"]["method"] == method
    assert from_dict(yaml.safe_load((run_dir / "config.yaml").read_text())).train.method == method


@pytest.mark.slow
@pytest.mark.parametrize("method", ["pgd_at", "spat_at"])
def test_clean_training_accuracy_is_measured_without_touching_the_training(method, tmp_path,
                                                                           monkeypatch):
    # pgd_at samples its clean accuracy (every CLEAN_ACC_EVERY-th batch), spat_at reads SPAT's
    # clean logits; a forward on every batch must give the same weights and the same accuracy
    # where both measured it
    import spatlib.train as train_mod
    cfg = digits_config(train={"method": method, "epochs": 2})
    sampled = train(cfg, tmp_path / "sampled")
    monkeypatch.setattr(train_mod, "CLEAN_ACC_EVERY", 1)
    # without SPAT's f(x) the trainer runs its own clean forward (eval mode, no grad)
    build = train_mod.Trainer.attack

    def attack_without_clean_logits(self, eps):
        attack = build(self, eps)
        run = attack.run
        attack.run = lambda x, y: dataclasses.replace(run(x, y), clean_logits=None)
        return attack
    monkeypatch.setattr(train_mod.Trainer, "attack", attack_without_clean_logits)
    every = train(cfg, tmp_path / "every")
    a = torch.load(tmp_path / "sampled" / "checkpoint_last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "every" / "checkpoint_last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sampled["test_pgd20_acc"] == every["test_pgd20_acc"]
    rows_s, rows_e = read_history(tmp_path / "sampled"), read_history(tmp_path / "every")
    for rs, re_ in zip(rows_s, rows_e):
        assert 0 <= rs["train_clean_acc"] <= 1 and rs["train_loss"] == re_["train_loss"]
        if method == "spat_at":   # every batch in both: SPAT's logits are f(x) in eval mode
            assert rs["train_clean_acc"] == pytest.approx(re_["train_clean_acc"], abs=1e-9)


# --------------------------------------------------------------------------------------------
# adversarial training buys robustness (runs shared by several tests)
ROBUST = dict(attack={"eps": 0.15, "alpha": 0.05, "steps": 3},
              train={"epochs": 10, "lr": 0.05, "eps_warmup_epochs": 2})


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    runs = {}
    for method in ("standard", "pgd_at", "spat_at"):
        cfg = digits_config(**deep_merge(ROBUST, {"train": {"method": method}}))
        runs[method] = (root / method, train(cfg, root / method), cfg)
    return runs


@pytest.mark.slow
def test_adversarial_training_beats_standard_under_pgd(trained_runs):
    std = trained_runs["standard"][1]
    assert std["test_clean_acc"] > 0.9
    for method in ("pgd_at", "spat_at"):
        m = trained_runs[method][1]
        assert m["test_pgd20_acc"] > std["test_pgd20_acc"] + 0.2, (method, m, std)
        assert m["test_clean_acc"] > 0.7
        assert m["eps"] == "0.15"


def test_finished_run_is_not_retrained(trained_runs, monkeypatch):
    run_dir, metrics, cfg = trained_runs["pgd_at"]
    before = {n: (run_dir / n).stat().st_mtime_ns for n in RUN_FILES}
    history = (run_dir / "history.csv").read_bytes()

    def no_training(*a, **k):
        raise AssertionError("a finished run was retrained")
    monkeypatch.setattr(T, "Trainer", no_training)
    assert train(cfg, run_dir) == metrics
    assert (run_dir / "history.csv").read_bytes() == history
    assert {n: (run_dir / n).stat().st_mtime_ns for n in RUN_FILES} == before
    # a different config is another run: refused, naming the key
    with pytest.raises(CheckpointError, match=r"train\.lr"):
        train(deep_merge(cfg, {"train": {"lr": 0.01}}), run_dir)
    # cosmetic keys do not matter
    assert train(deep_merge(cfg, {"name": "renamed", "train": {"progress": True}}), run_dir) == metrics


def test_best_checkpoint_is_the_reported_model(trained_runs):
    run_dir, metrics, _ = trained_runs["spat_at"]
    model, cfg, ds = load_run_model(run_dir)
    assert cfg.train.method == "spat_at" and not model.training
    n = metrics["n_test"]
    with torch.no_grad():
        acc = (model(ds.x_test[:n].float() / 255).argmax(1) == ds.y_test[:n]).float().mean().item()
    assert acc == pytest.approx(metrics["test_clean_acc"], abs=1e-6)
    best = load_checkpoint(run_dir / "checkpoint_best.pt")
    assert best["epoch"] == metrics["best_epoch"]
    rows = read_history(run_dir)
    assert max(r["val_robust_acc"] for r in rows) == pytest.approx(metrics["best_val_robust_acc"])


# --------------------------------------------------------------------------------------------
# bad params fail before any work
@pytest.mark.parametrize("section, key, value", [
    ("train", "method", "fgsm_at"),
    ("attack", "eps", 1.5),
    ("train", "batch_size", 0),
])
def test_bad_params_fail_before_training(section, key, value, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=rf"{section}\.{key}"):
        train(digits_config(**{section: {key: value}}), run_dir)
    assert not run_dir.exists()


def test_cli_reports_bad_params_without_writing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert T.main(["--run-dir", str(run_dir), "--set", "attack.eps=2"]) == 2
    assert "attack.eps" in capsys.readouterr().err
    assert not run_dir.exists()


def test_model_that_cannot_take_the_data_fails_before_training(tmp_path):
    cfg = digits_config(data={"name": "synthetic", "synthetic_shape": [1, 2, 2], "val_size": 0})
    with pytest.raises(ConfigError, match="model.name"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------
# checkpoints
def test_corrupt_or_mismatched_checkpoint_is_a_clear_error(trained_runs, tmp_path):
    src = trained_runs["standard"][0]
    run_dir = tmp_path / "run"
    shutil.copytree(src, run_dir)
    (run_dir / "metrics.json").unlink()
    last = run_dir / "checkpoint_last.pt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="checkpoint_last.pt"):
        load_checkpoint(last)
    history = (run_dir / "history.csv").read_bytes()
    with pytest.raises(CheckpointError, match="checkpoint_last.pt"):
        train(trained_runs["standard"][2], run_dir)
    assert (run_dir / "history.csv").read_bytes() == history
    last.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="checkpoint_last.pt"):
        load_checkpoint(last)
    # right file, wrong model: explained, not a raw state_dict traceback
    wrong = build_model("small_cnn", num_classes=5, in_channels=1, image_size=8)
    with pytest.raises(CheckpointError, match=r"checkpoint_best.pt.*10 classes"):
        load_checkpoint(run_dir / "checkpoint_best.pt", wrong)


def test_divergence_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    good = METHODS["standard"]

    def loss_that_explodes(clean, adv, y, beta):
        calls["n"] += 1
        loss = good.loss(clean, adv, y, beta)
        return loss * float("nan") if calls["n"] > 20 else loss   # epoch 2 (18 batches an epoch)
    monkeypatch.setitem(METHODS, "standard", T.Method(None, "ce", True, loss_that_explodes))
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingDivergedError, match=r"epoch 2, batch 3: loss = nan.*train\.lr"):
        train(digits_config(train={"method": "standard"}), run_dir)
    ckpt = load_checkpoint(run_dir / "checkpoint_last.pt")
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert not (run_dir / "metrics.json").exists()
    assert len(read_history(run_dir)) == 1


def test_ema_validation_early_stopping_and_test_split_fallback(tmp_path, monkeypatch):
    calls = {"n": 0}

    def flat_validation(self):   # never improves after the first eval
        calls["n"] += 1
        return {"val_clean_acc": 0.5, "val_robust_acc": 0.2,
                "ema_val_clean_acc": 0.6, "ema_val_robust_acc": 0.3}
    monkeypatch.setattr(T.Trainer, "validate", flat_validation)
    cfg = digits_config(data={"val_size": 0},
                        train={"epochs": 10, "ema": 0.9, "patience": 2, "max_batches": 3})
    run_dir = tmp_path / "run"
    metrics = train(cfg, run_dir)
    assert metrics["stopped_early"] and metrics["epochs_trained"] == 3 and calls["n"] == 3
    assert metrics["best_epoch"] == 1 and metrics["selected"] == "ema"
    assert metrics["best_val_robust_acc"] == 0.3 and metrics["val_source"] == "test[:450]"
    rows = read_history(run_dir)
    assert rows[0]["ema_val_robust_acc"] == 0.3 and rows[0]["val_source"] == "test[:450]"
    ckpt = load_checkpoint(run_dir / "checkpoint_last.pt")
    assert ckpt["ema_updates"] == 9 and ckpt["ema_model"] is not None
    ema, _, _ = load_run_model(run_dir, which="ema")
    raw, _, _ = load_run_model(run_dir, which="last")
    assert not torch.equal(ema.classifier.weight, raw.classifier.weight)


def test_run_killed_before_metrics_finishes_with_the_same_numbers(tmp_path, monkeypatch, capsys):
    scores = iter([0.1, 0.2])         # the last epoch is the best one
    monkeypatch.setattr(T.Trainer, "validate",
                        lambda self: {"val_clean_acc": 0.5, "val_robust_acc": next(scores)})
    cfg = digits_config(train={"epochs": 2, "max_batches": 3, "deterministic": True,
                               "progress": True})
    run_dir = tmp_path / "run"
    rng = torch.get_rng_state()
    first = train(cfg, run_dir, progress=True)
    assert "test" in capsys.readouterr().err          # tqdm bars, named after the run
    assert torch.equal(torch.get_rng_state(), rng)    # the caller's RNG is untouched ...
    assert not torch.are_deterministic_algorithms_enabled()   # ... and so are its flags
    assert first["best_epoch"] == 2
    monkeypatch.undo()
    # killed after checkpoint_last.pt of the last epoch, before checkpoint_best.pt and metrics
    (run_dir / "metrics.json").unlink()
    (run_dir / "checkpoint_best.pt").unlink()
    again = train(cfg, run_dir)
    assert load_checkpoint(run_dir / "checkpoint_best.pt")["epoch"] == 2
    for key in ("test_clean_acc", "test_pgd20_acc", "best_epoch", "best_val_robust_acc",
                "epochs_trained", "started_at"):
        assert again[key] == first[key], key
    assert len(read_history(run_dir)) == 2


# --------------------------------------------------------------------------------------------
# kill -9 and resume: the same numbers as an uninterrupted run
def _train_cmd(params: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "spatlib.train", str(params), "--run-dir", str(run_dir)]


@pytest.mark.slow
@pytest.mark.parametrize("awp", [{}, {"awp_gamma": 0.01, "awp_warmup": 1}],
                         ids=["plain", "awp"])
def test_killed_run_resumes_to_identical_metrics(awp, tmp_path):
    # with AWP from the second epoch: it keeps no state between steps, so the run still
    # resumes bit-identical whether the kill falls before or after it switched on
    cfg = digits_config(train={"epochs": 5, "deterministic": True, "ema": 0.9, **awp},
                        attack={"steps": 2})
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(cfg))
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    subprocess.run(_train_cmd(params, ref_dir), check=True, env=subprocess_env(),
                   capture_output=True, timeout=300)

    proc = subprocess.Popen(_train_cmd(params, run_dir), env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "checkpoint_last.pt").exists():
            assert proc.poll() is None, "the training process ended before its first checkpoint"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    at_kill = load_checkpoint(run_dir / "checkpoint_last.pt")
    assert 1 <= at_kill["epoch"] < 5 and not (run_dir / "metrics.json").exists()

    subprocess.run(_train_cmd(params, run_dir), check=True, env=subprocess_env(),
                   capture_output=True, timeout=300)
    ref = json.loads((ref_dir / "metrics.json").read_text())
    got = json.loads((run_dir / "metrics.json").read_text())
    for key in ("test_clean_acc", "test_pgd20_acc", "best_epoch", "best_val_clean_acc",
                "best_val_robust_acc", "epochs_trained"):
        assert got[key] == ref[key], key
    columns = ("train_loss", "train_clean_acc", "train_adv_acc", "val_clean_acc",
               "val_robust_acc", "ema_val_clean_acc", "ema_val_robust_acc", "lr", "eps")
    strip = lambda rows: [{c: r[c] for c in columns} for r in rows]  # noqa: E731
    assert strip(read_history(run_dir)) == strip(read_history(ref_dir))
    # resumed, not restarted: the epochs before the kill keep their recorded timings
    resumed = read_history(run_dir)
    for row in at_kill["history"]:
        assert resumed[row["epoch"] - 1]["epoch_time_s"] == row["epoch_time_s"]
    a = load_checkpoint(run_dir / "checkpoint_last.pt")["model"]
    b = load_checkpoint(ref_dir / "checkpoint_last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert leftover_temps(run_dir) == []


# --------------------------------------------------------------------------------------------
# torchrun: two CPU processes (gloo) follow the single-process loss curve
TORCHRUN = (Path(sys.executable).parent / "torchrun" if (Path(sys.executable).parent / "torchrun").exists()
            else shutil.which("torchrun"))


@pytest.mark.slow
@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not installed")
@pytest.mark.parametrize("awp", [{}, {"awp_gamma": 0.01}], ids=["plain", "awp"])
def test_torchrun_two_processes_match_single_process(awp, tmp_path):
    torchrun = str(TORCHRUN)
    # Without a random start PGD is noise-free and per example (small_cnn has no BatchNorm),
    # and 17 full batches of 64 split 32/32: the two processes then compute the very gradients
    # of the single one, and the curves agree to float rounding. With AWP the processes sum
    # their ascent gradients, so each adds the perturbation of the whole batch.
    cfg = digits_config(train={"epochs": 3, "max_batches": 17, **awp},
                        attack={"random_start": False})
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(cfg))
    single, multi = tmp_path / "single", tmp_path / "ddp"
    subprocess.run(_train_cmd(params, single), check=True, env=subprocess_env(),
                   capture_output=True, timeout=300)
    out = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "spatlib.train",
                          str(params), "--run-dir", str(multi)], env=subprocess_env(),
                         capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((multi / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["epochs_trained"] == 3
    a, b = read_history(single), read_history(multi)
    assert [r["train_loss"] for r in b] == pytest.approx([r["train_loss"] for r in a], abs=1e-3)
    assert [r["train_adv_acc"] for r in b] == pytest.approx([r["train_adv_acc"] for r in a], abs=0.01)
    assert b[-1]["train_loss"] < b[0]["train_loss"]
    assert leftover_temps(multi) == []


# --------------------------------------------------------------------------------------------
# real data: a short PGD-AT run on the CIFAR-10 prefix learns
CIFAR10 = SHARED_DATA / "cifar10_prefix.npz"


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR10.is_file(), reason=f"{CIFAR10} not present")
def test_pgd_at_on_cifar10_prefix_learns(tmp_path):
    cfg = {
        "name": "cifar-smoke", "seed": 0,
        "data": {"name": "npz", "path": str(CIFAR10), "train_limit": 4000, "val_size": 200},
        "model": {"name": "small_cnn"},
        "attack": {"eps": "8/255", "alpha": "4/255", "steps": 2},
        "train": {"method": "pgd_at", "epochs": 6, "batch_size": 128, "lr": 0.05,
                  "schedule": "cosine", "eps_warmup_epochs": 2, "progress": False},
        "eval": {"n_examples": 500},
    }
    # measured (seed 0, ~2 min on one busy core): clean 0.342, PGD-20 0.214; chance is 0.1
    metrics = train(cfg, tmp_path / "run")
    assert metrics["eps"] == "8/255"
    assert metrics["test_clean_acc"] > 0.25, metrics
    assert metrics["test_pgd20_acc"] > 0.15, metrics


def test_evaluation_settings_do_not_make_a_different_run():
    # eval.* never changes the weights: a finished run is reused, an unfinished one resumes
    from spatlib.train import config_diff
    a = RunConfig().to_dict()
    b = RunConfig().to_dict()
    b["eval"]["n_examples"] = 100
    b["eval"]["suite"] = ["clean", "pgd20"]
    assert config_diff(a, b) == []
    b["train"]["lr"] = 0.05
    assert config_diff(a, b) == ["train.lr: 0.1 -> 0.05"]


# --------------------------------------------------------------------------------------------
# spat train on the command line: experiment runs, progress lines, re-evaluation, disk errors
def test_spat_train_trains_one_run_of_an_experiment_into_the_batch_folder(tmp_path, monkeypatch,
                                                                          capsys):
    from spatlib.batch import plan_experiment
    from spatlib.runfolder import config_diff
    monkeypatch.chdir(tmp_path)
    params = str(ROOT / "params" / "smoke.yaml")
    over = ["train.epochs=1", "train.max_batches=2", "eval.n_examples=20"]
    assert T.main([params, "--run", "spat_at-digits-s0", "--set", *over]) == 0
    metrics = json.loads(capsys.readouterr().out)
    run_dir = tmp_path / "outputs" / "smoke" / "runs" / "spat_at-digits-s0"
    assert json.loads((run_dir / "metrics.json").read_text()) == metrics
    assert metrics["run"] == "spat_at-digits-s0" and metrics["method"] == "spat_at"
    # the very run spat batch plans, in the folder it uses: the two share the run
    plan = plan_experiment(params, over)
    assert plan.run_dir("spat_at-digits-s0") == run_dir
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config_diff(saved, plan.configs["spat_at-digits-s0"], ignore=()) == []
    # a misspelt run: the closest name and the runs there are; nothing written
    assert T.main([params, "--run", "spat-digits-s0", "--run-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "no run named 'spat-digits-s0'" in err and "did you mean 'spat_at-digits-s0'" in err
    assert "runs: standard-digits-s0, spat_at-digits-s0" in err
    # an experiment file without --run says so
    assert T.main([params, "--run-dir", str(tmp_path / "x")]) == 2
    assert "experiment file" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_spat_train_still_takes_one_runs_params_file(tmp_path, capsys):
    params = tmp_path / "run.yaml"
    params.write_text(yaml.safe_dump(digits_config(train={"epochs": 1, "max_batches": 2},
                                                   eval={"n_examples": 20})))
    assert T.main([str(params), "--run-dir", str(tmp_path / "run")]) == 0
    assert json.loads(capsys.readouterr().out)["n_test"] == 20


def test_spat_train_help_names_spat_train(capsys):
    with pytest.raises(SystemExit):
        T.main(["--help"])
    assert capsys.readouterr().out.startswith("usage: spat train")
    out = subprocess.run([sys.executable, "-m", "spatlib.train", "--help"], capture_output=True,
                         text=True, env=subprocess_env(), timeout=120).stdout
    assert out.startswith("usage: spat train") and "python -m spatlib.train" in out


def test_a_line_per_epoch_where_no_bar_shows(tmp_path, capsys):
    cfg = digits_config(train={"epochs": 2, "max_batches": 2, "eval_every": 2, "progress": True},
                        eval={"n_examples": 20})
    train(cfg, tmp_path / "run")          # stderr is not a terminal here: no bar, lines
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2, err
    assert err[0].startswith("test: epoch 1/2: loss ")
    assert ", val clean/robust acc -/-, " in err[0]     # no validation in epoch 1
    rows = read_history(tmp_path / "run")
    assert err[1] == T.epoch_line(rows[1], 2, "test")
    assert err[1].endswith(f", {rows[1]['epoch_time_s']:.1f} s")
    assert (f"train clean/adv acc {rows[1]['train_clean_acc']:.3f}/{rows[1]['train_adv_acc']:.3f}, "
            f"val clean/robust acc {rows[1]['val_clean_acc']:.3f}/{rows[1]['val_robust_acc']:.3f}"
            in err[1])
    train(cfg, tmp_path / "bars", progress=True)   # bars asked for: no lines
    assert "epoch 1/2: loss" not in capsys.readouterr().err
    assert not T._in_jupyter_kernel()


def sha256(path: Path) -> str:
    import hashlib
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_changed_eval_settings_reevaluate_a_finished_run_without_training(tmp_path, monkeypatch):
    cfg = digits_config(train={"epochs": 1, "max_batches": 3}, eval={"n_examples": 50})
    run_dir = tmp_path / "run"
    first = train(cfg, run_dir)
    assert first["n_test"] == 50 and first["eval_settings"]["n_examples"] == 50
    weights = {n: sha256(run_dir / n) for n in ("checkpoint_best.pt", "checkpoint_last.pt")}
    history = (run_dir / "history.csv").read_bytes()

    def no_training(*a, **k):
        raise AssertionError("a finished run was retrained")
    monkeypatch.setattr(T.Trainer, "train_epoch", no_training)
    again = train(deep_merge(cfg, {"eval": {"n_examples": 20}}), run_dir)
    assert again["n_test"] == 20 and again["eval_settings"]["n_examples"] == 20
    assert json.loads((run_dir / "metrics.json").read_text()) == again
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["eval"]["n_examples"] == 20
    assert {n: sha256(run_dir / n) for n in weights} == weights
    assert (run_dir / "history.csv").read_bytes() == history
    for key in ("best_epoch", "started_at", "train_time_s", "best_val_robust_acc"):
        assert again[key] == first[key], key
    # the numbers are those of the selected weights on the first 20 test images
    model, _, ds = load_run_model(run_dir)
    with torch.no_grad():
        acc = (model(ds.x_test[:20].float() / 255).argmax(1) == ds.y_test[:20]).float().mean().item()
    assert again["test_clean_acc"] == pytest.approx(acc, abs=1e-6)
    # the same settings again: returned as they are, nothing recomputed
    stamp = (run_dir / "metrics.json").stat().st_mtime_ns
    assert train(deep_merge(cfg, {"eval": {"n_examples": 20}}), run_dir) == again
    assert (run_dir / "metrics.json").stat().st_mtime_ns == stamp
    # and the eps too
    third = train(deep_merge(cfg, {"eval": {"n_examples": 20, "eps": 0.0}}), run_dir)
    assert third["eps"] == "0" and third["test_pgd20_acc"] == third["test_clean_acc"] == again["test_clean_acc"]


def test_unwritable_run_folder_is_one_line_before_training(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the output folder should be")
    params = tmp_path / "run.yaml"
    params.write_text(yaml.safe_dump(digits_config(train={"epochs": 1, "max_batches": 2})))

    def no_training(*a, **k):
        raise AssertionError("training started before the run folder was checked")
    monkeypatch.setattr(T.Trainer, "train_epoch", no_training)
    run_dir = blocker / "runs" / "one"
    assert T.main([str(params), "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: {run_dir}: Not a directory (ENOTDIR)") and str(run_dir) in err


# --------------------------------------------------------------------------------------------
# TensorBoard: the history's columns as event files beside history.csv
def read_tensorboard(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing import event_accumulator
    acc = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"),
                                             size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_events_equal_history_and_a_resumed_run_appends(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    cfg = digits_config(train={"epochs": 3, "max_batches": 2, "tensorboard": True, "eval_every": 2})
    run_dir = tmp_path / "run"
    saves = {"n": 0}
    real_save = T.Trainer.save

    def killed_at_third_save(self, improved):   # killed after epoch 3's events, before its checkpoint
        saves["n"] += 1
        if saves["n"] == 3:
            raise RuntimeError("killed")
        real_save(self, improved)
    monkeypatch.setattr(T.Trainer, "save", killed_at_third_save)
    with pytest.raises(RuntimeError, match="killed"):
        train(cfg, run_dir)
    assert len(read_tensorboard(run_dir)["train_loss"]) == 3     # epoch 3's stale events exist
    monkeypatch.undo()
    train(cfg, run_dir)                                          # resumes at epoch 3
    rows = read_history(run_dir)
    events = read_tensorboard(run_dir)
    numeric = [c for c in rows[0] if c not in ("epoch", "val_source")]
    assert sorted(events) == sorted(numeric)
    for c in numeric:
        expected = [(int(r["epoch"]), r[c]) for r in rows if math.isfinite(r[c])]
        assert [s for s, _ in events[c]] == [s for s, _ in expected], c    # once per epoch
        assert [v for _, v in events[c]] == pytest.approx([v for _, v in expected], rel=1e-6), c
    assert [s for s, _ in events["val_robust_acc"]] == [2, 3]   # validated epochs only


def test_tensorboard_off_writes_nothing_and_missing_package_is_one_line(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    train(digits_config(train={"epochs": 1, "max_batches": 1}), run_dir)
    assert not (run_dir / "tensorboard").exists()
    real_find_spec = T.importlib.util.find_spec
    monkeypatch.setattr(T.importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real_find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"train\.tensorboard: needs the tensorboard package: "
                                          r"pip install 'spatlib\[tensorboard\]'"):
        train(digits_config(train={"tensorboard": True}), tmp_path / "other")
    assert not (tmp_path / "other").exists()
