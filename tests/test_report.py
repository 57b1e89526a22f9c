"""spatlib.report: tidy tables, mean ± std over seeds, markdown, references, the eval cache.

Most tests build run folders by hand with known numbers (a config.yaml, a metrics.json and an
eval_<eps>.json cache whose key matches the checkpoint), so the expected means, standard
deviations and table cells are computed here, not read back from the code under test.
"""
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from spatlib import config, experiment, figures, hypothesis, report
from spatlib.config import ConfigError, from_dict

ATTACKS = ["clean", "fgsm", "pgd20", "pgd100", "cw", "autoattack"]


def _fake_run(root: Path, variant: str, seed: int, acc: dict, *, dataset="digits", eps=0.15,
              n=4, per_class=None, curve=None, val_source="train_holdout") -> Path:
    """A finished run folder whose eval cache says ``acc`` (attack -> accuracy fraction),
    selected on 150 held-out training images (or ``val_source``)."""
    name = f"{variant}-{dataset}-s{seed}"
    run_dir = root / name
    run_dir.mkdir(parents=True)
    cfg = from_dict({"name": name, "seed": seed, "data": {"name": "digits"},
                     "attack": {"eps": eps, "alpha": eps / 4},
                     "train": {"method": "pgd_at" if variant != "standard" else "standard"},
                     "eval": {"suite": list(acc), "n_examples": n, "eps_curve": [0.0, eps]}})
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    (run_dir / "checkpoint_best.pt").write_bytes(f"weights of {name}".encode())
    (run_dir / "metrics.json").write_text(json.dumps({"best_epoch": 3, "epochs_trained": 4,
                                                      "val_source": val_source, "n_val": 150}))
    key = report.eval_cache_key(run_dir, cfg, cfg.eval)
    flags = {a: [1] * round(v * n) + [0] * (n - round(v * n)) for a, v in acc.items()}
    worst = flags[list(acc)[-1]]
    result = {"eps": eps, "eps_str": config.format_eps(eps), "n": n, "cascade": True,
              "accuracy": dict(acc), "robust": worst, "correct": flags,
              "threat_model": {a: {"max_linf": eps, "n_nan": 0, "min_pixel": 0.0, "max_pixel": 1.0,
                                   "eps": eps, "ok": True} for a in acc if a != "clean"},
              "seconds": {a: 0.0 for a in acc}, "per_class": per_class or {},
              "robust_accuracy": sum(worst) / n}
    curve = curve or [{"eps": 0.0, "eps_str": "0", "accuracy": acc["clean"]},
                      {"eps": eps, "eps_str": config.format_eps(eps), "accuracy": acc.get("pgd20", 0.0)}]
    doc = {"key": key, "run": name, "class_names": ["zero", "one"], "seconds": 1.5,
           "result": result, "curve": curve}
    report.eval_cache_path(run_dir, eps).write_text(json.dumps(doc))
    return run_dir


@pytest.fixture
def three_seeds(tmp_path):
    """pgd_at with 3 seeds and standard with 1, known accuracies (fractions of 4 images)."""
    runs = tmp_path / "runs"
    pgd = [{"clean": 1.0, "pgd20": 0.5, "autoattack": 0.25},
           {"clean": 0.75, "pgd20": 0.5, "autoattack": 0.5},
           {"clean": 0.5, "pgd20": 0.25, "autoattack": 0.25}]
    dirs = [_fake_run(runs, "pgd_at", s, a, per_class={"clean": [1.0, 0.5], "autoattack": [0.5, 0.0]})
            for s, a in enumerate(pgd)]
    dirs.append(_fake_run(runs, "standard", 0, {"clean": 1.0, "pgd20": 0.0, "autoattack": 0.0},
                          per_class={"clean": [1.0, 1.0], "autoattack": [0.0, 0.0]}))
    return dirs


def test_collect_reads_the_cache_and_aggregates_mean_and_sample_std(three_seeds):
    collected = report.collect_results(three_seeds)
    runs = collected.runs
    assert list(runs["run"]) == ["pgd_at-digits-s0", "pgd_at-digits-s1", "pgd_at-digits-s2",
                                 "standard-digits-s0"]
    assert runs["eval_cached"].all()                      # nothing was attacked: the cache answered
    assert set(runs["selection"]) == {"held-out training images (150)"}
    assert not [c for c in runs if c.startswith("test_")]   # the suite's numbers are the only ones
    assert math.isnan(runs.loc[0, "fgsm"])                # not in the suite
    agg = report.aggregate(runs)
    pgd = agg[agg["method"] == "pgd_at"].iloc[0]
    assert pgd["n_seeds"] == 3 and pgd["seeds"] == "0, 1, 2"
    clean = np.array([100.0, 75.0, 50.0])
    assert pgd["clean_mean"] == pytest.approx(clean.mean())
    assert pgd["clean_std"] == pytest.approx(clean.std(ddof=1))           # 25.0
    assert pgd["autoattack_mean"] == pytest.approx(100 / 3)
    assert pgd["autoattack_std"] == pytest.approx(np.std([25, 50, 25], ddof=1))
    std = agg[agg["method"] == "standard"].iloc[0]
    assert std["n_seeds"] == 1 and math.isnan(std["clean_std"])          # one seed: no spread


def test_results_table_formats_mean_pm_std_and_leaves_out_unmeasured_attacks(three_seeds):
    agg = report.aggregate(report.collect_results(three_seeds).runs)
    table = report.results_table(agg)
    assert list(table.columns) == ["Method", "Dataset", "Model", "eps", "Images", "Clean", "PGD-20", "AutoAttack",
                                   "Seeds", "Selected on", "Source"]
    row = table.iloc[0]
    assert row["Clean"] == "75.00 ± 25.00"
    assert row["PGD-20"] == f"{np.mean([50, 50, 25]):.2f} ± {np.std([50, 50, 25], ddof=1):.2f}"
    assert table.iloc[1]["Clean"] == "100.00"                               # one seed: mean only
    md = report.to_markdown(table)
    lines = md.splitlines()
    assert lines[0] == ("| Method | Dataset | Model | eps | Images | Clean | PGD-20 | AutoAttack | Seeds "
                        "| Selected on | Source |")
    assert lines[2] == "| pgd_at | digits | SmallCNN | 0.15 | 4 | 75.00 ± 25.00 | 41.67 ± 14.43 | 33.33 ± 14.43 | 3 | held-out training images (150) | measured |"


def test_the_manipulation_check_of_each_method_joins_runs_csv_and_the_table(three_seeds):
    # history.csv's shared shares after the eps warm-up (epochs > 1 here), mean over seeds
    shares = {0: ([0.50, 0.30, 0.20], [0.20, 0.20, 0.20]), 1: ([0.50, 0.28, 0.30], [0.20, 0.20, 0.20]),
              2: ([0.50, 0.31, 0.29], [0.20, 0.18, 0.22])}
    for seed, (share, pgd) in shares.items():
        run = three_seeds[seed]
        cfg = from_dict({**report.read_run_config(run).to_dict(), "train": {"method": "spat_at",
                                                                             "eps_warmup_epochs": 1}})
        (run / "config.yaml").write_text(cfg.to_yaml())
        pd.DataFrame({"epoch": [1, 2, 3], "shared_share": share, "shared_share_pgd": pgd}).to_csv(
            run / "history.csv", index=False)
    runs = report.collect_results(three_seeds).runs
    assert runs.loc[0, "shared_share"] == pytest.approx(0.25) and runs.loc[0, "shared_share_pgd"] == 0.2
    assert runs.loc[0, "budget"] == "step" and runs.loc[3, "budget"] == ""
    assert math.isnan(runs.loc[3, "shared_share"])          # standard: no history, no check
    table = report.results_table(report.aggregate(runs))
    mean_share = 100 * np.mean([0.25, 0.29, 0.30])
    assert table.iloc[0][report.SHARED_COLUMN] == f"{mean_share:.1f} ({mean_share / 20:.2f}x PGD)"
    assert table.iloc[1][report.SHARED_COLUMN] == ""
    assert report.format_shared_share(18.4, 18.4) == "18.4 (PGD)"


def test_published_rows_join_only_their_dataset_and_eps_and_are_marked():
    agg = pd.DataFrame([{"method": "spat_at", "dataset": "cifar10", "model": "WRN-34-10",
                         "eps_str": "8/255", "n_seeds": 1, "clean_mean": 80.0, "clean_std": np.nan,
                         "autoattack_mean": 50.0, "autoattack_std": np.nan}])
    refs = report.load_references()
    table = report.results_table(agg, refs)
    published = table[table["Source"] != "measured"]
    expected = refs[(refs["dataset"] == "cifar10") & (refs["robust_attack"] == "AutoAttack")]
    assert len(published) == len(expected) >= 4
    assert all(m.endswith("(published)") for m in published["Method"])
    madry = published[published["Method"].str.startswith("PGD-AT (Madry")].iloc[0]
    assert (madry["Clean"], madry["AutoAttack"]) == ("87.14", "44.04")
    # how each published checkpoint was chosen, beside how the kit's were
    awp = published[published["Method"] == "AT-AWP (Wu et al. 2020) (published)"].iloc[0]
    assert (awp["Selected on"], madry["Selected on"]) == ("test PGD-20", "not stated")
    kit = report.results_table(agg.assign(selection="held-out training images"), refs)
    assert kit.iloc[0]["Selected on"] == "held-out training images"
    # digits has no published counterpart; MNIST rows need eps 0.3
    assert report.matching_references(refs, agg.assign(dataset="digits")).empty
    assert report.matching_references(refs, agg.assign(dataset="mnist", eps_str="0.1")).empty


def test_reference_csv_has_sources_for_every_row_and_the_issue_numbers():
    refs = report.load_references()
    assert refs["source"].str.len().min() > 20                 # every number names where it is from
    assert refs["robust"].notna().all()
    given = {("cifar10", "PGD-AT (Madry et al. 2018)"): (87.14, 44.04),
             ("cifar10", "TRADES (Zhang et al. 2019)"): (84.92, 53.08),
             ("cifar10", "AT-AWP (Wu et al. 2020)"): (85.36, 53.97),
             ("cifar10", "TRADES-AWP (Wu et al. 2020)"): (85.36, 56.17),
             ("cifar100", "AT-AWP (Wu et al. 2020)"): (60.38, 28.86)}
    aa = refs[(refs["robust_attack"] == "AutoAttack") & (refs["model"] == "WRN-34-10")]
    for (ds, method), (clean, robust) in given.items():
        row = aa[(aa["dataset"] == ds) & (aa["method"] == method)]
        assert len(row) == 1 and (row["clean"].item(), row["robust"].item()) == (clean, robust)
    assert set(refs[refs["dataset"] == "mnist"]["eps"]) == {"0.3"}
    # every row says how its checkpoint was chosen, and where that is written
    assert set(refs["selection"]) == {"test PGD-20", "test PGD-10", "not stated"}
    assert refs["selection_source"].str.startswith("github.com/").all()
    by = {(r.dataset, r.method, r.model): r.selection for r in refs.itertuples()}
    assert by[("cifar10", "AT-AWP (Wu et al. 2020)", "WRN-34-10")] == "test PGD-20"
    assert by[("cifar100", "PGD-AT (Rice et al. 2020)", "PreActResNet-18")] == "test PGD-10"


def test_save_results_writes_csv_markdown_and_figures(three_seeds, tmp_path):
    collected = report.collect_results(three_seeds)
    agg = report.aggregate(collected.runs)
    refs = report.load_references()
    table = report.results_table(agg, refs)
    figs = {"accuracy_vs_eps": figures.plot_accuracy_vs_eps(collected.curves),
            "per_class_accuracy": figures.plot_per_class_heatmap(collected.per_class)}
    out = tmp_path / "out"
    paths = report.save_results(out, collected, agg, table, refs, figs, experiment="toy")
    csv = pd.read_csv(paths["results.csv"])
    assert list(csv["method"]) == ["pgd_at", "standard"]      # no published digits rows
    assert csv.loc[0, "clean_mean"] == pytest.approx(75.0)
    md = paths["results.md"].read_text()
    assert md.startswith("# Results: toy")
    assert "| pgd_at | digits | SmallCNN | 0.15 | 4 | 75.00 ± 25.00 |" in md
    assert "## Published reference numbers" in md and "RobustBench" in md
    for name in figs:
        png = out / "figures" / f"{name}.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_per_class_matrix_is_the_worst_case_mean_over_seeds(three_seeds):
    collected = report.collect_results(three_seeds)
    mat = figures.per_class_matrix(collected.per_class)
    assert mat.attrs["attack"] == "autoattack"                 # the last attack of the cascade
    assert list(mat.columns) == ["zero", "one"]
    assert mat.loc["pgd_at", "zero"] == pytest.approx(50.0)
    assert mat.loc["standard", "one"] == pytest.approx(0.0)


def test_split_run_name_uses_known_variants_for_names_with_dashes():
    assert experiment.split_run_name("spat_at-digits-s2") == {"variant": "spat_at", "dataset": "digits", "seed": 2}
    assert experiment.split_run_name("spat-at-v2-cifar10-s0", ["spat-at-v2"]) == {
        "variant": "spat-at-v2", "dataset": "cifar10", "seed": 0}


def test_learning_curves_long_converts_history_to_percent():
    h = pd.DataFrame({"epoch": [1, 2], "lr": [0.1, 0.05], "eps": [0.1, 0.2], "train_loss": [2.0, 1.0],
                      "train_clean_acc": [0.5, 0.75], "train_adv_acc": [0.25, 0.5],
                      "val_clean_acc": [0.4, 0.8], "val_robust_acc": [float("nan"), 0.3]})
    long = figures.learning_curves_long(h)
    assert len(long) == 7                                      # the NaN epoch is dropped
    row = long[(long["kind"] == "robust") & (long["split"] == "validation")]
    assert row["accuracy (%)"].tolist() == [30.0]
    fig = figures.plot_learning_curves(h)
    drawn = [line for ax in fig.axes for line in ax.lines if len(line.get_xdata())]
    assert drawn, "the learning-curve figure has no curve"


def test_resolve_eval_rejects_a_typo_naming_the_key(three_seeds):
    cfg = report.read_run_config(three_seeds[0])
    assert report.resolve_eval(cfg, {"n_examples": 2}).n_examples == 2
    with pytest.raises(ConfigError, match="n_exmples"):
        report.resolve_eval(cfg, {"n_exmples": 2})


def test_evaluate_run_computes_once_then_reads_the_cache(tmp_path, capsys):
    """A real (tiny) run: the second call attacks nothing and returns the same numbers; new
    eval settings, new weights or other code invalidate the cache, with the reason printed."""
    from spatlib.train import train
    cfg = {"name": "tiny", "seed": 0,
           "data": {"name": "synthetic", "synthetic_train": 64, "synthetic_test": 16},
           "attack": {"eps": 0.1, "alpha": 0.05, "steps": 1},
           "train": {"method": "standard", "epochs": 1, "batch_size": 32, "val_steps": 1, "progress": False},
           "eval": {"suite": ["clean", "fgsm", "pgd20"], "n_examples": 16, "eps_curve": [0.0, 0.1]}}
    run_dir = tmp_path / "tiny"
    train(cfg, run_dir)
    first = report.evaluate_run(run_dir, device="cpu")
    assert not first.cached and first.path.name == "eval_0.1.json"
    assert first.result.n == 16 and len(first.curve) == 2
    second = report.evaluate_run(run_dir, device="cpu")
    assert second.cached
    assert second.result.accuracy == first.result.accuracy
    assert torch.equal(second.result.robust, first.result.robust)
    capsys.readouterr()
    # a cache computed by other code is recomputed, and the reason printed: a changed module ...
    doc = json.loads(first.path.read_text())
    assert doc["key"]["code"] == report.eval_code(cfg["eval"]["suite"])   # the suite's code, in the key
    assert {"evaluate.py", "attacks.py", "models.py", "data.py", "torch"} <= set(doc["key"]["code"])
    doc["key"]["code"]["attacks.py"] = "0" * 16
    first.path.write_text(json.dumps(doc))
    assert not report.evaluate_run(run_dir, device="cpu").cached
    assert capsys.readouterr().out == "tiny/eval_0.1.json: recomputed: code changed (attacks.py)\n"
    assert report.evaluate_run(run_dir, device="cpu").cached           # written anew, now current
    # ... or a cache of the format before the code was part of the key
    doc = json.loads(first.path.read_text())
    doc["key"]["format"] = "spatlib-eval/1"
    del doc["key"]["code"]
    first.path.write_text(json.dumps(doc))
    assert not report.evaluate_run(run_dir, device="cpu").cached
    assert capsys.readouterr().out == ("tiny/eval_0.1.json: recomputed: written by other code "
                                       "(format 'spatlib-eval/1', now 'spatlib-eval/2')\n")
    assert not report.evaluate_run(run_dir, {"n_examples": 8}, device="cpu").cached
    assert "recomputed: settings changed: n_examples 16 -> 8" in capsys.readouterr().out
    # the experiment's current eval settings (a --set on finished runs) win over the saved ones
    current = from_dict({**cfg, "eval": {**cfg["eval"], "n_examples": 12}})
    collected = report.collect_results([run_dir], configs={"tiny": current}, device="cpu")
    assert collected.runs.loc[0, "n_examples"] == 12 and not collected.runs.loc[0, "eval_cached"]
    assert report.results_table(report.aggregate(collected.runs)).loc[0, "Images"] == "12"
    ckpt = run_dir / "checkpoint_best.pt"
    ckpt.write_bytes(ckpt.read_bytes() + b"\0")               # other weights: other numbers
    key = report.eval_cache_key(run_dir, report.read_run_config(run_dir),
                                report.read_run_config(run_dir).eval)
    assert key["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    old = json.loads(first.path.read_text())["key"]
    assert report.cache_mismatch(old, key) == "weights changed; settings changed: n_examples 12 -> 16"
    assert report.cache_mismatch(old, {**key, "checkpoint_sha256": old["checkpoint_sha256"],
                                       "n_examples": 12}) is None


def test_results_table_says_where_checkpoints_were_selected_and_warns_on_test_images(tmp_path):
    runs = tmp_path / "runs"
    dirs = [_fake_run(runs, "pgd_at", 0, {"clean": 1.0, "pgd20": 0.5}),
            _fake_run(runs, "spat_at", 0, {"clean": 0.75, "pgd20": 0.5}, val_source="test[:4]")]
    collected = report.collect_results(dirs)
    assert list(collected.runs["selection"]) == ["held-out training images (150)",
                                                 "TEST images (4): optimistic"]
    agg = report.aggregate(collected.runs)
    table = report.results_table(agg, report.load_references())
    assert list(table["Selected on"]) == ["held-out training images (150)", "TEST images (4): optimistic"]
    assert list(table.columns)[-2:] == ["Selected on", "Source"]
    paths = report.save_results(tmp_path / "out", collected, agg, table, None, experiment="toy")
    md = paths["results.md"].read_text()
    assert "| spat_at | digits | SmallCNN | 0.15 | 4 | 75.00 | 50.00 | 1 | TEST images (4): optimistic | measured |" in md
    assert "selected on test images" in md.lower() and "optimistic" in md
    assert pd.read_csv(paths["runs.csv"])["selection"].tolist() == list(collected.runs["selection"])
    # none on test images: the column stays (published rows need it) but no warning
    held = report.aggregate(collected.runs.iloc[:1])
    table = report.results_table(held)
    assert list(table["Selected on"]) == ["held-out training images (150)"]
    assert "selected on test images" not in report.results_markdown(table, None, experiment="toy").lower()


def test_code_fingerprint_sees_code_not_docstrings_or_comments(tmp_path):
    import shutil
    from spatlib.util import PACKAGE_DIR, code_fingerprint
    pkg = tmp_path / "spatlib"
    shutil.copytree(PACKAGE_DIR, pkg, ignore=shutil.ignore_patterns("__pycache__"))

    def fingerprint():
        return code_fingerprint(report.EVAL_CODE, skip=report.EVAL_CODE_SKIP, package=pkg)

    def edited(module: str, old: str, new: str) -> dict:
        path = pkg / f"{module}.py"
        text = path.read_text()
        assert text.count(old) == 1, old
        path.write_text(text.replace(old, new))
        try:
            return fingerprint()
        finally:
            path.write_text(text)

    base = fingerprint()
    assert {"evaluate.py", "attacks.py", "semantics.py", "models.py", "data.py", "util.py"} <= set(base)
    assert "config.py" not in base                     # settings enter the key as values
    # a docstring, a comment, a blank line: the same code
    assert edited("attacks", "L-inf projected gradient ascent (Madry et al.)",
                  "Projected gradient ascent in the L-inf ball") == base
    assert edited("evaluate", "SUITE_STEP = 0.25   #", "\nSUITE_STEP = 0.25   # (eps / 4) ") == base
    # code the evaluation never runs: the same numbers (the trainer's loader; the cache's own
    # reader and its messages)
    assert edited("data", "self.epoch = epoch", "self.epoch = int(epoch)") == base
    assert edited("report", 'why.append("weights changed")', 'why.append("the weights changed")') == base
    # the path from the run folder to the numbers is followed
    changed = edited("report", "    eps = cfg.eval_eps(ev)\n    result = robustness(",
                     "    eps = cfg.eval_eps(ev) * 1.0\n    result = robustness(")
    assert {k for k in base if changed[k] != base[k]} == {"report.py"}
    # a changed constant, or a changed helper the suite calls: other numbers
    changed = edited("evaluate", "SUITE_STEP = 0.25", "SUITE_STEP = 0.3")
    assert {k for k in base if changed[k] != base[k]} == {"evaluate.py"}
    changed = edited("util", "            model.train(train)", "            model.train(not train)")
    assert {k for k in base if changed[k] != base[k]} == {"util.py"}
    assert fingerprint() == base


def test_describe_dataset_names_validation_on_test_images():
    held = from_dict({"data": {"name": "digits"}})
    assert report.describe_dataset(held) == ("digits: 1212 train + 135 validation + 450 test images "
                                             "of 1x8x8, 10 classes")          # a tenth held out
    on_test = from_dict({"data": {"name": "digits", "val_split": "test"}})
    assert report.describe_dataset(on_test) == ("digits: 1347 train + 450 validation (TEST images: "
                                                "optimistic) + 450 test images of 1x8x8, 10 classes")


def test_runs_selection_reaches_the_table_and_results_md(three_seeds, tmp_path):
    collected = report.collect_results(three_seeds)
    runs = collected.runs.assign(selection="held-out training images")
    agg = report.aggregate(runs)
    assert set(agg["selection"]) == {"held-out training images"}
    refs = report.load_references()
    cifar = agg.assign(dataset="cifar10", eps_str="8/255")
    table = report.results_table(cifar, refs)
    md = report.results_markdown(table, refs, experiment="toy")
    assert "| 3 | held-out training images | measured |" in md
    assert "| TRADES-AWP (Wu et al. 2020) (published) |" in md and "*Selected on* says" in md
    paths = report.save_results(tmp_path, collected, cifar, table, refs, experiment="toy")
    csv = pd.read_csv(paths["results.csv"])
    published = csv[csv["source"] == "published"]
    assert set(published["selection"]) == {"test PGD-20", "not stated"}
