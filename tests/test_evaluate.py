"""The robustness suite: agreement with an independent PGD, AutoAttack, worst case, 100 classes."""


import pytest
import torch
import torch.nn.functional as F

from spatlib.attacks import SPAT
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
