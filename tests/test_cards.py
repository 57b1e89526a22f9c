"""spat eval: a run folder, a kit checkpoint, a TorchScript export and module:factory + state_dict
of the same model give the run's own numbers; every bad target is one error line (exit 2).
Notebook 03 reads the same cards: it writes a run's card as spat eval does, and a card of an
external model joins its results table with the numbers it holds.

One tiny digits run (SmallCNN, PGD-AT, 1 epoch of 3 batches) is trained once per module; the
expected numbers come from its selected weights (a plain forward) and from report.evaluate_run.
"""
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from spatlib import cards, config, launch, report
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
    assert out.startswith("tiny-digits/eval_0.1.json: not used: code changed (models.py)\n")
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
           f"{100 * card['acc_fgsm']:.2f} | {100 * card['acc_pgd20']:.2f} |  | 1 | card: tiny-ts.json |")
    assert row in md, md
    assert "Result cards: 1 (card: tiny-ts.json); threat-model check passed: True." in md


# --------------------------------------------------------------------------------------------
# --format robustbench: RobustBench's model_info of a kit-trained model
def _digits_named_cifar10(monkeypatch) -> None:
    """The digits images stand in for CIFAR-10 (the format reads the dataset's name; the real
    CIFAR-10 is a download away)."""
    import dataclasses
    real = cards.dataset_from_config
    monkeypatch.setattr(cards, "dataset_from_config", lambda cfg: dataclasses.replace(
        real(config.DataConfig(name="digits")), name="cifar10"))


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
    assert ", cache" in printed.splitlines()[0]
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
