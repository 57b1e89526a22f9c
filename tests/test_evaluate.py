"""The robustness suite: agreement with an independent PGD, AutoAttack, worst case, 100 classes."""


import pytest
import torch
import torch.nn.functional as F

from spatlib.attacks import SPAT, Shaping
from spatlib.data import load_dataset
from spatlib.evaluate import result_from_json, result_to_json, robustness, suite_attack
from spatlib.models import build_model
from spatlib.semantics import class_evidence


@pytest.fixture(scope="module")
def digits_model():
    """A standard-trained SmallCNN on digits (~97% clean), trained here in a few seconds."""
    ds = load_dataset("digits")
    model = build_model("small_cnn", 10, 1, ds.mean, ds.std, image_size=8, seed=0)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    g = torch.Generator().manual_seed(0)
    x, y = ds.x_train.float() / 255, ds.y_train
    for _ in range(8):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            b = perm[i:i + 64]
            opt.zero_grad()
            F.cross_entropy(model(x[b]), y[b]).backward()
            opt.step()
    return model.eval(), ds


def plain_pgd_correct(model, x, y, eps, alpha, steps, seed):
    """PGD written out plainly, independent of spatlib.attacks: per-example correctness."""
    g = torch.Generator().manual_seed(seed)
    x_adv = (x + (torch.rand(x.shape, generator=g) * 2 - 1) * eps).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        grad, = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + alpha * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    with torch.no_grad():
        return model(x_adv).argmax(1) == y


def test_pgd20_matches_independent_implementation(digits_model):
    model, ds = digits_model
    x, y = ds.x_test.float() / 255, ds.y_test
    eps = 0.1
    # the suite's PGD-20 and the plain loop from the same random start: the same attack,
    # example for example (float rounding may move at most one example across the boundary)
    attack = suite_attack("pgd20", model, eps, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(attack(x, y)).argmax(1) == y
    plain = plain_pgd_correct(model, x, y, eps, eps / 4, 20, seed=3)
    assert int((ours != plain).sum()) <= 1
    r = robustness(model, x, y, ["clean", "pgd20"], eps=eps, cascade=False)
    assert r.accuracy["clean"] > 0.9
    # the suite attacks the clean-correct points with its own noise: within two points
    assert abs(r.accuracy["pgd20"] - plain.float().mean().item()) <= 0.02
    assert r.accuracy["pgd20"] < r.accuracy["clean"]


def test_suite_worst_case_and_threat_model(digits_model):
    model, ds = digits_model
    x, y = ds.x_test[:120], ds.y_test[:120]          # uint8 input is accepted
    r = robustness(model, x, y, ["clean", "fgsm", "pgd20", "pgd100", "cw"], eps=0.1,
                   pgd100_restarts=2)
    acc = [r.accuracy[a] for a in ["clean", "fgsm", "pgd20", "pgd100", "cw"]]
    assert acc == sorted(acc, reverse=True), "cascade accuracies never increase"
    assert r.robust_accuracy == pytest.approx(r.accuracy["cw"])
    assert r.threat_model_ok
    for a in ["fgsm", "pgd20", "pgd100", "cw"]:
        assert r.threat_model[a]["max_linf"] <= 0.1 + 1e-6
    # worst case per example: robust means correct under every attack
    every = torch.stack([r.correct[a] for a in r.correct]).all(0)
    assert torch.equal(every, r.robust)
    assert len(r.per_class["clean"]) == 10
    again = result_from_json(result_to_json(r))
    assert again.accuracy == r.accuracy and torch.equal(again.robust, r.robust)
    table = r.table()
    assert list(table["attack"])[-1] == "worst case"


def test_evaluation_is_seeded_and_restores_train_mode(digits_model):
    model, ds = digits_model
    x, y = ds.x_test[:64], ds.y_test[:64]
    model.train()
    rng = torch.get_rng_state()
    a = robustness(model, x, y, ["clean", "pgd20"], eps=0.1, seed=3)
    b = robustness(model, x, y, ["clean", "pgd20"], eps=0.1, seed=3)
    assert torch.equal(a.correct["pgd20"], b.correct["pgd20"])
    assert model.training
    assert torch.equal(rng, torch.get_rng_state())
    model.eval()


@pytest.mark.slow
def test_autoattack_is_at_most_pgd20(digits_model):
    model, ds = digits_model
    x, y = ds.x_test[:80].float() / 255, ds.y_test[:80]
    rng = torch.get_rng_state()
    r = robustness(model, x, y, ["clean", "pgd20", "autoattack"], eps=0.15, cascade=False)
    assert r.accuracy["autoattack"] <= r.accuracy["pgd20"]
    assert r.threat_model["autoattack"]["ok"]
    assert torch.equal(rng, torch.get_rng_state()), "AutoAttack must not move the caller's RNG"


def test_bad_suite_and_eps_are_named():
    model = build_model("small_cnn", 10, 1, image_size=8)
    x, y = torch.rand(2, 1, 8, 8), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="apgd"):
        robustness(model, x, y, ["clean", "apgd"], eps=0.1)
    with pytest.raises(ValueError, match="eps"):
        robustness(model, x, y, ["clean"], eps=8)


def test_hundred_classes_with_topk10():
    """A 100-class model: the suite runs, and SPAT with topk:10 computes class evidence for ten
    classes (the true one first) instead of a hundred, inside the threat model."""
    ds = load_dataset("synthetic", num_classes=100, shape=(3, 16, 16), n_train=200, n_test=64)
    model = build_model("small_cnn", 100, 3, ds.mean, ds.std, image_size=16, seed=0).eval()
    x, y = ds.x_test.float() / 255, ds.y_test
    r = robustness(model, x, y, ["clean", "fgsm", "pgd20"], eps=8 / 255)
    assert len(r.per_class["clean"]) == 100
    ev = class_evidence(model, x[:16], y[:16], "topk:10")
    assert ev.maps.shape == (16, 10, 16, 16) and torch.equal(ev.classes[:, 0], y[:16])
    for classes in ["topk:10", "all"]:
        attack = SPAT(model, eps=8 / 255, alpha=2 / 255, steps=2, classes=classes, class_chunk=10,
                      generator=torch.Generator().manual_seed(0))
        x_adv = attack(x[:16], y[:16])
        assert (x_adv - x[:16]).abs().max() <= 8 / 255 + 1e-6


# --------------------------------------------------------------------------------------------
# the suite's bookkeeping, on tiny models with known answers
def test_the_suite_evaluates_in_eval_mode(bn_model):
    # images of mean 0.6 and 0.8, all of class 1: in eval mode every one is class 1 (above the
    # running mean 0.5) and no eps-0.05 attack can move a mean by 0.1; with batch statistics
    # (train mode) the 0.6 half would be class 0. The model comes in train mode.
    model = bn_model()
    x = torch.tensor([0.6, 0.8] * 4).view(8, 1, 1, 1).expand(8, 1, 2, 2).contiguous()
    y = torch.ones(8, dtype=torch.long)
    stats = (model.bn.running_mean.clone(), model.bn.running_var.clone())
    r = robustness(model, x, y, ["clean", "fgsm", "pgd20"], eps=0.05)
    assert r.accuracy == {"clean": 1.0, "fgsm": 1.0, "pgd20": 1.0}
    assert model.training                                   # given back as it came
    assert torch.equal(model.bn.running_mean, stats[0]) and torch.equal(model.bn.running_var, stats[1])


def test_pgd100_keeps_the_restart_that_fools_over_one_of_higher_loss(linear_model):
    # logits 10 x over 3 channels, label 0. Restart A fools the model at CE 1.005 (logits
    # 4, 4.5, 1.5); restart B does not, at the higher CE 1.033 (logits 3, 2.9, 2.9). The worst
    # case is A, whichever restart ran first.
    model = linear_model(10 * torch.eye(3).view(3, 3, 1, 1))
    x, y = torch.tensor([0.5, 0.3, 0.2]).view(1, 3, 1, 1), torch.tensor([0])
    fools = torch.tensor([0.40, 0.45, 0.15]).view(1, 3, 1, 1)
    higher_loss = torch.tensor([0.30, 0.29, 0.29]).view(1, 3, 1, 1)
    ce = lambda v: F.cross_entropy(model(v), y).item()   # noqa: E731
    assert model(fools).argmax(1).item() == 1 and model(higher_loss).argmax(1).item() == 0
    assert ce(higher_loss) > ce(fools)
    for order in ([higher_loss, fools], [fools, higher_loss]):
        attack = suite_attack("pgd100", model, eps=0.5, pgd100_restarts=2)
        restarts = iter(order)
        attack.perturb = lambda *a, **k: (next(restarts), Shaping())   # (x_adv, its shaping)
        assert torch.allclose(attack(x, y), fools), order


class _ShiftAttack:
    """A stand-in for a suite attack: moves the images whose value is in ``fools`` down by
    eps (across the model's 0.5 boundary) and records the values it was given."""

    def __init__(self, fools: list[float], eps: float, seen: list):
        self.fools, self.eps, self.seen = torch.tensor(fools), eps, seen

    def __call__(self, x, y):
        self.seen.extend(x.flatten().tolist())
        hit = (x.flatten(1)[:, :1] - self.fools).abs().min(1).values < 1e-4
        return torch.where(hit.view(-1, 1, 1, 1), x - self.eps, x)


@pytest.fixture
def shifted_suite(linear_model, monkeypatch):
    """(model, x, y, seen): class 1 iff x > 0.5; five clean-correct points 0.60 .. 0.68 and one
    clean-wrong 0.30; FGSM fools 0.60 and 0.62, PGD-20 fools 0.62 and 0.64; ``seen[name]``:
    the values each attack was given."""
    import spatlib.evaluate as evaluate
    model = linear_model(torch.tensor([0.0, 10.0]).view(2, 1, 1, 1), torch.tensor([0.0, -5.0]))
    x = torch.tensor([0.60, 0.62, 0.64, 0.66, 0.68, 0.30]).view(6, 1, 1, 1)
    y = torch.ones(6, dtype=torch.long)
    fools = {"fgsm": [0.60, 0.62], "pgd20": [0.62, 0.64]}
    seen = {name: [] for name in fools}
    monkeypatch.setattr(evaluate, "suite_attack", lambda name, model, eps, **kw: _ShiftAttack(
        fools[name], eps, seen[name]))
    return model, x, y, seen


def test_the_cascade_attacks_only_the_points_still_robust(shifted_suite):
    model, x, y, seen = shifted_suite
    r = robustness(model, x, y, ["clean", "fgsm", "pgd20"], eps=0.3)
    assert seen["fgsm"] == pytest.approx([0.60, 0.62, 0.64, 0.66, 0.68])   # the clean-correct ones
    assert seen["pgd20"] == pytest.approx([0.64, 0.66, 0.68])              # those FGSM left
    assert r.accuracy == pytest.approx({"clean": 5 / 6, "fgsm": 3 / 6, "pgd20": 2 / 6})
    assert r.robust.tolist() == [False, False, False, True, True, False]


def test_standalone_worst_case_is_correct_under_every_attack(shifted_suite):
    # standalone, each attack sees every clean-correct point; the worst case is still per
    # example: robust only where no attack fooled it (not where the last one did not)
    model, x, y, seen = shifted_suite
    r = robustness(model, x, y, ["clean", "fgsm", "pgd20"], eps=0.3, cascade=False)
    assert seen["pgd20"] == pytest.approx([0.60, 0.62, 0.64, 0.66, 0.68])
    assert r.accuracy == pytest.approx({"clean": 5 / 6, "fgsm": 3 / 6, "pgd20": 3 / 6})
    assert r.robust.tolist() == [False, False, False, True, True, False]
    assert r.robust_accuracy == pytest.approx(2 / 6)
