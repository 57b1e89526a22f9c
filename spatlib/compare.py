"""Paired comparisons of two methods: how sure we are that B beats A, and by how much.

Every method of an experiment is evaluated on the same test images, so the right comparison
is *paired*: per test image and per seed, did A and B get it right? (For the suite, each
attack's flags are cascaded, see :mod:`spatlib.evaluate`; ``worst_case`` is the robust flag.)
Seed ``s`` of A is paired with seed ``s`` of B (the same seed: the same initialization and data
order). ``diff`` is the accuracy of B minus that of A (fractions here; ``*_pct`` = accuracy
points in the tables), the mean over seeds of the per-seed difference: positive means B is
better. Two questions get two answers (the statistics are :mod:`spatlib.stats`):

* **the methods** (the primary result: ``ci_low``, ``ci_high``, ``p_value``, ``df``, ``se``):
  would B beat A again with other training seeds and other test images? The seed-aware
  Cochran-Cox t interval, whose variance combines the spread of the per-seed differences
  (``seed_sd``) with the images' paired variance (:func:`spatlib.stats.seed_aware`). With one
  seed per method the training randomness is unmeasured: these are NaN and no verdict is given;
* **these trained models** (``ci_low_images``, ``ci_high_images``, ``p_value_images``): would
  these S + S networks differ again on other test images? A percentile paired bootstrap over
  test images (seeds never resampled) and the exact paired test (McNemar's per seed; combined
  over seeds as the exact sign-flip test on the images' seed-summed differences). These
  say nothing about retraining: with 3 seeds and 5 points of seed spread on 150 images they
  call identical methods different about a third of the time (:mod:`spatlib.stats`).

The power lines: ``mde`` is the smallest true difference the seed-aware test finds with 80%
power at these seeds and images (``mde_images``: the same for the image-level exact test, a
normal approximation); ``seeds_needed`` is how many seeds per method the seed-aware test needs
for 80% power at ``plan_diff`` (default 2 points) on these images, and ``seeds_needed_full`` on
the dataset's full test set (``n_images_full``, :data:`FULL_TEST_IMAGES` or given): more seeds
shrink only the seed part of the variance, more images the image part.

A table of comparisons (:func:`compare_methods`, :func:`comparisons_for_runs`) is one family:
its rows get Holm-adjusted p-values (``p_holm``, :func:`spatlib.stats.holm`; NaN rows do not
count) and a ``verdict`` that reads ``p_holm``: "B better" or "A better" below ``alpha``,
otherwise "cannot be told apart with these images and seeds" with the interval (not
significant is not equal); one seed: "1 seed: training randomness unmeasured".

Images shared by the seeds (``images="shared"``, the default). The kit evaluates every run on
the *same* first N test images, so the seeds' outcomes on one image are correlated (an image
that is hard for seed 0 is hard for seed 1): the bootstrap draws one multiset of image indices
for A and B in every seed, the exact test's unit is the image with its seed-summed difference,
and the seed-aware variance separates the seed part from the shared image part.
``images="per_seed"`` is for seeds evaluated on different images: each seed's images are
resampled independently, every (seed, image) is a unit of the exact test (the pooled McNemar
test), and the seed-aware interval is the t interval on the per-seed differences.

:func:`compare_methods` makes the table (one row per comparison and attack),
:func:`default_comparisons` names an experiment's comparisons, :func:`comparisons_for_runs`
builds the table from :func:`spatlib.report.collect_results`, :func:`format_comparison` and
:func:`format_plan` write a row as sentences, and :func:`save_comparisons` writes
``comparisons.csv`` beside ``results.csv`` (the forest plot is :func:`spatlib.figures.plot_forest`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Hashable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from . import stats
from .data import DIGITS_SIZES, TORCHVISION_FILES
from .evaluate import ATTACK_LABELS as SUITE_LABELS
from .stats import IMAGE_MODES
from .util import atomic_write_text, derive_seed, unknown_line

WORST_CASE = "worst_case"
ATTACK_LABELS = {**SUITE_LABELS, WORST_CASE: "worst case"}
PLAN_DIFF = 0.02             # the planning difference of seeds_needed: 2 accuracy points
ALPHA = 0.05                 # verdicts: p_holm below this; the power lines are at this level
# test-set sizes of the datasets (the "full test set" of seeds_needed_full); the digits split
# holds out 25% of 1,797 (spatlib.data); npz and synthetic data: give full_images
# the named datasets' full test sets, from the sizes data's pre-flight check knows
FULL_TEST_IMAGES = {"digits": DIGITS_SIZES["n_test"],
                    **{name: facts["n_test"] for name, facts in TORCHVISION_FILES.items()}}
ONE_SEED = "1 seed: training randomness unmeasured; no method-level verdict"
COLUMNS = ["comparison", "method_a", "method_b", "attack", "acc_a_pct", "acc_b_pct", "diff_pct",
           "ci_low_pct", "ci_high_pct", "p_value", "p_holm", "df", "se_pct", "seed_sd_pct",
           "ci_low_images_pct", "ci_high_images_pct", "p_value_images", "mde_pct", "mde_images_pct",
           "seeds_needed", "plan_diff_pct", "n_images_full", "seeds_needed_full", "n_images",
           "n_seeds", "b_only", "a_only", "level", "images", "verdict"]


@dataclass(frozen=True)
class PairedDifference:
    """B minus A, paired per image and seed. Accuracies and differences are fractions."""
    diff: float                  # acc(B) - acc(A), mean over seeds
    ci_low: float                # seed-aware interval at ``level`` (NaN with one seed)
    ci_high: float
    p_value: float               # seed-aware two-sided p (NaN with one seed)
    df: float                    # its effective degrees of freedom
    se: float                    # its standard error
    seed_sd: float               # sd of the per-seed differences (NaN with one seed)
    ci_low_images: float         # given these trained models: paired bootstrap interval
    ci_high_images: float
    p_value_images: float        # given these trained models: exact test, combined over seeds
    mde: float                   # smallest difference the seed-aware test finds with ``power``
    mde_images: float            # the same for the image-level exact test (normal approx.)
    seeds_needed: float          # seeds per method for ``power`` at ``plan_diff`` on these images
    plan_diff: float
    n_images_full: float         # the full test set (NaN: not known)
    seeds_needed_full: float     # seeds_needed on the full test set
    acc_a: float
    acc_b: float
    n_images: int                # test images per seed
    n_seeds: int
    b_only: int                  # (seed, image) pairs B got right and A wrong, over seeds
    a_only: int                  # ... A right and B wrong
    per_seed_p: dict             # seed -> exact McNemar p-value of that seed alone
    level: float
    images: str                  # "shared" | "per_seed"
    inference: stats.SeedAware   # the variance parts, for planning other designs

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
    stats.check_image_mode(images)
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


def _check_plan(plan_diff: float, full_images) -> None:
    if not 0 < plan_diff < 1:
        raise ValueError(f"plan_diff: expected a difference in (0, 1) as a fraction (0.02 = 2 accuracy "
                         f"points), got {plan_diff}")
    if full_images is not None and not (isinstance(full_images, (int, np.integer)) and full_images >= 2):
        raise ValueError(f"full_images: expected the full test set's size (an integer >= 2), "
                         f"got {full_images!r}")


# --------------------------------------------------------------------------------------------
# one comparison
def bootstrap_differences(a: Mapping[Hashable, object], b: Mapping[Hashable, object], *,
                          n_boot: int = 10_000, seed: int = 0, images: str = "shared") -> np.ndarray:
    """``n_boot`` paired bootstrap replicates of acc(B) - acc(A) over test images, stratified
    by seed (:func:`spatlib.stats.paired_bootstrap`: with ``images="shared"`` one multiset of
    images for A, B and every seed; ``"per_seed"``: independently per seed). Reproducible
    from ``seed``. Given these trained models: seeds are never resampled.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot: expected at least 1 bootstrap replicate, got {n_boot}")
    _, fa, fb = _paired_flags(a, b, images)
    return stats.paired_bootstrap(fb.astype(np.int64) - fa.astype(np.int64), n_boot=n_boot,
                                  rng=np.random.default_rng(seed), images=images)


def paired_difference(a: Mapping[Hashable, object], b: Mapping[Hashable, object], *,
                      n_boot: int = 10_000, seed: int = 0, level: float = 0.95,
                      images: str = "shared", alpha: float = ALPHA, power: float = stats.PLAN_POWER,
                      plan_diff: float = PLAN_DIFF, full_images: int | None = None
                      ) -> PairedDifference:
    """Accuracy of B minus accuracy of A, paired per test image and per seed.

    ``a``, ``b``: seed -> (N,) booleans (correct or not per test image, same images for A and
    B, same seeds; torch tensors are fine). Returns the difference (mean over seeds) with the
    seed-aware interval at ``level`` and its p-value (about the methods; NaN with one seed),
    the image-level bootstrap interval (``n_boot`` replicates seeded by ``seed``) and exact
    p-value (given these trained models; per seed: exact McNemar), the discordant counts, the
    power lines at ``power`` and two-sided ``alpha`` (``mde``, ``mde_images``) and the seeds
    per method needed to find ``plan_diff`` (a fraction) on these images and, given
    ``full_images``, on the full test set. See the module doc. Bad input raises ValueError
    naming the problem.
    """
    if not 0 < level < 1:
        raise ValueError(f"level: expected a confidence level in (0, 1), got {level}")
    _check_plan(plan_diff, full_images)
    seeds, fa, fb = _paired_flags(a, b, images)
    d = fb.astype(np.int64) - fa.astype(np.int64)          # (S, N) in {-1, 0, 1}
    boot = bootstrap_differences(a, b, n_boot=n_boot, seed=seed, images=images)
    lo, hi = np.quantile(boot, [(1 - level) / 2, 1 - (1 - level) / 2])
    units, scale = (d.sum(0), 1.0 / d.shape[0]) if images == "shared" else (d.reshape(-1), 1.0)
    r = stats.seed_aware(d, images=images, level=level)
    plan = dict(alpha=alpha, power=power)
    needed = stats.seeds_needed(r, plan_diff, **plan)
    needed_full = (stats.seeds_needed(r, plan_diff, n_images=full_images, **plan)
                   if full_images is not None else float("nan"))
    return PairedDifference(
        diff=float(d.mean()), ci_low=float(r.ci_low), ci_high=float(r.ci_high),
        p_value=float(r.p_value), df=float(r.df), se=float(r.se), seed_sd=float(r.seed_sd),
        ci_low_images=float(lo), ci_high_images=float(hi),
        p_value_images=stats.sign_flip_p_value(units),
        mde=stats.seed_aware_mde(r, **plan),
        mde_images=stats.minimum_detectable_difference(units, scale, **plan),
        seeds_needed=needed, plan_diff=float(plan_diff),
        n_images_full=float(full_images) if full_images is not None else float("nan"),
        seeds_needed_full=needed_full,
        acc_a=float(fa.mean()), acc_b=float(fb.mean()), n_images=int(fa.shape[1]), n_seeds=len(seeds),
        b_only=int((d > 0).sum()), a_only=int((d < 0).sum()),
        per_seed_p={s: stats.sign_flip_p_value(row) for s, row in zip(seeds, d)},
        level=float(level), images=images, inference=r)


def verdict(diff: float, ci_low: float, ci_high: float, p_holm: float, n_seeds: int, *,
            level: float = 0.95, alpha: float = ALPHA, family: int | None = None,
            p_value: float | None = None) -> str:
    """The verdict of one comparison (fractions): "B better" / "A better" only when the
    Holm-adjusted p is below ``alpha``; otherwise the two cannot be told apart (with the
    interval: not significant is not equal); with one seed, no method-level verdict. When the
    comparison alone (``p_value``) would pass but the table's ``family`` of comparisons does
    not let it, the verdict says so, so that an interval that excludes 0 is not misread."""
    if n_seeds < 2:
        return ONE_SEED
    if math.isnan(p_holm):
        return "1 image: image variance unmeasured; no method-level verdict"
    if p_holm < alpha:
        return "B better" if diff > 0 else "A better"
    ci = f"{100 * level:.0f}% CI {100 * ci_low:+.1f} to {100 * ci_high:+.1f} points"
    if p_value is not None and p_value < alpha and family:
        return (f"cannot be told apart with these images and seeds once the table's {family} "
                f"comparisons are counted (Holm p = {p_holm:.2g}; alone: p = {p_value:.2g}, {ci})")
    return f"cannot be told apart with these images and seeds ({ci})"


def _with_holm(df: pd.DataFrame, alpha: float) -> pd.DataFrame:
    """The table as one family: ``p_holm`` over all its rows and each row's ``verdict``."""
    df = df.copy()
    df["p_holm"] = stats.holm(df["p_value"].to_numpy(dtype=float)) if len(df) else []
    family = int(df["p_value"].notna().sum())
    df["verdict"] = [verdict(r.diff_pct / 100, r.ci_low_pct / 100, r.ci_high_pct / 100, r.p_holm,
                             int(r.n_seeds), level=float(r.level), alpha=alpha, family=family,
                             p_value=r.p_value)
                     for r in df.itertuples()]
    return df


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
    "rule", "budget"}, e.g. from :func:`spatlib.report.collect_results`' runs table) the control
    of a variant is a random-rule variant with the same training method and the same budget
    shape (step weights or per-pixel radius: the control must spend the budget as SPAT does);
    from names alone, ``spat_random`` is the control of ``spat_at`` (params/digits.yaml) and
    ``<v>_random`` that of ``<v>``.
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
                   and info[c].get("train_method") == info[v].get("train_method")
                   and info[c].get("budget", "") == info[v].get("budget", "")]
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
                    images: str = "shared", alpha: float = ALPHA, plan_diff: float = PLAN_DIFF,
                    full_images: int | None = None) -> pd.DataFrame:
    """One row per (comparison, attack): B - A in accuracy points, the seed-aware interval and
    p-value, Holm's adjustment over the table (``p_holm``), the image-level figures (given these
    trained models), the power lines, the seeds needed, the counts and the verdict (columns
    :data:`COLUMNS`; :func:`paired_difference` for each row).

    ``per_example``: (method, seed, attack) -> (N,) booleans, or a long frame
    (:func:`per_example_from_frame`); ``pairs``: (A, B) method pairs (:func:`default_comparisons`);
    ``attacks``: default every attack both methods have, in the order first seen (include
    ``worst_case`` in the mapping for the worst case). Each row's bootstrap is seeded from
    (``seed``, A, B, attack), so a row's numbers do not change when other rows are added (its
    ``p_holm`` does: the family grows).
    """
    return _with_holm(_comparison_rows(per_example, pairs, attacks, n_boot=n_boot, seed=seed,
                                       level=level, images=images, alpha=alpha,
                                       plan_diff=plan_diff, full_images=full_images), alpha)[COLUMNS]


def _comparison_rows(per_example, pairs, attacks, *, n_boot, seed, level, images, alpha,
                     plan_diff, full_images) -> pd.DataFrame:
    """:func:`compare_methods`' rows before the family's Holm adjustment and verdicts (the
    caller decides what the family is)."""
    if isinstance(per_example, pd.DataFrame):
        per_example = per_example_from_frame(per_example)
    _check_plan(plan_diff, full_images)
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
                raise ValueError(unknown_line(m, flags, f"pairs: no per-example results for "
                                                        f"method {m!r}", "methods"))
        both = [att for att in flags[ma] if att in flags[mb]]
        todo = list(attacks) if attacks is not None else both
        for att in todo:
            for m in (ma, mb):
                if att not in flags[m]:
                    raise ValueError(unknown_line(att, flags[m], f"attack {att!r}: no results "
                                                            f"for method {m!r}", "it has"))
            try:
                r = paired_difference(flags[ma][att], flags[mb][att], n_boot=n_boot,
                                      seed=derive_seed(seed, ma, mb, att), level=level, images=images,
                                      alpha=alpha, plan_diff=plan_diff, full_images=full_images)
            except ValueError as e:
                raise ValueError(f"{mb} - {ma}, {att}: {e}") from None
            pct = {f"{k}_pct": 100 * getattr(r, k) for k in (
                "acc_a", "acc_b", "diff", "ci_low", "ci_high", "se", "seed_sd", "ci_low_images",
                "ci_high_images", "mde", "mde_images", "plan_diff")}
            rows.append({"comparison": f"{mb} - {ma}", "method_a": ma, "method_b": mb, "attack": att,
                         **pct, "p_value": r.p_value, "df": r.df, "p_value_images": r.p_value_images,
                         "seeds_needed": r.seeds_needed, "n_images_full": r.n_images_full,
                         "seeds_needed_full": r.seeds_needed_full, "n_images": r.n_images,
                         "n_seeds": r.n_seeds, "b_only": r.b_only, "a_only": r.a_only,
                         "level": r.level, "images": r.images})
    return pd.DataFrame(rows, columns=[c for c in COLUMNS if c not in ("p_holm", "verdict")])


def _ci(lo: float, hi: float) -> str:
    return f"{lo:+.1f} to {hi:+.1f}"


def format_comparison(row: Mapping) -> str:
    """A row as a sentence a README can quote, the seed-aware result first: ``spat_at -
    pgd_at, worst case: -2.9 points (95% CI -12.0 to +6.2 over seeds and images; p = 0.31,
    Holm p = 1): cannot be told apart with these images and seeds; given these trained models:
    95% CI -6.2 to +0.2, p = 0.11 (exact)``."""
    att = ATTACK_LABELS.get(row["attack"], row["attack"])
    level = f"{100 * row['level']:.0f}%"
    head = f"{row['comparison']}, {att}: {row['diff_pct']:+.1f} points"
    images = (f"given these trained models: {level} CI "
              f"{_ci(row['ci_low_images_pct'], row['ci_high_images_pct'])}, p = {row['p_value_images']:.2g} (exact)")
    if row["n_seeds"] < 2 or math.isnan(row["p_value"]):
        return f"{head}; {row['verdict']}; {images}"
    said = {"B better": f"{row['method_b']} better", "A better": f"{row['method_a']} better"}
    outcome = said.get(row["verdict"], "cannot be told apart with these images and seeds")
    return (f"{head} ({level} CI {_ci(row['ci_low_pct'], row['ci_high_pct'])} over seeds and images; "
            f"p = {row['p_value']:.2g}, Holm p = {row['p_holm']:.2g}): {outcome}; {images}")


def format_plan(row: Mapping) -> str:
    """How many seeds a row's comparison needs: ``spat_at - pgd_at, worst case: 3 seeds x 150
    images find 12.3 points at 80% power; 2.0 points need 41 seeds per method on these 150
    images, 9 seeds per method on the full test set (450 images) (a rough guide: the seed
    spread is measured with 2 df)``."""
    att = ATTACK_LABELS.get(row["attack"], row["attack"])
    head = f"{row['comparison']}, {att}: "
    if row["n_seeds"] < 2:
        return head + ("1 seed: training randomness unmeasured, so the seeds needed are unknown "
                       "(train at least 2 seeds per method)")
    plan = f"{row['plan_diff_pct']:.1f} points"

    def seeds(needed: float, where: str) -> str:
        if math.isnan(needed):
            return f"no number of seeds on {where} (its image variance alone is too wide)"
        return f"{needed:.0f} seeds per method on {where}"

    mde = row["mde_pct"]
    found = (f"find {mde:.1f} points at 80% power" if not math.isnan(mde)
             else "find no difference at 80% power")
    line = (f"{head}{row['n_seeds']} seeds x {row['n_images']} images {found}; {plan} need "
            f"{seeds(row['seeds_needed'], 'these ' + str(row['n_images']) + ' images')}")
    full = row.get("n_images_full", float("nan"))
    if not math.isnan(full) and full != row["n_images"]:
        line += f", {seeds(row['seeds_needed_full'], f'the full test set ({full:.0f} images)')}"
    # the seed part is measured with S - 1 degrees of freedom: from 3 seeds, the planned
    # number of seeds easily varies threefold between repeats of the same experiment
    return line + f" (a rough guide: the seed spread is measured with {row['n_seeds'] - 1} df)"


def comparison_table(df: pd.DataFrame) -> pd.DataFrame:
    """The comparisons formatted for a notebook or README (points, one decimal): the
    seed-aware result first, then the image-level one (given these trained models)."""
    level = f"{100 * df['level'].iloc[0]:.0f}%" if len(df) else "95%"
    nan_or = (lambda v, fmt: "n/a" if math.isnan(v) else format(v, fmt))
    return pd.DataFrame({
        "Comparison": df["comparison"],
        "Attack": [ATTACK_LABELS.get(a, a) for a in df["attack"]],
        "A (%)": df["acc_a_pct"].round(1), "B (%)": df["acc_b_pct"].round(1),
        "B - A (points)": [f"{v:+.1f}" for v in df["diff_pct"]],
        f"{level} CI (seeds and images)": ["n/a" if math.isnan(lo) else f"[{lo:+.1f}, {hi:+.1f}]"
                                           for lo, hi in zip(df["ci_low_pct"], df["ci_high_pct"])],
        "p": [nan_or(p, ".2g") for p in df["p_value"]],
        "p (Holm)": [nan_or(p, ".2g") for p in df["p_holm"]],
        "verdict": df["verdict"],
        f"{level} CI given these models": [f"[{lo:+.1f}, {hi:+.1f}]" for lo, hi in
                                          zip(df["ci_low_images_pct"], df["ci_high_images_pct"])],
        "p given these models (exact)": [f"{p:.2g}" for p in df["p_value_images"]],
        "finds at 80% power": [nan_or(m, ".1f") for m in df["mde_pct"]],
        "seeds needed": [nan_or(s, ".0f") for s in df["seeds_needed"]],
        "images x seeds": [f"{n} x {s}" for n, s in zip(df["n_images"], df["n_seeds"])],
    })


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
                         images: str = "shared", alpha: float = ALPHA, plan_diff: float = PLAN_DIFF,
                         full_images: int | Mapping[str, int] | None = None) -> pd.DataFrame:
    """The comparison table of an experiment: :func:`compare_methods` on its runs' per-image flags.

    ``run_evaluations``: what :func:`spatlib.report.collect_results` returns (its ``runs``
    table names each run's method = variant, seed, dataset), or a mapping run name ->
    :class:`spatlib.report.RunEvaluation` (labels parsed from the run names). Runs are grouped
    by dataset, model and eps (the same test images); in each group, ``pairs`` (default:
    :func:`default_comparisons` of the group's methods, controls found by their rule) are
    compared under every attack of the suite and the worst case, over the seeds both methods
    have (column ``seeds``). A pair named in ``pairs`` that no group holds raises ValueError.
    The whole table is one family: ``p_holm`` and the verdicts are over all its rows.
    ``full_images``: the full test set's size for ``seeds_needed_full``, one for every group or
    per dataset (a mapping from the dataset label or name); default :data:`FULL_TEST_IMAGES`
    of the runs' dataset (NaN for a dataset it does not list).
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
        info = {m: {"train_method": r["train_method"], "rule": r["rule"], "budget": r.get("budget", "")}
                for m, r in part.drop_duplicates("method").set_index("method").iterrows()}
        todo = ([p for p in pairs if p[0] in seeds and p[1] in seeds] if pairs is not None
                else default_comparisons(methods, info=info))
        full = _full_images(full_images, group[0], part)
        for ma, mb in todo:
            common = sorted(seeds[ma] & seeds[mb])
            if not common:
                if pairs is not None:
                    raise ValueError(f"{mb} - {ma}: no seed in common (A: {sorted(seeds[ma])}, "
                                     f"B: {sorted(seeds[mb])})")
                continue
            seen_pairs.add((ma, mb))
            sub = {k: v for k, v in per.items() if k[0] in (ma, mb) and k[1] in common}
            df = _comparison_rows(sub, [(ma, mb)], None, n_boot=n_boot, seed=seed, level=level,
                                  images=images, alpha=alpha, plan_diff=plan_diff, full_images=full)
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
    if not out:
        return pd.DataFrame(columns=cols)
    # the whole table is the family: Holm and the verdicts once, over every row
    return _with_holm(pd.concat(out, ignore_index=True), alpha)[cols]


def _full_images(full_images, dataset: str, part: pd.DataFrame) -> int | None:
    """The full test set's size for one group of runs (comparisons_for_runs' ``full_images``)."""
    name = part["data"].iloc[0] if "data" in part else dataset
    if full_images is None:
        return FULL_TEST_IMAGES.get(name)
    if isinstance(full_images, Mapping):
        return full_images.get(dataset, full_images.get(name))
    return full_images


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


__all__ = ["PairedDifference", "paired_difference", "bootstrap_differences", "verdict",
           "default_comparisons", "compare_methods", "per_example_from_frame", "format_comparison",
           "format_plan", "comparison_table", "comparisons_for_runs", "save_comparisons",
           "COLUMNS", "IMAGE_MODES", "WORST_CASE", "PLAN_DIFF", "ALPHA", "FULL_TEST_IMAGES", "ONE_SEED"]
