"""spat eval: a run folder, a kit checkpoint, a TorchScript export and module:factory + state_dict
of the same model give the run's own numbers; every bad target is one error line (exit 2).
Notebook 03 reads the same cards: it writes a run's card as spat eval does, and a card of an
external model joins its results table with the numbers it holds.

One tiny digits run (SmallCNN, PGD-AT, 1 epoch of 3 batches) is trained once per module; the
expected numbers come from its selected weights (a plain forward) and from report.evaluate_run.
"""
import json
import re
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from spatlib import cards, config, launch, report, targets
from spatlib.launch.plan import robustness_job
from spatlib.runfolder import load_run_model
from spatlib.train import train

SUITE = "clean,fgsm,pgd20"
N = 120
ROOT = Path(__file__).resolve().parents[1]


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


@pytest.fixture
def spat_eval(capsys, monkeypatch, tmp_path):
    """``spat eval ARGS --device cpu --out FILE`` in this process: (exit code, stdout, stderr, card)."""
    monkeypatch.syspath_prepend(str(tmp_path))       # the factory modules the tests write
    calls = iter(range(100))

    def run(*args: str):
        out = tmp_path / f"card{next(calls)}.json"
        code = cards.cli_main([*args, "--device", "cpu", "--out", str(out)])
        captured = capsys.readouterr()
        card = json.loads(out.read_text()) if out.exists() else None
        return code, captured.out, captured.err, card
    return run


def _script(model, x, path: Path) -> None:
    """A TorchScript export of ``model`` (torch 2.x marks tracing deprecated; it still works)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.trace(model, x).save(str(path))


def _numbers(card: dict) -> dict:
    return {k: card[k] for k in ("clean_acc", "robust_acc", "acc_clean", "acc_fgsm", "acc_pgd20",
                                 "n_examples", "eps", "max_linf", "threat_model_ok")}


def test_run_folder_reproduces_its_weights_and_evaluate_run(run_dir, spat_eval):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    code, out, err, card = spat_eval(str(run_dir))
    assert code == 0, err
    assert card["source"] == "computed"
    assert not list(run_dir.glob("eval_*.json"))          # spat eval writes nothing into the run
    # the selected weights' clean accuracy on the first N test images, by a plain forward
    model, _, ds = load_run_model(run_dir, device="cpu")
    with torch.no_grad():
        plain = (model(ds.x_test[:N].float() / 255).argmax(1) == ds.y_test[:N]).double().mean().item()
    assert card["n_examples"] == N and card["clean_acc"] == pytest.approx(plain, abs=1e-12)
    # where the checkpoint was selected: the digits default, a tenth of the 1,347 training images
    assert card["selection"] == metrics["selection"] == "held-out training images (135)"
    assert card["dataset"] == "digits" and card["threat_model"] == "Linf"
    assert card["eps"] == "0.1" and card["eps_float"] == pytest.approx(0.1)
    assert card["suite"] == ["clean", "fgsm", "pgd20"] and card["threat_model_ok"] is True
    assert card["max_linf"] <= 0.1 + 1e-6
    assert card["robust_acc"] == card["acc_pgd20"] <= card["acc_fgsm"] <= card["clean_acc"]
    assert len(card["target_sha256"]) == 64 and card["target_file"].endswith("checkpoint_best.pt")
    assert "PGD-20" in out and "threat model" in out
    # notebook 02's evaluation of the run: the same suite numbers, then spat eval reads its cache
    ev = report.evaluate_run(run_dir, device="cpu")
    assert not ev.cached
    assert card["acc_fgsm"] == ev.result.accuracy["fgsm"]
    assert card["acc_pgd20"] == ev.result.accuracy["pgd20"]
    assert card["robust_acc"] == ev.result.robust_accuracy
    code, _, err, cached = spat_eval(str(run_dir))
    assert code == 0, err
    assert cached["source"] == "cache" and _numbers(cached) == _numbers(card)


def test_a_card_is_read_from_the_cache_only_while_the_code_is_the_same(run_dir, spat_eval, tmp_path):
    import shutil
    mine = tmp_path / "tiny-digits"
    shutil.copytree(run_dir, mine)
    ev = report.evaluate_run(mine, device="cpu")
    code, _, err, card = spat_eval(str(mine))
    assert code == 0 and card["source"] == "cache", err
    doc = json.loads(ev.path.read_text())
    doc["key"]["code"]["models.py"] = "0" * 16          # computed by other model code
    ev.path.write_text(json.dumps(doc))
    code, out, err, again = spat_eval(str(mine))
    assert code == 0 and again["source"] == "computed", err
    assert out.splitlines()[1] == "tiny-digits/eval_0.1.json: not used: code changed (models.py)"
    assert _numbers(again) == _numbers(card)            # the same code in truth: the same numbers


def test_checkpoint_torchscript_and_factory_give_the_run_numbers(run_dir, spat_eval, tmp_path):
    code, _, err, ref = spat_eval(str(run_dir), "--suite", SUITE)
    assert code == 0, err
    code, _, err, ck = spat_eval(str(run_dir / "checkpoint_best.pt"))
    assert code == 0, err
    assert ck["target_kind"] == "checkpoint" and _numbers(ck) == _numbers(ref)

    model, cfg, ds = load_run_model(run_dir, device="cpu")
    ts_path = tmp_path / "model.ts"
    _script(model, ds.x_test[:2].float() / 255, ts_path)
    ext = ["--dataset", "digits", "--eps", "0.1", "--suite", SUITE, "--n-examples", str(N),
           "--batch-size", "50", "--seed", "0"]
    code, _, err, ts = spat_eval(str(ts_path), *ext)
    assert code == 0, err
    assert ts["target_kind"] == "torchscript" and _numbers(ts) == _numbers(ref)
    # where a checkpoint was selected: the kit knows it for its own, not for a foreign model
    assert ck["selection"] == ref["selection"] == "held-out training images (135)"
    assert ts["selection"] is None and cards.card_row({**ts, "card_file": "x.json"})["selection"] == "not recorded"

    weights = tmp_path / "weights.pt"
    torch.save(model.state_dict(), weights)
    (tmp_path / "tiny_factory.py").write_text(
        "from spatlib.models import build_model\n"
        "def small_cnn_digits():\n"
        "    return build_model('small_cnn', 10, 1, mean=%r, std=%r, image_size=8)\n"
        % (list(ds.mean), list(ds.std)))
    code, _, err, fac = spat_eval("tiny_factory:small_cnn_digits", "--weights", str(weights), *ext)
    assert code == 0, err
    assert fac["target_kind"] == "factory" and _numbers(fac) == _numbers(ref)


def test_the_spat_command_runs_eval(run_dir, tmp_path):
    """The installed entry point dispatches to spat eval (one real subprocess)."""
    out = tmp_path / "card.json"
    proc = subprocess.run([sys.executable, "-m", "spatlib.cli", "eval", str(run_dir), "--suite",
                           "clean", "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    card = json.loads(out.read_text())
    assert card["suite"] == ["clean"] and card["robust_acc"] == card["clean_acc"]


def test_bad_targets_get_one_clear_error(run_dir, spat_eval, tmp_path):
    def error(*args: str) -> str:
        code, out, err, card = spat_eval(*args)
        lines = err.strip().splitlines()
        assert code == 2 and card is None, (out, err)
        assert len(lines) == 1 and lines[0].startswith("error: "), err   # one line, no traceback
        return lines[0]

    assert "no such file or folder" in error(str(tmp_path / "missing.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model at all")
    assert "neither a TorchScript file nor a spatlib checkpoint" in error(str(junk))
    (tmp_path / "nocfg").mkdir()
    assert "not a spatlib run folder" in error(str(tmp_path / "nocfg"))
    model, _, ds = load_run_model(run_dir, device="cpu")
    (tmp_path / "fac_mod.py").write_text(
        "from spatlib.models import build_model\n"
        "def digits():\n    return build_model('small_cnn', 10, 1, image_size=8)\n"
        "def three():\n    return build_model('small_cnn', 3, 1, image_size=8)\n")
    # a state_dict that does not fit the architecture (the classifier left out)
    wrong = tmp_path / "wrong.pt"
    torch.save({k: v for k, v in model.state_dict().items() if "classifier" not in k}, wrong)
    msg = error("fac_mod:digits", "--weights", str(wrong), "--dataset", "digits")
    assert f"--weights {wrong} for fac_mod:digits: does not fit the model" in msg
    assert "2 missing key(s): classifier.bias, classifier.weight" in msg
    assert "needs --weights" in error("fac_mod:digits", "--dataset", "digits")
    # a model whose output width is not the dataset's class count
    three = tmp_path / "three.pt"
    from spatlib.models import build_model
    torch.save(build_model("small_cnn", 3, 1, image_size=8).state_dict(), three)
    msg = error("fac_mod:three", "--weights", str(three), "--dataset", "digits")
    assert "digits has 10 classes" in msg and "(2, 3)" in msg
    ts = tmp_path / "m.ts"
    _script(model, ds.x_test[:2].float() / 255, ts)
    assert "unknown_set" in error(str(ts), "--dataset", "unknown_set")
    assert "outside [0, 1]" in error(str(ts), "--dataset", "digits", "--eps", "1.5")
    assert "needs --dataset" in error(str(ts))
    assert "unknown attack(s) pgd7" in error(str(run_dir), "--suite", "clean,pgd7")
    # a 1-channel 8x8 model cannot take 3x32x32 images (an .npz given by --data-path)
    rng = np.random.default_rng(0)
    cifar_like = tmp_path / "rgb.npz"
    np.savez(cifar_like, x_train=rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8),
             y_train=np.arange(4) % 10, x_test=rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8),
             y_test=np.arange(4) % 10, class_names=np.array([str(k) for k in range(10)]))
    assert "cannot take npz images of shape (3, 32, 32)" in error(str(ts), "--data-path", str(cifar_like))


# --------------------------------------------------------------------------------------------
# notebook 03 reads the same cards
@pytest.fixture(scope="module")
def ts_card(run_dir, tmp_path_factory):
    """``spat eval model.ts --name tiny-ts``: the card of a TorchScript export of the run's
    model at the run's settings (the same numbers as the run, see the test above)."""
    d = tmp_path_factory.mktemp("ts")
    model, _, ds = load_run_model(run_dir, device="cpu")
    _script(model, ds.x_test[:2].float() / 255, d / "model.ts")
    out = d / "tiny-ts.json"
    code = cards.cli_main([str(d / "model.ts"), "--name", "tiny-ts", "--dataset", "digits",
                           "--eps", "0.1", "--suite", SUITE, "--n-examples", str(N),
                           "--batch-size", "50", "--seed", "0", "--device", "cpu", "--out", str(out)])
    assert code == 0
    return out


def test_notebook_03s_run_card_is_the_card_spat_eval_writes(run_dir, spat_eval, tmp_path):
    collected = report.collect_results([run_dir], device="cpu")      # notebook 03's call
    (path,) = cards.write_run_cards(collected, tmp_path / "cards", which="best", device="cpu")
    assert path == tmp_path / "cards" / "tiny-digits.json"
    written = cards.load_card(path)
    code, _, err, ref = spat_eval(str(run_dir))
    assert code == 0, err
    assert _numbers(written) == _numbers(ref)
    assert written["name"] == ref["name"] == "tiny-digits"           # the run's name by default
    volatile = {"date", "seconds", "source", "card_file"}          # when and how fast, not what
    assert {k: v for k, v in written.items() if k not in volatile} == \
           {k: v for k, v in ref.items() if k not in volatile}
    # --name labels the card; an empty one is refused
    code, _, err, named = spat_eval(str(run_dir), "--name", "my label")
    assert code == 0 and named["name"] == "my label", err
    code, _, err, _ = spat_eval(str(run_dir), "--name", " ")
    assert code == 2 and "--name: expected a non-empty label" in err


def test_default_names_of_external_targets(ts_card, tmp_path, monkeypatch):
    assert cards.load_target(str(ts_card.parent / "model.ts")).default_name == "model"
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "name_factory.py").write_text(
        "from spatlib.models import build_model\n"
        "def net():\n    return build_model('small_cnn', 10, 1, image_size=8)\n")
    from spatlib.models import build_model
    torch.save(build_model("small_cnn", 10, 1, image_size=8).state_dict(), tmp_path / "w.pt")
    target = cards.load_target("name_factory:net", weights=str(tmp_path / "w.pt"))
    assert target.default_name == "name_factory:net"


def test_a_torchscript_card_joins_the_results_table_with_the_run_numbers(run_dir, ts_card):
    card = cards.load_card(ts_card)
    assert card["name"] == "tiny-ts" and card["target_kind"] == "torchscript"
    runs = report.collect_results([run_dir], device="cpu").runs
    row = cards.card_row(card)
    assert row["source"] == "card: tiny-ts.json" and row["worst_case"] == card["robust_acc"]
    assert np.isnan(row["cw"]) and row["pgd20"] == card["acc_pgd20"]
    agg = report.aggregate(pd.concat([runs, pd.DataFrame([row])], ignore_index=True))
    table = report.results_table(agg).set_index("Method")
    assert list(table.index) == ["tiny-digits", "tiny-ts"]          # a group each, never averaged
    assert table.loc["tiny-ts", "Source"] == "card: tiny-ts.json"
    assert table.loc["tiny-digits", "Source"] == "measured"
    assert table.loc["tiny-ts", "Model"] == "TorchScript model.ts"
    for col in ("Dataset", "eps", "Images", "Clean", "FGSM", "PGD-20", "Seeds"):
        assert table.loc["tiny-ts", col] == table.loc["tiny-digits", col], col
    assert table.loc["tiny-ts", "Clean"] == f"{100 * runs.loc[0, 'clean']:.2f}"
    assert "CW-inf" not in table                                     # neither measured it
    # a card at another eps joins too; notebook 03 prints a note
    (line,) = cards.card_lines([card], runs)
    assert line == (f"card {ts_card}: tiny-ts (TorchScript model.ts), digits at eps 0.1, {N} images, "
                    f"threat model OK")
    (line,) = cards.card_lines([{**card, "eps": "8/255", "eps_float": 8 / 255}], runs)
    assert line.endswith("8/255, 120 images, threat model OK; note: its eps differs from the "
                         "runs' (digits at eps 0.1)")


def test_bad_cards_get_one_clear_error(ts_card, tmp_path):
    good = json.loads(ts_card.read_text())

    def error(content, name="card.json") -> str:
        path = tmp_path / name
        if content is not None:
            path.write_text(content if isinstance(content, str) else json.dumps(content))
        with pytest.raises(cards.TargetError) as e:
            cards.load_cards([str(path)])
        msg = str(e.value)
        assert msg.startswith(str(path)) and "\n" not in msg, msg
        return msg

    assert "no such result card" in error(None, "missing.json")
    assert "not JSON" in error("{'clean_acc': 0.5", "python.json")
    assert "a JSON list, not a result card" in error([good], "list.json")
    assert "format 'spatlib-eval/1' is not 'spatlib-card/1'" in error({**good, "format": "spatlib-eval/1"})
    assert "no 'format' key" in error({k: v for k, v in good.items() if k != "format"})
    msg = error({k: v for k, v in good.items() if k not in ("robust_acc", "seed")})
    assert "without the key(s) robust_acc, seed" in msg
    assert "clean_acc: expected an accuracy in [0, 1], got 57.5" in error({**good, "clean_acc": 57.5})
    assert "n_examples: expected an integer >= 1" in error({**good, "n_examples": "120"})
    with pytest.raises(cards.TargetError, match=r"nothing/\*\.json: no file matches this pattern"):
        cards.load_cards([str(ts_card), str(tmp_path / "nothing" / "*.json")])
    # a file named twice (itself and by a glob) is one card; a card without a name (written
    # before --name) is named by its file's stem
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "legacy.json").write_text(json.dumps({k: v for k, v in good.items() if k != "name"}))
    loaded = cards.load_cards([str(ts_card), str(ts_card.parent / "*.json"), str(tmp_path / "old" / "*.json")])
    assert [c["card_file"] for c in loaded] == [str(ts_card.resolve()), str((tmp_path / "old" / "legacy.json").resolve())]
    assert [cards.card_row(c)["method"] for c in loaded] == ["tiny-ts", "legacy"]


def test_the_cards_parameter_is_a_list_of_files_or_globs(tmp_path, monkeypatch):
    with pytest.raises(config.ConfigError, match=r"robustness\.cards: expected a list, got 3"):
        config.check_notebook_parameters("robustness", {"cards": 3})
    with pytest.raises(config.ConfigError, match=r"robustness\.cards: expected a list, got 'a\.json'"):
        config.check_notebook_parameters("robustness", {"cards": "a.json"})
    config.check_notebook_parameters("robustness", {"cards": ["a.json", "cards/*.json"]})
    # spat batch: a params file's robustness.cards, relative to where the command runs
    monkeypatch.chdir(tmp_path)
    plan = launch.plan_experiment(ROOT / "params" / "smoke.yaml", ["robustness.cards=[mine/*.json]"],
                                  out_root=tmp_path / "out")
    assert plan.experiment.robustness["cards"] == [str(tmp_path / "mine" / "*.json")]
    job = robustness_job(plan, ROOT / "notebooks", threads=1)
    assert job.parameters["cards"] == [str(tmp_path / "mine" / "*.json")]
    with pytest.raises(config.ConfigError, match="robustness.cards"):
        launch.plan_experiment(ROOT / "params" / "smoke.yaml", ["robustness.cards=3"], out_root=tmp_path)


@pytest.mark.slow
def test_notebook_03_puts_a_card_in_its_results_table(ts_card, tmp_path):
    import papermill as pm
    out = tmp_path / "exp"
    pm.execute_notebook(str(ROOT / "notebooks" / "03_robustness.ipynb"), str(tmp_path / "03.ipynb"),
                        parameters={"out_dir": str(out), "cards": [str(ts_card.parent / "*.json")],
                                    "device": "cpu"},
                        kernel_name="spat", progress_bar=False, cwd=str(tmp_path))
    card = json.loads(ts_card.read_text())
    runs = pd.read_csv(out / "runs.csv")
    # every run's card, as spat eval RUN_DIR writes it
    assert sorted(p.name for p in (out / "cards").glob("*.json")) == sorted(f"{r}.json" for r in runs["run"])
    for r in runs.itertuples():
        run_card = cards.load_card(out / "cards" / f"{r.run}.json")
        assert run_card["clean_acc"] == pytest.approx(r.clean, abs=1e-12)
    # the card's row in results.csv and results.md
    results = pd.read_csv(out / "results.csv")
    mine = results[results["source"] == "card: tiny-ts.json"]
    assert list(mine["method"]) == ["tiny-ts"] and list(mine["model"]) == ["TorchScript model.ts"]
    assert mine["clean_mean"].iloc[0] == pytest.approx(100 * card["clean_acc"])
    assert mine["pgd20_mean"].iloc[0] == pytest.approx(100 * card["acc_pgd20"])
    assert set(results.loc[results["method"] != "tiny-ts", "source"]) == {"measured"}
    md = (out / "results.md").read_text()
    row = (f"| tiny-ts | digits | TorchScript model.ts | 0.1 | {N} | {100 * card['clean_acc']:.2f} | "
           f"{100 * card['acc_fgsm']:.2f} | {100 * card['acc_pgd20']:.2f} |  | 1 |  | not recorded | "
           f"card: tiny-ts.json |")      # no CW-inf, no shared share, its selection not known
    assert row in md, md
    assert "Result cards: 1 (card: tiny-ts.json); threat-model check passed: True." in md


# --------------------------------------------------------------------------------------------
# --format robustbench: RobustBench's model_info of a kit-trained model
def _digits_named_cifar10(monkeypatch) -> None:
    """The digits images stand in for CIFAR-10 (the format reads the dataset's name; the real
    CIFAR-10 is a download away)."""
    import dataclasses
    from spatlib import runfolder
    real = targets.dataset_from_config
    fake = lambda cfg: dataclasses.replace(real(config.DataConfig(name="digits")), name="cifar10")  # noqa: E731
    # both readers: a kit model's own data (runfolder) and --dataset's (targets)
    monkeypatch.setattr(targets, "dataset_from_config", fake)
    monkeypatch.setattr(runfolder, "dataset_from_config", fake)


@pytest.fixture
def digits_as_cifar10(monkeypatch):
    _digits_named_cifar10(monkeypatch)


def test_format_robustbench_writes_robustbenchs_model_info(run_dir, digits_as_cifar10, tmp_path,
                                                           capsys):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    # notebook 03's evaluation with AutoAttack, cached in the run folder: spat eval reads it
    ev = report.evaluate_run(run, {"suite": ["clean", "autoattack"], "n_examples": 3}, device="cpu")
    capsys.readouterr()          # the notebook's own lines (why the run's old cache was recomputed)
    out = tmp_path / "tiny.json"
    code = cards.cli_main([str(run), "--suite", "clean,autoattack", "--n-examples", "3",
                           "--device", "cpu", "--format", "robustbench", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert printed.splitlines()[0].endswith(": read from the cache")
    info = json.loads(out.read_text())
    assert list(info) == list(cards.ROBUSTBENCH_KEYS) == [
        "link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
        "architecture", "eps", "clean_acc", "reported", "autoattack_acc", "footnote", "unreliable"]
    acc = ev.result.accuracy
    assert info["clean_acc"] == str(round(100 * acc["clean"], 2))
    assert info["autoattack_acc"] == str(round(100 * acc["autoattack"], 2))
    assert (info["dataset"], info["eps"], info["architecture"]) == ("cifar10", "0.1", "SmallCNN")
    assert info["number_forward_passes"] == 1 and info["unreliable"] is False
    # trained on digits, not on RobustBench's dataset: the kit cannot say; nor can it the paper's
    assert all(info[k] is None for k in ("link", "name", "authors", "venue", "reported",
                                         "additional_data", "footnote"))
    assert (f"submit it as model_info/cifar10/Linf/tiny.json" in printed
            and "note: fill in before submitting: link, name, authors, additional_data, venue, "
                "reported" in printed)
    assert "evaluated on the first 3 of " in printed and "eps 0.1: RobustBench's" in printed


def test_robustbench_info_of_a_wide_resnet_trained_on_cifar10():
    cfg = config.from_dict({"data": {"name": "cifar10"},
                            "model": {"name": "wide_resnet", "depth": 34, "width": 10}})
    card = {"dataset": "cifar10", "eps": "8/255", "clean_acc": 0.8536, "acc_autoattack": 0.5617}
    info = cards.robustbench_info(card, cfg)
    assert info == {"link": None, "name": None, "authors": None, "additional_data": False,
                    "number_forward_passes": 1, "dataset": "cifar10", "venue": None,
                    "architecture": "WideResNet-34-10", "eps": "8/255", "clean_acc": "85.36",
                    "reported": None, "autoattack_acc": "56.17", "footnote": None,
                    "unreliable": False}
    external = cards.robustbench_info({**card, "acc_autoattack": 0.0})
    assert external["autoattack_acc"] == "0.0" and external["architecture"] is None
    assert external["number_forward_passes"] is None and external["additional_data"] is None


def test_format_robustbench_refuses_what_robustbench_does_not_take(run_dir, spat_eval, tmp_path,
                                                                  monkeypatch):
    code, _, err, _ = spat_eval(str(run_dir), "--format", "robustbench")
    assert code == 2 and err.strip().splitlines() == [
        "error: --format robustbench: RobustBench's leaderboards are on cifar10, cifar100 (and "
        "ImageNet); this evaluation is on 'digits'"]
    _digits_named_cifar10(monkeypatch)
    code, _, err, _ = spat_eval(str(run_dir), "--dataset", "cifar10", "--format", "robustbench")
    assert code == 2 and "add autoattack to --suite" in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------
# spat eval fails fast and shows progress
def _cli(*args: str) -> int:
    """``spat eval ARGS`` in this process; a KeyboardInterrupt that escapes it fails the test
    (pytest would otherwise stop the whole session)."""
    try:
        return cards.cli_main(list(args))
    except KeyboardInterrupt:
        pytest.fail("a KeyboardInterrupt escaped spat eval")


@pytest.fixture
def nothing_runs(monkeypatch):
    """Loading a target, its data or running an attack fails the test."""
    def never(*a, **k):
        raise AssertionError("work started before --out was checked")
    for module, name in ((cards, "load_target"), (targets, "dataset_from_config"),
                         (cards, "robustness")):
        monkeypatch.setattr(module, name, never)


@pytest.mark.parametrize("out, why", [
    ("/proc/x/card.json", "cannot create the folder /proc/x"),
    ("{tmp}/a_file/card.json", "{tmp}/a_file is a file, not a folder"),
    ("{tmp}", "a folder, not a file"),
])
def test_an_unwritable_out_is_one_line_before_any_work(out, why, run_dir, nothing_runs, tmp_path,
                                                       capsys):
    (tmp_path / "a_file").write_text("")
    out = out.format(tmp=tmp_path)
    code = _cli(str(run_dir), "--suite", "clean", "--device", "cpu", "--out", out)
    captured = capsys.readouterr()
    assert code == 2 and captured.out == "", captured
    (line,) = captured.err.strip().splitlines()
    assert line.startswith(f"error: --out {out}: ") and why.format(tmp=tmp_path) in line, line
    assert not Path("/proc/x").exists() and list(tmp_path.iterdir()) == [tmp_path / "a_file"]


def test_a_new_out_folder_is_checked_not_left_behind(tmp_path, capsys):
    """The check creates the folders it needs and takes them away: an evaluation that fails
    after it leaves nothing (here the target: the --out check passed)."""
    code = _cli(str(tmp_path / "missing.pt"), "--out", str(tmp_path / "new" / "sub" / "c.json"))
    assert code == 2 and "missing.pt: no such file or folder" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def fresh_run(run_dir, tmp_path):
    """A copy of the run without the evaluation cache other tests write: spat eval attacks."""
    import shutil
    return Path(shutil.copytree(run_dir, tmp_path / "tiny-digits",
                                ignore=shutil.ignore_patterns("eval_*.json")))


PROGRESS = re.compile(r"^  (Clean|FGSM|PGD-20) +\d+\.\d\d%  +\d+\.\d s$")


def test_the_header_comes_first_then_a_line_per_attack_on_a_terminal(fresh_run, tmp_path, capsys,
                                                                      monkeypatch):
    from spatlib import evaluate
    seen = []                  # what spat eval had printed when each attack started
    real = evaluate.suite_attack

    def watched(name, *a, **k):
        seen.append((name, capsys.readouterr().out))
        return real(name, *a, **k)
    monkeypatch.setattr(evaluate, "suite_attack", watched)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)       # a terminal: progress by default
    code = _cli(str(fresh_run), "--suite", SUITE, "--device", "cpu", "--out", str(tmp_path / "c.json"))
    rest = capsys.readouterr().out
    assert code == 0
    (fgsm, before_fgsm), (pgd20, before_pgd20) = seen
    assert (fgsm, pgd20) == ("fgsm", "pgd20")
    header, clean = before_fgsm.splitlines()
    assert header == ("tiny-digits: run tiny-digits (pgd_at, small_cnn, best weights) on digits "
                      f"({N} test images of 1x8x8), {cards.device_name(torch.device('cpu'))}, "
                      "eps 0.1, clean, fgsm, pgd20: computing")
    assert PROGRESS.match(clean) and clean.startswith("  Clean")
    (line,) = before_pgd20.splitlines()
    assert PROGRESS.match(line) and line.startswith("  FGSM")
    assert PROGRESS.match(rest.splitlines()[0]) and rest.startswith("  PGD-20")
    card = json.loads((tmp_path / "c.json").read_text())
    assert f"{100 * card['acc_fgsm']:6.2f}%" in line          # the accuracy so far (cascaded)
    # --no-progress on a terminal, and no terminal: the header only
    for args in (["--no-progress"], []):
        if not args:
            monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
        seen.clear()
        assert _cli(str(fresh_run), "--suite", SUITE, "--device", "cpu", *args,
                    "--out", str(tmp_path / "c.json")) == 0
        assert [out for _, out in seen] == [header + "\n", ""]
        assert not any(PROGRESS.match(ln) for ln in capsys.readouterr().out.splitlines())


def test_ctrl_c_is_one_line_and_exit_status_130(fresh_run, tmp_path, capsys, monkeypatch):
    from spatlib import evaluate

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(evaluate, "suite_attack", interrupted)
    code = _cli(str(fresh_run), "--suite", SUITE, "--device", "cpu", "--out", str(tmp_path / "c.json"))
    captured = capsys.readouterr()
    assert code == 130 and captured.err == "interrupted: nothing written\n", captured
    assert captured.out.startswith("tiny-digits: ") and not (tmp_path / "c.json").exists()


SLOW_FACTORY = """\
import time
import torch
from spatlib.models import build_model

class Slow(torch.nn.Module):
    '''A digits SmallCNN that takes 20 ms a forward: an evaluation that lasts.'''
    def __init__(self):
        super().__init__()
        self.net = build_model('small_cnn', 10, 1, image_size=8)
    def forward(self, x):
        time.sleep(0.02)
        return self.net(x)

def slow():
    return Slow()
"""


def test_sigint_while_evaluating_stops_with_one_line(run_dir, tmp_path):
    """A real Ctrl-C (SIGINT) to ``spat eval`` while it attacks: one line, status 130, nothing
    written. The progress lines reach a pipe as each attack ends (flushed), so the signal is sent
    after the first one, while PGD-100 runs."""
    (tmp_path / "slowmodels.py").write_text(SLOW_FACTORY)
    model, _, _ = load_run_model(run_dir, device="cpu")        # the run's weights: robust points
    torch.save({f"net.{k}": v for k, v in model.state_dict().items()}, tmp_path / "w.pt")
    proc = subprocess.Popen(
        [sys.executable, "-m", "spatlib.cli", "eval", "slowmodels:slow", "--weights", "w.pt",
         "--dataset", "digits", "--suite", "clean,pgd100", "--n-examples", "100", "--progress",
         "--device", "cpu", "--out", "card.json"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # Ctrl-C's default, whatever this test inherited: a shell that starts a job in the
        # background (CI, nohup) ignores SIGINT for it, and Python keeps an ignored SIGINT ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        header, clean = proc.stdout.readline(), proc.stdout.readline()
        proc.send_signal(signal.SIGINT)          # PGD-100 is under way: 500 steps of 20 ms
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert header.startswith("slowmodels:slow: slowmodels:slow with w.pt on digits"), header
    assert PROGRESS.match(clean.rstrip("\n")), clean
    assert proc.returncode == 130 and err == "interrupted: nothing written\n", (out, err)
    assert not (tmp_path / "card.json").exists()


def test_a_factory_module_in_the_current_folder_is_importable(run_dir, tmp_path, monkeypatch,
                                                             capsys):
    """As ``python -m`` would: the installed ``spat`` script does not put the current folder on
    sys.path; spat eval does, while it imports the module (and takes it away after)."""
    model, _, ds = load_run_model(run_dir, device="cpu")
    project = tmp_path / "project"
    project.mkdir()
    (project / "mymodels.py").write_text(
        "from spatlib.models import build_model\n"
        "def digits():\n    return build_model('small_cnn', 10, 1, mean=%r, std=%r, image_size=8)\n"
        % (list(ds.mean), list(ds.std)))
    torch.save(model.state_dict(), project / "w.pt")
    monkeypatch.chdir(project)
    path = [p for p in sys.path if p not in ("", str(project))]
    monkeypatch.setattr(sys, "path", list(path))
    code = _cli("mymodels:digits", "--weights", "w.pt", "--dataset", "digits", "--suite", "clean",
                "--device", "cpu", "--out", "c.json")
    assert code == 0, capsys.readouterr().err
    assert json.loads((project / "c.json").read_text())["target_kind"] == "factory"
    assert sys.path == path
    # a module that is nowhere: the line says where it was looked for
    monkeypatch.setenv("PYTHONPATH", "/opt/models")
    code = _cli("othermodels:net", "--weights", "w.pt", "--dataset", "digits", "--device", "cpu",
                "--out", "c.json")
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and line == (
        "error: othermodels:net: cannot import 'othermodels': no module named 'othermodels' "
        f"(looked in the current folder {project}, PYTHONPATH /opt/models and the installed "
        "packages)")
    # a module that is found but imports one that is not: that one is named
    (project / "brokenmodels.py").write_text("import not_installed_anywhere\n")
    code = _cli("brokenmodels:net", "--weights", "w.pt", "--dataset", "digits", "--device", "cpu",
                "--out", "c.json")
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "cannot import 'brokenmodels': no module named 'not_installed_anywhere'" in line


@pytest.fixture(scope="module")
def cifar_like(tmp_path_factory):
    """A 3x32x32 SmallCNN as a factory (``rgbmodels:net`` + ``w.pt``) and a TorchScript file."""
    from spatlib.models import build_model
    d = tmp_path_factory.mktemp("rgb")
    (d / "rgbmodels.py").write_text("from spatlib.models import build_model\n"
                                    "def net():\n    return build_model('small_cnn', 10, 3, image_size=32)\n")
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 3, image_size=32).eval()
    torch.save(model.state_dict(), d / "w.pt")
    _script(model, torch.rand(2, 3, 32, 32), d / "rgb.ts")
    return d


@pytest.mark.parametrize("kind", ["torchscript", "factory"])
def test_synthetic_data_takes_the_models_shape(kind, cifar_like, spat_eval, monkeypatch):
    """Offline, a CIFAR-shaped model is checked on synthetic images of its shape: taken from
    the model (the kit's shapes tried, one forward each) or given by --shape; a shape the model
    rejects is one line naming it, the shape and the model's own error (its last line)."""
    monkeypatch.syspath_prepend(str(cifar_like))
    target = (["rgbmodels:net", "--weights", str(cifar_like / "w.pt")] if kind == "factory"
              else [str(cifar_like / "rgb.ts")])
    fast = ["--dataset", "synthetic", "--suite", "clean,fgsm", "--n-examples", "16"]
    for shape in ([], ["--shape", "3,32,32"]):
        code, out, err, card = spat_eval(*target, *fast, *shape)
        assert code == 0, err
        assert card["dataset"] == "synthetic" and card["n_examples"] == 16
        assert " on synthetic (16 test images of 3x32x32), " in out.splitlines()[0]
    code, out, err, card = spat_eval(*target, *fast, "--shape", "1,8,8")
    (line,) = err.strip().splitlines()
    assert code == 2 and card is None
    assert line.startswith(f"error: {target[0]}: cannot take synthetic images of shape (1, 8, 8): ")
    assert "Kernel size can't be greater than actual input size" in line    # the model's own words
    code, _, err, _ = spat_eval(*target, "--dataset", "digits", "--shape", "3,32,32")
    assert code == 2 and "--shape: only --dataset synthetic takes it" in err
    code, _, err, _ = spat_eval(*target, *fast, "--shape", "3x32")
    assert code == 2 and "--shape: expected C,H,W" in err


def test_synthetic_data_for_a_model_of_no_known_shape_asks_for_one(tmp_path, spat_eval):
    from spatlib.models import build_model
    model = build_model("small_cnn", 10, 2, image_size=16).eval()     # 2 channels: no dataset's
    _script(model, torch.rand(2, 2, 16, 16), tmp_path / "odd.ts")
    code, _, err, _ = spat_eval(str(tmp_path / "odd.ts"), "--dataset", "synthetic")
    (line,) = err.strip().splitlines()
    assert code == 2 and "takes none of the kit's image shapes (1x8x8, 1x28x28, 3x32x32)" in line
    assert "give --shape C,H,W" in line
    code, _, err, card = spat_eval(str(tmp_path / "odd.ts"), "--dataset", "synthetic", "--shape",
                                   "2,16,16", "--suite", "clean", "--n-examples", "8")
    assert code == 0 and card["n_examples"] == 8, err
