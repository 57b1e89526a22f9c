"""spatlib.compare: paired differences about the methods (seed-aware) and given these trained
models (bootstrap, exact test), the power lines, the seeds needed, Holm over a table, verdicts.

Every expected number is computed here by hand (binomial sums with math.comb, the
normal-approximation formula) or by scipy (the t tests the seed-aware interval reduces to),
not read back from the code under test. The statistics themselves: tests/test_stats.py.
"""
import math
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from scipy import stats as sps

from spatlib import compare, figures, stats

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
    assert (r.ci_low, r.ci_high, r.p_value) == (0.0, 0.0, 1.0)
    assert (r.ci_low_images, r.ci_high_images, r.p_value_images) == (0.0, 0.0, 1.0)
    assert r.b_only == 0 and r.a_only == 0
    assert r.per_seed_p == {0: 1.0, 1: 1.0, 2: 1.0}
    assert r.n_images == 150 and r.n_seeds == 3
    # no discordance: the floor, z^2 h / n (shared: h = 1/3 over 150 images; per seed: h = 1
    # over 450 (seed, image) pairs): both 1.74 points
    assert r.mde_images == pytest.approx(Z ** 2 / 450, rel=1e-9)
    # the seed-aware power line has a floor too (what a true difference forces, not 0); with
    # per-seed images its test has the 2 df of 3 seeds
    assert 0.5 * r.mde_images < r.mde < (4 * r.mde_images if images == "per_seed" else r.mde_images)


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
    assert r.p_value_images == pytest.approx(2 * 0.5 ** 10, rel=1e-9)
    # bootstrap: resampling 100 images, the difference is (# draws among the 10 gain images)
    # / 100 ~ Bin(100, 0.1) / 100: percentile interval = its quantiles (to one image of
    # Monte Carlo slack) and the draws' sd = sqrt(0.1 * 0.9 / 100) = 3 points
    assert (_binom_quantile(0.025, 100, 0.1), _binom_quantile(0.975, 100, 0.1)) == (5, 16)
    assert _is_bootstrap_quantile(r.ci_low_images, 0.025, 100, 0.1, 20_000)
    assert _is_bootstrap_quantile(r.ci_high_images, 0.975, 100, 0.1, 20_000)
    assert 0.04 <= r.ci_low_images <= 0.05 and 0.15 <= r.ci_high_images <= 0.16
    draws = compare.bootstrap_differences(a, b, n_boot=20_000, seed=3)
    assert draws.mean() == pytest.approx(0.10, abs=0.001)
    assert draws.std() == pytest.approx(0.03, rel=0.03)
    # about the methods: every seed gains the same 10 images (no seed variation, no residual),
    # so the seed-aware interval is the one-sample t interval on the per-image differences,
    # within about a point of the bootstrap's
    per_image = np.mean([b[s].astype(int) - a[s].astype(int) for s in range(3)], axis=0)
    oracle = sps.ttest_1samp(per_image, 0.0)
    ci = oracle.confidence_interval(0.95)
    assert (r.ci_low, r.ci_high) == pytest.approx((ci.low, ci.high), rel=1e-9)
    assert r.p_value == pytest.approx(oracle.pvalue, rel=1e-6) and r.df == pytest.approx(99)
    assert abs(r.ci_low - r.ci_low_images) < 0.015 and abs(r.ci_high - r.ci_high_images) < 0.015
    assert r.seed_sd == 0.0 and r.se == pytest.approx(per_image.std(ddof=1) / 10)


def test_ten_points_more_per_seed_images():
    """Seeds on different images: 30 independent discordant pairs, and a narrower bootstrap
    (the mean of 3 independent Bin(100, 0.1) / 100 = Bin(300, 0.1) / 300). The seed-aware
    interval is the t interval on the 3 per-seed differences: all exactly 0.1 here, so it has
    no width (what a t test says of three equal values)."""
    a, b = _plus_ten()
    r = compare.paired_difference(a, b, n_boot=20_000, seed=3, images="per_seed")
    assert r.diff == pytest.approx(0.10, abs=1e-15)
    assert r.p_value_images == pytest.approx(2 * 0.5 ** 30, rel=1e-9)
    draws = compare.bootstrap_differences(a, b, n_boot=20_000, seed=3, images="per_seed")
    assert draws.std() == pytest.approx(math.sqrt(0.1 * 0.9 / 300), rel=0.03)
    assert _is_bootstrap_quantile(r.ci_low_images, 0.025, 300, 0.1, 20_000)
    assert _is_bootstrap_quantile(r.ci_high_images, 0.975, 300, 0.1, 20_000)
    assert (r.ci_low, r.ci_high, r.p_value, r.df) == (pytest.approx(0.1), pytest.approx(0.1), 0.0, 2)


def test_seed_aware_is_the_t_test_on_per_seed_differences_with_per_seed_images():
    a, b = _random_flags(n_seeds=4, seed=1), _random_flags(n_seeds=4, p=0.65, seed=2)
    r = compare.paired_difference(a, b, n_boot=200, images="per_seed")
    d = [b[s].mean() - a[s].mean() for s in range(4)]
    oracle = sps.ttest_1samp(d, 0.0)
    assert r.p_value == pytest.approx(oracle.pvalue, rel=1e-6)
    assert (r.ci_low, r.ci_high) == pytest.approx(tuple(oracle.confidence_interval(0.95)), rel=1e-9)
    assert r.seed_sd == pytest.approx(np.std(d, ddof=1))


def test_one_seed_gives_no_method_level_answer():
    a, b = _plus_ten(n_seeds=1)
    r = compare.paired_difference(a, b, n_boot=500, full_images=450)
    assert r.diff == pytest.approx(0.1) and r.p_value_images == pytest.approx(2 * 0.5 ** 10)
    for v in (r.ci_low, r.ci_high, r.p_value, r.df, r.se, r.seed_sd, r.mde, r.seeds_needed,
              r.seeds_needed_full):
        assert math.isnan(v)
    per = {("pgd_at", 0, "pgd20"): a[0], ("spat_at", 0, "pgd20"): b[0]}
    row = compare.compare_methods(per, [("pgd_at", "spat_at")], n_boot=500).iloc[0]
    assert row["verdict"] == compare.ONE_SEED == "1 seed: training randomness unmeasured; no method-level verdict"
    assert math.isnan(row["p_holm"])
    line = compare.format_comparison(row)
    assert "1 seed: training randomness unmeasured" in line and "given these trained models" in line
    assert "training randomness unmeasured" in compare.format_plan(row)


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
    assert r.p_value_images == pytest.approx(92 / 512, rel=1e-9)
    assert r.diff == pytest.approx(5 / 20)


def test_sign_flip_many_units_no_underflow():
    # 5000 discordant pairs, 2600 one way: the normal approximation is accurate here
    t = np.array([1] * 2600 + [-1] * 2400)
    z = 200 / math.sqrt(5000)
    assert stats.sign_flip_p_value(t) == pytest.approx(2 * (1 - NormalDist().cdf(z)), rel=0.05)


# --------------------------------------------------------------------------------------------
# the power lines and the seeds needed
def test_mde_images_formula_and_inverse_sqrt_scaling():
    rng = np.random.default_rng(5)
    n = 200
    a0 = rng.random(n) < 0.5
    b0 = a0.copy()
    flip = rng.choice(n, 60, replace=False)            # 30% discordant
    b0[flip] = ~b0[flip]
    r1 = compare.paired_difference({0: a0}, {0: b0}, n_boot=100)
    assert r1.mde_images == pytest.approx(Z * math.sqrt(0.30 / n), rel=1e-9)   # McNemar: p_d = 0.3
    r4 = compare.paired_difference({0: np.tile(a0, 4)}, {0: np.tile(b0, 4)}, n_boot=100)
    assert r4.mde_images == pytest.approx(r1.mde_images / 2, rel=1e-9)
    r16 = compare.paired_difference({0: np.tile(a0, 16)}, {0: np.tile(b0, 16)}, n_boot=100)
    assert r16.mde_images == pytest.approx(r1.mde_images / 4, rel=1e-9)


def test_mde_images_shared_images_uses_seed_averaged_differences():
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
    assert r.mde_images == pytest.approx(Z * math.sqrt(m2 / n), rel=1e-9)


def test_mde_images_undetectable_with_too_few_images():
    r = compare.paired_difference({0: np.array([True, False])}, {0: np.array([False, True])}, n_boot=10)
    assert math.isnan(r.mde_images)     # 2 images: z^2 / 2 > 1, no difference is detectable


def test_seed_aware_power_lines_follow_the_variance_parts():
    """The mde is the seed-aware test's (stats.seed_aware_mde of the same table); the seeds
    needed grow as plan_diff shrinks, and a larger test set needs no more seeds."""
    rng = np.random.default_rng(11)
    hard = rng.random(150) < 0.5                       # shared image difficulty
    a = {s: hard ^ (rng.random(150) < 0.15) for s in range(3)}
    b = {s: hard ^ (rng.random(150) < 0.12) for s in range(3)}
    r = compare.paired_difference(a, b, n_boot=200, full_images=450)
    assert r.mde == pytest.approx(stats.seed_aware_mde(r.inference), rel=1e-9)
    assert r.mde > r.mde_images                        # seeds cost power: the seed part has 2 df
    needs = [compare.paired_difference(a, b, n_boot=200, plan_diff=d).seeds_needed for d in (0.1, 0.05, 0.02)]
    assert needs == sorted(needs) and needs[0] >= 2, needs
    assert r.seeds_needed == needs[-1] and r.plan_diff == 0.02
    assert r.n_images_full == 450 and r.seeds_needed_full <= r.seeds_needed
    with pytest.raises(ValueError, match=r"plan_diff: .*0.02 = 2 accuracy points.*got 2"):
        compare.paired_difference(a, b, plan_diff=2)
    with pytest.raises(ValueError, match="full_images"):
        compare.paired_difference(a, b, full_images=0)


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
DIGITS_VARIANTS = ["standard", "pgd_at", "trades", "spat_at", "spat_random", "spat_radius",
                   "spat_radius_random"]


def test_default_comparisons_follow_the_experiment_names():
    variants = list(yaml.safe_load((ROOT / "params" / "digits.yaml").read_text())["variants"])
    assert variants == DIGITS_VARIANTS
    expected = [("pgd_at", "spat_at"), ("trades", "spat_at"), ("spat_random", "spat_at"),
                ("pgd_at", "spat_radius"), ("trades", "spat_radius"),
                ("spat_radius_random", "spat_radius")]
    assert compare.default_comparisons(variants) == expected
    info = {"standard": {"train_method": "standard", "rule": "", "budget": ""},
            "pgd_at": {"train_method": "pgd_at", "rule": "", "budget": ""},
            "trades": {"train_method": "trades", "rule": "", "budget": ""},
            "spat_at": {"train_method": "spat_at", "rule": "intersection", "budget": "step"},
            "spat_random": {"train_method": "spat_at", "rule": "random", "budget": "step"},
            "spat_radius": {"train_method": "spat_at", "rule": "intersection", "budget": "radius"},
            "spat_radius_random": {"train_method": "spat_at", "rule": "random", "budget": "radius"}}
    # by their rule, training method and budget: each SPAT variant gets the control that spends
    # the budget as it does, not the other budget's
    assert compare.default_comparisons(variants, info=info) == expected
    # a control named otherwise is found by its rule and training method
    info2 = {**info, "spat_trades": {"train_method": "spat_trades", "rule": "intersection", "budget": "step"},
             "ctrl": {"train_method": "spat_trades", "rule": "random", "budget": "step"}}
    pairs = compare.default_comparisons([*variants, "spat_trades", "ctrl"], info=info2)
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
    df = compare.compare_methods(per, [("pgd_at", "spat_at")], n_boot=2000, full_images=450)
    assert list(df.columns) == compare.COLUMNS
    assert list(df["attack"]) == ["clean", "pgd20", "worst_case"]
    assert (df["comparison"] == "spat_at - pgd_at").all()
    clean, pgd = df.iloc[0], df.iloc[1]
    assert clean["diff_pct"] == 0 and clean["p_value"] == 1.0 and clean["p_value_images"] == 1.0
    assert pgd["diff_pct"] == pytest.approx(10.0)
    assert pgd["p_value_images"] == pytest.approx(2 * 0.5 ** 10, rel=1e-9)
    r = compare.paired_difference(a, b, n_boot=2000, seed=0, full_images=450)
    assert pgd["p_value"] == pytest.approx(r.p_value) and pgd["df"] == pytest.approx(99)
    assert (pgd["n_images"], pgd["n_seeds"], pgd["b_only"], pgd["a_only"]) == (100, 3, 30, 0)
    assert pgd["ci_low_pct"] < 10 < pgd["ci_high_pct"] and pgd["ci_low_images_pct"] < 10 < pgd["ci_high_images_pct"]
    assert (pgd["plan_diff_pct"], pgd["n_images_full"]) == (2.0, 450)
    # one family: Holm over the three rows (the two equal p-values: 3 p and 2 p -> 3 p both)
    assert list(df["p_holm"]) == pytest.approx([1.0, 3 * r.p_value, 3 * r.p_value])
    assert list(df["verdict"]) == ["cannot be told apart with these images and seeds "
                                   "(95% CI +0.0 to +0.0 points)", "B better", "B better"]
    # the same row alone: same numbers (each row seeded from its own names), a smaller family
    alone = compare.compare_methods(per, [("pgd_at", "spat_at")], ["pgd20"], n_boot=2000)
    assert alone.iloc[0]["ci_low_images_pct"] == pgd["ci_low_images_pct"]
    assert alone.iloc[0]["p_holm"] == pytest.approx(r.p_value)
    # a long frame gives the same table
    long = pd.DataFrame([{"method": m, "seed": s, "attack": att, "image": i, "correct": bool(v)}
                         for (m, s, att), arr in per.items() for i, v in enumerate(arr)])
    df2 = compare.compare_methods(long, [("pgd_at", "spat_at")], n_boot=2000, full_images=450)
    pd.testing.assert_frame_equal(df, df2)
    line = compare.format_comparison(pgd)
    assert line.startswith("spat_at - pgd_at, PGD-20: +10.0 points (95% CI +4.0 to +16.0 over seeds "
                           "and images; p = 0.0013, Holm p = 0.0038): spat_at better; given these "
                           "trained models: 95% CI"), line
    plan = compare.format_plan(pgd)
    assert plan.startswith("spat_at - pgd_at, PGD-20: 3 seeds x 100 images find "), plan
    assert "2.0 points need" in plan and "the full test set (450 images)" in plan
    assert plan.endswith("(a rough guide: the seed spread is measured with 2 df)")
    table = compare.comparison_table(df)
    assert list(table["B - A (points)"]) == ["+0.0", "+10.0", "+10.0"]
    assert list(table["verdict"][1:]) == ["B better", "B better"]
    cols = list(table.columns)
    assert cols.index("95% CI (seeds and images)") < cols.index("95% CI given these models")


def test_verdicts_read_holm_and_never_call_a_tie_equal():
    """Three attacks, each the same 5-image gain in every seed: p ~ 0.025 each, but Holm over
    the three makes 0.075: no verdict calls B better, and none says "equal"."""
    base = np.zeros(100, dtype=bool)
    gain = base.copy()
    gain[:5] = True
    per = {(m, s, att): (gain if m == "spat_at" else base) for m in ("pgd_at", "spat_at")
           for s in range(3) for att in ("a1", "a2", "a3")}
    df = compare.compare_methods(per, [("pgd_at", "spat_at")], n_boot=200)
    p = sps.ttest_1samp(gain.astype(float), 0.0).pvalue
    assert list(df["p_value"]) == pytest.approx([p] * 3, rel=1e-6) and p < 0.05
    assert list(df["p_holm"]) == pytest.approx([3 * p] * 3, rel=1e-6) and 3 * p > 0.05
    for v, lo, hi in zip(df["verdict"], df["ci_low_pct"], df["ci_high_pct"]):
        # significant alone, not once the three are counted: the verdict says both
        assert v == (f"cannot be told apart with these images and seeds once the table's 3 "
                     f"comparisons are counted (Holm p = {3 * p:.2g}; alone: p = {p:.2g}, "
                     f"95% CI {lo:+.1f} to {hi:+.1f} points)")
    assert compare.verdict(-0.05, -0.08, -0.02, 0.01, 3) == "A better"
    assert compare.verdict(0.05, -0.01, 0.11, 0.2, 3, level=0.9).startswith(
        "cannot be told apart with these images and seeds (90% CI -1.0 to +11.0 points)")
    assert compare.verdict(0.05, np.nan, np.nan, np.nan, 1) == compare.ONE_SEED


def test_compare_methods_bad_names():
    per = {("pgd_at", 0, "clean"): [True], ("spat_at", 0, "clean"): [True]}
    with pytest.raises(ValueError, match="no per-example results for method 'pgd-at'.*did you mean 'pgd_at'"):
        compare.compare_methods(per, [("pgd-at", "spat_at")])
    with pytest.raises(ValueError, match="attack 'pgd20': no results for method 'pgd_at'"):
        compare.compare_methods(per, [("pgd_at", "spat_at")], ["pgd20"])
    with pytest.raises(ValueError, match=r"spat_at - pgd_at, clean: seeds differ"):
        compare.compare_methods({**per, ("spat_at", 1, "clean"): [True]}, [("pgd_at", "spat_at")])
    with pytest.raises(ValueError, match="plan_diff"):
        compare.compare_methods(per, [("pgd_at", "spat_at")], plan_diff=0)


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
    label = axes[-1].get_xlabel()
    assert "accuracy points" in label and "thick: over seeds and images" in label
    assert "thin: given these trained models" in label
    assert any(list(line.get_xdata()) == [0, 0] for line in axes[0].get_lines())   # zero line
    # two bars a row: the seed-aware one (thick) and the image-level one (thin)
    widths = sorted({round(c.get_linewidth()[0], 2) for c in axes[0].collections if hasattr(c, "get_segments")})
    assert widths == [0.9, 2.5], widths
    assert [t.get_text() for t in axes[0].texts] == [f"Holm p={p:.2g}" for p in df["p_holm"][:2]]
    assert len([c for c in figures.plot_forest(df, images=False).axes[0].collections
                if hasattr(c, "get_segments")]) == 2
    # one seed: no seed-aware bar, the row says so
    one = compare.compare_methods({k: v for k, v in per.items() if k[1] == 0}, [("pgd_at", "spat_at")], n_boot=200)
    assert [t.get_text() for t in figures.plot_forest(one).axes[0].texts] == ["1 seed", "1 seed"]
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
    p_t = compare.paired_difference(*_plus_ten(), n_boot=10).p_value      # the t test on the images
    for _, r in df.iterrows():
        if r["attack"] == "clean":
            assert (r["diff_pct"], r["p_value"], r["p_value_images"]) == (0.0, 1.0, 1.0)
        else:
            assert r["diff_pct"] == pytest.approx(10.0)
            assert r["p_value_images"] == pytest.approx(2 * 0.5 ** 10, rel=1e-9)
            assert r["p_value"] == pytest.approx(p_t)
            assert (r["b_only"], r["a_only"]) == (30, 0)
            assert 4 <= r["ci_low_images_pct"] <= 5 and 15 <= r["ci_high_images_pct"] <= 16
    # the table is one family: Holm over its 6 rows (the 4 equal smallest: x6, x5, x4, x3 -> 6 p)
    assert df["p_holm"].tolist() == pytest.approx([1.0, 6 * p_t, 6 * p_t] * 2)
    # digits: the full test set is 450 images. Under attack the whole difference is 10 images
    # that every seed gains: an image part so wide that no number of seeds finds 2 points, on
    # 100 images or on 450 (more images would: the line says so)
    assert (df["n_images_full"] == 450).all()
    clean, attacked = df[df["attack"] == "clean"], df[df["attack"] != "clean"]
    assert (clean["seeds_needed_full"] <= clean["seeds_needed"]).all()
    assert attacked["seeds_needed"].isna().all() and attacked["seeds_needed_full"].isna().all()
    assert "2.0 points need no number of seeds on these 100 images" in compare.format_plan(attacked.iloc[0])


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
    assert df.loc[df["attack"] == "pgd20", "p_value_images"].tolist() == pytest.approx([2 * 0.5 ** 10] * 2)
    # one family across the datasets; the full test set of each dataset
    assert df["p_holm"].tolist() == pytest.approx(list(stats.holm(df["p_value"])))
    assert df.groupby("dataset")["n_images_full"].first().to_dict() == {"digits": 450, "mnist": 10_000}
    mine = compare.comparisons_for_runs(evs, [("pgd_at", "spat_at")], n_boot=50, full_images={"mnist": 5000})
    assert mine.groupby("dataset")["n_images_full"].first().fillna(-1).to_dict() == {"digits": -1, "mnist": 5000}
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
