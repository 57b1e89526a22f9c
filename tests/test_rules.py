"""A SPAT rule is one registry entry: a toy rule registered here, at test time, runs through the
config, `spat train` and notebook 01's attack list with no other file changed."""
import json

import pytest
import torch

from spatlib import config, hypothesis, semantics
from spatlib import train_cli


def _left_half(ev, y, generator):
    """Score 1 on the left half of the image, 0 on the right."""
    n, _, h, w = ev.maps.shape
    s = torch.zeros(n, 1, h, w)
    s[..., : w // 2] = 1.0
    return s


@pytest.fixture
def toy_rule():
    rule = semantics.register_rule("left_half", _left_half)
    yield rule
    del semantics.RULES["left_half"]


def test_a_registered_rule_is_allowed_by_the_config_and_weights_the_step(toy_rule, linear_model):
    cfg = config.from_dict({"attack": {"rule": "left_half"}})
    assert cfg.attack.rule == "left_half"
    model = linear_model(torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0)))
    x, y = torch.full((2, 1, 4, 4), 0.5), torch.tensor([0, 1])
    w = semantics.shared_pixel_weights(model, x, y, "left_half", eps=0.1, alpha=0.05)
    # budget-preserving: mean 1, all of it on the left half, capped at eps/alpha = 2
    assert torch.allclose(w[..., :2], torch.full_like(w[..., :2], 2.0))
    assert torch.all(w[..., 2:] == 0)


def test_an_unregistered_rule_is_refused_naming_the_registered_ones():
    with pytest.raises(config.ConfigError, match="attack.rule.*intersection") as e:
        config.from_dict({"attack": {"rule": "left_half"}})
    assert "left_half" in str(e.value)


def test_a_registered_rule_trains_through_spat_train(toy_rule, tmp_path, capsys):
    run_dir = tmp_path / "toy"
    code = train_cli.main(["--run-dir", str(run_dir), "--set", "name=toy", "train.method=spat_at",
                              "attack.rule=left_half", "attack.eps=0.1", "attack.alpha=0.05",
                              "attack.steps=2", "train.epochs=1", "train.batch_size=64",
                              "train.max_batches=2", "train.val_steps=1", "data.val_size=50",
                              "eval.n_examples=16", "train.progress=false"])
    assert code == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["method"] == "spat_at" and 0.0 <= metrics["best_val_robust_acc"] <= 1.0
    assert "rule: left_half" in (run_dir / "config.yaml").read_text()


def test_a_registered_rule_joins_notebook_01s_attack_list(toy_rule, linear_model):
    assert "spat_left_half" in config.attack_names()
    section = config.check_section("hypothesis", {"attacks": ["pgd", "spat_left_half"]})
    assert section["attacks"] == ["pgd", "spat_left_half"]
    factories = hypothesis.standard_attacks(section["attacks"], steps=10, random_start=False)
    model = linear_model(torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(1)))
    x, y = torch.full((2, 1, 4, 4), 0.5), torch.tensor([0, 2])
    x_adv = factories["spat_left_half"](model, 0.1, torch.Generator().manual_seed(0))(x, y)
    assert torch.all(x_adv[..., 2:] == x[..., 2:])        # the right half gets no step at all
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6


def test_a_rule_that_needs_gradients_is_refused_with_cam(toy_rule):
    semantics.register_rule("left_half", _left_half, needs_grads=True)
    with pytest.raises(config.ConfigError, match="needs attack.saliency 'input_grad'"):
        config.from_dict({"attack": {"rule": "left_half", "saliency": "cam"}})
    assert "spat_left_half" not in config.attack_names("cam")
    with pytest.raises(config.ConfigError, match="spat_left_half"):
        config.check_section("hypothesis", {"attacks": ["spat_left_half"], "saliency": "cam"})
