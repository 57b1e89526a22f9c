"""spat eval: a run folder, a kit checkpoint, a TorchScript export and module:factory + state_dict
of the same model give the run's own numbers; every bad target is one error line (exit 2).

One tiny digits run (SmallCNN, PGD-AT, 1 epoch of 3 batches) is trained once per module; the
expected numbers come from the run itself (metrics.json) and from report.evaluate_run.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spatlib import cards, report
from spatlib.runfolder import load_run_model
from spatlib.train import train

SUITE = "clean,fgsm,pgd20"
N = 120


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    cfg = {"name": "tiny-digits", "seed": 0, "data": {"name": "digits"},
           "model": {"name": "small_cnn"},
           "attack": {"eps": 0.1, "alpha": 0.025, "steps": 2},
           "train": {"method": "pgd_at", "epochs": 1, "batch_size": 64, "max_batches": 3,
                     "val_steps": 1, "progress": False, "device": "cpu"},
           "eval": {"suite": ["clean", "fgsm", "pgd20"], "n_examples": N, "batch_size": 50,
                    "eps_curve": [0.0, 0.1]}}
    d = tmp_path_factory.mktemp("runs") / "tiny-digits"
    train(cfg, d)
    return d


def _eval(*args: str, out: Path) -> tuple[subprocess.CompletedProcess, dict | None]:
    proc = subprocess.run([sys.executable, "-m", "spatlib.cli", "eval", *args, "--device", "cpu",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    card = json.loads(out.read_text()) if proc.returncode == 0 else None
    return proc, card


def _numbers(card: dict) -> dict:
    return {k: card[k] for k in ("clean_acc", "robust_acc", "acc_clean", "acc_fgsm", "acc_pgd20",
                                 "n_examples", "eps", "max_linf", "threat_model_ok")}


def test_run_folder_reproduces_its_metrics_and_evaluate_run(run_dir, tmp_path):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    proc, card = _eval(str(run_dir), out=tmp_path / "card.json")
    assert proc.returncode == 0, proc.stderr
    assert card["source"] == "computed"
    assert not list(run_dir.glob("eval_*.json"))          # spat eval writes nothing into the run
    # the run's own final clean accuracy, on the same test images
    assert card["n_examples"] == metrics["n_test"] == N
    assert card["clean_acc"] == pytest.approx(metrics["test_clean_acc"], abs=1e-12)
    assert card["dataset"] == "digits" and card["threat_model"] == "Linf"
    assert card["eps"] == "0.1" and card["eps_float"] == pytest.approx(0.1)
    assert card["suite"] == ["clean", "fgsm", "pgd20"] and card["threat_model_ok"] is True
    assert card["max_linf"] <= 0.1 + 1e-6
    assert card["robust_acc"] == card["acc_pgd20"] <= card["acc_fgsm"] <= card["clean_acc"]
    assert len(card["target_sha256"]) == 64 and card["target_file"].endswith("checkpoint_best.pt")
    assert "PGD-20" in proc.stdout and "threat model" in proc.stdout
    # notebook 02's evaluation of the run: the same suite numbers, then spat eval reads its cache
    ev = report.evaluate_run(run_dir, device="cpu")
    assert not ev.cached
    assert card["acc_fgsm"] == ev.result.accuracy["fgsm"]
    assert card["acc_pgd20"] == ev.result.accuracy["pgd20"]
    assert card["robust_acc"] == ev.result.robust_accuracy
    proc, cached = _eval(str(run_dir), out=tmp_path / "card2.json")
    assert proc.returncode == 0, proc.stderr
    assert cached["source"] == "cache" and _numbers(cached) == _numbers(card)


def test_checkpoint_torchscript_and_factory_give_the_run_numbers(run_dir, tmp_path):
    proc, ref = _eval(str(run_dir), "--suite", SUITE, out=tmp_path / "run.json")
    assert proc.returncode == 0, proc.stderr

    proc, ck = _eval(str(run_dir / "checkpoint_best.pt"), out=tmp_path / "ckpt.json")
    assert proc.returncode == 0, proc.stderr
    assert ck["target_kind"] == "checkpoint" and _numbers(ck) == _numbers(ref)

    model, cfg, ds = load_run_model(run_dir, device="cpu")
    scripted = torch.jit.trace(model, ds.x_test[:2].float() / 255)
    ts_path = tmp_path / "model.ts"
    scripted.save(str(ts_path))
    ext = ["--dataset", "digits", "--eps", "0.1", "--suite", SUITE, "--n-examples", str(N),
           "--batch-size", "50", "--seed", "0"]
    proc, ts = _eval(str(ts_path), *ext, out=tmp_path / "ts.json")
    assert proc.returncode == 0, proc.stderr
    assert ts["target_kind"] == "torchscript" and _numbers(ts) == _numbers(ref)

    weights = tmp_path / "weights.pt"
    torch.save(model.state_dict(), weights)
    (tmp_path / "tiny_factory.py").write_text(
        "from spatlib.models import build_model\n"
        "def small_cnn_digits():\n"
        "    return build_model('small_cnn', 10, 1, mean=%r, std=%r, image_size=8)\n"
        % (list(ds.mean), list(ds.std)))
    env_path = f"{tmp_path}:{Path(cards.__file__).parents[1]}"
    proc = subprocess.run([sys.executable, "-m", "spatlib.cli", "eval", "tiny_factory:small_cnn_digits",
                           "--weights", str(weights), *ext, "--device", "cpu",
                           "--out", str(tmp_path / "fac.json")], capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ, "PYTHONPATH": env_path})
    assert proc.returncode == 0, proc.stderr
    fac = json.loads((tmp_path / "fac.json").read_text())
    assert fac["target_kind"] == "factory" and _numbers(fac) == _numbers(ref)


def _error(*args: str, tmp_path: Path) -> str:
    proc, _ = _eval(*args, out=tmp_path / "bad.json")
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr   # no traceback
    assert not (tmp_path / "bad.json").exists()
    return lines[0]


def test_bad_targets_get_one_clear_error(run_dir, tmp_path):
    assert "no such file or folder" in _error(str(tmp_path / "missing.pt"), tmp_path=tmp_path)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model at all")
    assert "neither a TorchScript file nor a spatlib checkpoint" in _error(str(junk), tmp_path=tmp_path)
    # a state_dict of another architecture
    model, _, ds = load_run_model(run_dir, device="cpu")
    wrong = tmp_path / "wrong.pt"
    torch.save({k: v for k, v in model.state_dict().items() if "classifier" not in k}, wrong)
    (tmp_path / "fac_mod.py").write_text(
        "from spatlib.models import build_model\n"
        "def digits():\n    return build_model('small_cnn', 10, 1, image_size=8)\n"
        "def three():\n    return build_model('small_cnn', 3, 1, image_size=8)\n")
    env = {**__import__("os").environ, "PYTHONPATH": f"{tmp_path}:{Path(cards.__file__).parents[1]}"}

    def factory_error(spec: str, weights: Path) -> str:
        proc = subprocess.run([sys.executable, "-m", "spatlib.cli", "eval", spec, "--weights",
                               str(weights), "--dataset", "digits", "--device", "cpu", "--out",
                               str(tmp_path / "bad.json")], capture_output=True, text=True,
                              timeout=300, env=env)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        return lines[0]

    assert "does not fit fac_mod:digits" in factory_error("fac_mod:digits", wrong)
    assert "Missing key(s)" in factory_error("fac_mod:digits", wrong)
    # a model whose output width is not the dataset's class count
    three = tmp_path / "three.pt"
    from spatlib.models import build_model
    torch.save(build_model("small_cnn", 3, 1, image_size=8).state_dict(), three)
    msg = factory_error("fac_mod:three", three)
    assert "digits has 10 classes" in msg and "(2, 3)" in msg
    ts = tmp_path / "m.ts"
    torch.jit.trace(model, ds.x_test[:2].float() / 255).save(str(ts))
    assert "unknown_set" in _error(str(ts), "--dataset", "unknown_set", tmp_path=tmp_path)
    assert "outside [0, 1]" in _error(str(ts), "--dataset", "digits", "--eps", "1.5", tmp_path=tmp_path)
    assert "needs --dataset" in _error(str(ts), tmp_path=tmp_path)
    assert "unknown attack(s) pgd7" in _error(str(run_dir), "--suite", "clean,pgd7", tmp_path=tmp_path)
    (tmp_path / "nocfg").mkdir()
    assert "not a spatlib run folder" in _error(str(tmp_path / "nocfg"), tmp_path=tmp_path)
