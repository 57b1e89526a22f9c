"""Paired comparisons of two methods: how sure we are that B beats A, and by how much.

Every method of an experiment is evaluated on the same test images, so the right comparison
is *paired*: per test image and per seed, did A and B get it right? (For the suite, each
attack's flags are cascaded, see :mod:`spatlib.evaluate`; ``worst_case`` is the robust flag.)
Seed ``s`` of A is paired with seed ``s`` of B. For two methods this module reports

* ``diff``: accuracy of B minus accuracy of A (fractions here, ``*_pct`` = accuracy points in
  the tables), the mean over seeds of the per-seed difference: positive means B is better;
* a percentile **paired bootstrap** interval over test images, stratified by seed (seeds are
  never resampled: with 3 seeds there is nothing to resample; the interval is about the test
  images, given these trained models);
* an **exact paired test**: McNemar's exact test per seed (reported), combined over seeds into
  one exact conditional test (below);
* the **power line** ``mde``: the smallest true difference these images and seeds detect with
  80% power at two-sided alpha 0.05, so "not significant" can be read as "too few images".

:func:`compare_methods` makes the table (one row per comparison and attack),
:func:`default_comparisons` names an experiment's comparisons, :func:`comparisons_for_runs`
builds the table from :func:`spatlib.report.collect_results`, and
:func:`save_comparisons` writes ``comparisons.csv`` beside ``results.csv`` (the forest plot is
:func:`spatlib.figures.plot_forest`).

Images shared by the seeds (``images="shared"``, the default). The kit evaluates every run on
the *same* first N test images, so the seeds' outcomes on one image are correlated (an image
that is hard for seed 0 is hard for seed 1). Resampling each seed's images independently would
treat the 3 x N outcomes as 3 x N independent images and make the interval too narrow. So a
bootstrap replicate draws one multiset of N image indices and applies it to A and B in every
seed; the unit of the test and of the power line is the image, with its seed-averaged
difference ``d_i = mean_s (b_si - a_si)``. ``images="per_seed"`` is for seeds evaluated on
different images: each seed's images are resampled independently and every (seed, image) is
its own unit. With one seed both modes are the same.

The exact test. Under H0 (A and B exchangeable on each unit), the sign of each unit's
difference ``t_u`` is a fair coin given ``|t_u|``; the statistic ``T = sum_u t_u`` then has an
exact permutation distribution (a convolution of binomials), and ``p = P(|T| >= |T_obs|)``.
With one seed, or with ``images="per_seed"``, every ``|t_u|`` is 0 or 1 and this *is* the
exact McNemar test on the pooled discordant pairs (the binomial test, Mantel-Haenszel style:
the stratified conditional test is the binomial on the total discordant count when the
discordant pairs of the strata are exchangeable under H0). With shared images it is the same
test on the images, which keeps the seeds' correlation out of the p-value; Fisher's method
over per-seed p-values would need independent seeds, which shared images are not.

The power line. The estimate is ``mean_u t_u`` over ``n`` units; under H0 its variance is
``V0 = mean_u(t_u^2) / n`` (for McNemar: the discordance rate over n). The normal
approximation rejects when ``|diff| > z_{1-alpha/2} sqrt(V0)``, so a true difference ``delta``
is detected with probability ``power`` when ``delta = (z_{1-alpha/2} + z_power) sqrt(V0)``
(the McNemar sample-size formula, using the null variance on both sides, which slightly
overstates the alternative's variance: conservative). A true difference ``delta`` cannot come
with less discordance than ``delta`` itself forces (``mean t^2 >= |delta| h`` for
``|delta| <= h``, h the grid step of t: 1, or 1/S for shared images), so ``V0`` is floored at
that: two identical runs give ``mde = z^2 h / n``, not 0. The mde scales as ``1/sqrt(n)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Hashable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .evaluate import ATTACK_LABELS as SUITE_LABELS
from .util import atomic_write_text, derive_seed, did_you_mean

IMAGE_MODES = ("shared", "per_seed")
WORST_CASE = "worst_case"
ATTACK_LABELS = {**SUITE_LABELS, WORST_CASE: "worst case"}
COLUMNS = ["comparison", "method_a", "method_b", "attack", "acc_a_pct", "acc_b_pct", "diff_pct",
           "ci_low_pct", "ci_high_pct", "p_value", "mde_pct", "n_images", "n_seeds", "b_only",
           "a_only", "level", "images"]


@dataclass(frozen=True)
class PairedDifference:
    """B minus A, paired per image and seed. Accuracies and differences are fractions."""
    diff: float                  # acc(B) - acc(A), mean over seeds
    ci_low: float                # percentile paired bootstrap interval at ``level``
    ci_high: float
    p_value: float               # exact two-sided test, combined over seeds (module doc)
    mde: float                   # smallest difference detected with ``power`` (NaN: none)
    acc_a: float
    acc_b: float
    n_images: int                # test images per seed
    n_seeds: int
    b_only: int                  # (seed, image) pairs B got right and A wrong, over seeds
    a_only: int                  # ... A right and B wrong
    per_seed_p: dict             # seed -> exact McNemar p-value of that seed alone
    level: float
    images: str                  # "shared" | "per_seed"

    @property
    def discordant(self) -> int:
        """(seed, image) pairs on which A and B disagree."""
        return self.b_only + self.a_only


# --------------------------------------------------------------------------------------------
# input checks
def _as_flags(v, where: str) -> np.ndarray:
    try:
        arr = np.asarray(v.detach().cpu() if hasattr(v, "detach") else v)
    except Exception as e:  # noqa: BLE001 - anything not array-like is the caller's error
        raise ValueError(f"{where}: expected a 1-D array of booleans, got {type(v).__name__}") from e
    if arr.ndim != 1:
        raise ValueError(f"{where}: expected a 1-D array of booleans (one per test image), "
                         f"got shape {arr.shape}")
    if arr.dtype != bool:
        if arr.size and not np.isin(arr, (0, 1)).all():
            raise ValueError(f"{where}: expected booleans (or 0/1), got values like "
                             f"{arr[~np.isin(arr, (0, 1))][:3].tolist()}")
        arr = arr.astype(bool)
    return arr


def _paired_flags(a: Mapping[Hashable, object], b: Mapping[Hashable, object], images: str
                  ) -> tuple[list, np.ndarray, np.ndarray]:
    """Validated (seeds, A flags (S, N), B flags (S, N))."""
    if images not in IMAGE_MODES:
        raise ValueError(f"images: expected one of {', '.join(IMAGE_MODES)}, got {images!r}"
                         f"{did_you_mean(images, IMAGE_MODES)}")
    if not a or not b:
        raise ValueError(f"no seeds: A has {len(a)} and B has {len(b)}; each needs at least one")
    if set(a) != set(b):
        only_a = sorted(map(str, set(a) - set(b)))
        only_b = sorted(map(str, set(b) - set(a)))
        raise ValueError(f"seeds differ: A and B must have the same seeds (paired by seed); "
                         f"only in A: {only_a or 'none'}, only in B: {only_b or 'none'}")
    seeds = sorted(a, key=lambda s: (str(type(s)), s))
    fa, fb = [], []
    for s in seeds:
        xa, xb = _as_flags(a[s], f"A seed {s}"), _as_flags(b[s], f"B seed {s}")
        if len(xa) != len(xb):
            raise ValueError(f"seed {s}: A has {len(xa)} test images and B has {len(xb)}; a paired "
                             f"comparison needs the same images for both")
        if len(xa) == 0:
            raise ValueError(f"seed {s}: no test images")
        fa.append(xa)
        fb.append(xb)
    sizes = {len(x) for x in fa}
    if len(sizes) > 1:
        per = ", ".join(f"seed {s}: {len(x)}" for s, x in zip(seeds, fa))
        raise ValueError(f"seeds have different numbers of test images ({per}); every seed must be "
                         f"evaluated on the same test images")
    return seeds, np.stack(fa), np.stack(fb)


# --------------------------------------------------------------------------------------------
# the three statistics
def _units(fa: np.ndarray, fb: np.ndarray, images: str) -> tuple[np.ndarray, float]:
    """Per-unit integer differences t_u (sum over seeds of b - a, for shared images) and the
    scale that turns them into the estimate's units (diff = mean(t) * scale)."""
    d = fb.astype(np.int64) - fa.astype(np.int64)          # (S, N) in {-1, 0, 1}
    if images == "shared":
        return d.sum(0), 1.0 / d.shape[0]
    return d.reshape(-1), 1.0


def _binomial_half_pmf(m: int) -> np.ndarray:
    """P(X = x) for X ~ Binomial(m, 1/2), x = 0..m (log space: no underflow before the sum)."""
    x = np.arange(m + 1)
    logc = np.array([math.lgamma(m + 1) - math.lgamma(k + 1) - math.lgamma(m - k + 1) for k in x])
    return np.exp(logc - m * math.log(2.0))


def sign_flip_p_value(t: np.ndarray) -> float:
    """Exact two-sided p of ``T = sum(t)`` when each integer t_u's sign is a fair coin given |t_u|.

    ``T = sum_k k (2 X_k - m_k)`` with ``X_k ~ Binomial(m_k, 1/2)``, m_k = #{u: |t_u| = k}; the
    pmf of T is the convolution of these and ``p = P(|T| >= |T_obs|)``. For t in {-1, 0, 1} this
    is the exact McNemar test: ``p = min(1, 2 P(Bin(D, 1/2) <= min(b, c)))``, D = b + c.
    """
    t = np.asarray(t, dtype=np.int64)
    t_obs = int(abs(t.sum()))
    if t_obs == 0:
        return 1.0
    mags = np.abs(t[t != 0])
    pmf = np.ones(1)                                        # distribution of T + offset
    for k, m in zip(*np.unique(mags, return_counts=True)):
        part = np.zeros(2 * int(k) * int(m) + 1)            # values k(2x - m), x = 0..m
        part[:: 2 * int(k)] = _binomial_half_pmf(int(m))
        pmf = np.convolve(pmf, part)
    total = (len(pmf) - 1) // 2                             # T ranges over -total..total
    values = np.arange(-total, total + 1)
    return float(min(1.0, pmf[np.abs(values) >= t_obs].sum()))


def bootstrap_differences(a: Mapping[Hashable, object], b: Mapping[Hashable, object], *,
                          n_boot: int = 10_000, seed: int = 0, images: str = "shared") -> np.ndarray:
    """``n_boot`` paired bootstrap replicates of acc(B) - acc(A), stratified by seed.

    A replicate resamples the test images with replacement, the same indices for A and B (and,
    with ``images="shared"``, for every seed; ``"per_seed"``: independently per seed), and takes
    the mean over seeds of the per-seed difference. Drawing N images with replacement and summing
    their paired differences is the same, in distribution, as drawing how many of the N land on
    each distinct difference value (a multinomial over the values' shares): that is what is
    drawn, so memory does not grow with N. Reproducible from ``seed``.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot: expected at least 1 bootstrap replicate, got {n_boot}")
    _, fa, fb = _paired_flags(a, b, images)
    rng = np.random.default_rng(seed)
    n_seeds, n = fa.shape
    d = fb.astype(np.int64) - fa.astype(np.int64)
    groups = [d.sum(0)] if images == "shared" else list(d)
    out = np.zeros(n_boot)
    for g in groups:
        values, counts = np.unique(g, return_counts=True)
        draws = rng.multinomial(n, counts / n, size=n_boot)   # (n_boot, n_values)
        out += draws @ values.astype(float) / n
    return out / n_seeds


def minimum_detectable_difference(t: np.ndarray, scale: float = 1.0, *, alpha: float = 0.05,
                                  power: float = 0.8) -> float:
    """The smallest true difference (estimate units) that a two-sided level-``alpha`` paired test
    on these units detects with probability ``power`` (normal approximation; module doc).

    ``t``: per-unit integer differences; the estimate is ``mean(t) * scale`` and t's grid step is
    ``scale`` (1 for McNemar pairs, 1/S for seed-averaged shared images). NaN when no difference
    up to 1 (100 points) is detectable with so few units.
    """
    if not 0 < alpha < 1 or not 0 < power < 1:
        raise ValueError(f"alpha and power must lie in (0, 1), got alpha={alpha}, power={power}")
    t = np.asarray(t, dtype=float) * scale
    n = len(t)
    if n == 0:
        raise ValueError("no units: the power line needs at least one test image")
    z = NormalDist().inv_cdf(1 - alpha / 2) + NormalDist().inv_cdf(power)
    m2_obs = float(np.mean(t ** 2))
    h = scale

    def m2_floor(delta: float) -> float:
        # the least mean square of grid values (step h) whose mean is delta: mass split
        # between the two grid points around delta
        k, f = divmod(delta / h, 1.0)
        return (1 - f) * (k * h) ** 2 + f * ((k + 1) * h) ** 2

    def short(delta: float) -> float:     # > 0 while delta is below what is detectable
        return z * math.sqrt(max(m2_obs, m2_floor(delta)) / n) - delta

    first = z * math.sqrt(m2_obs / n)
    if first > 0 and m2_floor(first) <= m2_obs:
        return first
    if short(1.0) > 0:
        return float("nan")
    lo, hi = max(first, 0.0), 1.0
    for _ in range(100):                  # bisection to ~1e-30: far below any reported digit
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if short(mid) > 0 else (lo, mid)
    return hi


def paired_difference(a: Mapping[Hashable, object], b: Mapping[Hashable, object], *,
                      n_boot: int = 10_000, seed: int = 0, level: float = 0.95,
                      images: str = "shared", alpha: float = 0.05, power: float = 0.8
                      ) -> PairedDifference:
    """Accuracy of B minus accuracy of A, paired per test image and per seed.

    ``a``, ``b``: seed -> (N,) booleans (correct or not per test image, same images for A and
    B, same seeds; torch tensors are fine). Returns the difference (mean over seeds), its
    percentile bootstrap interval at ``level`` (:func:`bootstrap_differences`, ``n_boot``
    replicates seeded by ``seed``), the exact paired test's p-value combined over seeds
    (:func:`sign_flip_p_value`; per seed: exact McNemar), the discordant counts and the
    minimum detectable difference at ``power`` and two-sided ``alpha``. See the module doc
    for ``images`` and the statistics. Bad input raises ValueError naming the problem.
    """
    if not 0 < level < 1:
        raise ValueError(f"level: expected a confidence level in (0, 1), got {level}")
    seeds, fa, fb = _paired_flags(a, b, images)
    boot = bootstrap_differences(a, b, n_boot=n_boot, seed=seed, images=images)
    lo, hi = np.quantile(boot, [(1 - level) / 2, 1 - (1 - level) / 2])
    t, scale = _units(fa, fb, images)
    acc_a, acc_b = float(fa.mean()), float(fb.mean())
    d = fb.astype(np.int64) - fa.astype(np.int64)
    per_seed = {s: sign_flip_p_value(row) for s, row in zip(seeds, d)}
    return PairedDifference(
        diff=float(d.mean()), ci_low=float(lo), ci_high=float(hi),
        p_value=sign_flip_p_value(t),
        mde=minimum_detectable_difference(t, scale, alpha=alpha, power=power),
        acc_a=acc_a, acc_b=acc_b, n_images=int(fa.shape[1]), n_seeds=len(seeds),
        b_only=int((d > 0).sum()), a_only=int((d < 0).sum()), per_seed_p=per_seed,
        level=float(level), images=images)


# --------------------------------------------------------------------------------------------
# many comparisons -> one table
def _is_control(name: str, rule: str | None = None) -> bool:
    return rule == "random" if rule is not None else (name == "spat_random" or name.endswith("_random"))


def default_comparisons(methods: Iterable[str], *, info: Mapping[str, Mapping] | None = None
                        ) -> list[tuple[str, str]]:
    """The comparisons an experiment names by default, as (A, B) pairs read "B - A":
    every SPAT variant vs ``pgd_at``, vs ``trades`` where present, and vs its random control.

    SPAT variants are methods named ``spat_*`` other than the controls. A control is a
    variant whose shared-pixel rule is ``random``: with ``info`` (variant -> {"train_method",
    "rule"}, e.g. from :func:`spatlib.report.collect_results`' runs table) the control of a
    variant is a random-rule variant with the same training method; from names alone,
    ``spat_random`` is the control of ``spat_at`` (params/digits.yaml) and ``<v>_random``
    that of ``<v>``.
    """
    methods = list(dict.fromkeys(methods))
    info = dict(info or {})
    rule = {m: (info[m].get("rule") or "") if m in info else None for m in methods}
    controls = [m for m in methods if _is_control(m, rule[m])]
    spat = [m for m in methods if m.startswith("spat_") and m not in controls]
    pairs = []
    for v in spat:
        for base in ("pgd_at", "trades"):
            if base in methods:
                pairs.append((base, v))
        if v in info:
            own = [c for c in controls if c in info
                   and info[c].get("train_method") == info[v].get("train_method")]
        else:
            own = [c for c in controls if c == f"{v}_random" or (v == "spat_at" and c == "spat_random")]
        pairs += [(c, v) for c in own]
    return pairs


def per_example_from_frame(df: pd.DataFrame) -> dict[tuple, np.ndarray]:
    """A long frame (columns method, seed, attack, image, correct: one row per test image) ->
    the mapping :func:`compare_methods` takes, each array ordered by ``image``."""
    need = ["method", "seed", "attack", "image", "correct"]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise ValueError(f"per-example frame: missing columns {missing}; expected {need}")
    out = {}
    for key, part in df.sort_values("image").groupby(["method", "seed", "attack"], sort=False):
        if part["image"].duplicated().any():
            raise ValueError(f"per-example frame: {key} lists an image twice")
        out[tuple(key)] = part["correct"].to_numpy()
    return out


def compare_methods(per_example: Mapping[tuple, object] | pd.DataFrame,
                    pairs: Sequence[tuple[str, str]], attacks: Sequence[str] | None = None, *,
                    n_boot: int = 10_000, seed: int = 0, level: float = 0.95,
                    images: str = "shared") -> pd.DataFrame:
    """One row per (comparison, attack): B - A in accuracy points with its interval, p-value,
    power line (``mde_pct``) and counts (columns :data:`COLUMNS`).

    ``per_example``: (method, seed, attack) -> (N,) booleans, or a long frame
    (:func:`per_example_from_frame`); ``pairs``: (A, B) method pairs (:func:`default_comparisons`);
    ``attacks``: default every attack both methods have, in the order first seen (include
    ``worst_case`` in the mapping for the worst case). Each row's bootstrap is seeded from
    (``seed``, A, B, attack), so a row does not change when other rows are added.
    """
    if isinstance(per_example, pd.DataFrame):
        per_example = per_example_from_frame(per_example)
    flags: dict[str, dict[str, dict]] = {}
    for key, v in per_example.items():
        if not (isinstance(key, tuple) and len(key) == 3):
            raise ValueError(f"per_example: keys must be (method, seed, attack), got {key!r}")
        m, s, att = key
        flags.setdefault(m, {}).setdefault(att, {})[s] = v
    rows = []
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"pairs: expected (method_a, method_b) pairs, got {pair!r}")
        ma, mb = pair
        for m in (ma, mb):
            if m not in flags:
                raise ValueError(f"pairs: no per-example results for method {m!r}"
                                 f"{did_you_mean(m, flags)}; methods: {', '.join(map(str, flags))}")
        both = [att for att in flags[ma] if att in flags[mb]]
        todo = list(attacks) if attacks is not None else both
        for att in todo:
            for m in (ma, mb):
                if att not in flags[m]:
                    raise ValueError(f"attack {att!r}: no results for method {m!r}"
                                     f"{did_you_mean(att, flags[m])}; it has {', '.join(flags[m])}")
            try:
                r = paired_difference(flags[ma][att], flags[mb][att], n_boot=n_boot,
                                      seed=derive_seed(seed, ma, mb, att), level=level, images=images)
            except ValueError as e:
                raise ValueError(f"{mb} - {ma}, {att}: {e}") from None
            rows.append({"comparison": f"{mb} - {ma}", "method_a": ma, "method_b": mb, "attack": att,
                         "acc_a_pct": 100 * r.acc_a, "acc_b_pct": 100 * r.acc_b,
                         "diff_pct": 100 * r.diff, "ci_low_pct": 100 * r.ci_low,
                         "ci_high_pct": 100 * r.ci_high, "p_value": r.p_value,
                         "mde_pct": 100 * r.mde, "n_images": r.n_images, "n_seeds": r.n_seeds,
                         "b_only": r.b_only, "a_only": r.a_only, "level": r.level,
                         "images": r.images})
    return pd.DataFrame(rows, columns=COLUMNS)


def format_comparison(row: Mapping) -> str:
    """One sentence a README can quote: ``spat_at - pgd_at, AutoAttack: +3.1 points (95% CI
    -1.3 to +7.6), p = 0.21 (exact); 150 images x 3 seeds detect 5.0 points at 80% power``."""
    att = ATTACK_LABELS.get(row["attack"], row["attack"])
    mde = row["mde_pct"]
    power = (f"detect {mde:.1f} points at 80% power" if not math.isnan(mde)
             else "detect no difference at 80% power")
    return (f"{row['comparison']}, {att}: {row['diff_pct']:+.1f} points ({100 * row['level']:.0f}% CI "
            f"{row['ci_low_pct']:+.1f} to {row['ci_high_pct']:+.1f}), p = {row['p_value']:.2g} (exact); "
            f"{row['n_images']} images x {row['n_seeds']} seeds {power}")


def comparison_table(df: pd.DataFrame) -> pd.DataFrame:
    """The comparisons formatted for a notebook or README (points, one decimal)."""
    out = pd.DataFrame({
        "Comparison": df["comparison"],
        "Attack": [ATTACK_LABELS.get(a, a) for a in df["attack"]],
        "A (%)": df["acc_a_pct"].round(1), "B (%)": df["acc_b_pct"].round(1),
        "B - A (points)": [f"{v:+.1f}" for v in df["diff_pct"]],
        "95% CI": [f"[{lo:+.1f}, {hi:+.1f}]" for lo, hi in zip(df["ci_low_pct"], df["ci_high_pct"])],
        "p (exact)": [f"{p:.2g}" for p in df["p_value"]],
        "detectable (80% power)": [f"{m:.1f}" if not math.isnan(m) else "none" for m in df["mde_pct"]],
        "images x seeds": [f"{n} x {s}" for n, s in zip(df["n_images"], df["n_seeds"])],
    })
    if "level" in df and len(df) and not np.allclose(df["level"], 0.95):
        out = out.rename(columns={"95% CI": "CI"})
    return out


# --------------------------------------------------------------------------------------------
# an experiment's runs -> its comparisons
GROUP_COLUMNS = ["dataset", "model", "eps_str"]


def _run_labels(run_evaluations) -> tuple[dict, pd.DataFrame]:
    """(run -> RunEvaluation, one row per run with method, seed, dataset, model, eps_str,
    train_method, rule) from a Collected or a mapping of run name -> RunEvaluation."""
    from . import report      # lazy: report is the heavier layer above this one

    if isinstance(run_evaluations, report.Collected):
        evals = dict(run_evaluations.evaluations)
        runs = run_evaluations.runs
    elif isinstance(run_evaluations, Mapping):
        evals = dict(run_evaluations)
        runs = pd.DataFrame([report.evaluation_row(ev) for ev in evals.values()])
    else:
        raise ValueError(f"run_evaluations: expected what spatlib.report.collect_results returns "
                         f"(a Collected) or a mapping run -> RunEvaluation, got "
                         f"{type(run_evaluations).__name__}")
    if not evals:
        raise ValueError("run_evaluations: no runs to compare")
    missing = [r for r in runs["run"] if r not in evals] if not runs.empty else []
    if missing:
        raise ValueError(f"run_evaluations: runs {missing} are in the runs table but have no evaluation")
    return evals, runs


def comparisons_for_runs(run_evaluations, pairs: Sequence[tuple[str, str]] | None = None, *,
                         n_boot: int = 10_000, seed: int = 0, level: float = 0.95,
                         images: str = "shared") -> pd.DataFrame:
    """The comparison table of an experiment: :func:`compare_methods` on its runs' per-image flags.

    ``run_evaluations``: what :func:`spatlib.report.collect_results` returns (its ``runs``
    table names each run's method = variant, seed, dataset), or a mapping run name ->
    :class:`spatlib.report.RunEvaluation` (labels parsed from the run names). Runs are grouped
    by dataset, model and eps (the same test images); in each group, ``pairs`` (default:
    :func:`default_comparisons` of the group's methods, controls found by their rule) are
    compared under every attack of the suite and the worst case, over the seeds both methods
    have (column ``seeds``). A pair named in ``pairs`` that no group holds raises ValueError.
    Columns: dataset, model, eps_str, seeds, then :data:`COLUMNS`.
    """
    evals, runs = _run_labels(run_evaluations)
    out = []
    seen_pairs: set[tuple[str, str]] = set()
    for group, part in runs.groupby(GROUP_COLUMNS, sort=False):
        per: dict[tuple, object] = {}
        seeds: dict[str, set] = {}
        for _, row in part.iterrows():
            m, s = row["method"], int(row["seed"])
            if s in seeds.get(m, set()):
                raise ValueError(f"{dict(zip(GROUP_COLUMNS, group))}: method {m!r} has two runs with "
                                 f"seed {s}; each (method, seed) must be one run")
            seeds.setdefault(m, set()).add(s)
            result = evals[row["run"]].result
            for att, flags in result.correct.items():
                per[(m, s, att)] = flags
            per[(m, s, WORST_CASE)] = result.robust
        methods = list(seeds)
        info = {m: {"train_method": r["train_method"], "rule": r["rule"]}
                for m, r in part.drop_duplicates("method").set_index("method").iterrows()}
        todo = ([p for p in pairs if p[0] in seeds and p[1] in seeds] if pairs is not None
                else default_comparisons(methods, info=info))
        for ma, mb in todo:
            common = sorted(seeds[ma] & seeds[mb])
            if not common:
                if pairs is not None:
                    raise ValueError(f"{mb} - {ma}: no seed in common (A: {sorted(seeds[ma])}, "
                                     f"B: {sorted(seeds[mb])})")
                continue
            seen_pairs.add((ma, mb))
            sub = {k: v for k, v in per.items() if k[0] in (ma, mb) and k[1] in common}
            df = compare_methods(sub, [(ma, mb)], n_boot=n_boot, seed=seed, level=level, images=images)
            for col, value in zip(GROUP_COLUMNS, group):
                df[col] = value
            df["seeds"] = ", ".join(map(str, common))
            out.append(df)
    if pairs is not None:
        unmatched = [tuple(p) for p in pairs if tuple(p) not in seen_pairs]
        if unmatched:
            methods = sorted(set(runs["method"]))
            raise ValueError(f"pairs {unmatched}: no dataset, model and eps has runs of both methods; "
                             f"methods: {', '.join(methods)}")
    cols = [*GROUP_COLUMNS, "seeds", *COLUMNS]
    return pd.concat(out, ignore_index=True)[cols] if out else pd.DataFrame(columns=cols)


def save_comparisons(out_dir: str | Path, df: pd.DataFrame, figure: Figure | None = None, *,
                     dpi: int = 120) -> dict[str, Path]:
    """Write ``comparisons.csv`` (beside results.csv) and, given one, the forest plot as
    ``figures/comparisons.png`` into ``out_dir``; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"comparisons.csv": out / "comparisons.csv"}
    atomic_write_text(paths["comparisons.csv"], df.to_csv(index=False))
    if figure is not None:
        (out / "figures").mkdir(exist_ok=True)
        paths["figure:comparisons"] = out / "figures" / "comparisons.png"
        figure.savefig(paths["figure:comparisons"], dpi=dpi)
    return paths


__all__ = ["PairedDifference", "paired_difference", "bootstrap_differences", "sign_flip_p_value",
           "minimum_detectable_difference", "default_comparisons", "compare_methods",
           "per_example_from_frame", "format_comparison", "comparison_table",
           "comparisons_for_runs", "save_comparisons",
           "COLUMNS", "IMAGE_MODES", "WORST_CASE"]
