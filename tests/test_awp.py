"""Adversarial weight perturbation: one trainer step equals the AWP authors' step.

The oracle below is a line-for-line re-implementation of the authors' ``AdvWeightPerturb``
(``AT_AWP/utils_awp.py``) and ``TradesAWP`` (``TRADES_AWP/utils_awp.py``) of
github.com/csdongxian/AWP, with the training steps of ``AT_AWP/train_cifar10.py`` and
``TRADES_AWP/train_trades_cifar.py`` that call them: a proxy model loaded from the model, one
SGD step of the negated loss, the difference rescaled to the layer's norm, added with gamma,
the optimizer step at the perturbed weights, then the perturbation subtracted.
"""
from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spatlib.awp import WeightPerturbation
from spatlib.config import ConfigError, from_dict
from spatlib.methods import METHODS
from spatlib.train import Trainer

# --------------------------------------------------------------------------------------------
# the oracle: the authors' code, as written (EPS, the state_dict zip, 'weight' in the key)
EPS = 1E-20


def diff_in_weights(model, proxy):
    diff_dict = OrderedDict()
    model_state_dict = model.state_dict()
    proxy_state_dict = proxy.state_dict()
    for (old_k, old_w), (new_k, new_w) in zip(model_state_dict.items(), proxy_state_dict.items()):
        if len(old_w.size()) <= 1:
            continue
        if 'weight' in old_k:
            diff_w = new_w - old_w
            diff_dict[old_k] = old_w.norm() / (diff_w.norm() + EPS) * diff_w
    return diff_dict


def add_into_weights(model, diff, coeff=1.0):
    names_in_diff = diff.keys()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in names_in_diff:
                param.add_(coeff * diff[name])


class AdvWeightPerturb:
    """AT-AWP; ``loss`` generalizes the authors' CE to the method's own loss (MART, SPAT-AT)."""

    def __init__(self, model, proxy, proxy_optim, gamma, loss=None, beta=6.0):
        self.model, self.proxy, self.proxy_optim, self.gamma = model, proxy, proxy_optim, gamma
        self.loss, self.beta = loss, beta

    def calc_awp(self, inputs_adv, targets, inputs_clean=None):
        self.proxy.load_state_dict(self.model.state_dict())
        self.proxy.train()
        if self.loss is None:
            loss = - F.cross_entropy(self.proxy(inputs_adv), targets)
        else:
            loss = - self.loss(self.proxy(inputs_clean), self.proxy(inputs_adv), targets, self.beta)
        self.proxy_optim.zero_grad()
        loss.backward()
        self.proxy_optim.step()
        diff = diff_in_weights(self.model, self.proxy)
        return diff

    def perturb(self, diff):
        add_into_weights(self.model, diff, coeff=1.0 * self.gamma)

    def restore(self, diff):
        add_into_weights(self.model, diff, coeff=-1.0 * self.gamma)


class TradesAWP(AdvWeightPerturb):
    """The authors' TradesAWP: their perturb and restore are AdvWeightPerturb's, word for word."""

    def calc_awp(self, inputs_adv, inputs_clean, targets, beta):
        self.proxy.load_state_dict(self.model.state_dict())
        self.proxy.train()
        loss_natural = F.cross_entropy(self.proxy(inputs_clean), targets)
        loss_robust = F.kl_div(F.log_softmax(self.proxy(inputs_adv), dim=1),
                               F.softmax(self.proxy(inputs_clean), dim=1),
                               reduction='batchmean')
        loss = - 1.0 * (loss_natural + beta * loss_robust)
        self.proxy_optim.zero_grad()
        loss.backward()
        self.proxy_optim.step()
        diff = diff_in_weights(self.model, self.proxy)
        return diff


def authors_step(method: str, model, opt, x, x_adv, y, *, gamma: float, beta: float) -> float:
    """One training step of the authors' loops (train_cifar10.py for AT, train_trades_cifar.py
    for TRADES; the AT loop with the method's loss for MART and SPAT). Returns the loss."""
    proxy = copy.deepcopy(model)        # the authors build a second model of the architecture
    model.train()
    if method in ("trades", "spat_trades"):
        adversary = TradesAWP(model, proxy, torch.optim.SGD(proxy.parameters(), lr=0.1), gamma)
        awp = adversary.calc_awp(inputs_adv=x_adv, inputs_clean=x, targets=y, beta=beta)
        adversary.perturb(awp)
        opt.zero_grad()
        logits_adv = model(x_adv)
        loss_robust = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(model(x), dim=1),
                               reduction='batchmean')
        logits = model(x)
        loss = F.cross_entropy(logits, y) + beta * loss_robust
    else:
        own = None if method in ("pgd_at", "spat_at") else METHODS[method].loss
        adversary = AdvWeightPerturb(model, proxy, torch.optim.SGD(proxy.parameters(), lr=0.01),
                                     gamma, loss=own, beta=beta)
        awp = adversary.calc_awp(inputs_adv=x_adv, targets=y, inputs_clean=x)
        adversary.perturb(awp)
        loss = (F.cross_entropy(model(x_adv), y) if own is None
                else own(model(x), model(x_adv), y, beta))
        opt.zero_grad()
    loss.backward()
    opt.step()
    adversary.restore(awp)
    return loss.item()


# --------------------------------------------------------------------------------------------
def awp_config(method: str, **train) -> dict:
    """A WRN-10-1 (BatchNorm, 10 perturbed weight tensors) on 8x8 synthetic images. A large lr
    and weight decay make the optimizer's step at the perturbed weights (lr * wd * v) far above
    float rounding, so restoring before the step instead would fail the comparison."""
    return {"name": "awp", "seed": 0,
            "data": {"name": "synthetic", "synthetic_shape": [3, 8, 8], "synthetic_classes": 10,
                     "synthetic_train": 64, "synthetic_test": 16, "augment": False},
            "model": {"name": "wide_resnet", "depth": 10, "width": 1},
            "attack": {"eps": 8 / 255, "alpha": 2 / 255, "steps": 2, "rule": "intersection"},
            "train": {"method": method, "epochs": 4, "batch_size": 16, "lr": 0.5, "momentum": 0.9,
                      "weight_decay": 0.1, "schedule": "cosine", "progress": False,
                      "awp_gamma": 0.01 if method in ("pgd_at", "mart", "spat_at") else 0.005,
                      **train}}


def recorded_attack(trainer: Trainer) -> dict:
    """Make ``trainer``'s attack keep its x_adv in the returned dict."""
    kept, build = {}, trainer.attack

    def attack(eps):
        a = build(eps)
        run = a.run

        def run_and_keep(x, y):
            res = run(x, y)
            kept["x_adv"] = res.x_adv.detach().clone()
            return res
        a.run = run_and_keep
        return a
    trainer.attack = attack
    return kept


@pytest.mark.parametrize("method", ["pgd_at", "trades", "mart", "spat_at", "spat_trades"])
def test_one_step_matches_the_authors_awp(method):
    cfg = from_dict(awp_config(method))
    t = Trainer(cfg, device=torch.device("cpu"))
    x, y = next(iter(t.loader))
    model = copy.deepcopy(t.model)          # the oracle starts from the same weights
    kept = recorded_attack(t)
    stats = t.train_step(x, y, 0)
    tc = cfg.train
    opt = torch.optim.SGD(model.parameters(), lr=stats.lr, momentum=tc.momentum,
                          weight_decay=tc.weight_decay)
    loss = authors_step(method, model, opt, x, kept["x_adv"], y, gamma=tc.awp_gamma, beta=tc.beta)
    assert float(stats.loss) == pytest.approx(loss, rel=1e-5)
    ours, theirs = t.model.state_dict(), model.state_dict()
    for k, w in theirs.items():
        if w.is_floating_point() and "running" not in k:
            assert torch.allclose(ours[k], w, rtol=1e-5, atol=2e-6), k
    if method in ("pgd_at", "spat_at"):
        # one training forward (on x_adv) in both: the BN statistics match only if the ascent
        # left them untouched (TRADES' loop forwards x twice more, so its running stats differ)
        for k, b in theirs.items():
            if "running" in k or "num_batches" in k:
                assert torch.allclose(ours[k], b, rtol=1e-5, atol=1e-6), k
    momentum_ours = [s["momentum_buffer"] for s in t.opt.state_dict()["state"].values()]
    momentum_theirs = [s["momentum_buffer"] for s in opt.state_dict()["state"].values()]
    assert all(torch.allclose(a, b, rtol=1e-5, atol=2e-6)
               for a, b in zip(momentum_ours, momentum_theirs))


def test_restoring_before_the_optimizer_step_would_differ():
    # the comparison above can tell the authors' order (step at w + v, then - v) from the
    # paper's prose (restore, then step): with this config they differ far above its tolerance
    cfg = from_dict(awp_config("pgd_at"))
    t = Trainer(cfg, device=torch.device("cpu"))
    x, y = next(iter(t.loader))
    model = copy.deepcopy(t.model)
    kept = recorded_attack(t)
    t.train_step(x, y, 0)
    w = dict(model.named_parameters())
    awp = WeightPerturbation(model, cfg.train.awp_gamma)
    model.train()
    v = awp.perturb(lambda: F.cross_entropy(model(kept["x_adv"]), y))
    loss = F.cross_entropy(model(kept["x_adv"]), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    awp.restore(v)
    tc = cfg.train
    lr = tc.lr
    with torch.no_grad():
        prose = {n: p - lr * (g + tc.weight_decay * p)
                 for (n, p), g in zip(model.named_parameters(), grads)}
        diff = max(float((prose[n] - p).abs().max()) for n, p in t.model.named_parameters())
    assert diff > 1e-4, diff      # 4e-4 measured; the comparison's tolerance is 2e-6
    assert set(prose) == set(w)


def test_perturbation_size_and_buffers():
    cfg = from_dict(awp_config("trades"))
    t = Trainer(cfg, device=torch.device("cpu"))
    x, y = next(iter(t.loader))
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    v = t.awp_perturb(x, x, y, 0)     # x as its own x_adv: any input will do here
    after = t.model.state_dict()
    perturbed = dict(zip(t.awp.names, v))
    for k, b in before.items():
        if k in perturbed:           # w + v with ||v|| = gamma ||w||
            assert torch.allclose(after[k], b + perturbed[k])
            assert float(perturbed[k].norm()) == pytest.approx(0.005 * float(b.norm()), rel=1e-5)
        else:                         # biases, BN affine and running statistics: untouched
            assert torch.equal(after[k], b), k
    assert all(p.grad is None for p in t.model.parameters())
    t.awp.restore(v)
    for k, b in before.items():
        assert torch.allclose(t.model.state_dict()[k], b, rtol=0, atol=1e-7), k


def test_warmup_counts_epochs_and_zero_gamma_is_off():
    t = Trainer(from_dict(awp_config("pgd_at", awp_warmup=2)), device=torch.device("cpu"))
    x, y = next(iter(t.loader))
    assert t.n_batches == 4
    assert t.awp_perturb(x, x, y, 2 * 4 - 1) is None          # last step of epoch 2
    v = t.awp_perturb(x, x, y, 2 * 4)                          # first step of epoch 3
    assert v is not None and len(v) == len(t.awp.names) == 10
    off = Trainer(from_dict(awp_config("pgd_at", awp_gamma=0.0)), device=torch.device("cpu"))
    assert off.awp is None and off.awp_perturb(x, x, y, 100) is None


@pytest.mark.parametrize("method, train, match", [
    ("pgd_at", {"awp_gamma": -0.01}, r"train\.awp_gamma: -0\.01 is not allowed; expected a number >= 0"),
    ("standard", {}, r"train\.awp_gamma: .*'standard'"),
    ("trades", {"awp_warmup": 4}, r"train\.awp_warmup: 4 epochs .* train\.epochs 4: AWP would never switch on"),
    ("pgd_at", {"awp_gamma": 0.0, "awp_warmup": 2}, r"train\.awp_warmup: 2 has no effect"),
])
def test_bad_awp_settings_are_one_line_config_errors(method, train, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(awp_config(method, **train))


def test_zero_gradient_layer_is_not_perturbed():
    # the authors' + 1e-20: a layer whose gradient is 0 gets v = 0, not NaN
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.Linear(4, 2))
    with torch.no_grad():
        model[2].weight.zero_()              # no gradient reaches layer 0 through it
        model[2].bias.fill_(1.0)             # layer 3 still sees an input, so it has one
    awp = WeightPerturbation(model, 0.01)
    v = awp.direction(lambda: model(torch.rand(5, 3)).sum())
    assert awp.names == ["0.weight", "2.weight", "3.weight"]
    assert all(torch.isfinite(t).all() for t in v)
    assert float(v[0].abs().max()) == 0.0 and float(v[1].abs().max()) == 0.0   # ||w|| = 0 too
    assert float(v[2].norm()) == pytest.approx(0.01 * float(model[3].weight.detach().norm()), rel=1e-6)
