"""Tests for spatlib.hypothesis: oracles, the semantic report, and its statistics.

Known answers where the math allows one: a synthetic dataset whose classes are defined by their
own pixel region plus a region shared by all (so which perturbation changes the meaning, and
how its mass splits, is known by construction), and hand-made paired tables for the verdicts
(the Wilson and McNemar known answers are in tests/test_stats.py). Then the real thing on
digits with a standard model.
"""
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from spatlib.attacks import Attack
from spatlib.data import DeviceLoader, load_dataset
from spatlib import stats
from spatlib.hypothesis import (AttackOutcome, attack_comparisons, compare_attacks,
                                mcnemar_test, perturbation_mass_share,
                                scaled_attack, semantic_report, standard_attacks,
                                wilson_interval)
from spatlib.oracles import EnsembleOracle, KNNOracle, build_oracle
from spatlib.models import build_model
from spatlib.semantics import shared_pixel_score



# --------------------------------------------------------------------------------------------
# synthetic data: 4 classes on 8x8; rows 0-1 are shared by every class, rows 2-7 are split into
# four 6x2 class regions. Class k: shared region 0.5, its own region 0.8, the rest 0.1 (+-0.05).
K = 4
SHARED = torch.zeros(8, 8, dtype=torch.bool)
SHARED[:2] = True
REGIONS = torch.zeros(K, 8, 8, dtype=torch.bool)
for _k in range(K):
    REGIONS[_k, 2:, 2 * _k:2 * _k + 2] = True
assert not (REGIONS.sum(0) > 1).any() and bool((REGIONS.any(0) | SHARED).all())   # a tiling


def _synthetic(n_per_class: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(K).repeat_interleave(n_per_class)
    x = torch.full((len(y), 1, 8, 8), 0.1)
    x[:, 0, SHARED] = 0.5
    x[:, 0][REGIONS[y]] = 0.8
    x = x + (torch.rand(x.shape, generator=g) - 0.5) * 0.1
    return (x * 255).round().to(torch.uint8), y


def _other(y):
    return (y + 1) % K


# perturbations by construction (no clipping: every pixel stays inside [0.05, 0.95])
def _to_other_class(y):
    """Light the region of class y+1 and dim the image's own: the meaning changes."""
    return 0.5 * REGIONS[_other(y)].float() - 0.5 * REGIONS[y].float()


def _shared_only(y):
    """Dim the shared rows, which every class has alike: the meaning stays."""
    return -0.3 * SHARED.float().expand(len(y), 8, 8)


def _mixed(y):
    """+0.5 on the 12 pixels of another class's region, -0.3 on the 16 shared pixels."""
    return 0.5 * REGIONS[_other(y)].float() - 0.3 * SHARED.float()


class _FixedShift(Attack):
    """An "attack" that adds a known perturbation pattern(y) (N, 8, 8)."""

    def __init__(self, model, *, eps, pattern, generator=None):
        super().__init__(model, eps=eps, generator=generator)
        self.pattern = pattern

    def forward(self, x, y):
        return (x + self.pattern(y).unsqueeze(1).to(x)).clamp(0, 1)


def _fixed(pattern):
    return lambda model, eps, generator: _FixedShift(model, eps=eps, pattern=pattern, generator=generator)


@pytest.fixture(scope="module")
def synthetic():
    x_train, y_train = _synthetic(40, seed=0)
    x_test, y_test = _synthetic(10, seed=1)
    return x_train, y_train, x_test, y_test


def test_knn_oracle_sees_class_region_flips_but_not_shared_ones(synthetic):
    x_train, y_train, x_test, y_test = synthetic
    oracle = KNNOracle(x_train, y_train, k=5)
    x = x_test.float() / 255
    assert torch.equal(oracle.predict(x), y_test)
    assert torch.equal(oracle.predict(x + _to_other_class(y_test).unsqueeze(1)), _other(y_test))
    assert torch.equal(oracle.predict(x + _shared_only(y_test).unsqueeze(1)), y_test)
    probs = oracle.predict_proba(x)
    assert probs.shape == (len(y_test), K)
    assert torch.allclose(probs.sum(1), torch.ones(len(y_test)))
    # vote shares move in steps of 1/k
    assert torch.allclose(probs * 5, (probs * 5).round())


def test_mass_share_by_construction():
    score = SHARED.float().expand(3, 1, 8, 8)
    y = torch.tensor([0, 1, 2])
    for pattern, shared in ((_to_other_class, 0.0), (_shared_only, 1.0), (_mixed, 4.8 / 10.8)):
        specific, share = perturbation_mass_share(pattern(y).unsqueeze(1), score)
        assert torch.allclose(share, torch.full((3,), shared))
        assert torch.allclose(specific, torch.full((3,), 1 - shared))
    specific, share = perturbation_mass_share(torch.zeros(1, 1, 8, 8), score[:1])
    assert math.isnan(float(share)) and math.isnan(float(specific))   # no perturbation, no share


def test_report_on_synthetic_known_answers(synthetic, linear_model):
    x_train, y_train, x_test, y_test = synthetic
    # z_k = sum of the pixels of region k and of the shared rows: input gradients are the
    # indicators, so the intersection score is exactly 1 on the shared rows and 0 elsewhere
    weight = (REGIONS | SHARED).float().unsqueeze(1)           # (K, 1, 8, 8)
    model = linear_model(weight)
    x = x_test.float() / 255
    score = shared_pixel_score(model, x, y_test, "intersection")
    assert torch.allclose(score, SHARED.float().expand_as(score))

    oracle = KNNOracle(x_train, y_train, k=5)
    attacks = {"to_other_class": _fixed(_to_other_class), "shared_only": _fixed(_shared_only),
               "mixed": _fixed(_mixed)}
    df = semantic_report(model, oracle, x_test, y_test, attacks, [0.5], batch_size=16).set_index("attack")
    n = len(y_test)
    assert (df["n"] == n).all() and (df["oracle_n_valid"] == n).all()
    assert (df["oracle_clean_acc"] == 1.0).all() and (df["model_clean_acc"] == 1.0).all()

    other = df.loc["to_other_class"]
    assert other["oracle_flip_rate"] == 1.0 and other["attack_success"] == 1.0
    assert other["oracle_p_drop"] == pytest.approx(1.0)               # all 5 votes leave y
    assert other["specific_mass_share"] == pytest.approx(1.0, abs=1e-6)
    assert other["l2"] == pytest.approx(math.sqrt(24 * 0.5**2), abs=1e-4)
    assert other["linf"] == pytest.approx(0.5, abs=1e-6)
    assert (other["oracle_flip_ci_low"], other["oracle_flip_ci_high"]) == pytest.approx(wilson_interval(n, n))

    shared = df.loc["shared_only"]
    assert shared["oracle_flip_rate"] == 0.0 and shared["attack_success"] == 0.0
    assert shared["oracle_p_drop"] == pytest.approx(0.0)
    assert shared["shared_mass_share"] == pytest.approx(1.0, abs=1e-6)

    assert df.loc["mixed", "shared_mass_share"] == pytest.approx(4.8 / 10.8, abs=1e-5)
    assert df.loc["mixed", "specific_mass_share"] == pytest.approx(6.0 / 10.8, abs=1e-5)
    assert not df["control"].any() and (df["rule"] == "none").all()


def test_report_rejects_out_of_threat_model_perturbations(synthetic, linear_model):
    from spatlib.attacks import ThreatModelError

    x_train, y_train, x_test, y_test = synthetic
    model = linear_model((REGIONS | SHARED).float().unsqueeze(1))
    with pytest.raises(ThreatModelError):
        semantic_report(model, KNNOracle(x_train, y_train), x_test, y_test,
                        {"too_big": _fixed(_to_other_class)}, [0.3])


class _TowardOther(Attack):
    """Moves ``strength * eps`` toward class y+1: +d on its region, -d on the image's own."""

    def __init__(self, model, *, eps, strength, generator=None):
        super().__init__(model, eps=eps, generator=generator)
        self.strength = strength

    def forward(self, x, y):
        d = self.strength * self.eps
        return (x + d * (REGIONS[_other(y)].float() - REGIONS[y].float()).unsqueeze(1)).clamp(0, 1)


def test_match_success_finds_the_least_budget_that_matches(synthetic, linear_model):
    """Known answer: the linear model's z_{y+1} - z_y grows by 24 d under a shift d, so example i
    is fooled iff d > d_i = (sum_{R_y} x_i - sum_{R_{y+1}} x_i) / 24. The full-strength reference
    fools every example at eps 0.45; the 0.8-strength attack needs eps > max_i d_i / 0.8, and
    any larger eps would "match" a saturated 100% as well: the smallest one must be chosen."""
    x_train, y_train, x_test, y_test = synthetic
    model = linear_model((REGIONS | SHARED).float().unsqueeze(1))
    x = x_test.float()[:, 0] / 255
    d = ((x * REGIONS[y_test]).sum((1, 2)) - (x * REGIONS[_other(y_test)]).sum((1, 2))) / 24
    crossing = float(d.max()) / 0.8
    attacks = {"pgd": lambda m, eps, g: _TowardOther(m, eps=eps, strength=1.0),
               "weaker": lambda m, eps, g: _TowardOther(m, eps=eps, strength=0.8)}
    same = semantic_report(model, KNNOracle(x_train, y_train), x_test, y_test, attacks, [0.45])
    assert list(same["attack_success"]) == [1.0, pytest.approx(float((0.8 * 0.45 > d).float().mean()))]
    assert same["attack_success"].iloc[1] < 1.0 < 0.45 * 2 * 0.8 / float(d.max())   # a bracket exists
    df = semantic_report(model, KNNOracle(x_train, y_train), x_test, y_test, attacks, [0.45],
                         match_success=True, match_iters=6)
    weaker = df.set_index("attack").loc["weaker"]
    assert weaker["matched"] and weaker["attack_success"] == 1.0 and weaker["eps_nominal"] == 0.45
    # bisection of [0.45, 0.9]: six steps leave an interval of 0.45 / 2**6 above the crossing
    assert crossing < weaker["eps"] <= crossing + 0.45 / 2**6 + 1e-9


# --------------------------------------------------------------------------------------------
# statistics with known answers
def test_statistics_come_from_spatlib_stats():
    # one implementation of each (the known answers are in tests/test_stats.py)
    assert wilson_interval is stats.wilson_interval and mcnemar_test is stats.mcnemar_test


def _outcome(name, flips, oracle_correct=None):
    flips = np.asarray(flips, dtype=bool)
    n = len(flips)
    correct = np.ones(n, bool) if oracle_correct is None else oracle_correct
    return AttackOutcome(attack=name, rule="none", eps=0.3, eps_nominal=0.3,
                         model_correct=np.ones(n, bool), model_fooled=np.ones(n, bool),
                         oracle_correct=correct, oracle_flipped=flips, p_drop=np.zeros(n),
                         specific_share=np.zeros(n), l2=np.zeros(n), linf=np.zeros(n))


def test_compare_attacks_verdicts_on_hand_made_tables():
    n = 200
    pgd = np.zeros(n, bool)
    pgd[:80] = True                                   # 40%
    spat = pgd.copy()
    spat[50:80] = False                               # 25%: 30 fewer flips, all discordant
    control_same = spat.copy()
    control_same[[0, 100]] = [False, True]            # 25%, 2 discordant pairs
    control_worse = pgd.copy()                        # 40%
    details = {("pgd", 0.3): _outcome("pgd", pgd), ("spat_intersection", 0.3): _outcome("s", spat)}

    same = compare_attacks({**details, ("spat_random", 0.3): _outcome("r", control_same)})
    row = same.iloc[0]
    assert row["n"] == n and row["flip_attack"] == 0.25 and row["flip_baseline"] == 0.40
    assert row["diff_vs_baseline"] == pytest.approx(-0.15)
    assert (row["attack_only_vs_baseline"], row["baseline_only"]) == (0, 30)
    assert row["p_vs_baseline"] == pytest.approx(2 / 2**30)
    assert row["p_vs_control"] == 1.0
    # Holm over the table's two tests: 2 p and max(2 p, 1 x 1.0)
    assert (row["p_holm_vs_baseline"], row["p_holm_vs_control"]) == (pytest.approx(4 / 2**30), 1.0)
    assert row["verdict"].startswith("on this attacked model, spat_intersection vs pgd: fewer flips")
    assert "vs spat_random: cannot be told apart with these images" in row["verdict"]
    assert row["verdict"].endswith("budget redistribution is not ruled out")
    assert "as well" not in row["verdict"]

    semantic = compare_attacks({**details, ("spat_random", 0.3): _outcome("r", control_worse)}).iloc[0]
    assert semantic["p_holm_vs_control"] < 0.05 and semantic["diff_vs_control"] < 0
    assert semantic["verdict"].endswith("consistent with semantics preservation")

    # fewer than PGD while the control flips fewer still
    control_better = np.zeros(n, bool)
    control_better[:10] = True                        # 5%
    redistribution = compare_attacks({**details, ("spat_random", 0.3): _outcome("r", control_better)}).iloc[0]
    assert redistribution["verdict"].endswith("budget redistribution, not semantics")

    # the wording bug: a control flipping 6x as often as SPAT at p = 0.0625 is not "does as well"
    few = np.zeros(n, bool)
    few[0] = True                                     # SPAT: 1 flip
    six = np.zeros(n, bool)
    six[:6] = True                                    # control: 6 flips, 5 discordant, p = 2 / 32
    many = np.zeros(n, bool)
    many[:40] = True                                  # PGD: 40 flips
    row = compare_attacks({("pgd", 0.3): _outcome("pgd", many), ("spat_intersection", 0.3): _outcome("s", few),
                           ("spat_random", 0.3): _outcome("r", six)}).iloc[0]
    assert row["p_vs_control"] == pytest.approx(0.0625) and row["flip_control"] == 6 * row["flip_attack"]
    assert "vs spat_random: cannot be told apart with these images (0.5% vs 3.0% oracle flips" in row["verdict"]
    assert "as well" not in row["verdict"] and "on this attacked model" in row["verdict"]

    # only the examples the oracle gets right when clean are paired
    mask = np.arange(n) >= 60
    d = {k: _outcome(k[0], v.oracle_flipped, mask) for k, v in details.items()}
    row = compare_attacks(d, [("spat_intersection", "pgd", None)]).iloc[0]
    assert row["n"] == 140 and (row["attack_only_vs_baseline"], row["baseline_only"]) == (0, 20)
    assert math.isnan(row["p_vs_control"]) and math.isnan(row["p_holm_vs_control"])
    assert row["verdict"].endswith("no random control to rule out budget redistribution")

    tie = compare_attacks({("pgd", 0.3): _outcome("pgd", pgd), ("spat_intersection", 0.3): _outcome("s", pgd)}).iloc[0]
    assert tie["p_vs_baseline"] == 1.0
    assert "vs pgd: cannot be told apart with these images" in tie["verdict"]
    with pytest.raises(KeyError, match="spat_random"):
        compare_attacks(details, [("spat_intersection", "pgd", "spat_random")])


def test_compare_attacks_every_variant_against_pgd_and_its_own_control_with_holm():
    """Two budget modes, two rules, two eps: one row per (eps, variant), each against PGD and
    against the control of its own mode; Holm over all 8 tests of the table."""
    names = ["pgd", "spat_intersection", "spat_random", "spat_intersection:radius", "spat_random:radius"]
    assert attack_comparisons(names) == [("spat_intersection", "pgd", "spat_random"),
                                         ("spat_intersection:radius", "pgd", "spat_random:radius")]
    assert attack_comparisons(["pgd", "spat_equality:radius"]) == [("spat_equality:radius", "pgd", None)]
    with pytest.raises(ValueError, match="'pgd'"):
        attack_comparisons(["spat_intersection"])
    rng = np.random.default_rng(0)
    details = {}
    for eps in (0.1, 0.2):
        for name in names:
            o = _outcome(name, rng.random(150) < (0.3 if name == "pgd" else 0.2))
            o.eps = o.eps_nominal = eps
            details[(name, eps)] = o
    df = compare_attacks(details)
    assert list(zip(df["eps"], df["attack"], df["control"])) == [
        (0.1, "spat_intersection", "spat_random"), (0.1, "spat_intersection:radius", "spat_random:radius"),
        (0.2, "spat_intersection", "spat_random"), (0.2, "spat_intersection:radius", "spat_random:radius")]
    raw = np.concatenate([df["p_vs_baseline"], df["p_vs_control"]])
    adjusted = np.concatenate([df["p_holm_vs_baseline"], df["p_holm_vs_control"]])
    assert adjusted == pytest.approx(stats.holm(raw))
    assert (adjusted >= raw).all() and (adjusted > raw).any()
    assert df["verdict"].str.startswith("on this attacked model, spat_intersection").all()
    one = compare_attacks(details, [("spat_intersection:radius", "pgd", "spat_random:radius")], eps=0.2)
    assert len(one) == 1 and one.iloc[0]["eps"] == 0.2


def test_scaled_attack_steps_in_proportion_to_eps():
    # attacks.make_attack takes alpha as given; notebook 01's attacks scale it with eps, so the
    # same attack at eps 0.1 and 0.3 (or at a success-matched eps) is equally well tuned
    model = build_model("small_cnn", 10, 1, image_size=8, seed=0)
    for eps in (0.1, 0.3):
        pgd = scaled_attack(model, eps, steps=10)
        assert (type(pgd).__name__, pgd.eps, pgd.alpha) == ("PGD", eps, pytest.approx(0.25 * eps))
    spat = scaled_attack(model, 0.2, rule="random", steps=4, alpha_scale=1.0, budget="radius")
    assert (type(spat).__name__, spat.rule, spat.budget, spat.alpha) == (
        "SPAT", "random", "radius", pytest.approx(0.05))
    assert scaled_attack(model, 0.0).alpha == 1e-12          # an empty budget is still an attack
    with pytest.raises(ValueError, match="steps: expected an integer >= 1"):
        scaled_attack(model, 0.1, steps=0)


def test_standard_attacks_differ_only_in_rule_and_budget():
    model = build_model("small_cnn", 10, 1, image_size=8, seed=0)
    factories = standard_attacks(steps=7, radius_mean=0.4)
    rules = ["intersection", "equality", "agreement", "random"]
    assert list(factories) == (["pgd"] + [f"spat_{r}" for r in rules]
                               + [f"spat_{r}:radius" for r in rules])
    built = {n: f(model, 0.2, torch.Generator()) for n, f in factories.items()}
    assert {n: (getattr(a, "rule", "none"), getattr(a, "budget", "step")) for n, a in built.items()} == {
        "pgd": ("none", "step"), **{f"spat_{r}": (r, "step") for r in rules},
        **{f"spat_{r}:radius": (r, "radius") for r in rules}}
    assert {a.radius_mean for n, a in built.items() if n.endswith(":radius")} == {0.4}
    settings = {(a.eps, a.steps, a.alpha, a.random_start) for a in built.values()}
    assert settings == {(0.2, 7, 2.5 * 0.2 / 7, True)}
    assert "spat_agreement" not in standard_attacks(saliency="cam")
    assert "spat_agreement:radius" not in standard_attacks(saliency="cam")
    with pytest.raises(ValueError, match="spat_agreement"):
        standard_attacks(["spat_agreement"], saliency="cam")
    with pytest.raises(ValueError, match="spat_none:radius"):
        standard_attacks(["spat_none:radius"])


# --------------------------------------------------------------------------------------------
# digits with a standard-trained SmallCNN
@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def digits_model(digits):
    """Standard training, a plain loop: Adam, 5 epochs (~98% clean test accuracy)."""
    model = build_model("small_cnn", digits.num_classes, digits.in_channels, digits.mean, digits.std,
                        image_size=digits.image_size, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DeviceLoader(digits.x_train, digits.y_train, 64, seed=0)
    for epoch in range(5):
        loader.set_epoch(epoch)
        for xb, yb in loader:
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(digits.x_test.float() / 255).argmax(1) == digits.y_test).float().mean()
    assert acc > 0.95
    return model


@pytest.fixture(scope="module")
def knn(digits):
    return build_oracle("knn", digits, k=5)


def test_digits_pgd_flip_rate_with_interval_and_spat_vs_control(digits, digits_model, knn):
    attacks = standard_attacks(["pgd", "spat_intersection", "spat_random"], steps=20)
    df, details = semantic_report(digits_model, knn, digits.x_test, digits.y_test, attacks, [0.3],
                                  return_details=True)
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(df[["attack", "eps_str", "attack_success", "oracle_flip_rate", "oracle_flip_ci_low",
                  "oracle_flip_ci_high", "oracle_p_drop", "shared_mass_share", "l2"]])
    assert list(df["attack"]) == ["pgd", "spat_intersection", "spat_random"]
    assert list(df["control"]) == [False, False, True]
    assert (df["eps"] == 0.3).all() and (df["eps_str"] == "0.3").all() and (df["steps"] == 20).all()
    assert df["alpha"].nunique() == 1 and (df["linf"] <= 0.3 + 1e-6).all()

    pgd = df.set_index("attack").loc["pgd"]
    n_valid = int((knn.predict(digits.x_test.float() / 255) == digits.y_test).sum())
    assert pgd["n"] == len(digits.y_test) and pgd["oracle_n_valid"] == n_valid
    assert pgd["oracle_flip_rate"] == pgd["oracle_flips"] / n_valid
    assert 0.0 <= pgd["oracle_flip_ci_low"] <= pgd["oracle_flip_rate"] <= pgd["oracle_flip_ci_high"] <= 1.0
    interval = (pgd["oracle_flip_ci_low"], pgd["oracle_flip_ci_high"])
    assert interval == wilson_interval(pgd["oracle_flips"], n_valid)
    # a standard model at eps 0.3 is broken, and its adversarial digits often look like others
    assert pgd["attack_success"] > 0.9
    assert pgd["oracle_flip_rate"] > 0.1 and pgd["oracle_p_drop"] > 0.1

    cmp = compare_attacks(details, [("spat_intersection", "pgd", "spat_random")], eps=0.3)
    print(cmp.drop(columns="verdict").T, "\n", cmp["verdict"].iloc[0])
    row = cmp.iloc[0]
    rates = df.set_index("attack")["oracle_flip_rate"]
    assert row["n"] == n_valid
    assert row["flip_baseline"] == pytest.approx(rates["pgd"])
    assert row["flip_attack"] == pytest.approx(rates["spat_intersection"])
    assert row["flip_control"] == pytest.approx(rates["spat_random"])
    discordant = row["attack_only_vs_baseline"] - row["baseline_only"]
    assert row["diff_vs_baseline"] == pytest.approx(discordant / n_valid)
    assert 0 <= row["p_vs_baseline"] <= 1 and 0 <= row["p_vs_control"] <= 1
    assert row["verdict"].startswith("on this attacked model, spat_intersection vs pgd")


def test_report_is_reproducible_under_a_fixed_seed(digits, digits_model, knn):
    x, y = digits.x_test[:64], digits.y_test[:64]
    attacks = standard_attacks(["pgd", "spat_intersection", "spat_random"], steps=4)
    rng = torch.get_rng_state()
    first = semantic_report(digits_model, knn, x, y, attacks, [0.25, "8/255"], seed=3, batch_size=40)
    again = semantic_report(digits_model, knn, x, y, attacks, [0.25, "8/255"], seed=3, batch_size=40)
    assert torch.equal(torch.get_rng_state(), rng)            # the global RNG is never touched
    pd.testing.assert_frame_equal(first, again)
    assert list(first["eps_str"].unique()) == ["0.25", "8/255"]
    other = semantic_report(digits_model, knn, x, y, attacks, [0.25, "8/255"], seed=4, batch_size=40)
    assert not np.allclose(first["l2"], other["l2"])           # a new seed draws new random starts


def test_match_success_equalizes_attack_success(digits, digits_model, knn):
    x, y = digits.x_test[:128], digits.y_test[:128]
    attacks = standard_attacks(["pgd", "spat_random"], steps=8)
    same = semantic_report(digits_model, knn, x, y, attacks, [0.1]).set_index("attack")
    matched = semantic_report(digits_model, knn, x, y, attacks, [0.1], match_success=True,
                              match_tol=0.02).set_index("attack")
    # the reference runs at the nominal eps with the same random numbers either way
    pd.testing.assert_series_equal(same.loc["pgd"], matched.loc["pgd"].rename("pgd"), check_names=False)
    control = matched.loc["spat_random"]
    assert control["matched"] and control["eps_nominal"] == 0.1
    assert abs(control["attack_success"] - matched.loc["pgd", "attack_success"]) <= 0.02
    # kept at the nominal eps when already within the tolerance, else moved toward the target:
    # a weaker attack gets a larger budget, a stronger one a smaller
    gap = same.loc["spat_random", "attack_success"] - same.loc["pgd", "attack_success"]
    expected = "nominal" if abs(gap) <= 0.02 else ("larger" if gap < 0 else "smaller")
    moved = ("nominal" if control["eps"] == 0.1 else "larger" if control["eps"] > 0.1 else "smaller")
    assert moved == expected
    assert control["linf"] <= control["eps"] + 1e-6
    with pytest.raises(ValueError, match="reference"):
        semantic_report(digits_model, knn, x, y, {"spat_random": attacks["spat_random"]}, [0.1],
                        match_success=True)


def test_ensemble_oracle_averages_softmax(digits, digits_model):
    other = build_model("small_cnn", 10, 1, digits.mean, digits.std, image_size=8, seed=1).train()
    oracle = EnsembleOracle([digits_model, other], batch_size=7)
    x = digits.x_test[:20].float() / 255
    with torch.no_grad():
        expected = (F.softmax(digits_model(x), 1) + F.softmax(other.eval()(x), 1)) / 2
    other.train()
    probs = oracle.predict_proba(x)
    assert torch.allclose(probs, expected, atol=1e-6)
    assert torch.equal(oracle.predict(x), expected.argmax(1))
    assert other.training and not digits_model.training          # modes restored
    assert oracle.num_classes == 10


def test_ensemble_oracle_from_run_folders_and_checkpoint_files(tmp_path, digits):
    from spatlib import train
    run_dir = tmp_path / "oracle-run"
    train.train({"name": "oracle", "seed": 1, "data": {"name": "digits"}, "model": {"name": "small_cnn"},
                 "train": {"method": "standard", "epochs": 1, "batch_size": 64, "lr": 0.05,
                           "max_batches": 3, "progress": False},
                 "eval": {"suite": ["clean"], "n_examples": 20}}, run_dir)
    oracle = EnsembleOracle.from_checkpoints([run_dir, run_dir / "checkpoint_last.pt"])
    assert len(oracle.models) == 2 and oracle.num_classes == 10
    best = train.load_run_model(run_dir, "best")[0]
    last = train.load_run_model(run_dir, "last")[0]
    x = digits.x_test[:16]                                   # uint8 is accepted as well
    with torch.no_grad():
        expected = (F.softmax(best(x.float() / 255), 1) + F.softmax(last(x.float() / 255), 1)) / 2
    assert torch.allclose(oracle.predict_proba(x), expected, atol=1e-6)
    with pytest.raises(FileNotFoundError):
        EnsembleOracle.from_checkpoints([tmp_path / "missing"])
    with pytest.raises(ValueError, match="run folder"):
        EnsembleOracle.from_checkpoints([run_dir / "config.yaml"])
    with pytest.raises(ValueError, match="checkpoints"):
        build_oracle("ensemble")
