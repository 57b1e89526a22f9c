"""Measure the hypothesis: do adversarial examples change semantics, and does SPAT preserve them?

docs/design.md, "Testing the hypothesis". The paper's claim is qualitative; this module turns it into
numbers a reader can check:

* an **oracle** decides what an image "means" without ever being seen by the attack
  (:mod:`spatlib.oracles`: k nearest neighbours on clean training pixels for small data such
  as digits, or independently trained models for CIFAR);
* :func:`semantic_report` runs attacks (PGD, SPAT with each rule, and the random control, all
  with the same eps, steps and step size; see :func:`standard_attacks`) and tabulates, per
  attack and eps, the attack success on the attacked model, the oracle flip rate with a Wilson
  interval, the drop of the oracle's p(y), how the perturbation mass splits between shared and
  class-specific pixels, and its L2 / L-inf size. With ``match_success=True`` every attack is
  also run at the eps where its success equals PGD's, so a weaker attack cannot look
  "semantics-preserving" merely by failing more;
* :func:`compare_attacks` pairs the attacks on the same images (exact McNemar test, Holm over
  the whole table: every SPAT variant against PGD and against its own random control at every
  eps) and writes a verdict about the one attacked model: fewer oracle flips than PGD *and*
  than the random control is evidence for semantics preservation; fewer than PGD while the
  control flips fewer still is budget redistribution; a difference the test cannot establish
  is "cannot be told apart with these images", never "does as well".

Imports point inward only: this module uses ``attacks``, ``semantics``, ``stats`` (the
Wilson interval and the exact McNemar test live there) and ``oracles``; they never import it.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from .attacks import MADRY_ALPHA_SCALE, PGD, Attack, assert_threat_model, make_attack
from .config import RADIUS_SUFFIX, attack_names, format_eps, parse_attack_name, parse_eps
from .semantics import SALIENCIES, perturbation_mass_share, shared_pixel_score
from .oracles import Oracle, as_unit_float
from .stats import McNemarResult, holm, mcnemar_test, wilson_interval
from .util import derive_seed, device_of, eval_mode, unknown_line

# an attack factory builds the attack for one eps: factory(model, eps, generator) -> Attack
AttackFactory = Callable[[nn.Module, float, torch.Generator], Attack]

SIGNIFICANCE = 0.05         # the level at which compare_attacks' verdict calls a difference real


# --------------------------------------------------------------------------------------------
# the attacks compared
def scaled_attack(model: nn.Module, eps: float, generator: torch.Generator | None = None, *,
                  rule: str = "none", steps: int = 20, alpha_scale: float = MADRY_ALPHA_SCALE,
                  saliency: str = "input_grad", gamma: float = 1.0, classes: str = "all",
                  random_start: bool | str = True, restarts: int = 1, loss: str = "ce",
                  bn_mode: str = "eval", budget: str = "step", radius_mean: float = 0.5) -> PGD:
    """PGD (``rule="none"``) or SPAT with ``rule`` and ``budget`` whose step size scales with
    eps: ``alpha = alpha_scale * eps / steps``.

    :func:`spatlib.attacks.make_attack` (the one factory, which this calls) takes the step
    size as given; here it follows eps, so that attacks compared at several eps (or at the eps
    found by matching success) stay equally well tuned.
    """
    if steps < 1:
        raise ValueError(f"steps: expected an integer >= 1, got {steps}")
    alpha = max(alpha_scale * eps / steps, 1e-12)   # eps = 0 is a valid (empty) budget
    return make_attack("pgd" if rule == "none" else "spat", model, eps=eps, alpha=alpha,
                       steps=steps, random_start=random_start, restarts=restarts, loss=loss,
                       bn_mode=bn_mode, generator=generator, rule=rule, saliency=saliency,
                       gamma=gamma, classes=classes, budget=budget, radius_mean=radius_mean)


def standard_attacks(names: Sequence[str] | None = None, *, steps: int = 20,
                     alpha_scale: float = MADRY_ALPHA_SCALE, saliency: str = "input_grad",
                     gamma: float = 1.0, classes: str = "all", random_start: bool | str = True,
                     restarts: int = 1, loss: str = "ce", radius_mean: float = 0.5
                     ) -> dict[str, AttackFactory]:
    """Factories for PGD, SPAT with each rule and budget, and the random controls, all alike but
    the rule and the budget.

    Same steps, the same step size ``alpha = alpha_scale * eps / steps`` (default 2.5 eps/steps,
    Madry et al.'s rule) and the same start, so the rule (and the budget) is the only difference.
    Names: those of :func:`attack_names`: ``pgd``, ``spat_<rule>`` (step budget: weighted steps in
    the eps-ball) and ``spat_<rule>:radius`` (radius budget: ``|delta_i| <= eps * r_i`` with mean
    radius ``radius_mean``) for ``intersection``, ``equality``, ``agreement`` (input_grad saliency
    only), ``random`` (the control) and any registered rule. ``names`` picks a subset.
    """
    if saliency not in SALIENCIES:
        raise ValueError(f"saliency: expected one of {', '.join(SALIENCIES)}, got {saliency!r}")
    available = attack_names(saliency)
    chosen = list(available if names is None else names)
    for n in chosen:
        if n not in available:
            raise ValueError(unknown_line(n, available, f"unknown attack {n!r}",
                                          f"available with saliency {saliency!r}"))
    settings = dict(steps=steps, alpha_scale=alpha_scale, saliency=saliency, gamma=gamma,
                    classes=classes, random_start=random_start, restarts=restarts, loss=loss,
                    radius_mean=radius_mean)
    out = {}
    for n in chosen:
        rule, budget = parse_attack_name(n)
        out[n] = functools.partial(scaled_attack, rule=rule, budget=budget, **settings)
    return out


# --------------------------------------------------------------------------------------------
# the report
@dataclass
class AttackOutcome:
    """Per-example results of one attack at one eps, as CPU numpy arrays of shape (N,)."""
    attack: str
    rule: str
    eps: float              # the budget used
    eps_nominal: float      # the eps of the report row (differs from eps when success-matched)
    model_correct: np.ndarray    # bool: the attacked model classifies clean x correctly
    model_fooled: np.ndarray     # bool: the attacked model misclassifies x_adv
    oracle_correct: np.ndarray   # bool: the oracle classifies clean x correctly
    oracle_flipped: np.ndarray   # bool: oracle(x_adv) != y
    p_drop: np.ndarray           # oracle p(y | x) - p(y | x_adv)
    specific_share: np.ndarray   # class-specific share of |delta| (NaN for delta = 0)
    l2: np.ndarray
    linf: np.ndarray
    budget: str = "step"         # step | radius (SPAT's budget shape; step for PGD)

    @property
    def attack_success(self) -> float:
        """Share of the model's clean-correct examples that x_adv misclassifies."""
        valid = self.model_correct
        return float(self.model_fooled[valid].mean()) if valid.any() else float("nan")

    @property
    def semantic_flips(self) -> np.ndarray:
        """bool (N,): the oracle was right on x and is wrong on x_adv (False where it was wrong)."""
        return self.oracle_correct & self.oracle_flipped


@dataclass
class _Clean:
    """What the report needs of the clean inputs, computed once for every attack."""
    x: Tensor                # (N, C, H, W) float32 in [0, 1], CPU
    y: Tensor                # (N,) long, CPU
    model_correct: Tensor    # (N,) bool
    oracle_correct: Tensor   # (N,) bool
    oracle_py: Tensor        # (N,) oracle p(y | x)
    score: Tensor            # (N, 1, H, W) intersection score of the attacked model at x


def _clean_pass(model, oracle, x, y, device, batch_size, saliency, classes, class_chunk) -> _Clean:
    correct, o_correct, o_py, scores = [], [], [], []
    for i in range(0, len(y), batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        with torch.no_grad():
            correct.append((model(xb).argmax(1) == yb).cpu())
        probs = oracle.predict_proba(xb).cpu()
        o_correct.append(probs.argmax(1) == yb.cpu())
        o_py.append(probs.gather(1, yb.cpu().view(-1, 1)).squeeze(1))
        # the intersection score of the attacked model: the "shared pixels" SPAT aims at
        scores.append(shared_pixel_score(model, xb, yb, "intersection", saliency, classes,
                                         class_chunk).detach().cpu())
    return _Clean(x, y, torch.cat(correct), torch.cat(o_correct), torch.cat(o_py), torch.cat(scores))


def _run_attack(model, oracle, factory: AttackFactory, name: str, eps: float, eps_nominal: float,
                clean: _Clean, device, batch_size: int, seed: int) -> tuple[AttackOutcome, Attack]:
    """One attack at one eps over all examples, seeded by (seed, name, nominal eps) alone, so a
    bisection over eps reuses the same random numbers at every trial eps."""
    gen = torch.Generator().manual_seed(derive_seed(seed, name, format_eps(eps_nominal)))
    attack = factory(model, eps, gen)
    fooled, flipped, p_drop, specific, l2, linf = [], [], [], [], [], []
    for i in range(0, len(clean.y), batch_size):
        xb, yb = clean.x[i:i + batch_size].to(device), clean.y[i:i + batch_size].to(device)
        result = attack.run(xb, yb)
        x_adv = result.x_adv
        assert_threat_model(xb, x_adv, eps, result.radius)   # per pixel for a radius budget
        with torch.no_grad():
            fooled.append((model(x_adv).argmax(1) != yb).cpu())
        probs = oracle.predict_proba(x_adv).cpu()
        y_cpu = yb.cpu()
        flipped.append(probs.argmax(1) != y_cpu)
        p_drop.append(clean.oracle_py[i:i + batch_size] - probs.gather(1, y_cpu.view(-1, 1)).squeeze(1))
        delta = (x_adv - xb).cpu()
        specific.append(perturbation_mass_share(delta, clean.score[i:i + batch_size])[0])
        l2.append(delta.flatten(1).norm(dim=1))
        linf.append(delta.flatten(1).abs().amax(1))

    def cat(parts):
        return torch.cat(parts).numpy()

    outcome = AttackOutcome(attack=name, rule=getattr(attack, "rule", "none"),
                            budget=getattr(attack, "budget", "step"), eps=float(eps),
                            eps_nominal=float(eps_nominal), model_correct=clean.model_correct.numpy(),
                            model_fooled=cat(fooled), oracle_correct=clean.oracle_correct.numpy(),
                            oracle_flipped=cat(flipped), p_drop=cat(p_drop), specific_share=cat(specific),
                            l2=cat(l2), linf=cat(linf))
    return outcome, attack


def _describe(factory: AttackFactory) -> str:
    """``scaled_attack(rule='intersection', steps=20, ...)`` for the standard factories."""
    if isinstance(factory, functools.partial):
        args = ", ".join(f"{k}={v!r}" for k, v in factory.keywords.items())
        return f"{getattr(factory.func, '__name__', factory.func)}({args})"
    return getattr(factory, "__qualname__", repr(factory))


def _nanmean(a: np.ndarray) -> float:
    a = a[~np.isnan(a)]
    return float(a.mean()) if a.size else float("nan")


def _row(outcome: AttackOutcome, attack: Attack, matched: bool, seed: int) -> dict:
    valid = outcome.oracle_correct
    n_valid = int(valid.sum())
    flips = int(outcome.semantic_flips.sum())
    low, high = wilson_interval(flips, n_valid)
    specific = _nanmean(outcome.specific_share)
    return {
        "attack": outcome.attack, "rule": outcome.rule, "budget": outcome.budget,
        "control": outcome.rule == "random",
        "eps_nominal": outcome.eps_nominal, "eps": outcome.eps, "eps_str": format_eps(outcome.eps),
        "matched": matched, "steps": getattr(attack, "steps", np.nan),
        "alpha": getattr(attack, "alpha", np.nan), "n": len(valid),
        "model_clean_acc": float(outcome.model_correct.mean()) if len(valid) else np.nan,
        "attack_success": outcome.attack_success,
        "oracle_clean_acc": float(valid.mean()) if len(valid) else np.nan,
        "oracle_n_valid": n_valid, "oracle_flips": flips,
        "oracle_flip_rate": flips / n_valid if n_valid else np.nan,
        "oracle_flip_ci_low": low, "oracle_flip_ci_high": high,
        "oracle_p_drop": float(outcome.p_drop[valid].mean()) if n_valid else np.nan,
        "specific_mass_share": specific, "shared_mass_share": 1 - specific,
        "shared_mass_share_pgd": np.nan, "shared_vs_pgd": np.nan,   # filled by semantic_report
        "l2": float(outcome.l2.mean()) if len(valid) else np.nan,
        "linf": float(outcome.linf.mean()) if len(valid) else np.nan,
        "seed": seed,
    }


def _match_success(model, oracle, factory, name, eps_nominal, target, clean, device, batch_size,
                   seed, iters, tol, max_scale):
    """The eps at which the attack's success reaches ``target`` (within ``tol``).

    Kept at the nominal eps when it is already within ``tol`` (equal eps and equal success at
    once). Otherwise ``iters`` bisection steps in [0, min(1, max_scale * eps)] for the smallest
    eps whose success reaches the target (success grows with eps; every trial reuses the same
    random numbers), and of the trials within ``tol`` the smallest eps is returned: when the
    target is saturated (PGD fools every example) any larger eps would match as well, and the
    least budget that matches is the fair one. No trial within ``tol``: the closest one.
    """
    lo, hi = 0.0, min(1.0, max_scale * eps_nominal)
    trial, trials = eps_nominal, []
    for i in range(iters + 1):
        outcome, attack = _run_attack(model, oracle, factory, name, trial, eps_nominal, clean,
                                      device, batch_size, seed)
        gap = outcome.attack_success - target
        trials.append((trial, abs(gap), outcome, attack))
        if i == 0 and not abs(gap) > tol:    # also stops on NaN (no clean-correct examples)
            break
        if gap < 0:
            lo = trial
        else:
            hi = trial
        trial = (lo + hi) / 2
    within = [t for t in trials if t[1] <= tol]
    _, _, outcome, attack = min(within, key=lambda t: t[0]) if within else min(trials, key=lambda t: t[1])
    return outcome, attack


def semantic_report(model: nn.Module, oracle: Oracle, x, y, attacks: Mapping[str, AttackFactory],
                    eps_list: Sequence[float | str], *, seed: int = 0, batch_size: int = 256,
                    match_success: bool = False, reference: str = "pgd", match_iters: int = 6,
                    match_tol: float = 0.01, match_max_scale: float = 2.0,
                    saliency: str = "input_grad", classes: str = "all", class_chunk: int = 16,
                    return_details: bool = False):
    """Do the attacks change what the images mean? One tidy row per attack and eps.

    model: the attacked model (its device is used); oracle: a classifier the attacks never see;
    x: (N, C, H, W) uint8 or float in [0, 1]; y: (N,) labels; attacks: name -> factory(model,
    eps, generator) (see :func:`standard_attacks`); eps_list: budgets in pixel units (``0.3``
    or ``"8/255"``).

    Columns: ``attack, rule, control`` (True for the random control), ``eps_nominal`` (the eps
    of eps_list), ``eps`` (the budget used), ``eps_str``, ``matched``, ``steps, alpha, n,
    model_clean_acc``, ``attack_success`` (share of the model's clean-correct examples that
    x_adv misclassifies), ``oracle_clean_acc, oracle_n_valid`` (the oracle's clean-correct
    examples), ``oracle_flips, oracle_flip_rate`` (oracle(x_adv) != y among them) with its 95%
    Wilson interval ``oracle_flip_ci_low/high``, ``oracle_p_drop`` (mean drop of the oracle's
    p(y) over the same examples), ``specific_mass_share, shared_mass_share`` (the split of
    |delta| by the attacked model's intersection score at the clean x, see
    :func:`perturbation_mass_share`; mean over examples), ``shared_mass_share_pgd`` and
    ``shared_vs_pgd`` (PGD's shared share at the same eps, and this attack's over it: the
    manipulation check, did the examples move?), ``budget`` (step | radius), ``l2, linf`` (mean
    perturbation norms), ``seed``. ``df.attrs`` records the oracle and the attack settings. ``saliency``, ``classes``
    and ``class_chunk`` say how that score is computed (match them to the attacks'). The mass
    split is measured with the attacked model's own score, so for SPAT it checks that the
    weights moved the budget; the oracle flip rate, not the split, is the evidence about meaning.

    ``match_success``: every attack but ``reference`` runs, instead of at the nominal eps, at
    the budget where its attack success comes within ``match_tol`` of the reference's: the
    nominal eps if it already does, else the smallest such eps found by ``match_iters``
    bisection steps in [0, match_max_scale * eps] (each step one more run of the attack);
    ``eps`` then holds the eps found, ``matched`` is True. The oracle flip rates at equal
    success are the fair comparison when the attacks differ in strength; where the reference's
    success is saturated (it fools nearly every example) matching is ill-conditioned (closing a
    1-point gap can take a much larger eps), so read matched rows at unsaturated eps.

    Randomness: one ``torch.Generator`` per (seed, attack, nominal eps), the global RNG is never
    touched; the numbers are a function of (seed, batch_size, inputs, model). Every x_adv is
    checked against the threat model. ``return_details``: also return a dict
    ``(attack, eps_nominal) -> AttackOutcome`` of per-example results for :func:`compare_attacks`.
    """
    if not attacks:
        raise ValueError("semantic_report: no attacks given")
    if match_success and reference not in attacks:
        raise ValueError(f"match_success needs the reference attack {reference!r} among the attacks "
                         f"({', '.join(attacks)})")
    eps_values = [parse_eps(e, "eps_list") for e in eps_list]
    bad = [e for e in eps_values if not 0.0 <= e <= 1.0]
    if bad:
        raise ValueError(f"eps_list: budgets must be in [0, 1] (pixel units), got {bad}")
    x = as_unit_float(x)
    y = torch.as_tensor(y).long().cpu()
    if x.ndim != 4 or len(x) != len(y):
        raise ValueError(f"semantic_report: expected x (N, C, H, W) and y (N,), got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    device = device_of(model)
    rows, details = [], {}
    with eval_mode(model):
        clean = _clean_pass(model, oracle, x.cpu(), y, device, batch_size, saliency, classes, class_chunk)
        for eps in eps_values:
            runs = {}
            if match_success:    # the reference first: its success is the target
                runs[reference] = _run_attack(model, oracle, attacks[reference], reference, eps, eps,
                                              clean, device, batch_size, seed)
                target = runs[reference][0].attack_success
            for name, factory in attacks.items():
                if name in runs:
                    continue
                if match_success:
                    runs[name] = _match_success(model, oracle, factory, name, eps, target, clean, device,
                                                batch_size, seed, match_iters, match_tol, match_max_scale)
                else:
                    runs[name] = _run_attack(model, oracle, factory, name, eps, eps, clean, device,
                                             batch_size, seed)
            for name in attacks:
                outcome, attack = runs[name]
                rows.append(_row(outcome, attack, match_success and name != reference, seed))
                details[(name, eps)] = outcome
    df = _with_pgd_share(pd.DataFrame(rows))
    df.attrs.update(seed=seed, batch_size=batch_size, oracle=repr(oracle), saliency=saliency,
                    attacks={n: _describe(f) for n, f in attacks.items()})
    return (df, details) if return_details else df


def _with_pgd_share(df: pd.DataFrame, reference: str = "pgd") -> pd.DataFrame:
    """The manipulation check beside every row: PGD's shared share of |delta| at the same nominal
    eps (``shared_mass_share_pgd``) and the row's share over it (``shared_vs_pgd``: 1 = the
    attack puts its perturbation where PGD does; NaN without a PGD row)."""
    if df.empty or reference not in set(df["attack"]):
        return df
    pgd = df[df["attack"] == reference].set_index("eps_nominal")["shared_mass_share"]
    df["shared_mass_share_pgd"] = df["eps_nominal"].map(pgd)
    df["shared_vs_pgd"] = df["shared_mass_share"] / df["shared_mass_share_pgd"]
    return df


# --------------------------------------------------------------------------------------------
# paired comparison and verdict
def _points(d: float) -> str:
    return f"{100 * d:+.1f} points"


def _versus(other: str, rate_self: float, rate_other: float, p_holm: float,
            alpha: float) -> tuple[int, str]:
    """(-1 fewer flips, +1 more, 0 cannot be told apart; the clause) for one paired test."""
    said = (f"{rate_self:.1%} vs {rate_other:.1%} oracle flips, {_points(rate_self - rate_other)}, "
            f"Holm p = {p_holm:.2g}")
    if p_holm < alpha:
        sign = -1 if rate_self < rate_other else 1
        return sign, f"vs {other}: {'fewer' if sign < 0 else 'more'} flips ({said})"
    return 0, f"vs {other}: cannot be told apart with these images ({said})"


def _verdict(row: Mapping, alpha: float) -> str:
    """One row of :func:`compare_attacks` in words, about the one attacked model, from the
    Holm-adjusted p-values (not significant is never read as equal)."""
    variant, baseline, control = row["attack"], row["baseline"], row["control"]
    control = control if isinstance(control, str) else None
    sign_b, vs_b = _versus(baseline, row["flip_attack"], row["flip_baseline"], row["p_holm_vs_baseline"],
                           alpha)
    head = f"on this attacked model, {variant} {vs_b}"
    if control is None:
        if sign_b < 0:
            return f"{head}: fewer oracle flips, but no random control to rule out budget redistribution"
        return head
    sign_c, vs_c = _versus(control, row["flip_attack"], row["flip_control"], row["p_holm_vs_control"],
                           alpha)
    head = f"{head}; {vs_c}"
    if sign_b < 0 and sign_c < 0:
        return (f"{head}: fewer than both {baseline} and its random control: consistent with "
                f"semantics preservation")
    if sign_b < 0 and sign_c > 0:
        return f"{head}: the random control flips fewer still: budget redistribution, not semantics"
    if sign_b < 0:
        return (f"{head}: fewer than {baseline}, but its random control cannot be told apart from it, "
                f"so budget redistribution is not ruled out")
    if sign_b > 0:
        return f"{head}: {variant} changes the oracle's label more often than {baseline}"
    return f"{head}: no evidence about semantics preservation with these images"


def _find(details: Mapping, name: str, eps: float) -> AttackOutcome:
    for (n, e), outcome in details.items():
        if n == name and math.isclose(e, eps, rel_tol=1e-9, abs_tol=1e-12):
            return outcome
    raise KeyError(f"no results for attack {name!r} at eps {format_eps(eps)}; have "
                   f"{sorted({n for n, _ in details})} at {sorted({format_eps(e) for _, e in details})}")


def compare_attacks(details: Mapping, comparisons: Sequence[tuple[str, str, str | None]] | None = None,
                    *, eps: float | str | None = None, alpha: float = SIGNIFICANCE) -> pd.DataFrame:
    """Paired comparison of oracle flips on the same images, one row per (nominal eps, variant).

    details: the dict from ``semantic_report(..., return_details=True)``; comparisons: (variant,
    baseline, control or None) triples, default :func:`attack_comparisons` of the attacks in
    ``details``; eps: one nominal eps (default: every eps of the variant). Only examples the
    oracle classifies correctly when clean are paired (the same ones for every attack: the
    oracle_n_valid examples of the report). Columns: ``eps, eps_str, attack, baseline, control,
    n, flip_attack, flip_baseline, flip_control``, ``diff_vs_baseline`` (attack minus baseline
    flip rate), ``attack_only_vs_baseline, baseline_only, p_vs_baseline`` (exact McNemar),
    ``p_holm_vs_baseline``, the same for the control (NaN without one), and a ``verdict``.

    The table is one family: Holm's adjustment runs over every test in it (each variant
    against the baseline and against its control, at every eps), and the verdict reads the
    adjusted p-values at ``alpha``. The verdict is about the one attacked model (one network,
    paired images): fewer flips than the baseline *and* than the control reads as semantics
    preservation; fewer than the baseline while the control flips fewer still as budget
    redistribution; a difference the test cannot establish is "cannot be told apart with these
    images", never equality.
    """
    if comparisons is None:
        comparisons = attack_comparisons(list(dict.fromkeys(n for n, _ in details)))
    rows = []
    for variant, baseline, control in comparisons:
        eps_values = sorted({e for n, e in details if n == variant}) if eps is None else [parse_eps(eps)]
        for e in eps_values:
            a = _find(details, variant, e)
            b = _find(details, baseline, e)
            c = _find(details, control, e) if control is not None else None
            valid = a.oracle_correct
            fa, fb = a.oracle_flipped[valid], b.oracle_flipped[valid]
            n = int(valid.sum())
            rate = (lambda f: float(f.mean()) if n else float("nan"))
            mb = mcnemar_test(fa, fb)
            row = {"eps": e, "eps_str": format_eps(e), "attack": variant, "baseline": baseline,
                   "control": control, "n": n, "flip_attack": rate(fa), "flip_baseline": rate(fb),
                   "flip_control": np.nan, "diff_vs_baseline": rate(fa) - rate(fb),
                   "attack_only_vs_baseline": mb.a_only, "baseline_only": mb.b_only,
                   "p_vs_baseline": mb.p_value, "diff_vs_control": np.nan,
                   "attack_only_vs_control": np.nan, "control_only": np.nan, "p_vs_control": np.nan}
            if c is not None:
                fc = c.oracle_flipped[valid]
                mc = mcnemar_test(fa, fc)
                row.update(flip_control=rate(fc), diff_vs_control=rate(fa) - rate(fc),
                           attack_only_vs_control=mc.a_only, control_only=mc.b_only,
                           p_vs_control=mc.p_value)
            rows.append(row)
    if not rows:
        raise ValueError(f"compare_attacks: no results for {[t[0] for t in comparisons]} at eps "
                         f"{eps if eps is not None else 'any'}; have {sorted({n for n, _ in details})}")
    df = pd.DataFrame(rows).sort_values("eps", kind="stable", ignore_index=True)
    adjusted = holm(np.concatenate([df["p_vs_baseline"].to_numpy(float),
                                    df["p_vs_control"].to_numpy(float)]))
    df.insert(df.columns.get_loc("p_vs_baseline") + 1, "p_holm_vs_baseline", adjusted[:len(df)])
    df["p_holm_vs_control"] = adjusted[len(df):]
    df["verdict"] = [_verdict(r, alpha) for _, r in df.iterrows()]
    return df


# --------------------------------------------------------------------------------------------
# notebook 01's tables
def _control_of(variant: str) -> str:
    """``spat_<rule>`` -> ``spat_random``; ``spat_<rule>:radius`` -> ``spat_random:radius``."""
    return "spat_random" + (RADIUS_SUFFIX if parse_attack_name(variant)[1] == "radius" else "")


def attack_comparisons(attacks: Sequence[str]) -> list[tuple[str, str, str | None]]:
    """(variant, baseline, control) for :func:`compare_attacks`: every SPAT variant among
    ``attacks`` (``spat_<rule>`` and ``spat_<rule>:<budget mode>``, in their order) against
    ``pgd`` and against its own random control (``spat_random``, resp. ``spat_random:<mode>``;
    None where it is not among the attacks)."""
    attacks = list(attacks)
    if "pgd" not in attacks:
        raise ValueError(f"attacks: the comparison needs 'pgd' as the baseline, got {attacks}")
    variants = [a for a in attacks if a.startswith("spat_") and parse_attack_name(a)[0] != "random"]
    if not variants:
        raise ValueError(f"attacks: the comparison needs a SPAT rule besides the control, got {attacks}")
    return [(v, "pgd", _control_of(v) if _control_of(v) in attacks else None) for v in variants]


def semantic_summary(report: pd.DataFrame) -> pd.DataFrame:
    """attack x eps table of the measurements a reader compares (percent, one decimal): success,
    oracle flips with their interval, p(y) drop, and the manipulation check: the shared share of
    |delta| beside PGD's at the same eps and their ratio (``x PGD``: 1.0 = the same pixels as PGD)."""
    cols = {"attack_success": "success %", "oracle_flip_rate": "oracle flips %",
            "oracle_p_drop": "oracle p(y) drop %", "shared_mass_share": "shared share %",
            "shared_mass_share_pgd": "PGD's shared share %"}
    df = report.copy()
    for c in cols:
        df[c] = (100 * df[c].astype(float)).round(1)
    df["oracle flips 95% CI"] = [f"[{100 * lo:.1f}, {100 * hi:.1f}]"
                                 for lo, hi in zip(df["oracle_flip_ci_low"], df["oracle_flip_ci_high"])]
    df["shared x PGD"] = df["shared_vs_pgd"].astype(float).round(2)
    keep = ["attack", "eps_str", *cols, "shared x PGD", "oracle flips 95% CI", "l2"]
    keep.insert(keep.index("oracle_flip_rate") + 1, keep.pop(keep.index("oracle flips 95% CI")))
    return df[keep].rename(columns={**cols, "eps_str": "eps", "l2": "mean L2"}).round({"mean L2": 3})


__all__ = ["AttackFactory", "scaled_attack", "standard_attacks", "attack_names",
           "semantic_summary", "MADRY_ALPHA_SCALE", "wilson_interval", "McNemarResult",
           "mcnemar_test", "perturbation_mass_share", "AttackOutcome", "semantic_report",
           "compare_attacks", "attack_comparisons"]
