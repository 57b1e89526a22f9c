"""What each training method is: the attack that crafts its examples, what that attack ascends,
and the loss the model minimizes.

The six methods differ only in those three things (``METHODS``); one loop
(:class:`spatlib.train.Trainer`) runs all of them. The names are
:data:`spatlib.config.METHODS` (what ``train.method`` allows, checked without this module);
``METHODS`` here gives each name its :class:`Method`, and importing this module fails when the
two tables disagree (:func:`check_method_table`), so neither can drift from the other:

============  ======  ==============  ===========================================
method        attack  attack ascends  training loss
============  ======  ==============  ===========================================
standard      none    -               CE(f(x), y)
pgd_at        PGD     CE              CE(f(x_adv), y)                 Madry et al. 2018
trades        PGD     KL to f(x)      CE(f(x), y) + beta KL           Zhang et al. 2019
mart          PGD     CE              BCE + beta KL (1 - p_y(x))      Wang et al. 2020
spat_at       SPAT    CE              CE(f(x_adv), y)
spat_trades   SPAT    KL to f(x)      CE(f(x), y) + beta KL
============  ======  ==============  ===========================================

The losses take logits (N, K) and labels (N,) and are computed in float32 even under autocast.

Where the inner attack starts (``Method.attack_start``), following the authors' code:

* TRADES (and SPAT-TRADES) start at x + 0.001 N(0, 1): at x itself the KL to f(x) is at its
  minimum, its gradient is exactly 0 and sign steps never move.
* MART starts at x + 0.001 N(0, 1) too (the MART authors' code), although its attack ascends
  CE: with that start the loss and gradients match the authors' to 4e-7, while the uniform
  eps-ball start that spatlib used before made them differ by 0.5-24% (so MART's numbers
  changed with this default).
* PGD-AT and SPAT-AT start where ``attack.random_start`` says (Madry et al.: uniform in the
  eps-ball).

One deliberate difference from both authors: spatlib clips the 0.001 N(0, 1) start into the
pixel range [0, 1] before the first gradient (``attacks.PGD`` keeps every iterate an image),
where the TRADES and MART code take the first gradient at the unclipped point and clip only
after the first step. Otherwise the two agree to 2e-7, but the clip makes the inner attack
stronger: measured on TRADES, the mean KL the attack reaches is 10-19% higher. It is kept
because every attack in the kit, training and evaluation alike, then only ever evaluates the
model on valid images.

:func:`shared_share_sums` is the manipulation check of a method's examples: their share of
|delta| on shared pixels beside PGD's on the same batch (the trainer runs it every
``train.share_every`` batches).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import attacks, config
from .config import AttackConfig
from .semantics import perturbation_mass_share, shared_pixel_score
from .util import eval_mode

__all__ = ["Method", "METHODS", "check_method_table", "kl_divergence", "trades_loss", "mart_loss",
           "ce_adv", "ce_clean", "training_attack", "START_CHOICES", "shared_share_sums"]


def kl_divergence(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """KL(softmax(logits_p) || softmax(logits_q)) per example, (N,)."""
    log_p = F.log_softmax(logits_p.float(), dim=1)
    log_q = F.log_softmax(logits_q.float(), dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(1)


def trades_loss(clean: Tensor, adv: Tensor, y: Tensor, beta: float) -> Tensor:
    """TRADES (Zhang et al. 2019): CE(f(x), y) + beta * KL(f(x) || f(x_adv)), batch mean."""
    return F.cross_entropy(clean.float(), y) + beta * kl_divergence(clean, adv).mean()


def mart_loss(clean: Tensor, adv: Tensor, y: Tensor, beta: float) -> Tensor:
    """MART (Wang et al. 2020, eq. 6), batch mean of

    BCE(p(x'), y) + beta * KL(p(x) || p(x')) * (1 - p_y(x)),
    BCE(p(x'), y) = -log p_y(x') - log(1 - max_{k != y} p_k(x')).

    The 1e-4 inside the second log is the authors' (log(1.0001 - p)): it bounds the gradient
    when the strongest wrong class takes all the probability.
    """
    p_adv = F.softmax(adv.float(), dim=1)
    wrong_max = p_adv.scatter(1, y.view(-1, 1), 0.0).amax(1)
    bce = F.cross_entropy(adv.float(), y, reduction="none") - torch.log(1.0001 - wrong_max)
    p_true = F.softmax(clean.float(), dim=1).gather(1, y.view(-1, 1)).squeeze(1)
    return (bce + beta * kl_divergence(clean, adv) * (1.0 - p_true)).mean()


def ce_adv(clean: Tensor | None, adv: Tensor, y: Tensor, beta: float) -> Tensor:
    """Adversarial training's loss: CE(f(x_adv), y) (``clean`` and ``beta`` unused)."""
    return F.cross_entropy(adv.float(), y)


def ce_clean(clean: Tensor, adv: Tensor | None, y: Tensor, beta: float) -> Tensor:
    """Standard training's loss: CE(f(x), y) (``adv`` and ``beta`` unused)."""
    return F.cross_entropy(clean.float(), y)


@dataclass(frozen=True)
class Method:
    """A training method: the attack that crafts its examples and the loss it minimizes."""
    attack: str | None      # None (clean training), "pgd" or "spat"
    attack_loss: str        # what the attack ascends: "ce", or "kl" (TRADES, from a 0.001 N(0,1) start)
    needs_clean: bool       # the loss uses f(x) (trained on, with gradient)
    loss: Callable[[Tensor | None, Tensor | None, Tensor, float], Tensor]  # (f(x), f(x_adv), y, beta)
    # where the attack starts: "normal" (x + 0.001 N(0, 1), the TRADES and MART authors'), or
    # None (attack.random_start: uniform in the eps-ball, or x itself)
    attack_start: str | None = None


METHODS: dict[str, Method] = {
    "standard": Method(None, "ce", True, ce_clean),
    "pgd_at": Method("pgd", "ce", False, ce_adv),            # Madry et al. 2018
    "trades": Method("pgd", "kl", True, trades_loss, "normal"),    # Zhang et al. 2019
    "mart": Method("pgd", "ce", True, mart_loss, "normal"),        # Wang et al. 2020
    "spat_at": Method("spat", "ce", False, ce_adv),
    "spat_trades": Method("spat", "kl", True, trades_loss, "normal"),
}


def check_method_table(table: Mapping[str, Method], names: Sequence[str]) -> None:
    """Raise RuntimeError unless ``table`` defines exactly ``names``, in their order: the
    method table against the names the config accepts (:data:`spatlib.config.METHODS`)."""
    if list(table) != list(names):
        missing = [n for n in names if n not in table]
        extra = [n for n in table if n not in names]
        raise RuntimeError(
            f"spatlib.methods.METHODS and spatlib.config.METHODS disagree: "
            f"no Method for {missing or 'none'}; no config name for {extra or 'none'}; "
            f"order {list(table)} vs {list(names)}")


check_method_table(METHODS, config.METHODS)


START_CHOICES = {"uniform": True, "normal": "normal", "none": False}


def training_attack(model: nn.Module, cfg: AttackConfig, method: Method, eps: float,
                    generator: torch.Generator | None, *, start: str | None = None) -> attacks.PGD:
    """The attack that crafts ``method``'s training examples at budget ``eps`` (the eps of the
    current step: below ``cfg.eps`` during the eps warm-up, which scales alpha alike).

    ``start``: None follows the method (``Method.attack_start``): TRADES, SPAT-TRADES and MART
    start at x + 0.001 N(0, 1), clipped to [0, 1], whatever ``cfg.random_start`` says (see the
    module docstring for why and how that differs from the authors' code); PGD-AT and SPAT-AT
    follow ``cfg.random_start``. ``"uniform"`` (the eps-ball), ``"normal"`` or ``"none"`` (x
    itself; not allowed for a KL attack, whose gradient at x is 0) override it, e.g. to train
    MART from the uniform start it used before.
    """
    if method.attack is None:
        raise ValueError("training_attack: this method trains on clean images (no attack)")
    if start is not None and start not in START_CHOICES:
        raise ValueError(f"start: expected None or one of {', '.join(START_CHOICES)}, got {start!r}")
    alpha = cfg.alpha * eps / cfg.eps if cfg.eps > 0 else cfg.alpha
    if start is not None:
        start = START_CHOICES[start]
    elif method.attack_start is not None:
        start = method.attack_start
    else:
        start = cfg.random_start
    return attacks.make_attack(method.attack, model, eps=eps, alpha=alpha, steps=cfg.steps,
                               random_start=start, loss=method.attack_loss, bn_mode=cfg.bn_mode,
                               generator=generator, rule=cfg.rule, saliency=cfg.saliency,
                               gamma=cfg.gamma, classes=cfg.classes, class_chunk=cfg.class_chunk,
                               refresh=cfg.refresh, budget=cfg.budget, radius_mean=cfg.radius_mean)


def shared_share_sums(model: nn.Module, cfg: AttackConfig, method: Method, x: Tensor, y: Tensor,
                      x_adv: Tensor, eps: float, generator: torch.Generator | None
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """The manipulation check on one batch (docs/design.md, "The manipulation check"): how far
    ``method``'s training examples ``x_adv`` moved from PGD's.

    The share of |x_adv - x| on shared pixels (the intersection score of ``model`` at x,
    :func:`spatlib.semantics.perturbation_mass_share`), and the same share for the method's
    attack without its SPAT shaping (rule none: PGD, same loss, start, eps and steps) on the
    same batch; for a method whose attack is PGD the two are one. x, x_adv: (N, C, H, W), y:
    (N,). Returns device sums (shares of the examples, PGD's shares, examples counted: an
    eps of 0 leaves nothing to split), no host sync. Runs with the model in eval mode and the
    PGD from ``generator`` (the caller's own stream for the check), so it moves no BatchNorm
    statistic, no dropout or training attack noise: training is the same with it or without.
    Autocast is the caller's.
    """
    with eval_mode(model):
        score = shared_pixel_score(model, x, y, "intersection", cfg.saliency, cfg.classes,
                                   cfg.class_chunk)
        share = perturbation_mass_share(x_adv - x, score)[1]
        if method.attack == "spat":
            plain = dataclasses.replace(cfg, rule="none", budget="step", bn_mode="eval")
            pgd = training_attack(model, plain, method, eps, generator)
            share_pgd = perturbation_mass_share(pgd.run(x, y).x_adv - x, score)[1]
        else:
            share_pgd = share
    ok = ~(share.isnan() | share_pgd.isnan())
    # where, not share[ok]: boolean indexing would sync with the host on CUDA
    zero = share.new_zeros(())
    return torch.where(ok, share, zero).sum(), torch.where(ok, share_pgd, zero).sum(), ok.sum()
