"""spatlib.compare: paired differences, their bootstrap interval, the exact test, the power line.

Every expected number is computed here by hand (binomial sums with math.comb, enumeration of
sign flips, the normal-approximation formula), not read back from the code under test.
"""
import itertools
import math
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from spatlib import compare, figures

Z = NormalDist().inv_cdf(0.975) + NormalDist().inv_cdf(0.8)     # 1.95996 + 0.84162
ROOT = Path(__file__).resolve().parents[1]


def _random_flags(n_seeds=3, n=150, p=0.6, seed=0):
    rng = np.random.default_rng(seed)
    return {s: rng.random(n) < p for s in range(n_seeds)}


def _plus_ten(n=100, n_seeds=3):
    """A right on the first 50 images (plus a seed-dependent scatter elsewhere, never on images
    50..59); B = A plus images 50..59: right on a fixed 10% more, never wrong where A is right."""
    rng = np.random.default_rng(1)
    a, b = {}, {}
    for s in range(n_seeds):
        flags = np.zeros(n, dtype=bool)
        flags[:50] = True
        flags[60:] = rng.random(n - 60) < 0.3
        a[s] = flags
        gain = flags.copy()
        gain[50:60] = True
        b[s] = gain
    return a, b


def _binom_cdf(k, n, p):
    return sum(math.comb(n, x) * p ** x * (1 - p) ** (n - x) for x in range(k + 1))


def _binom_quantile(q, n, p):
    """Smallest x with P(X <= x) >= q."""
    return next(x for x in range(n + 1) if _binom_cdf(x, n, p) >= q)


def _is_bootstrap_quantile(value, q, n, p, n_boot):
    """Is ``value`` (a fraction on the grid 1/n) the empirical q-quantile that n_boot draws of
    Bin(n, p) / n can give? Exactly when F(k) >= q and F(k - 1) <= q, up to the Monte Carlo
    error of an empirical CDF (4 sd): this allows the neighbour of the exact quantile only
    when the exact CDF passes close to q there."""
    k = round(value * n)
    assert abs(value * n - k) < 1e-9, f"{value} is not on the grid 1/{n}"
    sd = math.sqrt(q * (1 - q) / n_boot)
    return _binom_cdf(k, n, p) >= q - 4 * sd and _binom_cdf(k - 1, n, p) <= q + 4 * sd


# --------------------------------------------------------------------------------------------
# known answers
@pytest.mark.parametrize("images", ["shared", "per_seed"])
def test_identical_runs_give_exactly_zero(images):
    a = _random_flags()
    r = compare.paired_difference(a, {s: v.copy() for s, v in a.items()}, n_boot=2000, images=images)
    assert r.diff == 0.0
    assert r.ci_low == 0.0 and r.ci_high == 0.0
    assert r.p_value == 1.0
    assert r.b_only == 0 and r.a_only == 0
    assert r.per_seed_p == {0: 1.0, 1: 1.0, 2: 1.0}
    assert r.n_images == 150 and r.n_seeds == 3
    # no discordance: the floor, z^2 h / n (shared: h = 1/3 over 150 images; per seed: h = 1
    # over 450 (seed, image) pairs): both 1.74 points
    assert r.mde == pytest.approx(Z ** 2 / 450, rel=1e-9)


def test_ten_points_more_hand_computed():
    a, b = _plus_ten()
    r = compare.paired_difference(a, b, n_boot=20_000, seed=3)
    assert r.diff == pytest.approx(0.10, abs=1e-15)
    assert r.acc_b - r.acc_a == pytest.approx(0.10, abs=1e-15)
    assert (r.b_only, r.a_only) == (30, 0)
    # per seed: 10 discordant pairs, all one way: exact McNemar p = 2 * 0.5^10
    assert r.per_seed_p == {s: pytest.approx(2 * 0.5 ** 10, rel=1e-9) for s in range(3)}
    # combined over shared images: 10 images with t = +3 each; under H0 T = 3 (2X - 10),
    # X ~ Bin(10, 1/2), and |T| >= 30 only for X in {0, 10}
    assert r.p_value == pytest.approx(2 * 0.5 ** 10, rel=1e-9)
    # bootstrap: resampling 100 images, the difference is (# draws among the 10 gain images)
    # / 100 ~ Bin(100, 0.1) / 100: percentile interval = its quantiles (to one image of
    # Monte Carlo slack) and the draws' sd = sqrt(0.1 * 0.9 / 100) = 3 points
    assert (_binom_quantile(0.025, 100, 0.1), _binom_quantile(0.975, 100, 0.1)) == (5, 16)
    assert _is_bootstrap_quantile(r.ci_low, 0.025, 100, 0.1, 20_000)
    assert _is_bootstrap_quantile(r.ci_high, 0.975, 100, 0.1, 20_000)
    assert 0.04 <= r.ci_low <= 0.05 and 0.15 <= r.ci_high <= 0.16
    draws = compare.bootstrap_differences(a, b, n_boot=20_000, seed=3)
    assert draws.mean() == pytest.approx(0.10, abs=0.001)
    assert draws.std() == pytest.approx(0.03, rel=0.03)
    # and within the normal approximation 0.10 +- 1.96 * 0.03, give or take one image
    assert 0.10 - 1.96 * 0.03 - 0.01 <= r.ci_low < 0.10 < r.ci_high <= 0.10 + 1.96 * 0.03 + 0.01


def test_ten_points_more_per_seed_images():
    """Seeds on different images: 30 independent discordant pairs, and a narrower bootstrap
    (the mean of 3 independent Bin(100, 0.1) / 100 = Bin(300, 0.1) / 300)."""
    a, b = _plus_ten()
    r = compare.paired_difference(a, b, n_boot=20_000, seed=3, images="per_seed")
    assert r.diff == pytest.approx(0.10, abs=1e-15)
    assert r.p_value == pytest.approx(2 * 0.5 ** 30, rel=1e-9)
    draws = compare.bootstrap_differences(a, b, n_boot=20_000, seed=3, images="per_seed")
    assert draws.std() == pytest.approx(math.sqrt(0.1 * 0.9 / 300), rel=0.03)
    assert _is_bootstrap_quantile(r.ci_low, 0.025, 300, 0.1, 20_000)
    assert _is_bootstrap_quantile(r.ci_high, 0.975, 300, 0.1, 20_000)


def test_bootstrap_is_paired_exact_distribution():
    """Two images, A wrong on both, B right on the first: a paired replicate is 0, 1/2 or 1
    with probabilities 1/4, 1/2, 1/4 (an unpaired one could go negative)."""
    a, b = {0: np.array([False, False])}, {0: np.array([True, False])}
    draws = compare.bootstrap_differences(a, b, n_boot=40_000, seed=0)
    assert set(np.unique(draws)) <= {0.0, 0.5, 1.0}
    freq = [np.mean(draws == v) for v in (0.0, 0.5, 1.0)]
    assert freq == pytest.approx([0.25, 0.5, 0.25], abs=0.01)


def test_exact_mcnemar_mixed_counts():
    # b = 7 (B only), c = 2 (A only): p = 2 P(Bin(9, 1/2) <= 2) = 2 (1 + 9 + 36) / 512
    a = {0: np.array([0] * 7 + [1] * 2 + [1] * 5 + [0] * 6, dtype=bool)}
    b = {0: np.array([1] * 7 + [0] * 2 + [1] * 5 + [0] * 6, dtype=bool)}
    r = compare.paired_difference(a, b, n_boot=100)
    assert r.p_value == pytest.approx(92 / 512, rel=1e-9)
    assert r.diff == pytest.approx(5 / 20)


@pytest.mark.parametrize("t", [[2, 1, 1], [3, -1, 2, 0, 1, 1, -2, 3, 1, -1, 2, 1]])
def test_sign_flip_p_value_by_enumeration(t):
    t = np.array(t)
    obs = abs(t.sum())
    sums = [abs(np.dot(t, signs)) for signs in itertools.product((-1, 1), repeat=len(t))]
    expected = np.mean([s >= obs for s in sums])
    assert compare.sign_flip_p_value(t) == pytest.approx(expected, rel=1e-9)


def test_sign_flip_many_units_no_underflow():
    # 5000 discordant pairs, 2600 one way: the normal approximation is accurate here
    t = np.array([1] * 2600 + [-1] * 2400)
    z = 200 / math.sqrt(5000)
    assert compare.sign_flip_p_value(t) == pytest.approx(2 * (1 - NormalDist().cdf(z)), rel=0.05)


# --------------------------------------------------------------------------------------------
# the power line
def test_mde_formula_and_inverse_sqrt_scaling():
    rng = np.random.default_rng(5)
    n = 200
    a0 = rng.random(n) < 0.5
    b0 = a0.copy()
    flip = rng.choice(n, 60, replace=False)            # 30% discordant
    b0[flip] = ~b0[flip]
    r1 = compare.paired_difference({0: a0}, {0: b0}, n_boot=100)
    assert r1.mde == pytest.approx(Z * math.sqrt(0.30 / n), rel=1e-9)   # McNemar: p_d = 0.3
    r4 = compare.paired_difference({0: np.tile(a0, 4)}, {0: np.tile(b0, 4)}, n_boot=100)
    assert r4.mde == pytest.approx(r1.mde / 2, rel=1e-9)
    r16 = compare.paired_difference({0: np.tile(a0, 16)}, {0: np.tile(b0, 16)}, n_boot=100)
    assert r16.mde == pytest.approx(r1.mde / 4, rel=1e-9)


def test_mde_shared_images_uses_seed_averaged_differences():
    # 3 seeds; on 30 of 100 images B differs on exactly one seed (t = +-1, d = 1/3),
    # on 10 images on all three (t = +-3, d = 1): mean d^2 = (30/9 + 10) / 100
    n = 100
    a = {s: np.zeros(n, dtype=bool) for s in range(3)}
    b = {s: np.zeros(n, dtype=bool) for s in range(3)}
    for i in range(30):
        b[i % 3][i] = True
    for s in range(3):
        b[s][30:40] = True
    r = compare.paired_difference(a, b, n_boot=100)
    m2 = (30 / 9 + 10) / 100
    assert r.mde == pytest.approx(Z * math.sqrt(m2 / n), rel=1e-9)


def test_mde_undetectable_with_too_few_images():
    r = compare.paired_difference({0: np.array([True, False])}, {0: np.array([False, True])}, n_boot=10)
    assert math.isnan(r.mde)            # 2 images: z^2 / 2 > 1, no difference is detectable


# --------------------------------------------------------------------------------------------
# reproducibility and bad input
def test_bootstrap_reproducible_from_seed():
    a, b = _random_flags(seed=1), _random_flags(seed=2)
    d1 = compare.bootstrap_differences(a, b, n_boot=500, seed=7)
    d2 = compare.bootstrap_differences(a, b, n_boot=500, seed=7)
    d3 = compare.bootstrap_differences(a, b, n_boot=500, seed=8)
    assert np.array_equal(d1, d2)
    assert not np.array_equal(d1, d3)
    r1 = compare.paired_difference(a, b, n_boot=500, seed=7)
    r2 = compare.paired_difference(a, b, n_boot=500, seed=7)
    assert (r1.ci_low, r1.ci_high) == (r2.ci_low, r2.ci_high)


def test_torch_tensors_and_01_ints_accepted():
    a = {0: torch.tensor([1, 0, 1, 1], dtype=torch.bool)}
    b = {0: [1, 1, 1, 1]}
    r = compare.paired_difference(a, b, n_boot=50)
    assert r.diff == pytest.approx(0.25)


@pytest.mark.parametrize("a, b, match", [
    ({0: [True] * 5}, {0: [True] * 4}, r"seed 0: A has 5 test images and B has 4"),
    ({0: [True], 1: [True]}, {0: [True], 2: [True]}, r"seeds differ.*only in A: \['1'\].*only in B: \['2'\]"),
    ({}, {}, r"no seeds"),
    ({0: []}, {0: []}, r"seed 0: no test images"),
    ({0: [True, False], 1: [True]}, {0: [True, False], 1: [True]}, r"different numbers of test images"),
    ({0: [0, 2]}, {0: [0, 1]}, r"A seed 0: expected booleans"),
    ({0: [[True]]}, {0: [[True]]}, r"A seed 0: expected a 1-D array"),
])
def test_bad_input_names_the_problem(a, b, match):
    with pytest.raises(ValueError, match=match):
        compare.paired_difference(a, b, n_boot=10)


def test_bad_settings_raise():
    a = {0: [True, False]}
    with pytest.raises(ValueError, match="images: expected one of shared, per_seed"):
        compare.paired_difference(a, a, images="shard")
    with pytest.raises(ValueError, match="level"):
        compare.paired_difference(a, a, level=95)
    with pytest.raises(ValueError, match="n_boot"):
        compare.paired_difference(a, a, n_boot=0)


# --------------------------------------------------------------------------------------------
# tables and the default comparisons
DIGITS_VARIANTS = ["standard", "pgd_at", "trades", "spat_at", "spat_trades", "spat_random"]


def test_default_comparisons_follow_the_experiment_names():
    variants = list(yaml.safe_load((ROOT / "params" / "digits.yaml").read_text())["variants"])
    assert variants == DIGITS_VARIANTS
    expected = [("pgd_at", "spat_at"), ("trades", "spat_at"), ("spat_random", "spat_at"),
                ("pgd_at", "spat_trades"), ("trades", "spat_trades")]
    assert compare.default_comparisons(variants) == expected
    info = {"standard": {"train_method": "standard", "rule": ""},
            "pgd_at": {"train_method": "pgd_at", "rule": ""},
            "trades": {"train_method": "trades", "rule": ""},
            "spat_at": {"train_method": "spat_at", "rule": "intersection"},
            "spat_trades": {"train_method": "spat_trades", "rule": "intersection"},
            "spat_random": {"train_method": "spat_at", "rule": "random"}}
    assert compare.default_comparisons(variants, info=info) == expected
    # a control named otherwise is found by its rule and training method
    info2 = {**info, "ctrl": {"train_method": "spat_trades", "rule": "random"}}
    pairs = compare.default_comparisons([*variants, "ctrl"], info=info2)
    assert ("ctrl", "spat_trades") in pairs and ("ctrl", "spat_at") not in pairs
    assert compare.default_comparisons(["pgd_at", "spat_at"]) == [("pgd_at", "spat_at")]


def test_compare_methods_rows_match_paired_difference():
    a, b = _plus_ten()
    per = {}
    for s in range(3):
        for m, f in (("pgd_at", a), ("spat_at", b)):
            per[(m, s, "clean")] = np.ones(100, dtype=bool)
            per[(m, s, "pgd20")] = f[s]
            per[(m, s, "worst_case")] = f[s]
    df = compare.compare_methods(per, [("pgd_at", "spat_at")], n_boot=2000)
    assert list(df.columns) == compare.COLUMNS
    assert list(df["attack"]) == ["clean", "pgd20", "worst_case"]
    assert (df["comparison"] == "spat_at - pgd_at").all()
    clean, pgd = df.iloc[0], df.iloc[1]
    assert clean["diff_pct"] == 0 and clean["p_value"] == 1.0
    assert pgd["diff_pct"] == pytest.approx(10.0)
    assert pgd["p_value"] == pytest.approx(2 * 0.5 ** 10, rel=1e-9)
    assert (pgd["n_images"], pgd["n_seeds"], pgd["b_only"], pgd["a_only"]) == (100, 3, 30, 0)
    assert pgd["ci_low_pct"] < 10 < pgd["ci_high_pct"]
    # the same row alone: same numbers (each row seeded from its own names)
    alone = compare.compare_methods(per, [("pgd_at", "spat_at")], ["pgd20"], n_boot=2000)
    assert alone.iloc[0]["ci_low_pct"] == pgd["ci_low_pct"]
    # a long frame gives the same table
    long = pd.DataFrame([{"method": m, "seed": s, "attack": att, "image": i, "correct": bool(v)}
                         for (m, s, att), arr in per.items() for i, v in enumerate(arr)])
    df2 = compare.compare_methods(long, [("pgd_at", "spat_at")], n_boot=2000)
    pd.testing.assert_frame_equal(df, df2)
    line = compare.format_comparison(pgd)
    assert line.startswith("spat_at - pgd_at, PGD-20: +10.0 points (95% CI")
    assert "100 images x 3 seeds" in line
    table = compare.comparison_table(df)
    assert list(table["B - A (points)"]) == ["+0.0", "+10.0", "+10.0"]


def test_compare_methods_bad_names():
    per = {("pgd_at", 0, "clean"): [True], ("spat_at", 0, "clean"): [True]}
    with pytest.raises(ValueError, match="no per-example results for method 'pgd-at'.*did you mean 'pgd_at'"):
        compare.compare_methods(per, [("pgd-at", "spat_at")])
    with pytest.raises(ValueError, match="attack 'pgd20': no results for method 'pgd_at'"):
        compare.compare_methods(per, [("pgd_at", "spat_at")], ["pgd20"])
    with pytest.raises(ValueError, match=r"spat_at - pgd_at, clean: seeds differ"):
        compare.compare_methods({**per, ("spat_at", 1, "clean"): [True]}, [("pgd_at", "spat_at")])


def test_plot_forest_one_panel_per_comparison():
    a, b = _plus_ten()
    per = {}
    for s in range(3):
        for m, f in (("pgd_at", a), ("spat_at", b), ("spat_random", a)):
            per[(m, s, "pgd20")] = f[s]
            per[(m, s, "worst_case")] = f[s]
    df = compare.compare_methods(per, [("pgd_at", "spat_at"), ("spat_random", "spat_at")], n_boot=500)
    fig = figures.plot_forest(df)
    axes = fig.axes
    assert len(axes) == 2
    assert [t.get_text() for t in axes[0].get_yticklabels()] == ["PGD-20", "worst case"]
    assert "accuracy points" in axes[-1].get_xlabel()
    assert any(list(line.get_xdata()) == [0, 0] for line in axes[0].get_lines())   # zero line
    with pytest.raises(ValueError, match="no comparisons"):
        figures.plot_forest(df.iloc[0:0])


# --------------------------------------------------------------------------------------------
# an experiment's runs (hand-built evaluations: no training, no attack)
def _evaluation(tmp_path, name, seed, method, rule, clean, pgd20, *, dataset="digits"):
    from spatlib.config import from_dict
    from spatlib.evaluate import RobustnessResult
    from spatlib.report import RunEvaluation

    cfg = from_dict({"name": name, "seed": seed, "data": {"name": dataset},
                     "train": {"method": method}, "attack": {"rule": rule, "eps": 0.15, "alpha": 0.0375},
                     "eval": {"suite": ["clean", "pgd20"], "n_examples": len(clean)}})
    clean, pgd20 = torch.tensor(clean), torch.tensor(pgd20) & torch.tensor(clean)   # a cascade
    result = RobustnessResult(
        eps=0.15, eps_str="0.15", n=len(clean), cascade=True,
        accuracy={"clean": float(clean.double().mean()), "pgd20": float(pgd20.double().mean())},
        robust=pgd20.clone(), correct={"clean": clean, "pgd20": pgd20},
        threat_model={"pgd20": {"max_linf": 0.15, "n_nan": 0, "min_pixel": 0.0, "max_pixel": 1.0,
                                "eps": 0.15, "ok": True}},
        seconds={"clean": 0.0, "pgd20": 0.0})
    return RunEvaluation(run=name, run_dir=tmp_path / name, config=cfg, eval=cfg.eval, result=result,
                         curve=pd.DataFrame(columns=["eps", "eps_str", "accuracy"]), class_names=[],
                         cached=True, path=tmp_path / name / "eval_0.15.json", seconds=0.0)


def _experiment(tmp_path, seeds=(0, 1, 2), spat_seeds=(0, 1, 2), dataset="digits"):
    """pgd_at and its spat_random control equal; spat_at right on images 50..59 more (robust)."""
    a, b = _plus_ten(n_seeds=max(seeds) + 1)
    evs = {}
    for s in seeds:
        for variant, method, rule, flags in (("pgd_at", "pgd_at", "intersection", a),
                                              ("spat_random", "spat_at", "random", a),
                                              ("spat_at", "spat_at", "intersection", b)):
            if variant == "spat_at" and s not in spat_seeds:
                continue
            name = f"{variant}-{dataset}-s{s}"
            evs[name] = _evaluation(tmp_path, name, s, method, rule, [True] * 100, flags[s].tolist(),
                                    dataset=dataset)
    return evs


def test_comparisons_for_runs_from_evaluations(tmp_path):
    df = compare.comparisons_for_runs(_experiment(tmp_path), n_boot=2000)
    assert list(df.columns) == [*compare.GROUP_COLUMNS, "seeds", *compare.COLUMNS]
    assert list(dict.fromkeys(df["comparison"])) == ["spat_at - pgd_at", "spat_at - spat_random"]
    assert list(df["attack"]) == ["clean", "pgd20", "worst_case"] * 2
    assert (df["dataset"] == "digits").all() and (df["eps_str"] == "0.15").all()
    assert (df["seeds"] == "0, 1, 2").all() and (df["n_seeds"] == 3).all() and (df["n_images"] == 100).all()
    for _, r in df.iterrows():
        if r["attack"] == "clean":
            assert (r["diff_pct"], r["p_value"]) == (0.0, 1.0)
        else:
            assert r["diff_pct"] == pytest.approx(10.0)
            assert r["p_value"] == pytest.approx(2 * 0.5 ** 10, rel=1e-9)
            assert (r["b_only"], r["a_only"]) == (30, 0)
            assert 4 <= r["ci_low_pct"] <= 5 and 15 <= r["ci_high_pct"] <= 16


def test_comparisons_for_runs_reads_collected_labels(tmp_path):
    """From a Collected, methods are the runs table's variants (the batch's labels), not
    whatever the run names look like; the control is found by its rule."""
    from spatlib import report

    evs = _experiment(tmp_path)
    renamed = {f"run{i}": ev for i, ev in enumerate(evs.values())}
    labels = {f"run{i}": report.split_run_name(ev.run) for i, ev in enumerate(evs.values())}
    for new, ev in renamed.items():
        ev.run = new
        ev.config.name = new
    rows = [report.evaluation_row(ev, labels[name]) for name, ev in renamed.items()]
    collected = report.Collected(runs=pd.DataFrame(rows), curves=pd.DataFrame(),
                                 per_class=pd.DataFrame(), evaluations=renamed)
    df = compare.comparisons_for_runs(collected, n_boot=500)
    assert list(dict.fromkeys(df["comparison"])) == ["spat_at - pgd_at", "spat_at - spat_random"]
    assert df.loc[df["attack"] == "worst_case", "diff_pct"].tolist() == pytest.approx([10.0, 10.0])


def test_comparisons_for_runs_common_seeds_groups_and_pairs(tmp_path):
    evs = {**_experiment(tmp_path / "d", spat_seeds=(0, 1)),
           **_experiment(tmp_path / "m", dataset="mnist")}
    df = compare.comparisons_for_runs(evs, [("pgd_at", "spat_at")], n_boot=500)
    assert list(dict.fromkeys(zip(df["dataset"], df["seeds"]))) == [("digits", "0, 1"), ("mnist", "0, 1, 2")]
    assert df.loc[df["dataset"] == "digits", "n_seeds"].eq(2).all()
    assert df.loc[df["attack"] == "pgd20", "p_value"].tolist() == pytest.approx([2 * 0.5 ** 10] * 2)
    fig = figures.plot_forest(df)
    assert [ax.get_title().split("  (")[0] for ax in fig.axes] == [
        "spat_at - pgd_at | digits, SmallCNN, eps 0.15", "spat_at - pgd_at | mnist, SmallCNN, eps 0.15"]
    with pytest.raises(ValueError, match=r"pairs \[\('trades', 'spat_at'\)\]: no dataset.*methods: pgd_at, spat_at, spat_random"):
        compare.comparisons_for_runs(evs, [("trades", "spat_at")])
    with pytest.raises(ValueError, match="no runs to compare"):
        compare.comparisons_for_runs({})


def test_save_comparisons_round_trip(tmp_path):
    df = compare.comparisons_for_runs(_experiment(tmp_path / "runs"), n_boot=200)
    paths = compare.save_comparisons(tmp_path / "out", df, figures.plot_forest(df))
    assert paths["comparisons.csv"] == tmp_path / "out" / "comparisons.csv"
    back = pd.read_csv(paths["comparisons.csv"], dtype={"seeds": str, "eps_str": str})
    pd.testing.assert_frame_equal(back, df, check_dtype=False)
    assert paths["figure:comparisons"].stat().st_size > 0
