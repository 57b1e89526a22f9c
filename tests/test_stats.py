"""spatlib.stats: known answers against scipy and hand-worked examples, then simulations with a
known truth (false-positive rate, coverage, power, and the planned seeds' power).

The simulated experiments: two methods, S seeds each, the same N test images. Image i has a
difficulty u_i shared by every method and seed; each (method, seed) run has its own offset v
(the training randomness: the seed spread); each method has its own per-image effect c_i (the
images one method is systematically better on); a run gets image i right with probability
sigmoid(mu + shift + u_i + c_i + v). Methods identical in distribution (shift 0) is the null.
The truth of a shift is its difference of expected accuracies over images and seeds
(Gauss-Hermite). Every simulation is vectorised and seeded: it gives the same numbers on
every run.
"""
import itertools
import math
from statistics import NormalDist

import numpy as np
import pytest
from scipy import stats as sps
from scipy.special import expit

from spatlib import stats

# like the digits main job: worst-case accuracy ~47%; with 150 images and 3 seeds the
# image-level interval is +-4.3 points wide (the README's bootstrap intervals: +-3.2 to 4.3)
MU, SD_IMAGE, SD_METHOD_IMAGE = -0.2, 3.5, 0.5
GH_X, GH_W = np.polynomial.hermite_e.hermegauss(80)


def expected_accuracy(shift: float, sd_seed: float) -> float:
    sd = math.sqrt(SD_IMAGE ** 2 + SD_METHOD_IMAGE ** 2 + sd_seed ** 2)
    return float((expit(MU + shift + sd * GH_X) * GH_W).sum() / GH_W.sum())


def seed_spread_points(sd_seed: float) -> float:
    """sd over seeds of a method's expected accuracy (points): the seed spread."""
    sd_img = math.sqrt(SD_IMAGE ** 2 + SD_METHOD_IMAGE ** 2)
    acc = [(expit(MU + v + sd_img * GH_X) * GH_W).sum() / GH_W.sum() for v in sd_seed * GH_X]
    mean = np.dot(GH_W, acc) / GH_W.sum()
    return 100 * math.sqrt(np.dot(GH_W, (np.array(acc) - mean) ** 2) / GH_W.sum())


def simulate(rng, n_exp: int, n_seeds: int, n_images: int, *, shift: float = 0.0,
             sd_seed: float = 0.3) -> np.ndarray:
    """n_exp experiments: differences b - a (n_exp, n_seeds, n_images) in {-1, 0, 1}, int8."""
    def normal(sd, shape):                 # float32 throughout: the arrays are large
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(sd)

    u = normal(SD_IMAGE, (n_exp, 1, n_images)) + np.float32(MU)

    def method(s):
        logit = (u + normal(SD_METHOD_IMAGE, (n_exp, 1, n_images)) + np.float32(s)) \
            + normal(sd_seed, (n_exp, n_seeds, 1))
        return rng.random((n_exp, n_seeds, n_images), dtype=np.float32) < expit(logit)

    return method(shift).view(np.int8) - method(0.0).view(np.int8)


# --------------------------------------------------------------------------------------------
# known answers
def test_wilson_matches_scipy():
    z = NormalDist().inv_cdf(0.975)
    for k, n in [(42, 100), (0, 20), (20, 20), (3, 7), (500, 1000)]:
        expected = sps.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert stats.wilson_interval(k, n, z) == pytest.approx((expected.low, expected.high), abs=1e-12)
    # z = 1.96: (p + z^2/2n) / (1 + z^2/n) -+ z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n)
    assert stats.wilson_interval(42, 100) == pytest.approx((0.327982, 0.517937), abs=1e-6)
    assert all(math.isnan(v) for v in stats.wilson_interval(0, 0))
    with pytest.raises(ValueError, match="0 <= k <= n"):
        stats.wilson_interval(5, 4)


@pytest.mark.parametrize("a_only, b_only", [(2, 10), (0, 30), (7, 2), (13, 13), (1200, 1100)])
def test_exact_mcnemar_matches_scipy_binomtest(a_only, b_only):
    both, neither = 30, 58
    a = np.array([1] * a_only + [0] * b_only + [1] * both + [0] * neither, dtype=bool)
    b = np.array([0] * a_only + [1] * b_only + [1] * both + [0] * neither, dtype=bool)
    r = stats.mcnemar_test(a, b)
    assert (r.a_only, r.b_only) == (a_only, b_only)
    expected = sps.binomtest(a_only, a_only + b_only, 0.5).pvalue
    assert r.p_value == pytest.approx(expected, rel=1e-9)
    assert stats.mcnemar_test(b, a).p_value == r.p_value
    assert stats.mcnemar_test(a, a).p_value == 1.0
    # the same test, as the sign-flip test of b - a
    assert stats.sign_flip_p_value(b.astype(int) - a.astype(int)) == r.p_value
    with pytest.raises(ValueError, match="equal shapes"):
        stats.mcnemar_test(a, b[:-1])


@pytest.mark.parametrize("t", [[2, 1, 1], [3, -1, 2, 0, 1, 1, -2, 3, 1, -1, 2, 1]])
def test_sign_flip_p_value_by_enumeration(t):
    t = np.array(t)
    sums = [abs(np.dot(t, signs)) for signs in itertools.product((-1, 1), repeat=len(t))]
    assert stats.sign_flip_p_value(t) == pytest.approx(np.mean([s >= abs(t.sum()) for s in sums]), rel=1e-9)


def test_holm_hand_worked():
    # sorted 0.005, 0.01, 0.03, 0.04 (m = 4): x4 = 0.02, x3 = 0.03, x2 = 0.06, x1 = 0.04 -> 0.06
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    out = stats.holm([0.01, np.nan, 0.04])           # NaN stays NaN and is not counted: m = 2
    assert out[0] == pytest.approx(0.02) and math.isnan(out[1]) and out[2] == pytest.approx(0.04)
    assert list(stats.holm([0.5, 0.6])) == [1.0, 1.0]  # capped at 1, still monotone
    assert stats.holm([]).shape == (0,)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        stats.holm([0.2, 1.5])


def test_t_quantiles_and_the_cochran_cox_interval_by_hand():
    """A 3 x 5 table, its parts from the two-way residuals written out, the quantile from
    scipy's t: the interval, its effective df and the p-value (where that interval ends at 0)."""
    x = np.array([[1, 1, 0, 0, -1],
                  [1, 1, 0, 1, -1],
                  [1, 0, 0, 0, -1]])
    n_seeds, n = x.shape
    d, t = x.mean(1), x.mean(0)
    ms_images = n_seeds * t.var(ddof=1)
    ms_res = ((x - d[:, None] - t[None, :] + x.mean()) ** 2).sum() / ((n_seeds - 1) * (n - 1))
    seed_var = d.var(ddof=1) / n_seeds                    # d = (0.2, 0.4, 0): var 0.04 -> 1/75
    image_var = (ms_images - ms_res) / (n_seeds * n)
    assert seed_var == pytest.approx(1 / 75) and image_var > 0
    q_seed, q_image = sps.t.ppf(0.975, n_seeds - 1), sps.t.ppf(0.975, n - 1)
    assert (q_seed, q_image) == pytest.approx((4.302653, 2.776445), abs=1e-6)   # textbook tables
    c = (seed_var * q_seed + image_var * q_image) / (seed_var + image_var)
    se = math.sqrt(seed_var + image_var)
    r = stats.seed_aware(x)
    assert r.diff == pytest.approx(0.2)
    assert (r.seed_var, r.image_var, r.se) == pytest.approx((seed_var, image_var, se))
    assert (r.ci_low, r.ci_high) == pytest.approx((0.2 - c * se, 0.2 + c * se))
    assert sps.t.ppf(0.975, r.df) == pytest.approx(c, rel=1e-6)       # the effective df
    assert 2 < r.df < 4
    edge = stats.seed_aware(x, level=1 - r.p_value)
    assert edge.ci_low == pytest.approx(0.0, abs=1e-7)
    assert (r.p_value < 0.05) == (r.ci_low > 0 or r.ci_high < 0)


def test_identical_seeds_give_the_image_level_t_interval():
    """No seed-to-seed variation: A = 0 and MS_res = 0, so the seed-aware interval is scipy's
    one-sample t interval on the per-image differences."""
    rng = np.random.default_rng(3)
    row = rng.choice([-1, 0, 0, 1, 1], size=150)
    r = stats.seed_aware(np.tile(row, (3, 1)))
    oracle = sps.ttest_1samp(row, 0.0)
    ci = oracle.confidence_interval(0.95)
    assert (r.ci_low, r.ci_high) == pytest.approx((ci.low, ci.high), rel=1e-9)
    assert r.p_value == pytest.approx(oracle.pvalue, rel=1e-6)
    assert r.df == 149 and r.seed_var == 0


def test_per_seed_images_give_the_t_test_on_the_seed_differences():
    rng = np.random.default_rng(4)
    x = rng.choice([-1, 0, 1], size=(5, 80), p=[0.2, 0.5, 0.3])
    r = stats.seed_aware(x, images="per_seed")
    oracle = sps.ttest_1samp(x.mean(1), 0.0)
    ci = oracle.confidence_interval(0.9)
    assert r.p_value == pytest.approx(oracle.pvalue, rel=1e-6) and r.df == 4 and r.image_var == 0
    r90 = stats.seed_aware(x, images="per_seed", level=0.9)
    assert (r90.ci_low, r90.ci_high) == pytest.approx((ci.low, ci.high), rel=1e-9)


def test_one_seed_measures_no_training_randomness():
    r = stats.seed_aware(np.array([[1, 0, -1, 1]]))
    assert r.diff == 0.25
    assert all(math.isnan(v) for v in (r.ci_low, r.ci_high, r.p_value, r.se, r.df, r.seed_sd))
    assert math.isnan(stats.seed_aware_mde(r)) and math.isnan(stats.seeds_needed(r, 0.02))
    with pytest.raises(ValueError, match="images: expected one of shared, per_seed.*'per_seed'"):
        stats.seed_aware(np.zeros((2, 3)), images="perseed")
    with pytest.raises(ValueError, match="delta"):
        stats.seeds_needed(stats.seed_aware(np.zeros((2, 3))), 2.0)


def test_power_formula_matches_the_t_test_in_the_pure_seed_case():
    """B = 0 (per-seed images): the Cochran-Cox test is the one-sample t test on S values,
    whose power is the noncentral t's: scipy is the oracle for the numerical integral."""
    rng = np.random.default_rng(5)
    r = stats.seed_aware(rng.choice([-1, 0, 1], size=(4, 400)), images="per_seed")
    sd = math.sqrt(r.sigma_seed2 + r.sigma_res2 / 400)
    for n_seeds, delta in [(4, 0.05), (8, 0.05), (20, 0.03)]:
        q = sps.t.ppf(0.975, n_seeds - 1)
        nc = delta / (sd / math.sqrt(n_seeds))
        exact = sps.nct.sf(q, n_seeds - 1, nc) + sps.nct.cdf(-q, n_seeds - 1, nc)
        assert stats.seed_aware_power(r, delta, n_seeds=n_seeds) == pytest.approx(exact, abs=2e-3)


# --------------------------------------------------------------------------------------------
# simulations with a known truth
SPREADS = (0.0, 0.3, 0.5, 0.8)     # sd of the per-run logit offset: seed spreads 0, 3, 5, 8 points


def test_seed_aware_inference_is_calibrated_where_the_image_level_one_is_not():
    """False positives at 0.05 and 95% coverage at 3 and 5 seeds, 150 and 1,000 images, four
    seed spreads: every cell within 3 Monte Carlo standard errors of nominal (3,000 experiments
    a cell at 150 images: false positives <= 0.062, coverage >= 0.938; 1,000 at 1,000 images:
    <= 0.071, >= 0.929) and all cells together within 0.005 of it. The image-level test on the
    same data is far off as soon as the seeds spread. Power at a true 10 points is printed."""
    rng = np.random.default_rng(2026)
    shift = 1.0                     # 10 points
    lines, bad, image_fp, fps, covers = [], [], [], [], []
    for n_seeds, n_images, sd_seed in itertools.product((3, 5), (150, 1000), SPREADS):
        n_exp = 3000 if n_images == 150 else 1000
        mc = 3 * math.sqrt(0.05 * 0.95 / n_exp)
        truth = expected_accuracy(shift, sd_seed) - expected_accuracy(0.0, sd_seed)
        x = simulate(rng, n_exp, n_seeds, n_images, sd_seed=sd_seed)
        null = stats.seed_aware(x)
        alt = stats.seed_aware(simulate(rng, n_exp, n_seeds, n_images, shift=shift, sd_seed=sd_seed))
        fp = float(np.mean(null.p_value < 0.05))
        cover = float(np.mean((alt.ci_low <= truth) & (truth <= alt.ci_high)))
        power = float(np.mean((alt.p_value < 0.05) & (alt.diff > 0)))
        # the image-level t on the same data (what "given these trained models" answers)
        image_fp.append(float(np.mean(sps.ttest_1samp(x.mean(1), 0.0, axis=-1).pvalue < 0.05)))
        lines.append(f"{n_seeds} seeds x {n_images:4d} images, seed spread {seed_spread_points(sd_seed):4.1f} "
                     f"points: false positives {fp:.3f} (image-level {image_fp[-1]:.3f}), coverage "
                     f"{cover:.3f}, power at {100 * truth:.1f} points {power:.2f}")
        fps.append(fp)
        covers.append(cover)
        if fp > 0.05 + mc or cover < 0.95 - mc:
            bad.append(lines[-1])
        if (n_seeds, n_images, sd_seed) == (3, 150, 0.5):
            power_3x150 = power
        if (n_seeds, n_images, sd_seed) == (5, 1000, 0.0):
            power_5x1000 = power
    table = "\n".join(lines)
    print(table)
    assert not bad, "miscalibrated cells:\n" + "\n".join(bad) + f"\nall:\n{table}"
    assert np.mean(fps) <= 0.055 and np.mean(covers) >= 0.945, table
    assert max(image_fp) > 0.3, f"the simulation has no seed spread to speak of:\n{table}"
    # power is not thrown away: 10 points with 5 points of seed spread at 3 seeds is found a
    # fair share of the time (the seed part has 2 df), and nearly always without seed spread
    assert power_3x150 > 0.2 and power_5x1000 > 0.95, table


def test_planned_seeds_and_the_mde_reach_their_power():
    """seeds_needed from a pilot's variance components, then fresh experiments with that many
    seeds at the planned difference: about 80% find it; the same for the mde of 3 seeds."""
    rng = np.random.default_rng(7)
    sd_seed, n_images = 0.15, 150
    pilot = stats.seed_aware(simulate(rng, 1, 40, 3000, sd_seed=sd_seed)[0])   # the components
    shift = 0.3
    delta = expected_accuracy(shift, sd_seed) - expected_accuracy(0.0, sd_seed)
    planned = int(stats.seeds_needed(pilot, delta, n_images=n_images))
    found = stats.seed_aware(simulate(rng, 2000, planned, n_images, shift=shift, sd_seed=sd_seed))
    power_planned = float(np.mean((found.p_value < 0.05) & (found.diff > 0)))
    mde = stats.seed_aware_mde(pilot, n_seeds=3, n_images=n_images)
    # the shift whose true difference is the mde (accuracy is increasing in the shift)
    lo, hi = 0.0, 4.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected_accuracy(mid, sd_seed) - expected_accuracy(0, sd_seed) < mde else (lo, mid)
    found = stats.seed_aware(simulate(rng, 2000, 3, n_images, shift=hi, sd_seed=sd_seed))
    power_mde = float(np.mean((found.p_value < 0.05) & (found.diff > 0)))
    said = (f"{100 * delta:.1f} points: {planned} seeds planned, power {power_planned:.3f}; mde of 3 seeds "
            f"x {n_images} images {100 * mde:.1f} points, power {power_mde:.3f}")
    print(said)
    assert 3 < planned < 60, said
    assert 0.72 <= power_planned <= 0.90, said
    assert 0.72 <= power_mde <= 0.90, said


def test_seeds_needed_grows_as_the_planned_difference_shrinks_and_images_help():
    rng = np.random.default_rng(8)
    r = stats.seed_aware(simulate(rng, 1, 3, 150, sd_seed=0.2)[0])
    needs = [stats.seeds_needed(r, d) for d in (0.2, 0.1, 0.05)]
    assert needs == sorted(needs) and needs[0] >= 2, needs
    assert stats.seeds_needed(r, 0.05, n_images=10_000) <= needs[-1]
    # the image part alone too wide: no number of seeds on 150 images finds 1 point
    wide = stats.seed_aware(simulate(rng, 1, 3, 150, sd_seed=0.0)[0])
    assert wide.sigma_image2 > 0
    assert math.isnan(stats.seeds_needed(wide, 0.01, max_seeds=2000))
    assert stats.seed_aware_power(wide, 0.01, n_seeds=2000) < 0.8
