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
from spatlib import report, train_cli, trainlog
from spatlib.config import DATASETS, ConfigError, RunConfig, deep_merge, from_dict
from spatlib.models import build_model
from spatlib.schedules import EMA, eps_at, lr_at
from spatlib.train import (METHODS, CheckpointError, TrainingDivergedError, load_checkpoint,
                           load_run_model, mart_loss, train, trades_loss)

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
    # training facts only: the robustness suite gives the test numbers, one per setting
    assert not [k for k in metrics if k.startswith(("test_", "n_test", "eval_"))], metrics
    assert metrics["val_source"] == "train_holdout" and metrics["n_val"] == 200
    assert metrics["selection"] == "held-out training images (200)"
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
    assert sampled["best_val_robust_acc"] == every["best_val_robust_acc"]
    rows_s, rows_e = read_history(tmp_path / "sampled"), read_history(tmp_path / "every")
    for rs, re_ in zip(rows_s, rows_e):
        assert 0 <= rs["train_clean_acc"] <= 1 and rs["train_loss"] == re_["train_loss"]
        if method == "spat_at":   # every batch in both: SPAT's logits are f(x) in eval mode
            assert rs["train_clean_acc"] == pytest.approx(re_["train_clean_acc"], abs=1e-9)


@pytest.mark.parametrize("method, attack", [
    ("spat_at", {"budget": "radius", "radius_mean": 0.4}),
    ("spat_trades", {"rule": "random"}),
    ("pgd_at", {"bn_mode": "train"}),       # BatchNorm-free SmallCNN: the mode still switches
])
def test_the_manipulation_check_measures_without_touching_the_training(method, attack):
    # every batch checked vs never: the same weights, bit for bit (own generator, eval mode)
    cfg = digits_config(train={"method": method, "epochs": 2, "max_batches": 4},
                        attack={"eps": 0.15, "alpha": 0.05, "steps": 3, **attack})
    epochs = {}
    for every in (0, 1):
        trainer = T.Trainer(deep_merge(cfg, {"train": {"share_every": every}}), device=torch.device("cpu"))
        epochs[every] = [trainer.train_epoch(e) for e in range(2)]
        epochs[every].append(trainer.model.state_dict())
    off, on = epochs[0][-1], epochs[1][-1]
    assert all(torch.equal(off[k], on[k]) for k in off)
    for row_off, row_on in zip(epochs[0][:2], epochs[1][:2]):
        assert row_off["train_loss"] == row_on["train_loss"]
        assert math.isnan(row_off["shared_share"]) and math.isnan(row_off["shared_share_pgd"])
        assert 0 < row_on["shared_share"] < 1 and 0 < row_on["shared_share_pgd"] < 1
    share, pgd = epochs[1][1]["shared_share"], epochs[1][1]["shared_share_pgd"]
    if method == "pgd_at":          # its attack is PGD: one number
        assert share == pgd
    elif attack.get("budget") == "radius":   # the radius budget moves |delta| to shared pixels
        assert share > 1.2 * pgd
    else:                           # the random control spreads it like PGD
        assert share == pytest.approx(pgd, rel=0.25)


def test_standard_training_has_no_manipulation_check(tmp_path):
    cfg = digits_config(train={"method": "standard", "epochs": 1, "max_batches": 2, "share_every": 1})
    row = T.Trainer(cfg, device=torch.device("cpu")).train_epoch(0)
    assert math.isnan(row["shared_share"]) and math.isnan(row["shared_share_pgd"])


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
    # the suite's PGD-20 at the training eps (0.15) on the first 200 test images
    acc = {m: report.evaluate_run(d, {"suite": ["clean", "pgd20"]}, device="cpu").result
           for m, (d, _, _) in trained_runs.items()}
    assert all(r.eps_str == "0.15" and r.n == 200 for r in acc.values())
    std = acc["standard"].accuracy
    assert std["clean"] > 0.9
    for method in ("pgd_at", "spat_at"):
        m = acc[method].accuracy
        assert m["pgd20"] > std["pgd20"] + 0.2, (method, m, std)
        assert m["clean"] > 0.7


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
    with torch.no_grad():
        acc = (model(ds.x_test[:200].float() / 255).argmax(1) == ds.y_test[:200]).double().mean().item()
    # the suite evaluates the selected weights: its clean accuracy is theirs
    suite = report.evaluate_run(run_dir, {"suite": ["clean"]}, device="cpu").result
    assert suite.n == 200 and suite.accuracy["clean"] == pytest.approx(acc, abs=1e-12)
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
    assert train_cli.main(["--run-dir", str(run_dir), "--set", "attack.eps=2"]) == 2
    assert "attack.eps" in capsys.readouterr().err
    assert not run_dir.exists()


def test_model_that_cannot_take_the_data_fails_before_training(tmp_path):
    cfg = digits_config(data={"name": "synthetic", "synthetic_shape": [1, 2, 2]})
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


def test_ema_validation_early_stopping_and_selection_on_test_images(tmp_path, monkeypatch):
    calls = {"n": 0}

    def flat_validation(self):   # never improves after the first eval
        calls["n"] += 1
        return {"val_clean_acc": 0.5, "val_robust_acc": 0.2,
                "ema_val_clean_acc": 0.6, "ema_val_robust_acc": 0.3}
    monkeypatch.setattr(T.Trainer, "validate", flat_validation)
    # selecting on test images takes an explicit data.val_split: test (val_size: the first 200)
    cfg = digits_config(data={"val_split": "test"},
                        train={"epochs": 10, "ema": 0.9, "patience": 2, "max_batches": 3})
    run_dir = tmp_path / "run"
    metrics = train(cfg, run_dir)
    assert metrics["stopped_early"] and metrics["epochs_trained"] == 3 and calls["n"] == 3
    assert metrics["best_epoch"] == 1 and metrics["selected"] == "ema"
    assert metrics["best_val_robust_acc"] == 0.3 and metrics["val_source"] == "test[:200]"
    assert metrics["selection"] == "TEST images (200): optimistic"
    rows = read_history(run_dir)
    assert rows[0]["ema_val_robust_acc"] == 0.3 and rows[0]["val_source"] == "test[:200]"
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
    for key in ("best_epoch", "best_val_clean_acc", "best_val_robust_acc", "epochs_trained",
                "started_at", "selection"):
        assert again[key] == first[key], key
    assert len(read_history(run_dir)) == 2


# --------------------------------------------------------------------------------------------
# kill -9 and resume: the same numbers as an uninterrupted run
def _train_cmd(params: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "spatlib.train_cli", str(params), "--run-dir", str(run_dir)]


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
    for key in ("best_epoch", "best_val_clean_acc", "best_val_robust_acc", "epochs_trained"):
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
    out = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "spatlib.train_cli",
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
    # measured (seed 0, ~2 min on one busy core): the suite's clean 0.306, PGD-20 0.182 on the
    # first 500 test images; chance is 0.1
    train(cfg, tmp_path / "run")
    r = report.evaluate_run(tmp_path / "run", {"suite": ["clean", "pgd20"]}, device="cpu").result
    assert r.eps_str == "8/255" and r.n == 500
    assert r.accuracy["clean"] > 0.25, r
    assert r.accuracy["pgd20"] > 0.15, r


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


def test_a_setting_added_since_a_run_was_saved_counts_as_its_default():
    # a run folder of an older release lacks attack.budget: it trained as budget 'step' does
    from spatlib.runfolder import config_diff, upgrade_config
    old = RunConfig().to_dict()
    del old["attack"]["budget"], old["attack"]["radius_mean"], old["train"]["share_every"]
    assert config_diff(upgrade_config(old), RunConfig().to_dict()) == []
    new = RunConfig().to_dict()
    new["attack"]["budget"] = "radius"
    assert config_diff(upgrade_config(old), new) == ["attack.budget: 'step' -> 'radius'"]


# --------------------------------------------------------------------------------------------
# spat train on the command line: experiment runs, progress lines, re-evaluation, disk errors
def test_spat_train_trains_one_run_of_an_experiment_into_the_batch_folder(tmp_path, monkeypatch,
                                                                          capsys):
    from spatlib.launch import plan_experiment
    from spatlib.runfolder import config_diff
    monkeypatch.chdir(tmp_path)
    params = str(ROOT / "params" / "smoke.yaml")
    over = ["train.epochs=1", "train.max_batches=2", "eval.n_examples=20"]
    assert train_cli.main([params, "--run", "spat_at-digits-s0", "--set", *over]) == 0
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
    assert train_cli.main([params, "--run", "spat-digits-s0", "--run-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "no run named 'spat-digits-s0'" in err and "did you mean 'spat_at-digits-s0'" in err
    assert "runs: standard-digits-s0, spat_at-digits-s0" in err
    # an experiment file without --run says so
    assert train_cli.main([params, "--run-dir", str(tmp_path / "x")]) == 2
    assert "experiment file" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_spat_train_says_a_finished_run_was_not_retrained(tmp_path, capsys):
    params = tmp_path / "run.yaml"
    params.write_text(yaml.safe_dump(digits_config(train={"epochs": 1, "max_batches": 2},
                                                   eval={"n_examples": 20})))
    args = [str(params), "--run-dir", str(tmp_path / "run")]
    assert train_cli.main(args) == 0
    first = capsys.readouterr()
    assert "already finished" not in first.err
    finished_at = json.loads(first.out)["finished_at"]
    assert train_cli.main(args) == 0
    again = capsys.readouterr()
    assert again.err.splitlines()[0] == f"already finished (metrics.json of {finished_at}): not retrained"
    assert json.loads(again.out) == json.loads(first.out)        # stdout stays the metrics JSON


def test_spat_train_still_takes_one_runs_params_file(tmp_path, capsys):
    params = tmp_path / "run.yaml"
    params.write_text(yaml.safe_dump(digits_config(train={"epochs": 1, "max_batches": 2},
                                                   eval={"n_examples": 20})))
    run_dir = tmp_path / "run"
    assert train_cli.main([str(params), "--run-dir", str(run_dir)]) == 0
    out, err = capsys.readouterr()
    # what it trained, and where the test numbers come from (it computes none of its own)
    assert json.loads(out) == json.loads((run_dir / "metrics.json").read_text())
    assert "test_clean_acc" not in out
    assert err.splitlines()[-1].startswith(f"test numbers: spat eval {run_dir} (the robustness suite")


def test_spat_train_help_names_spat_train(capsys):
    with pytest.raises(SystemExit):
        train_cli.main(["--help"])
    assert capsys.readouterr().out.startswith("usage: spat train")
    out = subprocess.run([sys.executable, "-m", "spatlib.train_cli", "--help"], capture_output=True,
                         text=True, env=subprocess_env(), timeout=120).stdout
    assert out.startswith("usage: spat train") and "python -m spatlib.train_cli." in out
    # the trainer's module is no command line, and says where it is rather than doing nothing
    old = subprocess.run([sys.executable, "-m", "spatlib.train", "--help"], capture_output=True,
                         text=True, env=subprocess_env(), timeout=120)
    assert old.returncode != 0 and "python -m spatlib.train_cli" in old.stderr


def test_a_line_per_epoch_where_no_bar_shows(tmp_path, capsys):
    cfg = digits_config(train={"epochs": 2, "max_batches": 2, "eval_every": 2, "progress": True},
                        eval={"n_examples": 20})
    train(cfg, tmp_path / "run")          # stderr is not a terminal here: no bar, lines
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2, err
    assert err[0].startswith("test: epoch 1/2: loss ")
    assert ", val clean/robust acc -/-, " in err[0]     # no validation in epoch 1
    rows = read_history(tmp_path / "run")
    assert err[1] == trainlog.epoch_line(rows[1], 2, "test")
    assert err[1].endswith(f", {rows[1]['epoch_time_s']:.1f} s")
    assert (f"train clean/adv acc {rows[1]['train_clean_acc']:.3f}/{rows[1]['train_adv_acc']:.3f}, "
            f"val clean/robust acc {rows[1]['val_clean_acc']:.3f}/{rows[1]['val_robust_acc']:.3f}, "
            f"shared share {rows[1]['shared_share']:.3f} (PGD {rows[1]['shared_share_pgd']:.3f})"
            in err[1])
    train(cfg, tmp_path / "bars", progress=True)   # bars asked for: no lines
    assert "epoch 1/2: loss" not in capsys.readouterr().err
    assert not trainlog.in_jupyter_kernel()


def test_changed_eval_settings_change_no_finished_run(tmp_path, monkeypatch):
    # eval settings change what the suite measures, never the run: the finished run is returned
    # as it is, nothing is written, and the suite answers for the new settings
    cfg = digits_config(train={"epochs": 1, "max_batches": 3}, eval={"n_examples": 50})
    run_dir = tmp_path / "run"
    first = train(cfg, run_dir)
    stamps = {n: (run_dir / n).stat().st_mtime_ns for n in RUN_FILES}

    def no_training(*a, **k):
        raise AssertionError("a finished run was retrained")
    monkeypatch.setattr(T.Trainer, "train_epoch", no_training)
    again = train(deep_merge(cfg, {"eval": {"n_examples": 20, "eps": 0.0}}), run_dir)
    assert again == first
    assert {n: (run_dir / n).stat().st_mtime_ns for n in RUN_FILES} == stamps
    model, _, ds = load_run_model(run_dir)
    with torch.no_grad():
        acc = (model(ds.x_test[:20].float() / 255).argmax(1) == ds.y_test[:20]).double().mean().item()
    suite = report.evaluate_run(run_dir, {"n_examples": 20, "suite": ["clean"]}, device="cpu").result
    assert suite.n == 20 and suite.accuracy["clean"] == pytest.approx(acc, abs=1e-12)


def test_unwritable_run_folder_is_one_line_before_training(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the output folder should be")
    params = tmp_path / "run.yaml"
    params.write_text(yaml.safe_dump(digits_config(train={"epochs": 1, "max_batches": 2})))

    def no_training(*a, **k):
        raise AssertionError("training started before the run folder was checked")
    monkeypatch.setattr(T.Trainer, "train_epoch", no_training)
    run_dir = blocker / "runs" / "one"
    assert train_cli.main([str(params), "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: {run_dir}: Not a directory (ENOTDIR)") and str(run_dir) in err


# --------------------------------------------------------------------------------------------
# model selection never on test images by default
def test_val_size_zero_is_an_error_naming_the_key_not_a_switch_to_test_images(tmp_path):
    for data in ({"val_size": 0}, {"val_size": 0, "val_split": "test"}):
        with pytest.raises(ConfigError, match=r"data\.val_size: 0 leaves model selection no images"):
            train(digits_config(data=data), tmp_path / "run")
    with pytest.raises(ConfigError, match=r"data\.val_split: test"):
        from_dict(digits_config(data={"val_size": 0}))
    with pytest.raises(ConfigError, match=r"data\.val_split: 'held_out' is not allowed"):
        from_dict(digits_config(data={"val_split": "held_out"}))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("data, n_train, n_test, classes, expected", [
    ({}, 1347, 450, 10, 135),                    # digits: a tenth of the training images
    ({}, 50000, 10000, 10, 1000),                # CIFAR: at most 1000
    ({}, 40, 20, 10, 10),                        # at least one per class
    ({}, 8, 20, 10, 7),                          # always leaving training images
    ({"val_size": 150}, 1347, 450, 10, 150),
    ({"val_split": "test"}, 1347, 450, 10, 450),  # the first 512 test images, or all of them
    ({"val_split": "test"}, 50000, 10000, 10, 512),
    ({"val_split": "test", "val_size": 100}, 50000, 10000, 10, 100),
])
def test_validation_size(data, n_train, n_test, classes, expected):
    from spatlib.data import validation_size
    cfg = from_dict({"data": data}).data
    assert validation_size(cfg, n_train, n_test, classes) == expected


@pytest.mark.parametrize("data, n_train, n_test, message", [
    ({}, 1, 20, "data.val_size: digits has 1 training image"),
    ({"val_size": 100}, 100, 20, "data.val_size: 100 leaves no training images"),
    ({"val_split": "test", "val_size": 30}, 100, 20, "data.val_size: 30 is more than the 20 test images"),
])
def test_validation_size_that_cannot_be_met_names_the_key(data, n_train, n_test, message):
    from spatlib.data import validation_size
    with pytest.raises(ConfigError, match=message):
        validation_size(from_dict({"data": data}).data, n_train, n_test, 10)


def _fake_mnist(root: Path, folder: str) -> None:
    """The four idx files torchvision's MNIST / FashionMNIST read, 40 + 20 random images."""
    import numpy as np
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    g = np.random.default_rng(0)
    for split, n in (("train", 40), ("t10k", 20)):
        images = g.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        (raw / f"{split}-images-idx3-ubyte").write_bytes(
            np.array([0x803, n, 28, 28], ">i4").tobytes() + images.tobytes())
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(
            np.array([0x801, n], ">i4").tobytes() + (np.arange(n) % 10).astype(np.uint8).tobytes())


def _fake_cifar(root: Path, name: str, monkeypatch) -> None:
    """Pickled batches as torchvision's CIFAR-10 / CIFAR-100 read them (40 + 20 images); its
    md5 check of the real files is switched off for these."""
    import pickle

    import numpy as np
    from torchvision.datasets import cifar
    cls = cifar.CIFAR10 if name == "cifar10" else cifar.CIFAR100
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    k = 10 if name == "cifar10" else 100
    label_key = "labels" if name == "cifar10" else "fine_labels"
    g = np.random.default_rng(0)
    files = [(f, 40 // len(cls.train_list)) for f, _ in cls.train_list] + [(f, 20) for f, _ in cls.test_list]
    for file, n in files:
        entry = {"data": g.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8),
                 label_key: list(g.integers(0, k, n))}
        (folder / file).write_bytes(pickle.dumps(entry))
    (folder / cls.meta["filename"]).write_bytes(pickle.dumps({cls.meta["key"]: [str(c) for c in range(k)]}))
    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: Path(path).is_file())


def _data_section(name: str, tmp_path: Path, monkeypatch) -> dict:
    """A data section of ``name`` that loads offline: the bundled digits, a seeded synthetic
    set, a small npz, or small fake files of torchvision's datasets."""
    if name in ("digits", "synthetic"):
        return {"name": name}
    if name == "npz":
        import numpy as np
        g = np.random.default_rng(0)
        path = tmp_path / "data.npz"
        np.savez(path, x_train=g.integers(0, 256, (60, 8, 8), dtype=np.uint8),
                 y_train=np.arange(60) % 10, x_test=g.integers(0, 256, (30, 8, 8), dtype=np.uint8),
                 y_test=np.arange(30) % 10)
        return {"name": "npz", "path": str(path)}
    if name in ("mnist", "fashion_mnist"):
        _fake_mnist(tmp_path, "MNIST" if name == "mnist" else "FashionMNIST")
    elif name in ("cifar10", "cifar100"):
        _fake_cifar(tmp_path, name, monkeypatch)
    else:
        raise AssertionError(f"{name}: a dataset this test has no offline data for; add it")
    return {"name": name, "root": str(tmp_path), "download": False}


@pytest.mark.parametrize("name", DATASETS)
@pytest.mark.parametrize("val_split", ["train", "test"])
def test_validation_images_are_training_images_never_test_images(name, val_split, tmp_path,
                                                                 monkeypatch):
    # Provenance, not pixels (digits has identical images across splits): every loaded image
    # is replaced by a tag of its split and index, then the trainer's validation and training
    # images are read back as tags.
    import spatlib.data as data_mod

    def tag(x: torch.Tensor, split: int) -> torch.Tensor:
        t = torch.zeros_like(x).flatten(1)
        idx = torch.arange(len(x))
        t[:, 0], t[:, 1], t[:, 2] = split, idx // 256, idx % 256
        return t.view_as(x)

    def tagged(cfg):
        ds = data_mod.dataset_from_config(cfg)
        ds.x_train, ds.x_test = tag(ds.x_train, 0), tag(ds.x_test, 1)
        return ds

    def untag(x: torch.Tensor) -> tuple[set, list]:
        flat = x.cpu().flatten(1).long()
        return set(flat[:, 0].tolist()), (flat[:, 1] * 256 + flat[:, 2]).tolist()

    monkeypatch.setattr(T, "dataset_from_config", tagged)
    data = {**_data_section(name, tmp_path, monkeypatch), "val_split": val_split, "val_size": None}
    cfg = digits_config(data=data, train={"batch_size": 8, "device": "cpu"})
    trainer = T.Trainer(cfg, device=torch.device("cpu"))
    ds = trainer.dataset
    val_splits, val_idx = untag(trainer.x_val)
    train_splits, train_idx = untag(trainer.loader.x)
    assert train_splits == {0} and train_idx == sorted(set(train_idx))      # training images, once
    assert torch.equal(trainer.y_val, (ds.y_train if val_split == "train" else ds.y_test)[val_idx])
    if val_split == "train":
        assert val_splits == {0}, "model selection saw test images"
        assert not set(val_idx) & set(train_idx), "validation images were trained on"
        assert sorted(val_idx + train_idx) == list(range(len(ds.y_train)))
        assert trainer.val_source == "train_holdout" and val_idx
    else:   # only when asked, and then it says so
        assert val_splits == {1} and val_idx == list(range(len(val_idx)))
        assert train_idx == list(range(len(ds.y_train)))
        assert trainer.validation.label.startswith("TEST images") and "optimistic" in trainer.validation.label


def test_a_run_folder_from_before_val_split_is_still_its_own_run(tmp_path):
    # config.yaml written before data.val_split existed: val_size 200 is today's held-out
    # selection (the finished run is reused); val_size 0 selected on test images, which today
    # takes val_split: test (the default request is another run, named by its keys)
    cfg = digits_config(train={"epochs": 1, "max_batches": 2})
    run_dir = tmp_path / "run"
    first = train(cfg, run_dir)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    del saved["data"]["val_split"]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    assert train(cfg, run_dir) == first
    saved["data"]["val_size"] = 0
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(CheckpointError, match=r"data\.val_size: None -> 200; data\.val_split: 'test' -> 'train'"):
        train(cfg, run_dir)
    assert train(deep_merge(cfg, {"data": {"val_size": None, "val_split": "test"}}), run_dir) == first
    assert T.rf.read_run_config(run_dir).data.val_split == "test"


# --------------------------------------------------------------------------------------------
# the EMA and the eps warm-up, by hand
def test_ema_update_by_hand():
    # w = 1, then the model moves to 3 and to 5. The decay ramps as min(decay, (1+t)/(10+t)):
    # d1 = 2/11, d2 = 3/12 with decay 0.99; each update is ema <- d ema + (1 - d) w
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model, 0.99)
    expected = 1.0
    for w, d in ((3.0, 2 / 11), (5.0, 3 / 12)):
        with torch.no_grad():
            model.weight.fill_(w)
        ema.update(model)
        expected = d * expected + (1 - d) * w
        assert ema.module.weight.item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(29 / 44 + 3.75)     # 29/11 after the first update
    # a decay below the ramp: d = 0.1 from the first update on
    low = EMA(torch.nn.Linear(1, 1, bias=False).requires_grad_(False), 0.1)
    low.module.weight.fill_(1.0)
    target = torch.nn.Linear(1, 1, bias=False).requires_grad_(False)
    target.weight.fill_(3.0)
    low.update(target)
    assert low.module.weight.item() == pytest.approx(0.1 * 1 + 0.9 * 3)


def test_eps_warm_up_reaches_the_attack_eps_and_stays(tmp_path):
    # 54 training images in batches of 16: 4 steps an epoch; the eps of an epoch's row is its
    # last step's, eps * min(1, (step + 1) / (2 * 4)): half after epoch 1, all of it from epoch 2
    cfg = {"name": "warmup", "seed": 0,
           "data": {"name": "synthetic", "synthetic_train": 64, "synthetic_test": 16},
           "attack": {"eps": 0.2, "alpha": 0.1, "steps": 1},
           "train": {"method": "pgd_at", "epochs": 4, "batch_size": 16, "eps_warmup_epochs": 2,
                     "val_steps": 1, "progress": False, "device": "cpu"}}
    train(cfg, tmp_path / "run")
    rows = read_history(tmp_path / "run")
    assert [r["eps"] for r in rows] == pytest.approx([0.1, 0.2, 0.2, 0.2])


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
