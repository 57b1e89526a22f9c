"""Tests for spatlib.attacks: every attack's contract, known answers on linear models, SPAT.

One parametrized suite runs every exported attack (and every SPAT rule/saliency/loss variant)
through the same invariants, torchattacks-style: the threat model, determinism under a seeded
generator, the global RNG and the model's modes left alone, loss up and accuracy down. Known
answers come from linear models (tests/conftest.py) whose input gradients are written by hand.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spatlib.attacks
from spatlib.attacks import CW, FGSM, PGD, SPAT, check_threat_model, make_attack
from spatlib.evaluate import suite_attack
from spatlib.models import build_model
from spatlib.semantics import shared_pixel_weights

EPS = 0.1            # large enough that a few steps fool an untrained model
ALPHA = EPS / 4
STEPS = 5
N = 8



def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(n: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, c, h, w, generator=_gen(seed))


def _model(name: str = "wrn"):
    """Tiny real models on 1x8x8: WRN-10-1 (BatchNorm, GAP-linear head: exact CAM) or SmallCNN
    (no BatchNorm, MLP head: gradient-times-activation CAM)."""
    if name == "wrn":
        return build_model("wide_resnet", 10, 1, depth=10, width=1, seed=0)
    return build_model("small_cnn", 10, 1, image_size=8, seed=0)


def _spat(**kw):
    return lambda m, g, **extra: SPAT(m, eps=EPS, alpha=ALPHA, steps=STEPS, generator=g,
                                      **{**kw, **extra})


# id -> (model, factory(model, generator, **overrides) -> attack)
ATTACKS = {
    "fgsm": ("wrn", lambda m, g, **kw: FGSM(m, eps=EPS, generator=g, **kw)),
    "pgd": ("wrn", lambda m, g, **kw: PGD(m, eps=EPS, alpha=ALPHA, steps=STEPS, generator=g, **kw)),
    "pgd-restarts3": ("wrn", lambda m, g, **kw: PGD(m, eps=EPS, alpha=ALPHA, steps=STEPS,
                                                    restarts=3, generator=g, **kw)),
    "pgd-kl-normal-start": ("wrn", lambda m, g, **kw: PGD(m, eps=EPS, alpha=ALPHA, steps=STEPS,
                                                          loss="kl", random_start="normal",
                                                          generator=g, **kw)),
    "cw": ("wrn", lambda m, g, **kw: CW(m, eps=EPS, steps=STEPS, generator=g, **kw)),
    "spat-intersection-input_grad": ("wrn", _spat(rule="intersection", saliency="input_grad")),
    "spat-intersection-cam": ("wrn", _spat(rule="intersection", saliency="cam")),
    "spat-equality-input_grad": ("wrn", _spat(rule="equality", saliency="input_grad")),
    "spat-equality-cam": ("wrn", _spat(rule="equality", saliency="cam")),
    "spat-agreement-input_grad": ("wrn", _spat(rule="agreement", saliency="input_grad")),
    "spat-random-input_grad": ("wrn", _spat(rule="random", saliency="input_grad")),
    "spat-random-cam": ("wrn", _spat(rule="random", saliency="cam")),
    "spat-none": ("wrn", _spat(rule="none")),
    "spat-intersection-kl": ("wrn", _spat(rule="intersection", loss="kl")),
    "spat-agreement-kl": ("wrn", _spat(rule="agreement", loss="kl")),
    "spat-random-refresh2-restarts2": ("wrn", _spat(rule="random", refresh=2, restarts=2)),
    "spat-intersection-topk3-gamma2": ("wrn", _spat(rule="intersection", classes="topk:3",
                                                    gamma=2.0, class_chunk=3)),
    "spat-intersection-cam-mlp-head": ("small_cnn", _spat(rule="intersection", saliency="cam")),
    "spat-equality-refresh1-mlp-head": ("small_cnn", _spat(rule="equality", refresh=1)),
    "spat-intersection-radius": ("wrn", _spat(rule="intersection", budget="radius")),
    "spat-random-radius-refresh2": ("wrn", _spat(rule="random", budget="radius", radius_mean=0.3,
                                                 refresh=2)),
    "spat-agreement-radius-kl-restarts2": ("wrn", _spat(rule="agreement", budget="radius", loss="kl",
                                                        restarts=2)),
    "spat-intersection-radius-cam-mlp-head": ("small_cnn", _spat(rule="intersection", saliency="cam",
                                                                 budget="radius", gamma=2.0)),
}


def test_every_exported_attack_is_in_the_suite():
    exported = {obj for obj in map(lambda n: getattr(spatlib.attacks, n), spatlib.attacks.__all__)
                if isinstance(obj, type) and issubclass(obj, spatlib.attacks.Attack)
                and obj is not spatlib.attacks.Attack}
    model = _model("wrn")
    assert exported == {type(make(model, None)) for _, make in ATTACKS.values()}


def _batch(model):
    """Images and labels; the model (eval mode) gets exactly the even-indexed half right."""
    x = _images(N, 1, 8, 8)
    was = model.training
    model.eval()
    with torch.no_grad():
        pred = model(x).argmax(1)
    model.train(was)
    wrong = torch.arange(N) % 2 == 1
    return x, torch.where(wrong, (pred + 1) % 10, pred)


def _assert_threat_model(x, x_adv, eps):
    assert x_adv.dtype == torch.float32 and x_adv.shape == x.shape
    assert torch.isfinite(x_adv).all()
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert check_threat_model(x, x_adv, eps)["ok"]


def _record_modes(model):
    """Forward pre-hooks that record ``training`` of every module that runs."""
    seen = []
    handles = [m.register_forward_pre_hook(lambda mod, args: seen.append(mod.training))
               for m in model.modules()]
    return seen, handles


# --------------------------------------------------------------------------------------------
# every attack: the shared contract
@pytest.mark.parametrize("initial_training, bn_mode", [(True, "eval"), (False, "train")],
                         ids=["train-model-bn-eval", "eval-model-bn-train"])
@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_contract(name, initial_training, bn_mode):
    model_name, make = ATTACKS[name]
    model = _model(model_name)
    x, y = _batch(model)
    model.train(initial_training)
    seen, handles = _record_modes(model)
    rng_before = torch.get_rng_state()

    result = make(model, _gen(3), bn_mode=bn_mode).run(x, y)
    x_adv = result.x_adv
    again = make(model, _gen(3), bn_mode=bn_mode)(x, y)

    for h in handles:
        h.remove()
    _assert_threat_model(x, x_adv, EPS)
    if "radius" in name:   # every element inside its own ball eps * r_i <= eps
        r = result.radius
        assert r is not None and r.shape[0] == len(x) and float(r.min()) >= 0 and float(r.max()) <= 1
        assert ((x_adv - x).abs() <= EPS * r + 1e-6).all()
        assert check_threat_model(x, x_adv, EPS, r)["ok"]
    else:
        assert result.radius is None
    assert not torch.equal(x_adv, x)
    assert torch.equal(x_adv, again), "not deterministic under a seeded generator"
    assert torch.equal(torch.get_rng_state(), rng_before), "the global RNG was used"
    assert seen and all(t == (bn_mode == "train") for t in seen), "model not in bn_mode during the attack"
    assert all(m.training == initial_training for m in model.modules()), "mode not restored"


def _attack_loss(model, x, y, loss, x_clean):
    with torch.no_grad():
        logits = model(x)
        if loss == "ce":
            return F.cross_entropy(logits, y, reduction="none")
        if loss == "margin":
            true = logits.gather(1, y[:, None])[:, 0]
            return logits.scatter(1, y[:, None], float("-inf")).amax(1) - true
        p = F.softmax(model(x_clean), 1)
        return (p * (p.log() - F.log_softmax(logits, 1))).sum(1)   # KL(f(x) || f(x_adv))


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_raises_its_loss_and_lowers_accuracy(name):
    model_name, make = ATTACKS[name]
    model = _model(model_name).eval()
    x, y = _batch(model)
    attack = make(model, _gen(5))
    x_adv = attack(x, y)
    loss = attack.loss
    assert _attack_loss(model, x_adv, y, loss, x).mean() > _attack_loss(model, x, y, loss, x).mean()
    with torch.no_grad():
        clean_acc = (model(x).argmax(1) == y).float().mean()
        robust_acc = (model(x_adv).argmax(1) == y).float().mean()
    assert clean_acc == 0.5
    assert robust_acc <= clean_acc
    # CE and margin ascent flip labels of the untrained WRN at this eps; KL(f(x) || f(x_adv))
    # need not flip any, and the untrained SmallCNN has margins too wide for a 5-step SPAT
    if loss != "kl" and model_name == "wrn":
        assert robust_acc < clean_acc


def test_mode_of_each_submodule_is_restored():
    # fine-tuning with frozen BatchNorm: model in train mode, its BN layers in eval mode. The
    # call must give each module its own mode back; model.train(was_training) unfreezes the BN
    model = _model("wrn").train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    x, y = _batch(model)
    for m in model.modules():       # _batch restores only the top-level flag: freeze BN again
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    before = {name: m.training for name, m in model.named_modules()}
    assert not all(before.values()) and any(before.values())
    PGD(model, eps=EPS, alpha=ALPHA, steps=2, generator=_gen())(x, y)
    after = {name: m.training for name, m in model.named_modules()}
    assert after == before


@pytest.mark.parametrize("name", ["fgsm", "pgd", "cw", "spat-intersection-input_grad",
                                  "spat-equality-cam", "spat-agreement-kl",
                                  "spat-intersection-cam-mlp-head"])
def test_attack_under_bf16_autocast_stays_float32_and_in_threat_model(name):
    model_name, make = ATTACKS[name]
    model = _model(model_name).eval()
    x, y = _batch(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).dtype == torch.bfloat16            # the model really runs in bf16
        x_adv = make(model, _gen(1))(x, y)
    _assert_threat_model(x, x_adv, EPS)
    assert not torch.equal(x_adv, x)


# --------------------------------------------------------------------------------------------
# known answers on linear models
def test_fgsm_equals_hand_computed_sign_step(linear_model):
    weight = torch.randn(4, 2, 3, 3, generator=_gen(1))
    bias = torch.randn(4, generator=_gen(2))
    model = linear_model(weight, bias)
    x = _images(3, 2, 3, 3, seed=3)
    x[0, 0, 0, :] = torch.tensor([0.0, 0.02, 0.99])        # pixels where the [0, 1] box clips
    y = torch.tensor([0, 2, 3])
    # dCE/dx = W^T (softmax(z) - onehot(y))
    z = x.flatten(1) @ weight.flatten(1).T + bias
    grad = ((F.softmax(z, 1) - F.one_hot(y, 4).float()) @ weight.flatten(1)).view_as(x)
    assert (grad != 0).all()
    expected = (x + 0.05 * grad.sign()).clamp(0, 1)
    x_adv = FGSM(model, eps=0.05)(x, y)
    torch.testing.assert_close(x_adv, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("make", [
    lambda m, g: PGD(m, eps=0.1, alpha=0.05, steps=5, generator=g),
    lambda m, g: PGD(m, eps=0.1, alpha=0.05, steps=5, restarts=2, generator=g),
    lambda m, g: CW(m, eps=0.1, alpha=0.05, steps=5, generator=g),
    lambda m, g: SPAT(m, eps=0.1, alpha=0.05, steps=5, rule="none", generator=g),
], ids=["pgd", "pgd-restarts2", "cw", "spat-none"])
def test_two_class_linear_attacks_reach_the_corner(linear_model, make):
    # two classes: CE, margin and their gradients all point along +-(W_1 - W_0), whatever x is,
    # so from any start 5 steps of eps/2 end at the corner clip(x + eps * sign(W_other - W_y))
    weight = torch.randn(2, 1, 4, 4, generator=_gen(4))
    model = linear_model(weight)
    x = _images(4, 1, 4, 4, seed=5)
    x[0, 0, 0, :2] = torch.tensor([0.0, 1.0])
    y = torch.tensor([0, 1, 0, 1])
    direction = torch.where(y.view(-1, 1, 1, 1) == 0, weight[1] - weight[0], weight[0] - weight[1])
    expected = (x + 0.1 * direction.sign()).clamp(0, 1)
    torch.testing.assert_close(make(model, _gen(6))(x, y), expected, rtol=0, atol=1e-6)


# same layout as tests/test_semantics.py: p0 shared by all classes, p1..p3 private, p4 classes
# 0 and 1, p5 all; intersection weights (eps/alpha = 4) are exactly (4, 0, 0, 0, 0, 2)
_SHARED_W = torch.tensor([[2.0, 2.0, 0.0, 0.0, 1.0, 1.0],
                          [-2.0, 0.0, 2.0, 0.0, -1.0, 1.0],
                          [2.0, 0.0, 0.0, -2.0, 0.0, -1.0]]).view(3, 1, 2, 3)


def test_spat_pixels_of_weight_zero_never_move(linear_model):
    model = linear_model(_SHARED_W)
    x = torch.full((2, 1, 2, 3), 0.5)
    y = torch.tensor([0, 1])
    w = shared_pixel_weights(model, x, y, rule="intersection", eps=0.2, alpha=0.05)
    zero = (w == 0).expand_as(x)
    assert zero.any() and (~zero).any()
    # no random start: the zero-weight pixels stay exactly at x, the others move
    x_adv = SPAT(model, eps=0.2, alpha=0.05, steps=4, random_start=False)(x, y)
    assert torch.equal(x_adv[zero], x[zero])
    assert ((x_adv - x).abs()[~zero] > 0.01).all()
    # random start: they stay where the start put them (SPAT with 0 steps is the start)
    start = SPAT(model, eps=0.2, alpha=0.05, steps=0, generator=_gen(2))(x, y)
    x_adv = SPAT(model, eps=0.2, alpha=0.05, steps=4, generator=_gen(2))(x, y)
    assert not torch.equal(start, x)
    assert torch.equal(x_adv[zero], start[zero])
    assert not torch.equal(x_adv[~zero], start[~zero])


def test_spat_step_is_alpha_times_weight_times_sign(linear_model):
    # two classes on 8 pixels: the gradient sign is fixed (+-(W_1 - W_0)), so the trajectory is
    # delta <- clip(delta + alpha * w * sign, -eps, eps), box-clipped, computed here step by step
    weight = torch.zeros(2, 1, 2, 4)
    weight[0, 0] = torch.tensor([[1.0, 0.0, 0.5, 2.0], [0.3, 1.0, 0.0, 0.7]])
    weight[1, 0] = torch.tensor([[-1.0, 0.4, 0.0, 2.5], [0.6, -0.2, 0.0, 0.1]])
    model = linear_model(weight)
    x = _images(2, 1, 2, 4, seed=8) * 0.8 + 0.1
    y = torch.tensor([0, 1])
    eps, alpha, steps = 0.08, 0.01, 3
    w = shared_pixel_weights(model, x, y, rule="intersection", eps=eps, alpha=alpha)
    assert len(w.unique()) > 3                              # the weights differ between pixels
    sign = torch.where(y.view(-1, 1, 1, 1) == 0, weight[1] - weight[0], weight[0] - weight[1]).sign()
    delta = torch.zeros_like(x)
    for _ in range(steps):
        delta = (delta + alpha * w * sign).clamp(-eps, eps)
        delta = (x + delta).clamp(0, 1) - x
    x_adv = SPAT(model, eps=eps, alpha=alpha, steps=steps, random_start=False)(x, y)
    torch.testing.assert_close(x_adv, x + delta, rtol=0, atol=1e-6)


def test_radius_budget_reaches_each_pixels_own_corner(linear_model):
    # two classes: the gradient sign is fixed, so from x itself enough PGD steps end at
    # x + eps * r * sign(W_other - W_y): every pixel at its own radius, known in closed form
    weight = _SHARED_W[:2].clone()
    weight[1, 0, 1, 2] = -1.0          # same |W| (same evidence), but W_1 - W_0 != 0 there
    model = linear_model(weight)
    x = torch.full((2, 1, 2, 3), 0.5)
    y = torch.tensor([0, 1])
    # two classes of _SHARED_W: min_k P_k = (1/3, 0, 0, 0, 1/6, 1/6), so the score is
    # s = (1, 0, 0, 0, 1/2, 1/2) and r = min(1, c s) with mean(r) = radius_mean
    sign = torch.where(y.view(-1, 1, 1, 1) == 0, weight[1] - weight[0], weight[0] - weight[1]).sign()
    for mean, r in [(0.5, [1.0, 0, 0, 0, 1.0, 1.0]), (0.25, [0.75, 0, 0, 0, 0.375, 0.375])]:
        radius = torch.tensor(r).view(1, 1, 2, 3)
        attack = SPAT(model, eps=0.2, alpha=0.05, steps=8, random_start=False, budget="radius",
                      radius_mean=mean)
        result = attack.run(x, y)
        torch.testing.assert_close(result.radius, radius.expand(2, 1, 2, 3), rtol=0, atol=1e-6)
        torch.testing.assert_close(result.x_adv, x + 0.2 * radius * sign, rtol=0, atol=1e-6)
    # a random start stays inside each pixel's ball too
    result = SPAT(model, eps=0.2, alpha=0.05, steps=0, generator=_gen(3), budget="radius",
                  radius_mean=0.25).run(x, y)
    delta = result.x_adv - x
    assert (delta.flatten(1)[:, 1:4] == 0).all() and (delta.abs() <= 0.2 * result.radius + 1e-7).all()
    assert delta.flatten(1)[:, 0].abs().max() > 0.05


def test_radius_mean_one_is_pgd():
    # r = 1 everywhere: the eps-ball itself, with the same random numbers as PGD
    model = _model("wrn").eval()
    x, y = _batch(model)
    pgd = PGD(model, eps=EPS, alpha=ALPHA, steps=STEPS, generator=_gen(9))(x, y)
    result = SPAT(model, eps=EPS, alpha=ALPHA, steps=STEPS, budget="radius", radius_mean=1.0,
                  generator=_gen(9)).run(x, y)
    assert torch.equal(result.radius, torch.ones_like(result.radius))
    torch.testing.assert_close(result.x_adv, pgd, rtol=0, atol=1e-7)


def test_radius_budget_moves_the_perturbation_to_shared_pixels():
    # the manipulation check on a real model: the radius budget's |delta| sits on higher-score
    # pixels than PGD's, its random control's does not
    from spatlib.hypothesis import perturbation_mass_share
    from spatlib.semantics import shared_pixel_score
    model = _model("small_cnn").eval()
    x, y = _batch(model)
    score = shared_pixel_score(model, x, y, "intersection")
    share = {}
    for name, kw in [("pgd", dict(rule="none")), ("radius", dict(budget="radius")),
                     ("control", dict(rule="random", budget="radius"))]:
        x_adv = SPAT(model, eps=EPS, alpha=ALPHA, steps=10, generator=_gen(4), **kw)(x, y)
        share[name] = float(perturbation_mass_share(x_adv - x, score)[1].mean())
    assert share["radius"] > 1.3 * share["pgd"]
    assert abs(share["control"] - share["pgd"]) < 0.2 * share["pgd"]


def test_refresh_recomputes_the_weights(linear_model):
    # a linear model's evidence does not depend on x: refreshing changes nothing ...
    model = linear_model(_SHARED_W)
    x, y = _images(2, 1, 2, 3), torch.tensor([0, 2])
    runs = [SPAT(model, eps=0.2, alpha=0.05, steps=4, refresh=r, generator=_gen(1))(x, y)
            for r in (0, 1)]
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=1e-7)
    # ... while a nonlinear model's evidence at x_adv differs from the one at x
    model = _model("small_cnn").eval()
    x, y = _batch(model)
    runs = [SPAT(model, eps=EPS, alpha=ALPHA, steps=STEPS, refresh=r, generator=_gen(1))(x, y)
            for r in (0, 1)]
    assert not torch.equal(runs[0], runs[1])


def test_restarts_with_a_refreshed_radius_are_refused_before_any_attack(linear_model):
    model = linear_model(_SHARED_W)
    with pytest.raises(ValueError, match="restarts > 1 with a refreshed per-pixel radius"):
        SPAT(model, eps=0.2, alpha=0.05, steps=4, refresh=2, budget="radius", restarts=2)
    # the radius fixed at the clean x (refresh 0), or a refresh that never comes: one ball
    for refresh in (0, 4):
        x, y = _images(2, 1, 2, 3), torch.tensor([0, 2])
        result = SPAT(model, eps=0.2, alpha=0.05, steps=4, refresh=refresh, budget="radius",
                      restarts=2, generator=_gen(1)).run(x, y)
        assert (result.x_adv - x).abs().le(0.2 * result.radius + 1e-6).all()


# --------------------------------------------------------------------------------------------
# PGD and SPAT relations on a real model
def test_spat_rule_none_is_pgd_exactly():
    model = _model("wrn").eval()
    x, y = _batch(model)
    for kw in (dict(), dict(restarts=2, loss="kl")):
        pgd = PGD(model, eps=EPS, alpha=ALPHA, steps=STEPS, generator=_gen(9), **kw)(x, y)
        spat = SPAT(model, eps=EPS, alpha=ALPHA, steps=STEPS, rule="none", generator=_gen(9), **kw)(x, y)
        assert torch.equal(pgd, spat)


@pytest.mark.parametrize("model_name,saliency", [("wrn", "input_grad"), ("wrn", "cam"),
                                                  ("small_cnn", "cam"), ("small_cnn", "input_grad")])
def test_spat_clean_logits_are_the_eval_mode_logits_of_x(model_name, saliency):
    # the trainer reads its clean training accuracy from these instead of another forward
    model = _model(model_name).train()
    x, y = _batch(model)
    with torch.no_grad():
        expected = model.eval()(x)
    model.train()
    attack = SPAT(model, eps=EPS, alpha=ALPHA, steps=2, saliency=saliency, generator=_gen(1))
    result = attack.run(x, y)
    assert result.clean_logits is not None and not result.clean_logits.requires_grad
    torch.testing.assert_close(result.clean_logits, expected, rtol=1e-5, atol=1e-5)
    assert model.training                      # and the caller's mode is back
    # the same x_adv as the plain call (same generator state)
    assert torch.equal(result.x_adv, SPAT(model, eps=EPS, alpha=ALPHA, steps=2, saliency=saliency,
                                          generator=_gen(1))(x, y))
    # no f(x) where the attack ran none (rule none, PGD) or ran it in train mode
    assert SPAT(model, eps=EPS, alpha=ALPHA, steps=2, rule="none", generator=_gen(1)).run(x, y).clean_logits is None
    assert PGD(model, eps=EPS, alpha=ALPHA, steps=2, generator=_gen(1)).run(x, y).clean_logits is None
    assert SPAT(model, eps=EPS, alpha=ALPHA, steps=2, bn_mode="train", saliency=saliency,
                generator=_gen(1)).run(x, y).clean_logits is None


def test_spat_trades_attack_reuses_the_evidence_forward_for_its_kl_target():
    # TRADES' KL target softmax(f(x)) comes from the class evidence's forward: one f(x), not two
    model = _model("small_cnn").eval()
    x, y = _batch(model)
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    spat = SPAT(model, eps=EPS, alpha=ALPHA, steps=2, loss="kl", generator=_gen(4))
    result = spat.run(x, y)
    assert len(calls) == 1 + 2                 # the evidence's f(x) and one forward per step
    calls.clear()
    PGD(model, eps=EPS, alpha=ALPHA, steps=2, loss="kl", generator=_gen(4)).run(x, y)
    assert len(calls) == 1 + 2                 # PGD's own f(x) for the target, then the steps
    with torch.no_grad():
        target = F.softmax(model(x), 1)
    torch.testing.assert_close(F.softmax(result.clean_logits, 1), target, rtol=1e-5, atol=1e-6)


def test_restarts_keep_the_worst_case_per_example():
    # the first restart draws the same start as a single run: per example the result of three
    # restarts fools the model whenever the single run does, and otherwise has no lower loss
    model = _model("wrn").eval()
    x = _images(16, 1, 8, 8, seed=4)
    with torch.no_grad():
        y = model(x).argmax(1)
    one = PGD(model, eps=0.03, alpha=0.01, steps=3, generator=_gen(2))(x, y)
    three = PGD(model, eps=0.03, alpha=0.01, steps=3, restarts=3, generator=_gen(2))(x, y)
    with torch.no_grad():
        fooled1, fooled3 = model(one).argmax(1) != y, model(three).argmax(1) != y
        loss1 = F.cross_entropy(model(one), y, reduction="none")
        loss3 = F.cross_entropy(model(three), y, reduction="none")
    assert not (fooled1 & ~fooled3).any()
    same = fooled1 == fooled3
    assert (loss3[same] >= loss1[same] - 1e-6).all()
    assert not torch.equal(one, three)


def test_make_attack_builds_each_kind_with_one_step_convention():
    model = _model("small_cnn")
    pgd = make_attack("pgd", model, eps=0.1, alpha=0.02, steps=3)
    spat = make_attack("spat", model, eps=0.05, alpha=0.01, steps=3, loss="kl", rule="equality",
                       saliency="cam", refresh=2)
    assert type(pgd) is PGD and (pgd.eps, pgd.alpha, pgd.steps, pgd.loss) == (0.1, 0.02, 3, "ce")
    assert isinstance(spat, SPAT) and (spat.eps, spat.alpha, spat.loss) == (0.05, 0.01, "kl")
    assert (spat.rule, spat.saliency, spat.refresh) == ("equality", "cam", 2)
    # alpha None: 2.5 eps / steps (Madry et al.), for every iterative kind
    cw = make_attack("cw", model, eps=0.08, steps=10)
    assert type(cw) is CW and cw.loss == "margin" and cw.alpha == pytest.approx(0.02)
    fgsm = make_attack("fgsm", model, eps=0.08)
    assert type(fgsm) is FGSM and (fgsm.steps, fgsm.alpha) == (1, 0.08)
    with pytest.raises(ValueError, match="kind"):
        make_attack("apgd", model, eps=0.1)
    with pytest.raises(ValueError, match="margin"):
        make_attack("cw", model, eps=0.1, loss="ce")


def test_check_threat_model_checks_each_pixels_radius():
    x = torch.full((1, 1, 2, 2), 0.5)
    r = torch.tensor([1.0, 0.5, 0.0, 0.25]).view(1, 1, 2, 2)
    ok = x + 0.1 * r
    assert check_threat_model(x, ok, 0.1, r)["ok"]
    bad = ok.clone()
    bad[0, 0, 1, 0] += 0.01                      # a zero-radius pixel moved: inside eps, outside r
    report = check_threat_model(x, bad, 0.1, r)
    assert not report["ok"] and report["max_radius_excess"] == pytest.approx(0.01, abs=1e-6)
    assert check_threat_model(x, bad, 0.1)["ok"]  # the eps-ball alone does not see it
    with pytest.raises(spatlib.attacks.ThreatModelError, match="eps \\* r"):
        spatlib.attacks.assert_threat_model(x, bad, 0.1, r)


def test_check_threat_model_reports_violations():
    x = torch.full((1, 1, 2, 2), 0.5)
    assert check_threat_model(x, x + 0.1, 0.1)["ok"]
    bad = check_threat_model(x, x + 0.2, 0.1)
    assert not bad["ok"] and bad["max_linf"] == pytest.approx(0.2)
    assert not check_threat_model(x, x.clone().fill_(1.5), 1.0)["ok"]
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")
    assert check_threat_model(x, nan, 0.1)["n_nan"] == 1 and not check_threat_model(x, nan, 0.1)["ok"]


# --------------------------------------------------------------------------------------------
# bad input
@pytest.mark.parametrize("eps", [-0.01, 1.5, float("nan")])
@pytest.mark.parametrize("make", [
    lambda m, eps: FGSM(m, eps=eps),
    lambda m, eps: PGD(m, eps=eps, alpha=0.01, steps=1),
    lambda m, eps: CW(m, eps=eps),
    lambda m, eps: SPAT(m, eps=eps, alpha=0.01, steps=1),
], ids=["fgsm", "pgd", "cw", "spat"])
def test_eps_outside_unit_interval_raises_naming_eps(linear_model, make, eps):
    with pytest.raises(ValueError, match="eps"):
        make(linear_model(_SHARED_W), eps)


@pytest.mark.parametrize("kwargs, match", [
    (dict(rule="union"), "intersection, equality, agreement, random, none"),
    (dict(saliency="gradcam"), "input_grad, cam"),
    (dict(rule="none", saliency="gradcam"), "input_grad, cam"),
    (dict(loss="hinge"), "ce, kl, margin"),
    (dict(rule="agreement", saliency="cam"), "agreement.*input_grad"),
    (dict(classes="top3"), "topk"),
    (dict(bn_mode="frozen"), "eval, train"),
    (dict(budget="ball"), "budget: expected one of step, radius"),
    (dict(rule="none", budget="radius"), "budget 'radius' needs a shared-pixel rule"),
    (dict(budget="radius", radius_mean=0.0), "radius_mean: expected a number in \\(0, 1\\]"),
    (dict(budget="radius", radius_mean=1.5), "radius_mean"),
], ids=["rule", "saliency", "saliency-with-rule-none", "loss", "agreement-cam", "classes", "bn_mode",
        "budget", "radius-without-score", "radius-mean-zero", "radius-mean-above-one"])
def test_spat_bad_settings_raise_naming_allowed_values(linear_model, kwargs, match):
    model = linear_model(_SHARED_W)
    x, y = _images(1, 1, 2, 3), torch.tensor([0])
    with pytest.raises(ValueError, match=match):
        SPAT(model, eps=0.1, alpha=0.02, steps=1, **kwargs)(x, y)


def test_pgd_bad_settings_raise(linear_model):
    model = linear_model(_SHARED_W)
    with pytest.raises(ValueError, match="ce, kl, margin"):
        PGD(model, eps=0.1, alpha=0.01, steps=1, loss="hinge")
    with pytest.raises(ValueError, match="alpha"):
        PGD(model, eps=0.1, alpha=0.0, steps=1)
    with pytest.raises(ValueError, match="restarts"):
        PGD(model, eps=0.1, alpha=0.01, steps=1, restarts=0)
    with pytest.raises(ValueError, match="random_start"):
        PGD(model, eps=0.1, alpha=0.01, steps=1, random_start="uniform")
    with pytest.raises(ValueError, match="refresh"):
        SPAT(model, eps=0.1, alpha=0.01, steps=1, refresh=-1)


def test_kl_loss_without_random_start_is_refused():
    # KL(f(x) || f(x_adv)) has zero gradient at x_adv = x: such an attack would never move
    model = _model("wrn").eval()
    with pytest.raises(ValueError, match="random start"):
        PGD(model, eps=EPS, alpha=ALPHA, steps=3, loss="kl", random_start=False)


class _Wave(nn.Module):
    """Two classes on a 1x1 image p: z1 - z0 = sin(2 pi p) - 0.7. From p = 0.1 (correct, class
    0), sign steps of 0.2 go to 0.3 (fooled: sin(0.6 pi) - 0.7 > 0) and back to 0.1 (correct)."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))   # a parameter, so the model has a device

    def forward(self, x):
        d = torch.sin(2 * math.pi * x.flatten(1)[:, 0]) - 0.7
        return torch.stack([torch.zeros_like(d), d], 1)


@pytest.mark.parametrize("kind", ["pgd", "cw"])
def test_keep_fooled_returns_the_iterate_that_fooled_the_model(kind):
    model = _Wave().eval()
    x, y = torch.tensor([[[[0.1]]]]), torch.tensor([0])
    last = make_attack(kind, model, eps=0.45, alpha=0.2, steps=2, random_start=False)(x, y)
    kept = make_attack(kind, model, eps=0.45, alpha=0.2, steps=2, random_start=False,
                       keep_fooled=True)(x, y)
    assert float(last) == pytest.approx(0.1) and int(model(last).argmax()) == 0   # textbook: correct again
    assert float(kept) == pytest.approx(0.3) and int(model(kept).argmax()) == 1   # the fooling iterate
    # the suite keeps fooling iterates; training attacks (make_attack's default) do not
    assert suite_attack("pgd20", model, 0.1).keep_fooled and suite_attack("cw", model, 0.1).keep_fooled
    assert not make_attack("pgd", model, eps=0.1).keep_fooled


def test_keep_fooled_never_raises_accuracy_and_keeps_the_threat_model():
    model = _model("small_cnn").eval()
    x, y = _batch(model)
    plain = PGD(model, eps=EPS, alpha=EPS / 4, steps=10, generator=_gen(5))(x, y)
    kept = PGD(model, eps=EPS, alpha=EPS / 4, steps=10, generator=_gen(5), keep_fooled=True)(x, y)
    with torch.no_grad():
        ok_plain, ok_kept = model(plain).argmax(1) == y, model(kept).argmax(1) == y
    assert not (ok_kept & ~ok_plain).any()          # fooled by the plain attack: fooled here too
    assert check_threat_model(x, kept, EPS)["ok"]
    same = ok_kept == ok_plain
    assert torch.equal(kept[same & ok_kept], plain[same & ok_kept])   # never fooled: the last iterate
