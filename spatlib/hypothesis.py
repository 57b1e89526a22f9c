"""Measure the hypothesis: do adversarial examples change semantics, and does SPAT preserve them?

docs/design.md, "Testing the hypothesis". The paper's claim is qualitative; this module turns it into
numbers a reader can check:

* an **oracle** decides what an image "means" without ever being seen by the attack:
  :class:`KNNOracle` (k nearest neighbours on clean training pixels, for small data such as
  digits) or :class:`EnsembleOracle` (independently trained models, e.g. robust models of other
  seeds or architectures, for CIFAR);
* :func:`semantic_report` runs attacks (PGD, SPAT with each rule, and the random control, all
  with the same eps, steps and step size; see :func:`standard_attacks`) and tabulates, per
  attack and eps, the attack success on the attacked model, the oracle flip rate with a Wilson
  interval, the drop of the oracle's p(y), how the perturbation mass splits between shared and
  class-specific pixels, and its L2 / L-inf size. With ``match_success=True`` every attack is
  also run at the eps where its success equals PGD's, so a weaker attack cannot look
  "semantics-preserving" merely by failing more;
* :func:`compare_attacks` pairs the attacks on the same images (exact McNemar test) and writes a
  verdict: fewer oracle flips than PGD *and* than the random control is evidence for semantics
  preservation; fewer than PGD but no fewer than the control is budget redistribution.

Imports point inward only: this module uses ``attacks`` and ``semantics``; they never import it.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, NamedTuple, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attacks import MADRY_ALPHA_SCALE, PGD, Attack, assert_threat_model
from .attacks import make_attack as _make
from .config import attack_names, format_eps, parse_eps
from .semantics import SALIENCIES, shared_pixel_score
from .util import derive_seed, device_of, eval_mode
from .zoo import ZOO_DATASETS, ZOO_PREFIX, load_zoo_model

# an attack factory builds the attack for one eps: factory(model, eps, generator) -> Attack
AttackFactory = Callable[[nn.Module, float, torch.Generator], Attack]

SIGNIFICANCE = 0.05         # the level at which compare_attacks' verdict calls a difference real


# --------------------------------------------------------------------------------------------
# input helpers
def _as_unit_float(x, name: str = "x") -> Tensor:
    """uint8 (0..255) or float in [0, 1], tensor or numpy -> float32 tensor in [0, 1]."""
    x = torch.as_tensor(x)
    if x.dtype == torch.uint8:
        return x.float().div(255)
    x = x.float()
    if x.numel() and (float(x.min()) < 0.0 or float(x.max()) > 1.0):
        raise ValueError(f"{name}: expected uint8 images or floats in [0, 1], got values in "
                         f"[{float(x.min()):.3g}, {float(x.max()):.3g}]")
    return x


# --------------------------------------------------------------------------------------------
# oracles
class Oracle:
    """A classifier the attack never sees; it stands in for "what the image means".

    Subclasses implement :meth:`predict_proba`. Inputs are images (N, C, H, W) in [0, 1] on any
    device; outputs are on the input's device.
    """

    num_classes: int

    def predict_proba(self, x: Tensor) -> Tensor:
        """x (N, C, H, W) in [0, 1] -> class probabilities (N, K), float32, rows sum to 1."""
        raise NotImplementedError

    def predict(self, x: Tensor) -> Tensor:
        """x (N, C, H, W) in [0, 1] -> labels (N,) long (ties: the smallest class index)."""
        return self.predict_proba(x).argmax(1)

    def accuracy(self, x: Tensor, y: Tensor, batch_size: int = 1024) -> float:
        """Clean accuracy on (x, y); x uint8 or [0, 1] floats."""
        x, y = _as_unit_float(x), torch.as_tensor(y)
        if len(y) == 0:
            return float("nan")
        hits = sum(int((self.predict(x[i:i + batch_size]).cpu() == y[i:i + batch_size].cpu()).sum())
                   for i in range(0, len(y), batch_size))
        return hits / len(y)


class KNNOracle(Oracle):
    """k nearest neighbours (Euclidean) on the flattened clean training pixels in [0, 1].

    The "probability" of class c is the share of the k neighbours' votes that c gets
    (``weights="uniform"``) or its inverse-distance-weighted share (``weights="distance"``), so
    with uniform votes it moves in steps of 1/k. A kNN classifier on pixels is a fair oracle for
    small, aligned images (digits, MNIST): it knows nothing of the attacked network, and an
    image moves to another class only by coming to look like that class's training images.
    """

    def __init__(self, x_train, y_train, k: int = 5, *, weights: str = "uniform",
                 num_classes: int | None = None):
        from sklearn.neighbors import KNeighborsClassifier   # import here: sklearn is slow to load

        x = _as_unit_float(x_train, "x_train")
        y = torch.as_tensor(y_train).long().cpu()
        if x.ndim < 2 or len(x) != len(y):
            raise ValueError(f"KNNOracle: {len(x)} images but {len(y)} labels")
        if not 1 <= k <= len(y):
            raise ValueError(f"KNNOracle: k must be in [1, {len(y)}], got {k}")
        self.k = int(k)
        self.weights = weights
        self.num_classes = int(num_classes if num_classes is not None else int(y.max()) + 1)
        self.image_shape = tuple(x.shape[1:])
        self._knn = KNeighborsClassifier(n_neighbors=self.k, weights=weights)
        self._knn.fit(x.reshape(len(x), -1).cpu().numpy(), y.numpy())
        # sklearn's columns are the classes present in y_train; map them into 0..K-1
        self._columns = torch.as_tensor(self._knn.classes_, dtype=torch.long)

    def predict_proba(self, x: Tensor) -> Tensor:
        """x (N, C, H, W) in [0, 1] -> neighbour vote shares (N, K)."""
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"KNNOracle: fitted on images {self.image_shape}, got {tuple(x.shape[1:])}")
        flat = _as_unit_float(x.detach()).reshape(len(x), -1).cpu().numpy()
        votes = torch.as_tensor(self._knn.predict_proba(flat), dtype=torch.float32)
        out = torch.zeros(len(x), self.num_classes)
        out[:, self._columns] = votes
        return out.to(x.device)

    def __repr__(self) -> str:
        return (f"KNNOracle(k={self.k}, weights={self.weights!r}, n_train={self._knn.n_samples_fit_}, "
                f"classes={self.num_classes})")


class EnsembleOracle(Oracle):
    """The mean softmax of several independently trained models (each in eval mode, no grad).

    For CIFAR-sized data, where pixel-space neighbours mean little: e.g. robust models of other
    seeds or architectures than the attacked one, or of RobustBench's zoo. Each model runs on
    its own device.
    """

    def __init__(self, models: Sequence[nn.Module], *, batch_size: int = 512):
        self.models = list(models)
        if not self.models:
            raise ValueError("EnsembleOracle: needs at least one model")
        ks = {getattr(m, "num_classes", None) for m in self.models} - {None}
        if len(ks) > 1:
            raise ValueError(f"EnsembleOracle: the models disagree on the number of classes: {sorted(ks)}")
        self.num_classes = ks.pop() if ks else None   # else known after the first prediction
        self.batch_size = int(batch_size)

    @torch.no_grad()
    def predict_proba(self, x: Tensor) -> Tensor:
        """x (N, C, H, W) in [0, 1] -> mean softmax over the models (N, K)."""
        x = _as_unit_float(x)
        total = 0
        with eval_mode(*self.models):
            for m in self.models:
                dev = device_of(m)
                probs = [F.softmax(m(x[i:i + self.batch_size].to(dev)).float(), 1).to(x.device)
                         for i in range(0, max(len(x), 1), self.batch_size)]
                total = total + torch.cat(probs)
        self.num_classes = total.shape[1]
        return total / len(self.models)

    @classmethod
    def from_checkpoints(cls, paths: Iterable[str | Path], *, which: str = "best",
                         device: str | torch.device = "cpu", batch_size: int = 512,
                         dataset: str | None = None) -> "EnsembleOracle":
        """An ensemble of trained runs on ``device``, via ``spatlib.runfolder.load_run_model``,
        and of RobustBench zoo models.

        paths: run folders (``which``: ``best``, ``last`` or ``ema`` weights) or their
        ``checkpoint_best.pt`` / ``checkpoint_last.pt`` files (the file decides best or last;
        ``which="ema"`` picks the EMA of a last checkpoint). The model is rebuilt from the
        config saved in the checkpoint, so runs of other architectures mix freely.
        ``robustbench:NAME``: the Linf zoo model of ``dataset`` (cifar10 or cifar100) from
        :func:`spatlib.zoo.default_model_dir` (:func:`spatlib.zoo.load_zoo_model`).
        """
        from . import runfolder   # lazy: loading runs is the caller's choice

        by_file = {runfolder.BEST: "best", runfolder.LAST: "last"}
        models = []
        for entry in paths:
            if str(entry).startswith(ZOO_PREFIX):
                if dataset not in ZOO_DATASETS:
                    raise ValueError(f"EnsembleOracle: {entry}: a zoo model is looked up in the "
                                     f"dataset's zoo ({', '.join(ZOO_DATASETS)}), and the data is "
                                     f"{dataset!r}")
                zoo_model, _ = load_zoo_model(str(entry)[len(ZOO_PREFIX):], dataset=dataset)
                models.append(zoo_model.to(device))
                continue
            p = Path(entry)
            if p.is_file():
                if p.name not in by_file:
                    raise ValueError(f"EnsembleOracle: {p} is not a run's {runfolder.BEST} or {runfolder.LAST}; "
                                     f"pass the run folder")
                run_dir = p.parent
                kind = "ema" if (by_file[p.name] == "last" and which == "ema") else by_file[p.name]
            elif p.is_dir():
                run_dir, kind = p, which
            else:
                raise FileNotFoundError(f"EnsembleOracle: no run folder or checkpoint at {p}")
            models.append(runfolder.load_run_model(run_dir, which=kind, device=device)[0])
        return cls(models, batch_size=batch_size)

    def __repr__(self) -> str:
        names = ", ".join(type(m).__name__ for m in self.models)
        return f"EnsembleOracle([{names}])"


def build_oracle(kind: str, dataset=None, *, k: int = 5, checkpoints: Sequence[str | Path] = (),
                 which: str = "best", device: str | torch.device = "cpu") -> Oracle:
    """An oracle from notebook parameters: ``"knn"`` (needs ``dataset``, fits on its clean
    training split) or ``"ensemble"`` (needs ``checkpoints``: run folders, checkpoint files or
    ``robustbench:NAME`` zoo models of ``dataset``'s zoo)."""
    if kind == "knn":
        if dataset is None:
            raise ValueError("oracle 'knn' needs the dataset (it fits on the clean training images)")
        return KNNOracle(dataset.x_train, dataset.y_train, k=k, num_classes=dataset.num_classes)
    if kind == "ensemble":
        if not checkpoints:
            raise ValueError("oracle 'ensemble' needs checkpoints: run folders of independently "
                             "trained models (other seeds or architectures than the attacked one)")
        return EnsembleOracle.from_checkpoints(checkpoints, which=which, device=device,
                                               dataset=getattr(dataset, "name", None))
    raise ValueError(f"oracle: expected 'knn' or 'ensemble', got {kind!r}")


# --------------------------------------------------------------------------------------------
# the attacks compared
def make_attack(model: nn.Module, eps: float, generator: torch.Generator | None = None, *,
                rule: str = "none", steps: int = 20, alpha_scale: float = MADRY_ALPHA_SCALE,
                saliency: str = "input_grad", gamma: float = 1.0, classes: str = "all",
                random_start: bool | str = True, restarts: int = 1, loss: str = "ce",
                bn_mode: str = "eval") -> PGD:
    """PGD (``rule="none"``) or SPAT with ``rule``, with ``alpha = alpha_scale * eps / steps``.

    The step size scales with eps so that attacks compared at several eps (or at the eps found
    by matching success) stay equally well tuned. Built by :func:`spatlib.attacks.make_attack`.
    """
    if steps < 1:
        raise ValueError(f"steps: expected an integer >= 1, got {steps}")
    alpha = max(alpha_scale * eps / steps, 1e-12)   # eps = 0 is a valid (empty) budget
    return _make("pgd" if rule == "none" else "spat", model, eps=eps, alpha=alpha, steps=steps,
                 random_start=random_start, restarts=restarts, loss=loss, bn_mode=bn_mode,
                 generator=generator, rule=rule, saliency=saliency, gamma=gamma, classes=classes)


def standard_attacks(names: Sequence[str] | None = None, *, steps: int = 20,
                     alpha_scale: float = MADRY_ALPHA_SCALE, saliency: str = "input_grad",
                     gamma: float = 1.0, classes: str = "all", random_start: bool | str = True,
                     restarts: int = 1, loss: str = "ce") -> dict[str, AttackFactory]:
    """Factories for PGD, SPAT with each rule, and the random control, all alike but the rule.

    Same steps, the same step size ``alpha = alpha_scale * eps / steps`` (default 2.5 eps/steps,
    Madry et al.'s rule) and the same start, so the rule is the only difference. Names: those of
    :func:`attack_names` (``pgd``, ``spat_intersection``, ``spat_equality``, ``spat_agreement``
    with input_grad saliency only, ``spat_random``: the control, and any registered rule).
    ``names`` picks a subset.
    """
    if saliency not in SALIENCIES:
        raise ValueError(f"saliency: expected one of {', '.join(SALIENCIES)}, got {saliency!r}")
    available = attack_names(saliency)
    chosen = list(available if names is None else names)
    unknown = [n for n in chosen if n not in available]
    if unknown:
        raise ValueError(f"unknown attack(s) {unknown}; available with saliency {saliency!r}: "
                         f"{', '.join(available)}")
    settings = dict(steps=steps, alpha_scale=alpha_scale, saliency=saliency, gamma=gamma,
                    classes=classes, random_start=random_start, restarts=restarts, loss=loss)
    return {n: functools.partial(make_attack, rule="none" if n == "pgd" else n[len("spat_"):],
                                 **settings) for n in chosen}


# --------------------------------------------------------------------------------------------
# statistics
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


class McNemarResult(NamedTuple):
    """Paired comparison of two binary outcomes on the same examples."""
    a_only: int       # examples where a flipped and b did not
    b_only: int       # examples where b flipped and a did not
    p_value: float    # exact two-sided binomial p-value on the discordant pairs


def mcnemar_test(flips_a, flips_b) -> McNemarResult:
    """Exact McNemar test: under H0 the discordant pairs split Binomial(a_only + b_only, 1/2).

    flips_a, flips_b: boolean arrays (N,) over the same examples. Two-sided p-value
    ``min(1, 2 * P(X <= min(a_only, b_only)))``, computed exactly with integers.
    """
    a = np.asarray(flips_a, dtype=bool)
    b = np.asarray(flips_b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"mcnemar_test: paired outcomes need equal shapes, got {a.shape} and {b.shape}")
    a_only, b_only = int((a & ~b).sum()), int((b & ~a).sum())
    n = a_only + b_only
    if n == 0:
        return McNemarResult(0, 0, 1.0)
    tail = sum(math.comb(n, i) for i in range(min(a_only, b_only) + 1))
    return McNemarResult(a_only, b_only, min(1.0, 2 * tail / 2**n))


def perturbation_mass_share(delta: Tensor, score: Tensor) -> tuple[Tensor, Tensor]:
    """How the L1 mass of a perturbation splits between class-specific and shared pixels.

    delta: (N, C, H, W) perturbation ``x_adv - x``; score: (N, 1 | C, H, W) shared-pixel score
    in [0, 1] (the intersection score at the clean x). Soft split, no threshold to choose:
    ``shared = sum(|delta| * s) / sum(|delta|)``, ``specific = 1 - shared``, per example; NaN
    where delta is all zero. "Specific" is the complement of "shared": a pixel that no class
    relies on counts there too (input gradients of real networks are rarely exactly zero).
    Returns (specific, shared), each (N,) float32.
    """
    mass = delta.detach().float().abs()
    total = mass.flatten(1).sum(1)
    shared_mass = (mass * score.float().to(mass.device)).flatten(1).sum(1)
    nan = torch.full_like(total, float("nan"))
    shared = torch.where(total > 0, shared_mass / total.clamp_min(1e-30), nan)
    return 1 - shared, shared


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
        x_adv = attack(xb, yb)
        assert_threat_model(xb, x_adv, eps)
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

    outcome = AttackOutcome(attack=name, rule=getattr(attack, "rule", "none"), eps=float(eps),
                            eps_nominal=float(eps_nominal), model_correct=clean.model_correct.numpy(),
                            model_fooled=cat(fooled), oracle_correct=clean.oracle_correct.numpy(),
                            oracle_flipped=cat(flipped), p_drop=cat(p_drop), specific_share=cat(specific),
                            l2=cat(l2), linf=cat(linf))
    return outcome, attack


def _describe(factory: AttackFactory) -> str:
    """``make_attack(rule='intersection', steps=20, ...)`` for the standard factories."""
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
        "attack": outcome.attack, "rule": outcome.rule, "control": outcome.rule == "random",
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
    :func:`perturbation_mass_share`; mean over examples), ``l2, linf`` (mean perturbation norms),
    ``seed``. ``df.attrs`` records the oracle and the attack settings. ``saliency``, ``classes``
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
    x = _as_unit_float(x)
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
    df = pd.DataFrame(rows)
    df.attrs.update(seed=seed, batch_size=batch_size, oracle=repr(oracle), saliency=saliency,
                    attacks={n: _describe(f) for n, f in attacks.items()})
    return (df, details) if return_details else df


# --------------------------------------------------------------------------------------------
# paired comparison and verdict
def _points(d: float) -> str:
    return f"{100 * d:+.1f} points"


def _verdict(attack: str, baseline: str, control: str | None, diff_b: float, p_b: float,
             diff_c: float, p_c: float, alpha: float) -> str:
    vs_b = f"{_points(diff_b)}, p={p_b:.2g}"
    if not p_b < alpha:
        return (f"{attack} vs {baseline}: {vs_b}: no significant difference in oracle flips at "
                f"this sample size")
    if diff_b > 0:
        return f"{attack} vs {baseline}: {vs_b}: {attack} changes the oracle's label more often"
    head = f"{attack} vs {baseline}: {vs_b}"
    if control is None:
        return f"{head}: fewer oracle flips (no random control to rule out budget redistribution)"
    vs_c = f"{attack} vs {control}: {_points(diff_c)}, p={p_c:.2g}"
    if p_c < alpha and diff_c < 0:
        return (f"{head}; {vs_c}: fewer oracle flips than both {baseline} and the random control: "
                f"consistent with semantics preservation")
    if p_c < alpha:
        return (f"{head}; {vs_c}: the random control flips even fewer: budget redistribution, "
                f"not semantics")
    return f"{head}; {vs_c}: the random control does as well: budget redistribution, not semantics"


def _find(details: Mapping, name: str, eps: float) -> AttackOutcome:
    for (n, e), outcome in details.items():
        if n == name and math.isclose(e, eps, rel_tol=1e-9, abs_tol=1e-12):
            return outcome
    raise KeyError(f"no results for attack {name!r} at eps {format_eps(eps)}; have "
                   f"{sorted({n for n, _ in details})} at {sorted({format_eps(e) for _, e in details})}")


def compare_attacks(details: Mapping, attack: str = "spat_intersection", baseline: str = "pgd",
                    control: str | None = "spat_random", eps: float | str | None = None,
                    alpha: float = SIGNIFICANCE) -> pd.DataFrame:
    """Paired comparison of oracle flips on the same images, one row per nominal eps.

    details: the dict from ``semantic_report(..., return_details=True)``. Only examples the
    oracle classifies correctly when clean are paired (the same ones for every attack, so the
    pairs are the oracle_n_valid examples of the report). Columns: ``eps, eps_str, n,
    flip_attack, flip_baseline, flip_control``, ``diff_vs_baseline`` (attack minus baseline flip
    rate), ``attack_only_vs_baseline, baseline_only, p_vs_baseline`` (exact McNemar), the same
    three ``..._vs_control`` / ``control_only`` for the control (NaN without one), and a
    ``verdict``: fewer flips than the baseline *and* than the control (both p < alpha) reads as
    semantics preservation; fewer than the baseline only reads as budget redistribution.
    """
    if eps is None:
        eps_values = sorted({e for n, e in details if n == attack})
    else:
        eps_values = [parse_eps(eps)]
    rows = []
    for e in eps_values:
        a = _find(details, attack, e)
        b = _find(details, baseline, e)
        c = _find(details, control, e) if control is not None else None
        valid = a.oracle_correct
        fa, fb = a.oracle_flipped[valid], b.oracle_flipped[valid]
        n = int(valid.sum())
        rate = (lambda f: float(f.mean()) if n else float("nan"))
        mb = mcnemar_test(fa, fb)
        row = {"eps": e, "eps_str": format_eps(e), "attack": attack, "baseline": baseline,
               "control": control, "n": n, "flip_attack": rate(fa), "flip_baseline": rate(fb),
               "flip_control": np.nan, "diff_vs_baseline": rate(fa) - rate(fb),
               "attack_only_vs_baseline": mb.a_only, "baseline_only": mb.b_only,
               "p_vs_baseline": mb.p_value, "diff_vs_control": np.nan,
               "attack_only_vs_control": np.nan, "control_only": np.nan, "p_vs_control": np.nan}
        if c is not None:
            fc = c.oracle_flipped[valid]
            mc = mcnemar_test(fa, fc)
            row.update(flip_control=rate(fc), diff_vs_control=rate(fa) - rate(fc),
                       attack_only_vs_control=mc.a_only, control_only=mc.b_only, p_vs_control=mc.p_value)
        row["verdict"] = _verdict(attack, baseline, control, row["diff_vs_baseline"], row["p_vs_baseline"],
                                  row["diff_vs_control"], row["p_vs_control"], alpha)
        rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# notebook 01's tables
def comparison_names(attacks: Sequence[str]) -> tuple[str, str, str | None]:
    """(attack, baseline, control) for :func:`spatlib.hypothesis.compare_attacks`: SPAT's
    default rule (or the first SPAT rule given) against PGD, with the random rule as control."""
    if "pgd" not in attacks:
        raise ValueError(f"attacks: the comparison needs 'pgd' as the baseline, got {list(attacks)}")
    spat = [a for a in attacks if a.startswith("spat_") and a != "spat_random"]
    if not spat:
        raise ValueError(f"attacks: the comparison needs a SPAT rule besides the control, got {list(attacks)}")
    attack = "spat_intersection" if "spat_intersection" in spat else spat[0]
    return attack, "pgd", "spat_random" if "spat_random" in attacks else None


def semantic_summary(report: pd.DataFrame) -> pd.DataFrame:
    """attack x eps table of the measurements a reader compares (percent, one decimal)."""
    cols = {"attack_success": "success %", "oracle_flip_rate": "oracle flips %",
            "oracle_p_drop": "oracle p(y) drop %", "specific_mass_share": "specific share %"}
    df = report.copy()
    for c in cols:
        df[c] = (100 * df[c].astype(float)).round(1)
    df["oracle flips 95% CI"] = [f"[{100 * lo:.1f}, {100 * hi:.1f}]"
                                 for lo, hi in zip(df["oracle_flip_ci_low"], df["oracle_flip_ci_high"])]
    keep = ["attack", "eps_str", *cols, "oracle flips 95% CI", "l2"]
    return df[keep].rename(columns={**cols, "eps_str": "eps", "l2": "mean L2"}).round({"mean L2": 3})


__all__ = ["Oracle", "KNNOracle", "EnsembleOracle", "build_oracle", "AttackFactory", "make_attack",
           "standard_attacks", "attack_names", "comparison_names", "semantic_summary", "MADRY_ALPHA_SCALE", "wilson_interval",
           "McNemarResult", "mcnemar_test", "perturbation_mass_share", "AttackOutcome",
           "semantic_report", "compare_attacks"]
