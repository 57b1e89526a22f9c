"""The kit's statistics, in one place: every interval, test, power line and correction.

* :func:`wilson_interval`: a proportion (notebook 01's oracle flip rates).
* :func:`sign_flip_p_value` and :func:`mcnemar_test`: the exact paired test. For outcomes in
  {-1, 0, 1} it is the exact McNemar test; for seed-summed differences of shared images, the
  exact sign-flip test on the images. One implementation serves both.
* :func:`paired_bootstrap`: percentile bootstrap draws over test images.
* :func:`minimum_detectable_difference`: the image-level power line (normal approximation).
* :func:`seed_aware`: inference about the *methods*, over training seeds and test images.
* :func:`seed_aware_power`, :func:`seed_aware_mde`, :func:`seeds_needed`: planning with it.
* :func:`holm`: Holm's step-down adjustment of a family of p-values.

Two questions, two answers. Comparing methods A and B, each trained with S seeds and
evaluated on the same N test images, ``x[s, i] = b[s, i] - a[s, i]`` in {-1, 0, 1} and the
estimate is ``D = mean(x)``. *Given these trained models*, only the test images vary: the
image-level answers (bootstrap, exact test, ``*_images``) hold for these S + S networks and no
others. A claim about the *methods* must also vary the training seed: retraining moves
accuracy by several points, and an image-level test that ignores it calls identical methods
different far more often than it says (simulated below: 12-80% of the time at 0.05 once the
seeds spread by 2-9 points; the more images, the worse).

Seed-aware inference (:func:`seed_aware`). The design is crossed (every seed sees every
image). Per-seed differences ``d_s = mean_i x[s, i]``, per-image differences
``t_i = mean_s x[s, i]``, and the two-way mean squares ``MS_seeds = N var_s(d_s)``,
``MS_images = S var_i(t_i)``, ``MS_res`` (the residual). The variance of D has two parts,

* the seed part ``A = var_s(d_s) / S`` (S - 1 degrees of freedom); it already holds each
  seed's own image-by-model noise, and
* the image part ``B = max(MS_images - MS_res, 0) / (S N)`` (N - 1 degrees of freedom): the
  images on which one method is systematically better, which every seed shares (so ``d_s``
  cannot see it) and which a new test set would redraw;

``se = sqrt(A + B)``, the lead's ``var_s(d_s)/S + var_i(t_i)/N - MS_res/(S N)`` with the
image component rather than the seed component floored at zero. The interval is
``D +- c se`` with the Cochran-Cox quantile ``c = (A t_{S-1} + B t_{N-1}) / (A + B)``, a
variance-weighted mean of the two parts' t quantiles; the p-value is the level at which that
interval touches 0 (so p < alpha exactly when the 1 - alpha interval excludes 0), and ``df`` is
the effective degrees of freedom (the t whose quantile is c). With identical seeds (no seed
variation at all) A = 0 and MS_res = 0, and this is the image-level t interval on ``t_i``.
``images="per_seed"`` (seeds on different images) nests images in seeds: ``d_s`` carries its
own images' noise, B = 0 and the interval is the t interval on the S per-seed differences.
One seed measures no training randomness: every seed-aware number is NaN.

Why Cochran-Cox and not Satterthwaite. Simulated with fixed seeds: two methods identical in
distribution, a logistic outcome with shared image difficulty (sd 2 or 3.5), a method-by-image
effect (sd 0, 0.5 or 1), a per-run seed offset (seed spread 0 to 9 accuracy points),
accuracies 17-83%, 3 and 5 seeds, 150 and 1,000 images: 216 cells of 1,000-2,000 experiments,
each cell also with a true difference of 5-9 points for the coverage. Satterthwaite's t on
``MS_seeds + MS_images - MS_res`` (df from the three mean squares, the total floored at the
image-level variance) rejected the true null up to 8.5% of the time at 0.05 with 3 seeds, and
rerun with 3,000-8,000 experiments its worst cells stayed at 6.6-7.7% with 92.5-93.3% coverage:
its df rests on 2 seed degrees of freedom, and a small ``var_s(d_s)`` both shrinks the
variance and raises the df. Cochran-Cox: false positives 3.0-6.8% in the sweep (mean 4.6%)
and every cell above 5.8% back to 4.4-5.5% on the rerun, coverage >= 0.943; Banerjee's bound
(``sqrt(t_{S-1}^2 A + t_{N-1}^2 B)``) was as calibrated but wider. The price of honesty at 3
seeds is power: with a digits-like setting (150 images, accuracy ~48%) a true 10-point
difference with 5 points of seed spread is found 23% of the time, where the image-level test
"finds" it 88% of the time, at a false-positive rate of 34%.
``tests/test_stats.py`` reruns part of this grid in seconds and prints its table.

Planning. From one table the variance components are ``sigma_seed^2 = max(MS_seeds - MS_res,
0) / N`` (the seed effect), ``sigma_res^2 = MS_res`` and ``sigma_image^2 = max(MS_images -
MS_res, 0) / S``; with S' seeds and N' images, ``A' = (sigma_seed^2 + sigma_res^2 / N') / S'``
and ``B' = sigma_image^2 / N'``. :func:`seed_aware_power` is the exact power of the
Cochran-Cox test under that model (the estimate normal, its seed part a scaled chi-square with
S' - 1 degrees of freedom, integrated numerically); :func:`seed_aware_mde` inverts it in the
difference, :func:`seeds_needed` in S'. A true difference delta cannot come with less variance
than it forces on {-1, 0, 1} outcomes, so both floor the image part there (two identical runs
do not "detect 0 points"). More seeds shrink only A': when B' alone keeps the power below the
target, no number of seeds reaches it (NaN; more images would).

Multiplicity (:func:`holm`). The comparisons one table reports are one family: every row of
``comparisons.csv`` (all method pairs x all attacks of an experiment, every dataset, model and
eps in it) and every test of notebook 01's comparison table (each SPAT variant against PGD and
against its random control, at every eps). Verdicts read the Holm-adjusted p-values.

scipy (t, chi-square and normal quantiles) is imported only inside the functions that need
it: importing ``scipy.stats`` takes about a second.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import NamedTuple

import numpy as np

from .util import did_you_mean

IMAGE_MODES = ("shared", "per_seed")
PLAN_POWER = 0.8                 # the power every planning number is for
PLAN_ALPHA = 0.05
MAX_PLAN_SEEDS = 10_000          # seeds_needed searches up to here; beyond it: NaN
_QUAD_POINTS = 2000              # chi-square quantile midpoints in the power integral


# --------------------------------------------------------------------------------------------
# a proportion
def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (95% for z = 1.96); (nan, nan) when n = 0.

    Unlike the normal approximation it stays inside [0, 1] and is sensible at k = 0 or k = n.
    """
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"wilson_interval: need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, center - half), min(1.0, center + half))


# --------------------------------------------------------------------------------------------
# the exact paired test
def _binomial_half_pmf(m: int) -> np.ndarray:
    """P(X = x) for X ~ Binomial(m, 1/2), x = 0..m (log space: no underflow before the sum)."""
    x = np.arange(m + 1)
    logc = np.array([math.lgamma(m + 1) - math.lgamma(k + 1) - math.lgamma(m - k + 1) for k in x])
    return np.exp(logc - m * math.log(2.0))


def sign_flip_p_value(t) -> float:
    """Exact two-sided p of ``T = sum(t)`` when each integer t_u's sign is a fair coin given |t_u|.

    ``t``: (n,) integers. ``T = sum_k k (2 X_k - m_k)`` with ``X_k ~ Binomial(m_k, 1/2)``,
    m_k = #{u: |t_u| = k}; the pmf of T is the convolution of these and ``p = P(|T| >= |T_obs|)``.
    For t in {-1, 0, 1} this is the exact McNemar test: ``p = min(1, 2 P(Bin(D, 1/2) <= min(b,
    c)))``, D = b + c discordant pairs.
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


class McNemarResult(NamedTuple):
    """Paired comparison of two binary outcomes on the same examples."""
    a_only: int       # examples where a is true and b is not
    b_only: int       # examples where b is true and a is not
    p_value: float    # exact two-sided binomial p-value on the discordant pairs


def mcnemar_test(flags_a, flags_b) -> McNemarResult:
    """Exact McNemar test: under H0 the discordant pairs split Binomial(a_only + b_only, 1/2).

    flags_a, flags_b: boolean arrays (N,) over the same examples. Two-sided p-value
    ``min(1, 2 P(X <= min(a_only, b_only)))`` (:func:`sign_flip_p_value` on b - a).
    """
    a = np.asarray(flags_a, dtype=bool)
    b = np.asarray(flags_b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"mcnemar_test: paired outcomes need equal shapes, got {a.shape} and {b.shape}")
    d = b.astype(np.int64) - a.astype(np.int64)
    return McNemarResult(int((d < 0).sum()), int((d > 0).sum()), sign_flip_p_value(d.reshape(-1)))


# --------------------------------------------------------------------------------------------
# given these trained models: bootstrap over images, the image-level power line
def check_image_mode(images: str) -> None:
    """ValueError naming ``images`` unless it is one of :data:`IMAGE_MODES`."""
    if images not in IMAGE_MODES:
        raise ValueError(f"images: expected one of {', '.join(IMAGE_MODES)}, got {images!r}"
                         f"{did_you_mean(images, IMAGE_MODES)}")


def paired_bootstrap(x, *, n_boot: int, rng: np.random.Generator, images: str = "shared") -> np.ndarray:
    """``n_boot`` bootstrap draws of ``mean(x)`` for paired differences ``x`` (S, N) in {-1, 0, 1}.

    A draw resamples the N test images with replacement: the same indices for every seed with
    ``images="shared"``, independently per seed with ``"per_seed"``; it is the mean over seeds
    of the per-seed mean. Drawing N images and summing their differences equals, in
    distribution, drawing how many of the N land on each distinct value (a multinomial over the
    values' shares): that is what is drawn, so memory does not grow with N. Returns (n_boot,).
    """
    if n_boot < 1:
        raise ValueError(f"n_boot: expected at least 1 bootstrap replicate, got {n_boot}")
    check_image_mode(images)
    x = np.asarray(x, dtype=np.int64)
    n_seeds, n = x.shape
    groups = [x.sum(0)] if images == "shared" else list(x)
    out = np.zeros(n_boot)
    for g in groups:
        values, counts = np.unique(g, return_counts=True)
        draws = rng.multinomial(n, counts / n, size=n_boot)   # (n_boot, n_values)
        out += draws @ values.astype(float) / n
    return out / n_seeds


def _least_mean_square(delta: float, h: float) -> float:
    """The least mean square of values on the grid h * Z whose mean is delta: the mass split
    between the two grid points around delta."""
    k, f = divmod(abs(delta) / h, 1.0)
    return (1 - f) * (k * h) ** 2 + f * ((k + 1) * h) ** 2


def _check_alpha_power(alpha: float, power: float) -> None:
    if not 0 < alpha < 1 or not 0 < power < 1:
        raise ValueError(f"alpha and power must lie in (0, 1), got alpha={alpha}, power={power}")


def minimum_detectable_difference(t, scale: float = 1.0, *, alpha: float = PLAN_ALPHA,
                                  power: float = PLAN_POWER) -> float:
    """The smallest true difference that a two-sided level-``alpha`` paired test on these units
    detects with probability ``power``, *given these trained models* (normal approximation of
    the exact test: McNemar's sample-size formula with the null variance).

    ``t``: (n,) per-unit integer differences; the estimate is ``mean(t) * scale`` and t's grid
    step is ``scale`` (1 for McNemar pairs, 1/S for seed-summed shared images). With the null
    variance ``V0 = mean(t^2) / n`` the test rejects when ``|diff| > z_{1-alpha/2} sqrt(V0)``,
    so ``delta = (z_{1-alpha/2} + z_power) sqrt(V0)``; V0 is floored at what delta itself forces
    (two identical runs give ``z^2 h / n``, not 0). NaN when nothing up to 1 is detectable.
    """
    _check_alpha_power(alpha, power)
    t = np.asarray(t, dtype=float) * scale
    n = len(t)
    if n == 0:
        raise ValueError("no units: the power line needs at least one test image")
    z = NormalDist().inv_cdf(1 - alpha / 2) + NormalDist().inv_cdf(power)
    m2_obs = float(np.mean(t ** 2))

    def short(delta: float) -> float:     # > 0 while delta is below what is detectable
        return z * math.sqrt(max(m2_obs, _least_mean_square(delta, scale)) / n) - delta

    first = z * math.sqrt(m2_obs / n)
    if first > 0 and _least_mean_square(first, scale) <= m2_obs:
        return first
    if short(1.0) > 0:
        return float("nan")
    return _bisect_increasing(lambda d: -short(d), max(first, 0.0), 1.0)


def _bisect_increasing(f, lo: float, hi: float, iters: int = 100) -> float:
    """The smallest x in [lo, hi] with f(x) >= 0 for f increasing, f(hi) >= 0 (to ~2^-iters)."""
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
    return hi


# --------------------------------------------------------------------------------------------
# over seeds and images: the seed-aware interval and test
def _t_isf(q, df):
    from scipy import stats as sps    # lazy: scipy.stats takes a second to import
    return sps.t.isf(q, df)


@dataclass(frozen=True)
class SeedAware:
    """Seed-aware inference on paired differences (module doc). Fractions; every field is a
    float, or an array of the batch shape when :func:`seed_aware` was given a batch."""
    diff: float | np.ndarray        # mean(x): acc(B) - acc(A)
    se: float | np.ndarray          # sqrt(seed_var + image_var)
    ci_low: float | np.ndarray      # D - c se, c the Cochran-Cox quantile at ``level``
    ci_high: float | np.ndarray
    p_value: float | np.ndarray     # two-sided: the level at which the interval touches 0
    df: float | np.ndarray          # effective degrees of freedom (the t whose quantile is c)
    seed_var: float | np.ndarray    # A = var_s(d_s) / S
    image_var: float | np.ndarray   # B = max(MS_images - MS_res, 0) / (S N); 0 for per_seed
    seed_sd: float | np.ndarray     # sd of the per-seed differences d_s (ddof 1)
    sigma_seed2: float | np.ndarray  # planning components (module doc)
    sigma_res2: float | np.ndarray
    sigma_image2: float | np.ndarray
    n_seeds: int
    n_images: int
    images: str
    level: float


def _mean_squares(x: np.ndarray) -> tuple[np.ndarray, ...]:
    """(D, var_s(d_s), MS_seeds, MS_images, MS_res) of x (..., S, N), S, N >= 2 (two-way, no
    replicate). From the integer row and column sums, so that equal rows give exactly 0."""
    n_seeds, n = x.shape[-2:]
    rows, cols, total = x.sum(-1), x.sum(-2), x.sum((-2, -1))
    diff = total / (n_seeds * n)
    var_d = rows.var(-1, ddof=1) / n ** 2
    ms_seeds = n * var_d
    ms_images = cols.var(-1, ddof=1) / n_seeds
    ss_total = np.square(x).sum((-2, -1)) - total ** 2 / (n_seeds * n)
    ss_res = ss_total - (n_seeds - 1) * ms_seeds - (n - 1) * ms_images
    ms_res = np.maximum(ss_res, 0.0) / ((n_seeds - 1) * (n - 1))   # >= 0: rounding only
    return diff, var_d, ms_seeds, ms_images, ms_res


def _cochran_cox(seed_var, image_var, df_seed, df_image, alpha):
    """The Cochran-Cox quantile ``(A t_{df_seed} + B t_{df_image}) / (A + B)`` at two-sided
    ``alpha`` (broadcasts); where A + B = 0, the image quantile."""
    q_seed, q_image = _t_isf(np.divide(alpha, 2), df_seed), _t_isf(np.divide(alpha, 2), df_image)
    total = seed_var + image_var
    with np.errstate(invalid="ignore", divide="ignore"):
        c = (seed_var * q_seed + image_var * q_image) / total
    return np.where(total > 0, c, q_image)


def seed_aware(x, *, images: str = "shared", level: float = 0.95) -> SeedAware:
    """Inference about the methods from paired differences ``x`` (..., S, N) in {-1, 0, 1}
    (``x[s, i] = b - a`` on image i for seed s; leading dimensions are a batch, e.g. simulated
    experiments). Cochran-Cox t interval and p-value on D = mean(x) with the seed and image
    variance parts of the module doc. One seed (or one image): every field but ``diff`` NaN.
    """
    check_image_mode(images)
    if not 0 < level < 1:
        raise ValueError(f"level: expected a confidence level in (0, 1), got {level}")
    x = np.asarray(x, dtype=float)
    if x.ndim < 2:
        raise ValueError(f"seed_aware: expected differences (..., seeds, images), got shape {x.shape}")
    n_seeds, n = x.shape[-2:]
    batch = x.shape[:-2]
    if n_seeds < 2 or n < 2:
        nan = np.full(batch, np.nan)[()]
        return SeedAware(x.mean((-2, -1))[()], nan, nan, nan, nan, nan, nan, nan, nan, nan, nan, nan,
                         n_seeds, n, images, level)
    diff, var_d, ms_seeds, ms_images, ms_res = _mean_squares(x)
    seed_var = var_d / n_seeds
    if images == "shared":
        image_var = np.maximum(ms_images - ms_res, 0.0) / (n_seeds * n)
        sigma_seed2 = np.maximum(ms_seeds - ms_res, 0.0) / n
        sigma_res2, sigma_image2 = ms_res, np.maximum(ms_images - ms_res, 0.0) / n_seeds
    else:   # nested: d_s already holds its own images' noise
        image_var = np.zeros_like(seed_var)
        within = x.var(-1, ddof=1).mean(-1)
        sigma_seed2 = np.maximum(var_d - within / n, 0.0)
        sigma_res2, sigma_image2 = within, np.zeros_like(seed_var)
    df_seed = n_seeds - 1
    df_image = n - 1 if images == "shared" else df_seed      # per_seed: no image part
    se = np.sqrt(seed_var + image_var)
    c = _cochran_cox(seed_var, image_var, df_seed, df_image, 1 - level)
    p = _cochran_cox_p(diff, se, seed_var, image_var, df_seed, df_image)
    df = _effective_df(c, seed_var, image_var, df_seed, df_image, 1 - level)
    return SeedAware(diff=diff[()], se=se[()], ci_low=(diff - c * se)[()], ci_high=(diff + c * se)[()],
                     p_value=p[()], df=df[()], seed_var=seed_var[()], image_var=image_var[()],
                     seed_sd=np.sqrt(var_d)[()], sigma_seed2=sigma_seed2[()],
                     sigma_res2=sigma_res2[()], sigma_image2=sigma_image2[()],
                     n_seeds=n_seeds, n_images=n, images=images, level=float(level))


def _cochran_cox_p(diff, se, seed_var, image_var, df_seed, df_image, iters: int = 30):
    """The two-sided p: the alpha at which the Cochran-Cox quantile equals T = |D| / se. The
    quantile is a weighted mean of the two t quantiles, so that alpha lies between the two t
    tests' p-values (image df: the smaller); bisection on log(alpha) in that bracket
    (vectorised; 30 halvings leave log(p) within 1e-8 of the bracket's log-width)."""
    from scipy import stats as sps

    diff, se = np.broadcast_arrays(np.asarray(diff, float), np.asarray(se, float))
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.abs(diff) / se
    lo = np.log(np.clip(2 * sps.t.sf(ratio, df_image), 1e-300, 1.0))
    hi = np.log(np.clip(2 * sps.t.sf(ratio, df_seed), 1e-300, 1.0))
    lo = np.minimum(lo, hi)
    for _ in range(iters):
        mid = (lo + hi) / 2
        beyond = _cochran_cox(seed_var, image_var, df_seed, df_image, np.exp(mid)) < ratio
        lo, hi = np.where(beyond, lo, mid), np.where(beyond, mid, hi)
    p = np.exp(hi)
    p = np.where(diff == 0, 1.0, p)                  # also where se = 0
    p = np.where((se == 0) & (diff != 0), 0.0, p)
    return np.where(np.isnan(diff) | np.isnan(se), np.nan, p)


def _effective_df(c, seed_var, image_var, df_seed, df_image, alpha, iters: int = 30):
    """The degrees of freedom of the t whose two-sided ``alpha`` quantile is c (between the
    seed and the image df; the t quantile falls as df grows)."""
    c = np.asarray(c, float)
    lo = np.full(c.shape, math.log(df_seed))
    hi = np.full(c.shape, math.log(df_image))
    for _ in range(iters):
        mid = (lo + hi) / 2
        above = _t_isf(alpha / 2, np.exp(mid)) > c
        lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
    df = np.exp((lo + hi) / 2)
    df = np.where(np.asarray(image_var) <= 0, df_seed, df)
    return np.where(np.asarray(seed_var) <= 0, df_image, df)


# --------------------------------------------------------------------------------------------
# planning: power, mde, seeds needed
def _plan_parts(r: SeedAware, delta: float, n_seeds: int, n_images: int) -> tuple[float, float]:
    """(A', B') for ``n_seeds`` seeds and ``n_images`` images from r's components, each part
    floored at the variance a true difference ``delta`` forces (module doc)."""
    seed_var = (r.sigma_seed2 + r.sigma_res2 / n_images) / n_seeds
    if r.images == "shared":
        forced = (_least_mean_square(delta, 1 / n_seeds) - delta ** 2) / n_images
        return float(seed_var), float(max(r.sigma_image2 / n_images, forced))
    forced = (abs(delta) - delta ** 2) / (n_seeds * n_images)
    return float(max(seed_var, forced)), 0.0


@functools.lru_cache(maxsize=256)
def _chi2_midpoints(df: int) -> np.ndarray:
    """chi2_df / df at the midpoints of _QUAD_POINTS equal-probability bins (read-only)."""
    from scipy import stats as sps

    w = sps.chi2.ppf((np.arange(_QUAD_POINTS) + 0.5) / _QUAD_POINTS, df) / df
    w.flags.writeable = False
    return w


def _power_of(delta: float, seed_var: float, image_var: float, df_seed: int, df_image: int,
              alpha: float) -> float:
    """Power of the two-sided Cochran-Cox test at true difference delta: the estimate is
    N(delta, A + B), its seed part estimated as A W, W ~ chi2_{df_seed} / df_seed (integrated
    over W's quantile midpoints), the image part as B."""
    from scipy import stats as sps

    total = seed_var + image_var
    if total <= 0:
        return 1.0 if delta != 0 else alpha
    w = _chi2_midpoints(df_seed)
    seed_hat = seed_var * w
    c = _cochran_cox(seed_hat, image_var, df_seed, df_image, alpha)
    half = c * np.sqrt(seed_hat + image_var)
    sd = math.sqrt(total)
    return float(np.mean(sps.norm.cdf((abs(delta) - half) / sd) + sps.norm.cdf((-abs(delta) - half) / sd)))


def seed_aware_power(r: SeedAware, delta: float, *, n_seeds: int | None = None,
                     n_images: int | None = None, alpha: float = PLAN_ALPHA) -> float:
    """Power of the seed-aware test (level ``alpha``, two-sided) to find a true difference
    ``delta`` with ``n_seeds`` seeds and ``n_images`` images (default: r's), under the variance
    components measured in ``r`` (a :func:`seed_aware` result of one table). NaN for 1 seed."""
    n_seeds = r.n_seeds if n_seeds is None else int(n_seeds)
    n_images = r.n_images if n_images is None else int(n_images)
    if n_seeds < 2 or n_images < 1 or np.isnan(r.sigma_res2):
        return float("nan")
    seed_var, image_var = _plan_parts(r, delta, n_seeds, n_images)
    return _power_of(delta, seed_var, image_var, n_seeds - 1, max(n_images - 1, 1), alpha)


def seed_aware_mde(r: SeedAware, *, n_seeds: int | None = None, n_images: int | None = None,
                   alpha: float = PLAN_ALPHA, power: float = PLAN_POWER) -> float:
    """The smallest true difference the seed-aware test finds with probability ``power``
    (:func:`seed_aware_power` inverted by bisection). NaN for 1 seed or when no difference up
    to 1 (100 points) is found that often."""
    _check_alpha_power(alpha, power)
    if not seed_aware_power(r, 1.0, n_seeds=n_seeds, n_images=n_images, alpha=alpha) >= power:
        return float("nan")    # also when the power is NaN (1 seed)
    return _bisect_increasing(lambda d: seed_aware_power(r, d, n_seeds=n_seeds, n_images=n_images,
                                                         alpha=alpha) - power, 0.0, 1.0, iters=40)


def seeds_needed(r: SeedAware, delta: float, *, n_images: int | None = None,
                 alpha: float = PLAN_ALPHA, power: float = PLAN_POWER,
                 max_seeds: int = MAX_PLAN_SEEDS) -> float:
    """Seeds per method for the seed-aware test to find a true difference ``delta`` with
    probability ``power`` on ``n_images`` images (default: r's), under r's variance components.
    NaN for 1 seed (nothing measured) and when even ``max_seeds`` seeds fall short (the image
    part alone is too wide: more images, not seeds)."""
    _check_alpha_power(alpha, power)
    if not 0 < abs(delta) <= 1:
        raise ValueError(f"delta: expected a difference in (0, 1] (a fraction: 0.02 = 2 points), "
                         f"got {delta}")

    def enough(s: int) -> bool:
        return seed_aware_power(r, delta, n_seeds=s, n_images=n_images, alpha=alpha) >= power

    if r.n_seeds < 2 or not enough(max_seeds):
        return float("nan")
    lo, hi = 1, max_seeds         # enough(hi); the answer is in (lo, hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if enough(mid) else (mid, hi)
    return float(hi)


# --------------------------------------------------------------------------------------------
# multiplicity
def holm(p_values) -> np.ndarray:
    """Holm's step-down adjusted p-values of a family, in the given order (same shape).

    The i-th smallest of m p-values becomes ``max_{j <= i} min(1, (m - j + 1) p_(j))``
    (monotone in p, capped at 1). NaN stays NaN and does not count in m.
    """
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    flat = p.reshape(-1)
    ok = np.flatnonzero(~np.isnan(flat))
    outside = flat[ok][(flat[ok] < 0) | (flat[ok] > 1)]
    if outside.size:
        raise ValueError(f"holm: p-values must lie in [0, 1], got {outside[:3]}")
    order = ok[np.argsort(flat[ok], kind="stable")]
    m = len(order)
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * flat[order]))
    out.reshape(-1)[order] = adjusted
    return out


__all__ = ["wilson_interval", "sign_flip_p_value", "McNemarResult", "mcnemar_test",
           "paired_bootstrap", "minimum_detectable_difference", "SeedAware", "seed_aware",
           "seed_aware_power", "seed_aware_mde", "seeds_needed", "holm", "IMAGE_MODES",
           "PLAN_POWER", "PLAN_ALPHA", "MAX_PLAN_SEEDS", "check_image_mode"]
