"""L-inf attacks on inputs in [0, 1]: FGSM, PGD, CW-inf, and SPAT.

Every attack is ``attack(x, y) -> x_adv``; ``attack.run(x, y)`` returns an
:class:`AttackResult`, which also carries f(x) when the attack computed it on the way. The call puts the model in the mode asked for
(``bn_mode``, default eval) and restores it; randomness comes from an optional
``torch.Generator`` and the global RNG is never reseeded. Attack arithmetic (gradient sign,
step, projection) is float32 even when the model runs under autocast.

There is one step rule, ``delta <- clip(delta + alpha * w * sign(grad), -eps * r, eps * r)``, in
:class:`PGD`. Plain PGD has ``w = 1`` and ``r = 1``; :class:`SPAT` shapes the budget from the
shared-pixel score of :mod:`spatlib.semantics`: step weights ``w`` (``budget='step'``) or a radius
``r`` in [0, 1] per pixel (``budget='radius'``). FGSM and CW are PGD with other settings, not copies.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dataclasses import dataclass

from .models import SpatModel
from .semantics import check_spat_settings, shared_pixels
from .util import eval_mode

ATTACK_LOSSES = ("ce", "kl", "margin")
BN_MODES = ("eval", "train")
ATTACK_KINDS = ("fgsm", "pgd", "cw", "spat")
MADRY_ALPHA_SCALE = 2.5     # the default step: 2.5 * eps / steps, enough to cross the eps-ball


class ThreatModelError(RuntimeError):
    """An adversarial example left the threat model (|x_adv - x| > eps, outside [0, 1], NaN)."""


def margin_loss(logits: Tensor, y: Tensor) -> Tensor:
    """CW margin per example, max_{k != y} z_k - z_y (positive when misclassified). (N,)"""
    true = logits.gather(1, y.view(-1, 1)).squeeze(1)
    other = logits.scatter(1, y.view(-1, 1), float("-inf")).amax(1)
    return other - true


def per_example_loss(logits: Tensor, y: Tensor, loss: str, clean_prob: Tensor | None = None) -> Tensor:
    """The loss an attack ascends, per example (N,). ``kl`` needs the clean probabilities."""
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    if loss == "margin":
        return margin_loss(logits, y)
    if loss == "kl":
        # TRADES: KL(f(x) || f(x_adv)) with f(x) fixed
        return F.kl_div(F.log_softmax(logits, 1), clean_prob, reduction="none").sum(1)
    raise ValueError(f"loss: expected one of {', '.join(ATTACK_LOSSES)}, got {loss!r}")


def check_threat_model(x: Tensor, x_adv: Tensor, eps: float, radius: Tensor | None = None) -> dict:
    """The threat-model check AutoAttack prints: max |x_adv - x|, NaNs, pixel range.

    ``radius`` (N, 1 | C, H, W) in [0, 1] (SPAT's ``budget='radius'``): also checks every element
    against its own ball, ``|x_adv - x| <= eps * r`` (``max_radius_excess``: the largest
    ``|x_adv - x| - eps * r``, at most 0 when it holds)."""
    diff = (x_adv.float() - x.float()).abs()
    report = {
        "max_linf": float(diff.max()) if diff.numel() else 0.0,
        "n_nan": int(torch.isnan(x_adv).sum()),
        "min_pixel": float(x_adv.min()) if x_adv.numel() else 0.0,
        "max_pixel": float(x_adv.max()) if x_adv.numel() else 0.0,
        "eps": float(eps),
    }
    ok_radius = True
    if radius is not None:
        excess = diff - eps * radius.float().to(diff.device)
        report["max_radius_excess"] = float(excess.max()) if excess.numel() else 0.0
        ok_radius = report["max_radius_excess"] <= 1e-6 and float(radius.max()) <= 1.0 + 1e-6
    report["ok"] = (report["max_linf"] <= eps + 1e-6 and report["n_nan"] == 0 and ok_radius
                    and report["min_pixel"] >= 0.0 and report["max_pixel"] <= 1.0)
    return report


def compute_layout(model: nn.Module, x: Tensor) -> Tensor:
    """x in the memory layout the attack computes in: channels_last for spatlib's models on the
    CPU, else x as given.

    oneDNN's CPU convolutions run 1.5-2x faster on channels_last (NHWC) inputs, and PyTorch
    takes the input's layout when the weights are NCHW, so the attack's forwards and backwards
    all speed up (docs/benchmarks.md). Only for :class:`~spatlib.models.SpatModel`: they flatten
    with ``flatten``/``mean``, never ``view``, so no layout breaks them; other models get x as
    given. On CUDA the caller's layout stands (the trainer's ``train.channels_last``).
    """
    if (x.dim() == 4 and x.shape[1] > 1 and x.device.type == "cpu"
            and isinstance(model, SpatModel)):
        return x.contiguous(memory_format=torch.channels_last)
    return x


def _check_eps(eps) -> None:
    if isinstance(eps, bool) or not (isinstance(eps, (int, float)) and 0.0 <= eps <= 1.0):
        raise ValueError(f"eps: expected a number in [0, 1] (pixel units, e.g. 8/255), got {eps!r}")


def _project(delta: Tensor, bound: float | Tensor) -> Tensor:
    """delta clipped into [-bound, bound] (a number, or a tensor broadcast over delta)."""
    return delta.clamp(-bound, bound)


@dataclass
class AttackResult:
    """x_adv (N, C, H, W) float32 in the layout of x; ``clean_logits`` (N, K), detached,
    float32: f(x) with the model in eval mode when the attack computed it on the way (SPAT's
    class evidence in ``bn_mode='eval'``), else None. A caller that needs f(x) reads it here
    instead of running another forward. ``radius`` (N, 1 | C, H, W): the per-element ball of
    SPAT's ``budget='radius'`` as a fraction of eps (``|x_adv - x| <= eps * radius``, the one at
    the last step when it is refreshed), else None (the eps-ball)."""
    x_adv: Tensor
    clean_logits: Tensor | None = None
    radius: Tensor | None = None


@dataclass
class Shaping:
    """How the budget is shaped at a step: ``weights`` multiply the step (None: 1), ``radius``
    bounds each element at ``eps * radius`` (None: eps); both (N, 1 | C, H, W) float32.
    ``logits``: f(x), when computing the shaping ran it."""
    weights: Tensor | None = None
    radius: Tensor | None = None
    logits: Tensor | None = None


class Attack:
    """Base: holds the model, eps, BatchNorm mode and generator; ``run`` manages the mode."""

    def __init__(self, model: nn.Module, *, eps: float, bn_mode: str = "eval",
                 generator: torch.Generator | None = None):
        _check_eps(eps)
        if bn_mode not in BN_MODES:
            raise ValueError(f"bn_mode: expected one of {', '.join(BN_MODES)}, got {bn_mode!r}")
        self.model = model
        self.eps = float(eps)
        self.bn_mode = bn_mode
        self.generator = generator

    def forward(self, x: Tensor, y: Tensor) -> AttackResult | Tensor:
        """The attack itself (x already in the compute layout, the model in ``bn_mode``). A
        subclass may return x_adv alone."""
        raise NotImplementedError

    def run(self, x: Tensor, y: Tensor) -> AttackResult:
        """x: (N, C, H, W) in [0, 1]; y: (N,) long. x_adv comes back float32 in the memory
        layout of x (the attack may compute in another, see :func:`compute_layout`). The model
        is in ``bn_mode`` during the attack; every submodule's own flag is restored after."""
        x = x.detach().float()
        with eval_mode(self.model, train=self.bn_mode == "train"):
            result = self.forward(compute_layout(self.model, x), y.detach())
        if isinstance(result, Tensor):
            result = AttackResult(result)
        x_adv = result.x_adv.detach()
        if x_adv.stride() != x.stride():
            x_adv = torch.empty_like(x).copy_(x_adv)   # empty_like keeps the layout of x
        result.x_adv = x_adv
        return result

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        """``run(x, y).x_adv``."""
        return self.run(x, y).x_adv

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in vars(self).items()
                           if k not in ("model", "generator") and not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class PGD(Attack):
    """L-inf projected gradient ascent (Madry et al.) with restarts keeping the worst case.

    ``random_start``: True (uniform in the eps-ball), False, or ``"normal"`` (TRADES' start,
    0.001 * N(0, 1)). ``loss``: ``ce``, ``margin`` (CW) or ``kl`` (TRADES: KL(f(x) || f(x_adv))).
    With several restarts each example keeps the restart that misclassifies it, else the one of
    highest loss.

    ``keep_fooled`` (evaluation): per example, once an iterate fools the model that iterate is
    returned, even if later steps (which ascend the loss, not the error) make it correct again;
    as AutoAttack keeps its adversarial points. It reads the logits that each step's forward
    computes anyway, plus one forward at the end. Off for training attacks (their textbook
    form: the last iterate).
    """

    def __init__(self, model: nn.Module, *, eps: float, alpha: float, steps: int,
                 random_start: bool | str = True, restarts: int = 1, loss: str = "ce",
                 bn_mode: str = "eval", generator: torch.Generator | None = None,
                 keep_fooled: bool = False):
        super().__init__(model, eps=eps, bn_mode=bn_mode, generator=generator)
        if not (alpha > 0):
            raise ValueError(f"alpha: expected a step size > 0, got {alpha!r}")
        if steps < 0 or restarts < 1:
            raise ValueError(f"steps >= 0 and restarts >= 1 expected, got steps={steps}, restarts={restarts}")
        if loss not in ATTACK_LOSSES:
            raise ValueError(f"loss: expected one of {', '.join(ATTACK_LOSSES)}, got {loss!r}")
        if random_start not in (True, False, "normal"):
            raise ValueError(f"random_start: expected true, false or 'normal', got {random_start!r}")
        if loss == "kl" and random_start is False and steps > 0:
            # KL(f(x) || f(x)) has a zero gradient at x: every sign step would be 0
            raise ValueError("loss 'kl' needs a random start (random_start true or 'normal'): "
                             "its gradient at x_adv = x is exactly zero")
        self.alpha = float(alpha)
        self.steps = int(steps)
        self.random_start = random_start
        self.restarts = int(restarts)
        self.loss = loss
        self.keep_fooled = bool(keep_fooled)

    # -- hooks for SPAT ------------------------------------------------------------------
    def clean_shaping(self, x: Tensor, y: Tensor) -> Shaping:
        """The budget's shape at the clean x (step weights or radius, and f(x) if computing them
        ran it); PGD: no shaping."""
        return Shaping()

    def step_shaping(self, x_adv: Tensor, y: Tensor, step: int, previous: Shaping) -> Shaping:
        """The shaping of the step at ``step``, given the previous step's (the clean one at step
        0). PGD: unchanged."""
        return previous

    # -- the one step rule ---------------------------------------------------------------
    def _start(self, x: Tensor, bound: float | Tensor | None = None) -> Tensor:
        bound = self.eps if bound is None else bound
        if self.random_start is True:
            noise = torch.rand(x.shape, generator=self.generator, device=self._rng_device(x))
            delta = (2 * noise.to(x.device) - 1) * bound
        elif self.random_start == "normal":
            noise = torch.randn(x.shape, generator=self.generator, device=self._rng_device(x))
            delta = _project(0.001 * noise.to(x.device), bound)
        else:
            delta = torch.zeros_like(x)
        # x first: the result takes the layout of x (see compute_layout), not the noise's
        return (x + delta).clamp(0, 1) - x

    def _rng_device(self, x: Tensor) -> torch.device:
        return self.generator.device if self.generator is not None else x.device

    def _bound(self, shaping: Shaping) -> float | Tensor:
        """eps, or the per-element ball eps * r of a radius shaping."""
        return self.eps if shaping.radius is None else self.eps * shaping.radius

    def perturb(self, x: Tensor, y: Tensor, clean_prob: Tensor | None = None,
                shaping: Shaping | None = None) -> tuple[Tensor, Shaping]:
        """One restart: ``steps`` shaped sign-gradient steps from the start (``shaping``: that of
        the first step, see :meth:`step_shaping`). Returns x_adv and the last step's shaping."""
        shaping = shaping if shaping is not None else Shaping()
        bound = self._bound(shaping)
        delta = self._start(x, bound)
        kept = fooled = None
        if self.keep_fooled:
            kept, fooled = x.clone(), torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for step in range(self.steps):
            new = self.step_shaping(x + delta, y, step, shaping)
            if new is not shaping:      # a refreshed shaping: its ball, once per refresh
                shaping, bound = new, self._bound(new)
            delta.requires_grad_(True)
            with torch.enable_grad():
                logits = self.model(x + delta).float()
                loss = per_example_loss(logits, y, self.loss, clean_prob).sum()
                (grad,) = torch.autograd.grad(loss, delta)
            if fooled is not None:   # the iterate this forward ran at: keep it if it fools first
                new = (logits.detach().argmax(1) != y) & ~fooled
                kept[new] = (x + delta.detach())[new]
                fooled |= new
            w = shaping.weights
            step_size = self.alpha if w is None else self.alpha * w
            delta = _project(delta.detach() + step_size * grad.float().sign(), bound)
            delta = (x + delta).clamp(0, 1) - x
        x_adv = x + delta
        if fooled is not None:
            with torch.no_grad():
                lost = fooled & (self.model(x_adv).argmax(1) == y)
            x_adv = torch.where(lost.view(-1, *([1] * (x.dim() - 1))), kept, x_adv)
        return x_adv, shaping

    def forward(self, x: Tensor, y: Tensor) -> AttackResult:
        # the clean-input shaping is the same for every restart: computed once per call
        shaping = self.clean_shaping(x, y)
        clean_logits = shaping.logits if self.bn_mode == "eval" else None
        clean_prob = None
        if self.loss == "kl":   # TRADES' f(x): the class evidence's forward when it ran one
            with torch.no_grad():
                clean_prob = F.softmax(self.model(x).float() if clean_logits is None
                                       else clean_logits, 1)
        best, last = self.perturb(x, y, clean_prob, shaping)
        if self.restarts == 1:
            return AttackResult(best, clean_logits, last.radius)
        best_fooled, best_loss = self._score(best, y, clean_prob)
        for _ in range(self.restarts - 1):
            cand, _ = self.perturb(x, y, clean_prob, shaping)
            fooled, loss = self._score(cand, y, clean_prob)
            better = (fooled & ~best_fooled) | ((fooled == best_fooled) & (loss > best_loss))
            best = torch.where(better.view(-1, 1, 1, 1), cand, best)
            best_fooled = best_fooled | fooled
            best_loss = torch.where(better, loss, best_loss)
        return AttackResult(best, clean_logits, shaping.radius)

    @torch.no_grad()
    def _score(self, x_adv: Tensor, y: Tensor, clean_prob: Tensor | None) -> tuple[Tensor, Tensor]:
        logits = self.model(x_adv).float()
        return logits.argmax(1) != y, per_example_loss(logits, y, self.loss, clean_prob)


class FGSM(PGD):
    """One step of size eps from x (Goodfellow et al.): x + eps * sign(grad)."""

    def __init__(self, model: nn.Module, *, eps: float, loss: str = "ce", bn_mode: str = "eval",
                 generator: torch.Generator | None = None):
        _check_eps(eps)
        super().__init__(model, eps=eps, alpha=max(eps, 1e-12), steps=1, random_start=False,
                         loss=loss, bn_mode=bn_mode, generator=generator)


class CW(PGD):
    """CW-inf: L-inf PGD on the Carlini-Wagner margin loss (30 steps of eps/4 by default)."""

    def __init__(self, model: nn.Module, *, eps: float, alpha: float | None = None, steps: int = 30,
                 random_start: bool | str = True, restarts: int = 1, bn_mode: str = "eval",
                 generator: torch.Generator | None = None, keep_fooled: bool = False):
        _check_eps(eps)
        super().__init__(model, eps=eps, alpha=alpha if alpha is not None else max(eps / 4, 1e-12),
                         steps=steps, random_start=random_start, restarts=restarts, loss="margin",
                         bn_mode=bn_mode, generator=generator, keep_fooled=keep_fooled)


class SPAT(PGD):
    """Semantics-preserving PGD: the PGD budget shaped toward pixels shared by all classes.

    ``budget='step'``: step weights from :func:`spatlib.semantics.shared_pixels` (mean 1 per image,
    at most eps/alpha); every element keeps the eps-ball. ``budget='radius'``: the step is PGD's
    and each element keeps its own ball ``|delta_i| <= eps * r_i``, ``r`` in [0, 1] with mean
    ``radius_mean`` (:func:`spatlib.semantics.per_pixel_radius`). The shaping is computed at the
    clean x, or at the current x_adv every ``refresh`` steps. ``rule="none"`` (step budget) is
    PGD exactly. ``run(x, y).clean_logits`` is f(x) from the forward the class evidence ran at
    the clean x (``bn_mode='eval'``, a rule other than ``none``); ``run(x, y).radius`` the radius.
    """

    def __init__(self, model: nn.Module, *, eps: float, alpha: float, steps: int,
                 rule: str = "intersection", saliency: str = "input_grad", gamma: float = 1.0,
                 classes: str = "all", class_chunk: int = 16, refresh: int = 0,
                 budget: str = "step", radius_mean: float = 0.5,
                 random_start: bool | str = True, restarts: int = 1, loss: str = "ce",
                 bn_mode: str = "eval", generator: torch.Generator | None = None,
                 keep_fooled: bool = False):
        super().__init__(model, eps=eps, alpha=alpha, steps=steps, random_start=random_start,
                         restarts=restarts, loss=loss, bn_mode=bn_mode, generator=generator,
                         keep_fooled=keep_fooled)
        if refresh < 0:
            raise ValueError(f"refresh: expected an integer >= 0, got {refresh}")
        check_spat_settings(rule, saliency, gamma, classes, budget, radius_mean)
        if budget == "radius" and rule != "none" and 0 < refresh < steps and restarts > 1:
            # refreshed radii differ per restart: the restarts' balls would not be one ball
            raise ValueError("restarts > 1 with a refreshed per-pixel radius: use refresh 0 or restarts 1")
        self.rule, self.saliency, self.gamma = rule, saliency, float(gamma)
        self.classes, self.class_chunk, self.refresh = classes, int(class_chunk), int(refresh)
        self.budget, self.radius_mean = budget, float(radius_mean)

    def _shared_pixels(self, x: Tensor, y: Tensor):
        return shared_pixels(self.model, x, y, self.rule, self.saliency, self.gamma, self.classes,
                             self.eps, self.alpha, self.class_chunk, self.generator,
                             budget=self.budget, radius_mean=self.radius_mean)

    def shaping(self, x: Tensor, y: Tensor) -> Shaping:
        """The step weights or the radius at x, (N, 1 | C, H, W), and f(x)."""
        sp = self._shared_pixels(x, y)
        return Shaping(sp.weights, sp.radius, sp.logits)

    def clean_shaping(self, x, y):
        if self.rule == "none":
            return Shaping()
        return self.shaping(x, y)

    def step_shaping(self, x_adv, y, step, previous):
        if self.rule != "none" and self.refresh and step and step % self.refresh == 0:
            new = self.shaping(x_adv.detach(), y)
            return Shaping(new.weights, new.radius, previous.logits)
        return previous


def make_attack(kind: str, model: nn.Module, *, eps: float, steps: int = 10,
                alpha: float | None = None, random_start: bool | str = True, restarts: int = 1,
                loss: str | None = None, bn_mode: str = "eval",
                generator: torch.Generator | None = None, keep_fooled: bool = False,
                rule: str = "intersection", saliency: str = "input_grad", gamma: float = 1.0,
                classes: str = "all", class_chunk: int = 16, refresh: int = 0,
                budget: str = "step", radius_mean: float = 0.5) -> PGD:
    """The one attack factory (training, the evaluation suite, notebook 01).

    ``kind``: ``fgsm`` (one step of eps from x), ``pgd``, ``cw`` (PGD on the margin loss) or
    ``spat`` (PGD with the budget shaped by the shared-pixel score: ``budget`` ``step`` or
    ``radius``, ``rule`` and the other SPAT settings).
    Step size convention: ``alpha`` is in pixel units, like eps; None means
    ``MADRY_ALPHA_SCALE * eps / steps`` (2.5 eps / steps). ``loss`` None: ce (margin for cw).
    ``keep_fooled``: return per example the first iterate that fooled the model (evaluation).
    """
    if kind not in ATTACK_KINDS:
        raise ValueError(f"kind: expected one of {', '.join(ATTACK_KINDS)}, got {kind!r}")
    if kind == "fgsm":
        return FGSM(model, eps=eps, loss=loss or "ce", bn_mode=bn_mode, generator=generator)
    if steps < 1:
        raise ValueError(f"steps: expected an integer >= 1, got {steps}")
    if alpha is None:
        alpha = max(MADRY_ALPHA_SCALE * eps / steps, 1e-12)   # eps = 0 is a valid (empty) budget
    common = dict(eps=eps, alpha=alpha, steps=steps, random_start=random_start, restarts=restarts,
                  bn_mode=bn_mode, generator=generator, keep_fooled=keep_fooled)
    if kind == "cw":
        if loss not in (None, "margin"):
            raise ValueError(f"loss: cw ascends the margin loss, got {loss!r}")
        return CW(model, **common)
    if kind == "spat":
        return SPAT(model, rule=rule, saliency=saliency, gamma=gamma, classes=classes,
                    class_chunk=class_chunk, refresh=refresh, budget=budget,
                    radius_mean=radius_mean, loss=loss or "ce", **common)
    return PGD(model, loss=loss or "ce", **common)


def assert_threat_model(x: Tensor, x_adv: Tensor, eps: float, radius: Tensor | None = None) -> None:
    """Cheap runtime check; raises ThreatModelError naming the violated bound (with ``radius``,
    each element's own ball ``eps * radius`` too)."""
    r = check_threat_model(x, x_adv, eps, radius)
    if not r["ok"]:
        per_pixel = (f", largest excess over eps * r {r['max_radius_excess']:.3g}"
                     if radius is not None else "")
        raise ThreatModelError(f"adversarial examples leave the threat model: max |x_adv - x| = "
                               f"{r['max_linf']:.3g} (eps {eps:.3g}){per_pixel}, NaNs {r['n_nan']}, "
                               f"pixel range [{r['min_pixel']:.3g}, {r['max_pixel']:.3g}]")


__all__ = ["Attack", "AttackResult", "Shaping", "PGD", "FGSM", "CW", "SPAT", "make_attack", "check_threat_model",
           "assert_threat_model", "compute_layout", "margin_loss", "per_example_loss",
           "ThreatModelError"]
