"""Tests for spatlib.semantics: class evidence maps, shared-pixel rules and step weights.

Known answers come from linear models (tests/conftest.py) whose input gradients and class
activation maps can be written by hand; the batched backward is checked against a plain
per-class loop of ``torch.autograd.grad`` on real nonlinear models.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from spatlib.models import build_model
from spatlib.semantics import (budget_preserving_weights, class_evidence, resolve_classes,
                               per_pixel_radius, shared_pixel_score, shared_pixel_weights,
                               shared_pixels)

RULES_BY_SALIENCY = [("intersection", "input_grad"), ("intersection", "cam"),
                     ("equality", "input_grad"), ("equality", "cam"),
                     ("agreement", "input_grad"), ("random", "input_grad"), ("random", "cam")]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(n: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, c, h, w, generator=_gen(seed))


def _wrn():
    """WRN-10-1 on 1x8x8: BatchNorm and a GAP-linear head (exact CAM), ~80k parameters."""
    return build_model("wide_resnet", 10, 1, depth=10, width=1, seed=0).eval()


# --------------------------------------------------------------------------------------------
# class evidence: known answers on linear models
def test_input_grad_maps_of_linear_model_are_abs_weights(linear_model):
    weight = torch.randn(4, 2, 3, 3, generator=_gen(1))
    model = linear_model(weight, torch.randn(4, generator=_gen(2)))
    y = torch.tensor([0, 3])
    expected_maps = weight.abs().sum(1).expand(2, 4, 3, 3)           # sum_c |W_kc|
    for seed in (0, 1):  # a linear model's evidence does not depend on x
        ev = class_evidence(model, _images(2, 2, 3, 3, seed), y, saliency="input_grad")
        assert ev.maps.shape == (2, 4, 3, 3)
        torch.testing.assert_close(ev.maps, expected_maps, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ev.grads, weight.expand(2, 4, 2, 3, 3), rtol=1e-6, atol=1e-6)
        assert torch.equal(ev.classes, torch.arange(4).expand(2, 4))


def test_cam_of_gap_linear_model_is_relu_of_weighted_channels(gap_linear_model):
    # feature map size == input size, so the upsampling must be the identity
    v = torch.tensor([[1.0, -2.0], [-1.0, 0.5], [0.3, 0.3]])
    model = gap_linear_model(v)
    x = _images(2, 2, 4, 4)
    ev = class_evidence(model, x, torch.tensor([0, 1]), saliency="cam")
    raw = torch.einsum("kc,nchw->nkhw", v, x)
    assert (raw < 0).any() and (raw > 0).any()        # the relu matters in this example
    torch.testing.assert_close(ev.maps, raw.clamp_min(0), rtol=1e-6, atol=1e-6)
    assert ev.grads is None


def test_cam_of_mlp_head_is_gradient_times_activation(linear_model):
    # no GAP-linear head: relu(sum_c dz_k/dF_c * F_c); here F = x and dz_k/dF = W_k
    weight = torch.randn(3, 2, 4, 4, generator=_gen(3))
    model = linear_model(weight)
    x = _images(2, 2, 4, 4, seed=4)
    ev = class_evidence(model, x, torch.tensor([2, 0]), saliency="cam")
    expected = torch.einsum("kchw,nchw->nkhw", weight, x).clamp_min(0)
    torch.testing.assert_close(ev.maps, expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# the batched backward equals a per-class loop on real nonlinear models
def _loop_input_grads(model, x, classes):
    xg = x.clone().requires_grad_(True)
    z = model(xg)
    # examples are independent in eval mode, so d sum_n z[n, c_nj] / dx is per-example
    return torch.stack([torch.autograd.grad(z.gather(1, classes[:, j:j + 1]).sum(), xg,
                                            retain_graph=True)[0]
                        for j in range(classes.shape[1])], 1)


# preact_resnet18 with 4 classes and 2 images: each slot of the batched backward costs about a
# full backward of the 11M-parameter net on CPU, so K and N stay small
@pytest.mark.parametrize("name, shape, k, y", [("small_cnn", (1, 8, 8), 10, [4, 0, 9]),
                                               ("preact_resnet18", (3, 8, 8), 4, [3, 0])])
@pytest.mark.parametrize("class_chunk", [1, 3, 16])
def test_batched_input_gradients_equal_per_class_loop(name, shape, k, y, class_chunk):
    model = build_model(name, k, shape[0], image_size=shape[1:], seed=0).eval()
    y = torch.tensor(y)
    x = _images(len(y), *shape)
    ev = class_evidence(model, x, y, "all", "input_grad", class_chunk)
    ref = _loop_input_grads(model, x, torch.arange(k).expand(len(y), k))
    assert ev.grads.shape == (len(y), k, *shape)
    assert ref.abs().sum() > 0
    torch.testing.assert_close(ev.grads, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ev.maps, ref.abs().sum(2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("class_chunk", [1, 3, 16])
def test_batched_cam_of_mlp_head_equals_per_class_loop(class_chunk):
    model = build_model("small_cnn", 10, 1, image_size=8, seed=0).eval()
    x = _images(3, 1, 8, 8)
    y = torch.tensor([1, 2, 3])
    ev = class_evidence(model, x, y, "all", "cam", class_chunk)
    with torch.no_grad():
        feats = model.features(x)
    f = feats.clone().requires_grad_(True)
    z = model.head(f)
    grads = torch.stack([torch.autograd.grad(z[:, k].sum(), f, retain_graph=True)[0]
                         for k in range(10)], 1)
    ref = F.interpolate((grads * feats.unsqueeze(1)).sum(2).clamp_min(0), size=(8, 8),
                        mode="bilinear", align_corners=False)
    assert ref.sum() > 0
    torch.testing.assert_close(ev.maps, ref, rtol=1e-5, atol=1e-6)


def test_topk_evidence_matches_the_all_classes_evidence():
    model = build_model("small_cnn", 10, 1, image_size=8, seed=0).eval()
    x = _images(3, 1, 8, 8)
    y = torch.tensor([4, 0, 9])
    full = class_evidence(model, x, y, "all", "input_grad", class_chunk=3)
    top = class_evidence(model, x, y, "topk:4", "input_grad", class_chunk=3)
    logits = model(x).detach()
    assert torch.equal(top.classes[:, 0], y)
    for n in range(3):
        others = [k for k in logits[n].argsort(descending=True).tolist() if k != int(y[n])]
        assert top.classes[n, 1:].tolist() == others[:3]
    index = top.classes[:, :, None, None].expand(-1, -1, 8, 8)
    torch.testing.assert_close(top.maps, full.maps.gather(1, index), rtol=1e-5, atol=1e-6)


def test_resolve_classes_topk_puts_true_class_first_then_highest_logits():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 0.0],
                           [9.0, 2.0, 8.0, 7.0, 1.0],
                           [1.0, 5.0, 3.0, 4.0, 0.0]])
    y = torch.tensor([1, 0, 4])
    assert resolve_classes(logits, y, "topk:3").tolist() == [[1, 3, 2], [0, 2, 3], [4, 1, 3]]
    assert resolve_classes(logits, y, "topk:1").tolist() == [[1], [0], [4]]
    # more than K: every class once, the true one first
    assert resolve_classes(logits, y, "topk:99").tolist() == [[1, 3, 2, 0, 4], [0, 2, 3, 1, 4],
                                                              [4, 1, 3, 2, 0]]
    assert resolve_classes(logits, y, "all").tolist() == [list(range(5))] * 3


# --------------------------------------------------------------------------------------------
# shared-pixel rules: known answers
# 6 pixels (1 x 2 x 3), 3 classes; |W| per pixel:
#   p0 all classes (2, 2, 2), p1 class 0 only, p2 class 1 only, p3 class 2 only,
#   p4 classes 0 and 1 (1, 1, 0), p5 all classes (1, 1, 1)
# class sums 6, 6, 5 -> P_k(p0) = 1/3, 1/3, 2/5 and P_k(p5) = 1/6, 1/6, 1/5
_SHARED_W = torch.tensor([[2.0, 2.0, 0.0, 0.0, 1.0, 1.0],
                          [-2.0, 0.0, 2.0, 0.0, -1.0, 1.0],
                          [2.0, 0.0, 0.0, -2.0, 0.0, -1.0]]).view(3, 1, 2, 3)


def test_intersection_scores_and_weights_by_hand(linear_model):
    model = linear_model(_SHARED_W)
    x, y = _images(2, 1, 2, 3), torch.tensor([0, 2])
    s = shared_pixel_score(model, x, y, rule="intersection")
    # min_k P_k = (1/3, 0, 0, 0, 0, 1/6), scaled by its max
    expected = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.5]).view(1, 1, 2, 3).expand(2, 1, 2, 3)
    torch.testing.assert_close(s, expected, rtol=1e-6, atol=1e-7)
    # mean(s) = 1/4: uncapped weights 4 and 2; a cap of 3 moves the excess of p0 to p5
    w = shared_pixel_weights(model, x, y, rule="intersection", eps=0.4, alpha=0.1)
    torch.testing.assert_close(w, 4 * expected, rtol=1e-6, atol=1e-6)
    w = shared_pixel_weights(model, x, y, rule="intersection", eps=0.3, alpha=0.1)
    torch.testing.assert_close(w, torch.tensor([3.0, 0, 0, 0, 0, 3]).view(1, 1, 2, 3).expand(2, 1, 2, 3),
                               rtol=1e-5, atol=1e-5)
    # zero weight on the pixels only one class uses, the highest on the one all use alike
    assert (w.flatten(1)[:, 1:4] == 0).all()
    assert (w.flatten(1).argmax(1) == 0).all()


def test_equality_scores_by_hand(linear_model):
    # 8 pixels (1 x 2 x 4), 3 classes, every class sum is 4:
    #   p0 (1, 1, 1): weighed alike by all -> 1;  p1..p3 one class each -> 0;
    #   p4 (1, 1, 0): ignored by class 2 -> 0;   p5 nobody -> 0;  p6 (1, 1, 2): in between
    a = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0],
                      [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0],
                      [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 2.0, 0.0]])
    signs = torch.tensor([1.0, -1.0]).repeat(4)          # evidence is |dz/dx|: signs must not matter
    model = linear_model((a * signs).view(3, 1, 2, 4))
    s = shared_pixel_score(model, _images(1, 1, 2, 4), torch.tensor([1]), rule="equality")
    p6 = [1 / 4, 1 / 4, 2 / 4]
    geo_over_arith = math.prod(p6) ** (1 / 3) / (sum(p6) / 3)
    expected = torch.tensor([1.0, 0, 0, 0, 0, 0, geo_over_arith, 0]).view(1, 1, 2, 4)
    torch.testing.assert_close(s, expected, rtol=1e-5, atol=1e-6)
    assert 0 < geo_over_arith < 1


def test_agreement_is_fraction_of_other_classes_agreeing_in_sign(linear_model):
    k, c, h, w = 4, 2, 2, 2
    weight = torch.randn(k, c, h, w, generator=_gen(5))
    weight[:, 0, 0, 0] = torch.tensor([0.0, 1.0, 2.0, 3.0])  # y=0: D = 1, 2, 3 all agree
    model = linear_model(weight)
    y = torch.tensor([0, 2])
    s = shared_pixel_score(model, _images(2, c, h, w), y, rule="agreement")
    assert s.shape == (2, c, h, w)
    expected = torch.empty(2, c, h, w)
    for n, yn in enumerate(y.tolist()):
        for idx in [(ci, hi, wi) for ci in range(c) for hi in range(h) for wi in range(w)]:
            d = [float(weight[(kk, *idx)] - weight[(yn, *idx)]) for kk in range(k) if kk != yn]
            pos, neg = sum(v > 0 for v in d), sum(v < 0 for v in d)
            expected[(n, *idx)] = max(pos, neg) / (k - 1)
    torch.testing.assert_close(s, expected)
    assert s[0, 0, 0, 0] == 1.0                                 # every other class agrees
    assert s[1, 0, 0, 0] == pytest.approx(2 / 3)               # y=2: D = -2, -1, +1


def test_random_rule_shuffles_the_intersection_weights():
    model = build_model("small_cnn", 10, 1, image_size=8, seed=0).eval()
    x, y = _images(3, 1, 8, 8), torch.tensor([1, 5, 7])
    kw = dict(eps=0.1, alpha=0.025)
    inter = shared_pixel_weights(model, x, y, rule="intersection", **kw)
    rng_before = torch.get_rng_state()
    rand = shared_pixel_weights(model, x, y, rule="random", generator=_gen(7), **kw)
    again = shared_pixel_weights(model, x, y, rule="random", generator=_gen(7), **kw)
    other = shared_pixel_weights(model, x, y, rule="random", generator=_gen(8), **kw)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert torch.equal(rand, again)
    assert not torch.equal(rand, other)
    # same histogram per image, different places
    torch.testing.assert_close(rand.flatten(1).sort(1).values, inter.flatten(1).sort(1).values)
    for n in range(3):
        assert not torch.equal(rand[n], inter[n])
    s_inter = shared_pixel_score(model, x, y, rule="intersection")
    s_rand = shared_pixel_score(model, x, y, rule="random", generator=_gen(7))
    torch.testing.assert_close(s_rand.flatten(1).sort(1).values, s_inter.flatten(1).sort(1).values)


def test_per_pixel_radius_by_hand():
    # score (1, 0, 0, 0, 0, 1/2): r = min(1, c s), water-filled to the mean
    s = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.5]).view(1, 1, 2, 3)
    cases = {0.25: [1.0, 0, 0, 0, 0, 0.5],           # c = 1: nothing capped
             1 / 3: [1.0, 0, 0, 0, 0, 1.0],          # both shared pixels at the cap, nothing left
             0.5: [1.0, 0.25, 0.25, 0.25, 0.25, 1.0],  # the rest spread evenly: no score there
             1.0: [1.0] * 6}                         # PGD's ball
    for mean, expected in cases.items():
        r = per_pixel_radius(s, 1.0, mean)
        torch.testing.assert_close(r, torch.tensor(expected).view(1, 1, 2, 3), rtol=0, atol=1e-6)
        assert float(r.mean()) == pytest.approx(mean, abs=1e-6)
    # gamma 2: s^2 = (1, 0, .., 1/4); c = 1.5 / 1.25 = 1.2 caps p0, then c = 0.5 / 0.25 = 2
    torch.testing.assert_close(per_pixel_radius(s, 2.0, 0.25),
                               torch.tensor([1.0, 0, 0, 0, 0, 0.5]).view(1, 1, 2, 3), rtol=0, atol=1e-6)
    torch.testing.assert_close(per_pixel_radius(torch.zeros(1, 1, 2, 2), 1.0, 0.3),
                               torch.full((1, 1, 2, 2), 0.3), rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="radius_mean"):
        per_pixel_radius(s, 1.0, 0.0)


@pytest.mark.parametrize("mean", [0.2, 0.5, 0.8])
def test_radius_of_a_real_model_keeps_its_mean_and_the_control_its_radii(mean):
    model = build_model("small_cnn", 10, 1, image_size=8, seed=0).eval()
    x, y = _images(3, 1, 8, 8), torch.tensor([1, 5, 7])
    inter = shared_pixels(model, x, y, "intersection", budget="radius", radius_mean=mean)
    rand = shared_pixels(model, x, y, "random", budget="radius", radius_mean=mean, generator=_gen(7))
    assert inter.weights is None and inter.radius.shape == (3, 1, 8, 8)
    torch.testing.assert_close(inter.radius.flatten(1).mean(1), torch.full((3,), mean), rtol=0, atol=1e-5)
    assert float(inter.radius.min()) >= 0 and float(inter.radius.max()) <= 1
    # higher score, larger ball
    order = inter.score.flatten(1).argsort(1)
    assert (inter.radius.flatten(1).gather(1, order).diff(dim=1) >= -1e-6).all()
    # the control: the same radii per image (same total budget) on other pixels
    torch.testing.assert_close(rand.radius.flatten(1).sort(1).values, inter.radius.flatten(1).sort(1).values)
    assert not torch.equal(rand.radius, inter.radius)


def test_rule_none_is_all_ones(linear_model):
    model = linear_model(_SHARED_W)
    x = _images(2, 1, 2, 3)
    s = shared_pixel_score(model, x, torch.tensor([0, 1]), rule="none")
    assert torch.equal(s, torch.ones(2, 1, 2, 3))
    w = shared_pixel_weights(model, x, torch.tensor([0, 1]), rule="none", eps=0.1, alpha=0.01)
    assert torch.equal(w, torch.ones(2, 1, 2, 3))


@pytest.mark.parametrize("rule, saliency", RULES_BY_SALIENCY)
def test_scores_in_unit_interval_and_weights_keep_the_budget(rule, saliency):
    model = _wrn()
    x, y = _images(4, 1, 8, 8), torch.arange(4)
    s = shared_pixel_score(model, x, y, rule, saliency, generator=_gen(0))
    assert s.shape == (4, 1, 8, 8)                     # one channel: pixel and element rules alike
    assert torch.isfinite(s).all() and s.min() >= 0 and s.max() <= 1
    assert s.max() > 0
    for gamma in (0.5, 1.0, 3.0):
        w = shared_pixel_weights(model, x, y, rule, saliency=saliency, gamma=gamma, eps=0.1,
                                 alpha=0.025, generator=_gen(0))
        assert w.dtype == torch.float32 and torch.isfinite(w).all() and w.min() >= 0
        assert w.max() <= 4.0 + 1e-5                                  # eps / alpha
        torch.testing.assert_close(w.mean((1, 2, 3)), torch.ones(4), rtol=0, atol=1e-5)


def test_evidence_leaves_model_mode_and_global_rng_alone():
    model = _wrn().train()
    rng_before = torch.get_rng_state()
    shared_pixel_weights(model, _images(2, 1, 8, 8), torch.tensor([0, 1]), rule="random",
                         eps=0.1, alpha=0.05, generator=_gen(0))
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert all(m.training for m in model.modules())


# --------------------------------------------------------------------------------------------
# budget-preserving weights (water-filling)
def _water_filling(score: torch.Tensor, gamma: float, cap: float) -> torch.Tensor:
    """Reference, exact: w = min(cap, c * s**gamma) with mean(w) = 1 per image. With the scores
    sorted descending, capping the top m leaves c_m = (n - m cap) / sum(rest); the answer is the
    smallest m whose largest uncapped weight c_m * s_m fits under the cap."""
    out = []
    for s in score.double().pow(gamma).flatten(1):
        n = s.numel()
        v, order = s.sort(descending=True)
        m = torch.arange(n, dtype=torch.float64)
        tail = v.flip(0).cumsum(0).flip(0)                     # sum of v[m:]
        c = (n - cap * m) / tail
        first = int(torch.nonzero(c * v <= cap)[0])
        w = torch.empty_like(s)
        w[order] = torch.cat([torch.full((first,), cap, dtype=s.dtype), c[first] * v[first:]])
        out.append(w)
    return torch.stack(out).view(score.shape).float()


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0])
def test_weights_without_binding_cap_are_normalized_powers(gamma):
    s = _images(3, 1, 5, 5, seed=9)
    expected = s ** gamma / (s ** gamma).mean((1, 2, 3), keepdim=True)
    torch.testing.assert_close(budget_preserving_weights(s, gamma), expected)
    torch.testing.assert_close(budget_preserving_weights(s, gamma, cap=100.0), expected)


def test_water_filling_by_hand():
    # s = (8, 4, 1 x 6), cap 2: s/mean = (3.56, 1.78, .44...): cap p0, rescale -> p1 = 2.4, cap it,
    # the six others share the remaining 8 - 4: 2/3 each
    s = torch.tensor([8.0, 4.0, 1, 1, 1, 1, 1, 1]).view(1, 1, 2, 4)
    w = budget_preserving_weights(s, 1.0, cap=2.0)
    torch.testing.assert_close(w, torch.tensor([2.0, 2.0] + [2 / 3] * 6).view(1, 1, 2, 4))


def test_score_with_small_support_spreads_the_rest_evenly():
    # 5 of 64 pixels nonzero, cap 4: they can hold 20 of the 64 units of step mass at most
    s = torch.zeros(2, 1, 8, 8)
    s.view(2, -1)[0, [3, 10, 17, 40, 63]] = torch.tensor([1.0, 0.5, 0.2, 0.9, 0.05])
    s.view(2, -1)[1, 5] = 1.0
    w = budget_preserving_weights(s, 1.0, cap=4.0)
    torch.testing.assert_close(w.mean((1, 2, 3)), torch.ones(2), rtol=0, atol=1e-5)
    assert w.max() <= 4.0
    torch.testing.assert_close(w.view(2, -1)[0, [3, 10, 17, 40, 63]], torch.full((5,), 4.0))
    rest = torch.ones(64, dtype=torch.bool)
    rest[[3, 10, 17, 40, 63]] = False
    torch.testing.assert_close(w.view(2, -1)[0, rest], torch.full((59,), 44 / 59))
    torch.testing.assert_close(w.view(2, -1)[1, 5], torch.tensor(4.0))
    torch.testing.assert_close(w.view(2, -1)[1, torch.arange(64) != 5], torch.full((63,), 60 / 63))


def test_all_zero_score_gives_plain_pgd_weights():
    assert torch.equal(budget_preserving_weights(torch.zeros(2, 1, 4, 4), 1.0, cap=4.0),
                       torch.ones(2, 1, 4, 4))


@pytest.mark.parametrize("gamma", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("cap", [1.25, 2.0, 4.0])
def test_capped_weights_are_the_water_filling_solution(gamma, cap):
    # 32x32 (CIFAR-sized) heavy-tailed scores, like the min over classes of normalized maps
    t = torch.linspace(0, 1, 1024).view(1, 1, 32, 32)
    s = torch.cat([t ** 16, _images(1, 1, 32, 32, seed=11) ** 6, _images(1, 1, 32, 32, seed=12)])
    w = budget_preserving_weights(s, gamma, cap)
    assert w.max() <= cap * (1 + 1e-6)
    torch.testing.assert_close(w.mean((1, 2, 3)), torch.ones(3), rtol=0, atol=1e-5)
    torch.testing.assert_close(w, _water_filling(s, gamma, cap), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# bad input
def test_unknown_rule_saliency_classes_raise_with_allowed_values(linear_model):
    model = linear_model(_SHARED_W)
    x, y = _images(1, 1, 2, 3), torch.tensor([0])
    with pytest.raises(ValueError, match="intersection, equality, agreement, random, none"):
        shared_pixel_score(model, x, y, rule="union")
    with pytest.raises(ValueError, match="input_grad, cam"):
        shared_pixel_score(model, x, y, saliency="gradcam")
    with pytest.raises(ValueError, match="input_grad, cam"):
        class_evidence(model, x, y, saliency="gradcam")
    with pytest.raises(ValueError, match="'all' or 'topk:N'"):
        shared_pixel_score(model, x, y, classes="top3")
    with pytest.raises(ValueError, match="class_chunk"):
        class_evidence(model, x, y, class_chunk=0)


def test_agreement_needs_input_gradients_and_the_true_class(linear_model):
    model = linear_model(_SHARED_W)
    x, y = _images(1, 1, 2, 3), torch.tensor([0])
    with pytest.raises(ValueError, match="agreement.*input_grad"):
        shared_pixel_weights(model, x, y, rule="agreement", saliency="cam")
    with pytest.raises(ValueError, match="true class"):
        shared_pixel_score(model, x, y, rule="agreement", classes=torch.tensor([[1, 2]]))


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("class_chunk", [1, 3, 16])
def test_both_vjp_paths_equal_the_per_class_loop(batched, class_chunk):
    # the vmapped backward (default on GPUs) and the per-class backward (default on CPUs) must
    # agree with a plain loop wherever they run
    from spatlib.semantics import _input_gradients
    model = build_model("small_cnn", 10, 1, image_size=8, seed=0).eval()
    x = _images(3, 1, 8, 8).requires_grad_(True)
    z = model(x)
    classes = torch.arange(10).expand(3, 10)
    got = _input_gradients(z.gather(1, classes), x, class_chunk, batched=batched)
    ref = _loop_input_grads(model, x.detach(), classes)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
