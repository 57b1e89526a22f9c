"""Which pixels carry class-specific evidence, and which are shared by all classes.

docs/design.md, "The SPAT attack", steps 1-3:

1. class evidence maps ``A_k`` for every class k of a class set S (``class_evidence``);
2. a shared-pixel score ``s`` in [0, 1] by a ``rule`` (``shared_pixel_score``);
3. how the score shapes the budget, by ``budget``:

   * ``step`` (the weighted step): budget-preserving step weights ``w = s**gamma / mean(s**gamma)``,
     capped at ``eps/alpha`` by water-filling (``shared_pixel_weights``,
     ``budget_preserving_weights``); every pixel keeps the eps-ball, only its pace changes;
   * ``radius`` (the per-pixel ball): a radius ``r`` in [0, 1] per pixel, ``r = min(1, c * s**gamma)``
     water-filled to the mean ``radius_mean`` (``per_pixel_radius``); the attack keeps
     ``|delta_i| <= eps * r_i``, so class-specific pixels cannot saturate at eps.

The rules live in one registry, :data:`RULES` (name -> :class:`Rule`). A new SPAT rule is one
:func:`register_rule` call: the config's allowed ``attack.rule`` values, the attack, the trainer
and notebook 01's attack list (``spat_<rule>``) all read the registry.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SALIENCIES = ("input_grad", "cam")
BUDGETS = ("step", "radius")   # how the score shapes the budget (module doc, step 3)
_TINY = 1e-12
_TOPK = re.compile(r"topk:(\d+)")


@dataclass
class Evidence:
    """Class evidence of a batch.

    maps:    (N, S, H, W) non-negative evidence A_k per class slot
    classes: (N, S) long, the class index of each slot
    grads:   (N, S, C, H, W) d z_k / d x (input_grad saliency only, else None)
    logits:  (N, K) logits at x (detached)
    """
    maps: Tensor
    classes: Tensor
    grads: Tensor | None
    logits: Tensor


def parse_classes(spec: str) -> int | None:
    """The class-set spec: ``"all"`` -> None, ``"topk:N"`` -> N (>= 1). ValueError otherwise."""
    if spec == "all":
        return None
    m = _TOPK.fullmatch(str(spec))
    if not m or int(m.group(1)) < 1:
        raise ValueError(f"classes: expected 'all' or 'topk:N' with N >= 1, got {spec!r}")
    return int(m.group(1))


def check_spat_settings(rule: str, saliency: str, gamma: float = 1.0, classes: str | Tensor = "all",
                        budget: str = "step", radius_mean: float = 0.5) -> None:
    """Raise ValueError naming the setting and its allowed values (checked before any work)."""
    if rule not in RULES:
        raise ValueError(f"rule: expected one of {', '.join(RULES)}, got {rule!r}")
    if saliency not in SALIENCIES:
        raise ValueError(f"saliency: expected one of {', '.join(SALIENCIES)}, got {saliency!r}")
    if RULES[rule].needs_grads and saliency != "input_grad":
        raise ValueError(f"rule {rule!r} needs saliency 'input_grad' (it uses the input gradients)")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or gamma < 0:
        raise ValueError(f"gamma: expected a number >= 0, got {gamma!r}")
    if budget not in BUDGETS:
        raise ValueError(f"budget: expected one of {', '.join(BUDGETS)}, got {budget!r}")
    if budget == "radius":
        if RULES[rule].score is None:
            raise ValueError(f"budget 'radius' needs a shared-pixel rule with a score; rule {rule!r} "
                             f"has none (it is plain PGD): use budget 'step' or another rule")
        if (isinstance(radius_mean, bool) or not isinstance(radius_mean, (int, float))
                or not 0 < radius_mean <= 1):
            raise ValueError(f"radius_mean: expected a number in (0, 1] (the mean per-pixel radius "
                             f"as a fraction of eps), got {radius_mean!r}")
    if not isinstance(classes, Tensor):
        parse_classes(classes)


def resolve_classes(logits: Tensor, y: Tensor, spec: str | Tensor = "all") -> Tensor:
    """The class set S per example, (N, S) long.

    ``"all"``: every class 0..K-1. ``"topk:N"``: the true class first, then the N-1 highest
    other logits (cheap evidence for many-class data). A tensor is returned as given.
    """
    if isinstance(spec, Tensor):
        return spec.to(device=logits.device, dtype=torch.long)
    n, k = logits.shape
    topk = parse_classes(spec)
    if topk is None:
        return torch.arange(k, device=logits.device).expand(n, k)
    top = min(topk, k)
    others = logits.detach().float().scatter(1, y.view(-1, 1), float("-inf"))
    rest = others.topk(top - 1, dim=1).indices if top > 1 else logits.new_empty(n, 0, dtype=torch.long)
    return torch.cat([y.view(-1, 1), rest], dim=1)


def _class_vjps(z: Tensor, x: Tensor, class_chunk: int, batched: bool | None = None):
    """The S vector-Jacobian products d z[:, j] / d x, chunk by chunk.

    z: (N, S) selected logits of a graph from x (N, C, H, W). Yields ``(start, g)`` with
    g (chunk, N, C, H, W) the gradients of classes ``start .. start + chunk - 1``.
    Batched (``is_grads_batched``; by default off the CPU when ``class_chunk`` > 1): the
    backward is vmapped over one-hot grad_outputs, one backward per chunk of ``class_chunk``
    classes; the chunk bounds memory, which grows with it (chunk x the activation gradients).
    Else one plain backward per class: on the CPU always, where oneDNN's kernels already use
    every core and the vmapped backward measured 1.3-1.45x slower, its extra time in copies of
    per-class tensors (``aten::cat`` in the profile), with 3-4x the peak memory (docs/benchmarks.md).
    """
    n, s = z.shape
    if batched is None:
        batched = z.device.type != "cpu" and class_chunk > 1
    chunk = class_chunk if batched else 1
    eye = torch.eye(s, device=z.device, dtype=z.dtype) if batched else None
    for start in range(0, s, chunk):
        stop = min(start + chunk, s)
        if batched:
            # (chunk, N, S): slot j selects z[:, j] of every example at once
            cotangents = eye[start:stop].unsqueeze(1).expand(stop - start, n, s)
            (g,) = torch.autograd.grad(z, x, grad_outputs=cotangents, is_grads_batched=True,
                                       retain_graph=stop < s)
        else:
            (g,) = torch.autograd.grad(z[:, start].sum(), x, retain_graph=stop < s)
            g = g.unsqueeze(0)
        yield start, g


def _input_gradients(z: Tensor, x: Tensor, class_chunk: int, batched: bool | None = None) -> Tensor:
    """All S vector-Jacobian products d z[:, j] / d x, (N, S, C, H, W) (see ``_class_vjps``)."""
    out = x.new_empty((z.shape[1], *x.shape))
    for start, g in _class_vjps(z, x, class_chunk, batched):
        out[start:start + len(g)] = g
    return out.transpose(0, 1)


def _cam_maps(model: nn.Module, x: Tensor, y: Tensor, spec, class_chunk: int) -> Evidence:
    """Class activation maps of the last convolutional block, upsampled to the input size.

    GAP + linear heads: exact CAM ``relu(sum_c W_kc F_c)``, no backward at all. Other heads
    (SmallCNN's MLP): gradient x activation at the feature map, ``relu(sum_c dz_k/dF_c * F_c)``,
    which equals the CAM up to a constant for GAP + linear heads; its backward runs through the
    small head only, never through the convolutions.
    """
    with torch.no_grad():
        feats = model.features(x).float()
    if getattr(model, "gap_linear", False):
        with torch.no_grad():
            logits = model.head(feats).float()
            classes = resolve_classes(logits, y, spec)
            weight = model.classifier.weight.float()[classes]          # (N, S, Cf)
            cam = torch.einsum("nsc,nchw->nshw", weight, feats)
    else:
        with torch.enable_grad():
            f = feats.detach().requires_grad_(True)
            logits = model.head(f).float()
            classes = resolve_classes(logits, y, spec)
            g = _input_gradients(logits.gather(1, classes), f, class_chunk)   # (N, S, Cf, h, w)
        cam = (g * feats.unsqueeze(1)).sum(2)
        logits = logits.detach()
    cam = F.interpolate(cam.clamp_min(0), size=x.shape[-2:], mode="bilinear", align_corners=False)
    return Evidence(maps=cam.clamp_min(0), classes=classes, grads=None, logits=logits)


def class_evidence(model: nn.Module, x: Tensor, y: Tensor, classes: str | Tensor = "all",
                   saliency: str = "input_grad", class_chunk: int = 16, *,
                   keep_grads: bool = True, batched: bool | None = None) -> Evidence:
    """Class evidence maps A_k (N, S, H, W) for the class set S (docs/design.md step 1).

    ``input_grad`` (exact): ``A_k = sum_c |d z_k / d x|``, one backward per class (batched in
    chunks of ``class_chunk`` off the CPU, see ``_class_vjps``). ``keep_grads=False`` keeps
    only the maps, not the (N, S, C, H, W) gradients (``Evidence.grads`` is then None): C x
    less memory, for every rule but ``agreement``. ``batched``: force the vmapped backward
    (True) or the per-class loop (False); None decides by device (``spat doctor`` compares both).
    ``cam`` (fast): class activation maps of the last conv block (see ``_cam_maps``).
    The model's train/eval mode is left as the caller set it.
    """
    if saliency not in SALIENCIES:
        raise ValueError(f"saliency: expected one of {', '.join(SALIENCIES)}, got {saliency!r}")
    if class_chunk < 1:
        raise ValueError(f"class_chunk: expected an integer >= 1, got {class_chunk}")
    if saliency == "cam":
        return _cam_maps(model, x, y, classes, class_chunk)
    with torch.enable_grad():
        xg = x.detach().float().requires_grad_(True)
        logits = model(xg).float()
        cls = resolve_classes(logits, y, classes)
        z = logits.gather(1, cls)
        if keep_grads:
            grads = _input_gradients(z, xg, class_chunk, batched)
            maps = grads.abs().sum(2)
        else:
            grads = None
            n, _, h, w = xg.shape
            maps = xg.new_empty((cls.shape[1], n, h, w))
            for start, g in _class_vjps(z, xg, class_chunk, batched):
                maps[start:start + len(g)] = g.abs().sum(2)
            maps = maps.transpose(0, 1)
    return Evidence(maps=maps, classes=cls, grads=grads, logits=logits.detach())


def normalize_maps(maps: Tensor) -> Tensor:
    """P_k = A_k / sum_pixels A_k, (N, S, H, W). An all-zero map becomes uniform."""
    total = maps.sum((-2, -1), keepdim=True)
    uniform = torch.full_like(maps, 1.0 / (maps.shape[-1] * maps.shape[-2]))
    return torch.where(total > _TINY, maps / total.clamp_min(_TINY), uniform)


# --------------------------------------------------------------------------------------------
# shared-pixel rules: Evidence (+ y, generator) -> score in [0, 1], (N, 1, H, W) or (N, C, H, W)
def _per_image_max_scale(s: Tensor) -> Tensor:
    peak = s.flatten(1).amax(1).view(-1, *([1] * (s.dim() - 1)))
    return s / peak.clamp_min(_TINY)


def _intersection(ev: Evidence, y: Tensor, generator) -> Tensor:
    """min_k P_k scaled by its per-image max: pixels that every class relies on."""
    return _per_image_max_scale(normalize_maps(ev.maps).amin(1, keepdim=True))


def _equality(ev: Evidence, y: Tensor, generator) -> Tensor:
    """Geometric over arithmetic mean of P_k across classes (<= 1 by AM-GM): equal reliance."""
    p = normalize_maps(ev.maps)
    geo = p.clamp_min(_TINY).log().mean(1, keepdim=True).exp()
    geo = torch.where((p > 0).all(1, keepdim=True), geo, torch.zeros_like(geo))
    return (geo / p.mean(1, keepdim=True).clamp_min(_TINY)).clamp(0, 1)


def _agreement(ev: Evidence, y: Tensor, generator) -> Tensor:
    """Per element, the fraction of other classes k whose sign(dz_k/dx - dz_y/dx) agrees with
    the majority: where moving toward every other class is the same move, the step adds no
    single class's features. Shape (N, C, H, W), values in [1/2, 1] (1 where all agree)."""
    if ev.grads is None:
        raise ValueError("rule 'agreement' needs saliency 'input_grad' (it uses the input gradients)")
    is_true = ev.classes == y.view(-1, 1)                                   # (N, S)
    if not bool(is_true.any(1).all()):
        raise ValueError("rule 'agreement' needs the true class in the class set")
    g_true = (ev.grads * is_true[..., None, None, None]).sum(1, keepdim=True)
    signs = torch.sign(ev.grads - g_true) * (~is_true)[..., None, None, None]
    n_other = (~is_true).sum(1).view(-1, 1, 1, 1).clamp_min(1)
    pos = (signs > 0).sum(1)
    neg = (signs < 0).sum(1)
    return torch.maximum(pos, neg).float() / n_other


def shuffle_pixels(s: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Permute the pixels of each image independently (channels move together)."""
    n, c, h, w = s.shape
    noise = torch.rand(n, h * w, generator=generator, device=s.device if generator is None
                       else generator.device).to(s.device)
    perm = noise.argsort(1)
    flat = s.flatten(2)
    return flat.gather(2, perm.unsqueeze(1).expand(n, c, h * w)).view(n, c, h, w)


def _random(ev: Evidence, y: Tensor, generator) -> Tensor:
    """The control: the intersection score with its pixels shuffled within each image. Same
    histogram of weights, no relation to semantics."""
    return shuffle_pixels(_intersection(ev, y, generator), generator)


# --------------------------------------------------------------------------------------------
# the registry
ScoreFn = Callable[[Evidence, Tensor, "torch.Generator | None"], Tensor]


@dataclass(frozen=True)
class Rule:
    """A shared-pixel rule: ``score(evidence, y, generator)`` -> s in [0, 1], (N, 1 | C, H, W).

    ``score`` None: no weighting at all (``none``: plain PGD, no class evidence computed).
    ``needs_grads``: the rule reads the input gradients themselves (``Evidence.grads``), so it
    needs ``saliency='input_grad'`` and the (N, S, C, H, W) gradients are kept for it.
    """
    name: str
    score: ScoreFn | None
    needs_grads: bool = False
    description: str = ""


RULES: dict[str, Rule] = {}


def register_rule(name: str, score: ScoreFn | None, *, needs_grads: bool = False,
                  description: str = "") -> Rule:
    """Add (or replace) a rule in :data:`RULES`; every layer that lists rules reads it."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"rule name: expected lower-case letters, digits and _, got {name!r}")
    RULES[name] = rule = Rule(name, score, needs_grads, description or ((score.__doc__ or "") if score else "").strip())
    return rule


register_rule("intersection", _intersection)
register_rule("equality", _equality)
register_rule("agreement", _agreement, needs_grads=True)
register_rule("random", _random)
register_rule("none", None, description="s = 1 everywhere: plain PGD")


@dataclass
class SharedPixels:
    """What :func:`shared_pixels` computes for a batch.

    score:   (N, 1 | C, H, W) shared-pixel score s in [0, 1] (ones for ``none``)
    weights: same shape, the step weights (mean 1 per image, at most the cap), float32;
             None with ``budget='radius'`` (the step is PGD's, the ball is per pixel)
    radius:  same shape, the per-pixel radius r in [0, 1] as a fraction of eps (mean
             ``radius_mean`` per image), float32; None with ``budget='step'``
    logits:  (N, K) f(x), detached, float32, from the forward the class evidence ran (model in
             the caller's mode); None for ``none``, which runs no forward. A caller that needs
             f(x) too (the trainer's clean accuracy) reads it here instead of another forward.
    """
    score: Tensor
    weights: Tensor | None
    logits: Tensor | None
    radius: Tensor | None = None


def _score(model: nn.Module, x: Tensor, y: Tensor, rule: str, saliency: str,
           classes: str | Tensor, class_chunk: int,
           generator: torch.Generator | None) -> tuple[Tensor, Tensor | None]:
    """(score s, f(x) of the class-evidence forward or None for ``none``); the caller has
    checked the settings (:func:`check_spat_settings`)."""
    r = RULES[rule]
    if r.score is None:
        return torch.ones_like(x[:, :1], dtype=torch.float32), None
    # only a rule that reads the gradients keeps them; the others need the maps alone
    ev = class_evidence(model, x, y, classes, saliency, class_chunk, keep_grads=r.needs_grads)
    return r.score(ev, y, generator), ev.logits


def shared_pixels(model: nn.Module, x: Tensor, y: Tensor, rule: str = "intersection",
                  saliency: str = "input_grad", gamma: float = 1.0,
                  classes: str | Tensor = "all", eps: float | None = None,
                  alpha: float | None = None, class_chunk: int = 16,
                  generator: torch.Generator | None = None, *, budget: str = "step",
                  radius_mean: float = 0.5) -> SharedPixels:
    """Score, step weights or per-pixel radius, and f(x) of a batch (docs/design.md, SPAT steps 1-3).

    x: (N, C, H, W) in [0, 1]; y: (N,). ``budget='step'``: the step weights, capped at eps/alpha
    when both are given. ``budget='radius'``: the radius ``r`` (:func:`per_pixel_radius`, mean
    ``radius_mean``), no weights.
    """
    check_spat_settings(rule, saliency, gamma, classes, budget, radius_mean)
    score, logits = _score(model, x, y, rule, saliency, classes, class_chunk, generator)
    if budget == "radius":
        return SharedPixels(score, None, logits, per_pixel_radius(score, gamma, radius_mean))
    cap = eps / alpha if (eps is not None and alpha) else None
    return SharedPixels(score, budget_preserving_weights(score, gamma, cap), logits)


def per_pixel_radius(score: Tensor, gamma: float = 1.0, mean: float = 0.5) -> Tensor:
    """The per-pixel radius of ``budget='radius'``: ``r = min(1, c * s**gamma)`` per image, with c
    water-filled so that mean(r) = ``mean`` (in (0, 1]); float32, the shape of ``score``.

    The attack keeps ``|delta_i| <= eps * r_i``: a pixel of low shared-pixel score gets a small ball,
    whatever the number of steps, so the perturbation's mass moves to the shared pixels (the step
    weights of ``budget='step'`` only change the pace, and with steps that travel 2.5 eps in all nearly
    every pixel still reaches eps). It is :func:`budget_preserving_weights` with the cap at 1/mean,
    times ``mean``: the m largest scores sit at r = 1, the others are proportional to ``s**gamma``.
    ``mean = 1`` gives r = 1 everywhere (PGD's ball); a score that is zero everywhere gives r = mean.
    Shuffling the score within the image shuffles r alike (the water-filling only reads the sorted
    values), so the ``random`` rule's radii are SPAT's radii on other pixels: same total budget.
    """
    if not 0 < mean <= 1:
        raise ValueError(f"radius_mean: expected a number in (0, 1], got {mean!r}")
    return (budget_preserving_weights(score, gamma, 1.0 / mean) * mean).clamp_max(1.0)


def shared_pixel_score(model: nn.Module, x: Tensor, y: Tensor, rule: str = "intersection",
                       saliency: str = "input_grad", classes: str | Tensor = "all",
                       class_chunk: int = 16, generator: torch.Generator | None = None) -> Tensor:
    """The score s of :func:`shared_pixels` alone (no weights computed): (N, 1, H, W) for the
    pixel rules, (N, C, H, W) for ``agreement``; all ones for ``none``."""
    check_spat_settings(rule, saliency, 1.0, classes)
    return _score(model, x, y, rule, saliency, classes, class_chunk, generator)[0]


def budget_preserving_weights(score: Tensor, gamma: float = 1.0, cap: float | None = None) -> Tensor:
    """w = s**gamma / mean(s**gamma) per image, capped at ``cap`` (docs/design.md step 3).

    Water-filling, solved exactly: the m largest weights sit at the cap and the others are
    ``c * s`` with c chosen so the per-image mean is 1. With the scores sorted in descending
    order, m is the first count for which the largest uncapped weight stays under the cap (one
    sort and a cumulative sum, no iteration). When the uncapped pixels hold no score at all (the
    support is under 1/cap of the pixels) their share is spread evenly. An all-zero score gives
    w = 1. A cap below 1 cannot keep the mean at 1 and is treated as 1 (alpha >= eps: PGD).
    """
    if gamma < 0:
        raise ValueError(f"gamma: expected a number >= 0, got {gamma}")
    s = score.double().clamp_min(0) ** gamma  # float64: sharp scores span many decades
    flat = s.flatten(1)                         # (N, D)
    n_pix = flat.shape[1]
    mean = flat.mean(1, keepdim=True)
    if cap is None:
        w = torch.where(mean > 0, flat / mean.clamp_min(1e-300), torch.ones_like(flat))
        return w.float().view_as(s)
    cap = max(float(cap), 1.0)
    v, order = flat.sort(1, descending=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n_pix, device=flat.device).expand_as(order))
    m = torch.arange(n_pix, device=flat.device, dtype=flat.dtype)   # candidate number capped
    rest = v.flip(1).cumsum(1).flip(1)                               # score left uncapped: sum v[m:]
    budget = n_pix - m * cap                                         # mass the uncapped must hold
    scale = budget / rest.clamp_min(1e-300)
    valid = (rest <= 0) | (scale * v <= cap * (1 + 1e-9))
    first = valid.float().argmax(1, keepdim=True)                    # always exists (m = D-1)
    scale_m, rest_m = scale.gather(1, first), rest.gather(1, first)
    level = budget.expand_as(v).gather(1, first) / (n_pix - first).to(flat.dtype)
    uncapped = torch.where(rest_m > 0, scale_m * flat, level.expand_as(flat))
    w = torch.where(rank < first, torch.full_like(flat, cap), uncapped.clamp_max(cap))
    return w.float().view_as(s)


def shared_pixel_weights(model: nn.Module, x: Tensor, y: Tensor, rule: str = "intersection",
                         **options: Any) -> Tensor:
    """The step weights of :func:`shared_pixels` alone (``options``: its keywords saliency,
    gamma, classes, eps, alpha, class_chunk, generator; the budget is ``step``): mean 1 per
    image, at most eps/alpha; (N, 1, H, W) (or (N, C, H, W) for ``agreement``), float32, to
    multiply the PGD step ``alpha * sign(grad)``."""
    return shared_pixels(model, x, y, rule, budget="step", **options).weights


def perturbation_mass_share(delta: Tensor, score: Tensor) -> tuple[Tensor, Tensor]:
    """How the L1 mass of a perturbation splits between class-specific and shared pixels.

    delta: (N, C, H, W) perturbation ``x_adv - x``; score: (N, 1 | C, H, W) shared-pixel score
    in [0, 1] (the intersection score at the clean x). The kit's manipulation check: read next to
    PGD's on the same images, it says how far SPAT's examples moved (notebook 01's report, the
    trainer's ``shared_share`` history column). Soft split, no threshold to choose:
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
