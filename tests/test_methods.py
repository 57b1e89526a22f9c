"""The methods' training attacks start where the authors' code starts them; the method table is
the config's list of names."""
from __future__ import annotations

import pytest
import torch

from spatlib import config
from spatlib.config import AttackConfig
from spatlib.methods import METHODS, check_method_table, training_attack
from spatlib.models import build_model


@pytest.fixture
def model():
    return build_model("small_cnn", num_classes=10, in_channels=1, image_size=8)


def test_mart_starts_at_the_authors_small_normal_start(model):
    cfg = AttackConfig(eps=0.2, alpha=0.05, steps=3, random_start=True)
    gen = torch.Generator().manual_seed(0)
    mart = training_attack(model, cfg, METHODS["mart"], 0.2, gen)
    assert mart.random_start == "normal"
    # the start itself: x + 0.001 N(0, 1) (clipped to the pixel range), not the eps-ball
    x = torch.full((64, 1, 8, 8), 0.5)
    delta = mart._start(x)
    assert delta.abs().max() < 0.01 and delta.std().item() == pytest.approx(0.001, rel=0.05)
    # PGD-AT keeps the uniform eps-ball start of attack.random_start
    pgd = training_attack(model, cfg, METHODS["pgd_at"], 0.2, gen)
    assert pgd.random_start is True
    assert pgd._start(x).abs().max() > 0.15


def test_the_uniform_start_stays_available(model):
    cfg = AttackConfig(eps=0.2, alpha=0.05, steps=3, random_start=False)
    gen = torch.Generator().manual_seed(0)
    assert training_attack(model, cfg, METHODS["mart"], 0.2, gen, start="uniform").random_start is True
    assert training_attack(model, cfg, METHODS["mart"], 0.2, gen, start="none").random_start is False
    assert training_attack(model, cfg, METHODS["pgd_at"], 0.2, gen, start="normal").random_start == "normal"
    # attack.random_start: false does not stop TRADES' KL start (its gradient at x is 0)
    assert training_attack(model, cfg, METHODS["trades"], 0.2, gen).random_start == "normal"
    with pytest.raises(ValueError, match="start"):
        training_attack(model, cfg, METHODS["mart"], 0.2, gen, start="gaussian")
    with pytest.raises(ValueError, match="random start"):
        training_attack(model, cfg, METHODS["trades"], 0.2, gen, start="none")


def test_the_method_table_is_the_configs_names_and_a_drift_fails_loudly():
    # train.method is validated against config.METHODS, the trainer looks the name up in
    # methods.METHODS: one name short on either side would be a KeyError mid-batch
    assert list(METHODS) == list(config.METHODS)
    check_method_table(METHODS, config.METHODS)
    with pytest.raises(RuntimeError, match=r"no Method for \['awp_at'\]"):
        check_method_table(METHODS, [*config.METHODS, "awp_at"])
    with pytest.raises(RuntimeError, match=r"no config name for \['mart'\]"):
        check_method_table(METHODS, [n for n in config.METHODS if n != "mart"])
    with pytest.raises(RuntimeError, match="order"):
        check_method_table(METHODS, list(reversed(config.METHODS)))
