"""Tests for spatlib.models: published parameter counts, shapes, the features/head split,
normalization inside the model, exact CAM for GAP-linear heads, and input gradients."""
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from spatlib.config import MODELS, ModelConfig
from spatlib.models import (Normalize, SpatModel, build_model, count_parameters,
                            model_from_config)


def _tiny(name: str, **kw) -> SpatModel:
    """Small, fast instances of every architecture (WRN-10-1 stands in for the big ones)."""
    defaults = {"small_cnn": dict(num_classes=10, in_channels=1, image_size=8),
                "preact_resnet18": dict(num_classes=10, in_channels=3),
                "wide_resnet": dict(num_classes=10, in_channels=3, depth=10, width=1)}[name]
    return build_model(name, **{**defaults, **kw}, seed=0).eval()


# --------------------------------------------------------------------------------------------
# parameter counts of the published architectures (built on the meta device: no memory, fast)
@pytest.mark.parametrize("name, kwargs, expected", [
    ("small_cnn", dict(num_classes=10, in_channels=1, image_size=28), 312_202),   # TRADES MNIST
    # Rice et al.'s PreActResNet-18 ends in BN(512)-ReLU: 11,171,146 (the count usually quoted,
    # of the variant without that BN) + 2 * 512 affine BN parameters.
    ("preact_resnet18", dict(num_classes=10, in_channels=3), 11_171_146 + 2 * 512),
    ("wide_resnet", dict(num_classes=10, in_channels=3, depth=34, width=10), 46_160_474),
    ("wide_resnet", dict(num_classes=10, in_channels=3, depth=28, width=10), 36_479_194),
    # 8x8 digits: padded convs leave a 2x2 map after the last pool -> fc1 is 256 -> 200
    ("small_cnn", dict(num_classes=10, in_channels=1, image_size=8), 64_992 + 256 * 200 + 200 + 40_200 + 2_010),
])
def test_parameter_counts_match_published(name, kwargs, expected):
    with torch.device("meta"):
        model = build_model(name, **kwargs)
    assert count_parameters(model) == expected


def test_buffers_are_not_parameters():
    model = build_model("small_cnn", 10, 1, [0.5], [0.25], image_size=28)
    assert count_parameters(model) == 312_202
    assert model.normalize.mean.shape == (1, 1, 1, 1)
    state = model.state_dict()
    assert torch.equal(state["normalize.mean"], torch.full((1, 1, 1, 1), 0.5))
    assert torch.equal(state["normalize.std"], torch.full((1, 1, 1, 1), 0.25))


# --------------------------------------------------------------------------------------------
# shapes and the features/head split
@pytest.mark.parametrize("name, kwargs, shape, feat_shape", [
    ("small_cnn", dict(in_channels=1, image_size=8), (1, 8, 8), (64, 4, 4)),
    ("small_cnn", dict(in_channels=1, image_size=28), (1, 28, 28), (64, 8, 8)),
    ("small_cnn", dict(in_channels=3, image_size=32), (3, 32, 32), (64, 10, 10)),
    ("small_cnn", dict(in_channels=1, image_size=(8, 12)), (1, 8, 12), (64, 4, 6)),
    ("preact_resnet18", dict(), (3, 32, 32), (512, 4, 4)),
    ("preact_resnet18", dict(), (3, 8, 8), (512, 1, 1)),
    ("wide_resnet", dict(), (3, 32, 32), (64, 8, 8)),
])
def test_forward_and_feature_shapes(name, kwargs, shape, feat_shape):
    model = _tiny(name, **kwargs)
    x = torch.rand(2, *shape)
    with torch.no_grad():
        feats = model.features(x)
        logits = model(x)
    assert feats.shape == (2, *feat_shape)
    assert logits.shape == (2, 10)
    assert (feats >= 0).all()                       # post-activation
    torch.testing.assert_close(logits, model.head(feats), rtol=0, atol=0)
    assert model.num_classes == 10
    assert isinstance(model.classifier, torch.nn.Linear) and model.classifier.out_features == 10


@pytest.mark.parametrize("name", MODELS)
def test_gap_linear_head_is_exact_cam(name):
    """logits == mean over pixels of (W F + b): the CAM A_k = W_k . F sums back to the logit."""
    model = _tiny(name)
    x = torch.rand(3, model.normalize.mean.shape[1], 8, 8)
    with torch.no_grad():
        feats = model.features(x)
        logits = model(x)
    if name == "small_cnn":
        assert model.gap_linear is False       # MLP head: semantics uses grad x activation instead
        return
    assert model.gap_linear is True
    W, b = model.classifier.weight.detach(), model.classifier.bias.detach()
    cam = torch.einsum("kc,nchw->nkhw", W, feats)
    torch.testing.assert_close(logits, feats.mean((2, 3)) @ W.T + b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, cam.mean((2, 3)) + b, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# normalization is the first layer
@pytest.mark.parametrize("name", MODELS)
def test_normalization_inside_model(name):
    in_ch = 1 if name == "small_cnn" else 3
    mean, std = [0.49, 0.48, 0.45][:in_ch], [0.25, 0.24, 0.26][:in_ch]
    normed = _tiny(name, mean=mean, std=std)
    plain = _tiny(name)                        # mean 0 / std 1
    weights = {k: v for k, v in normed.state_dict().items() if not k.startswith("normalize.")}
    plain.load_state_dict(weights, strict=False)
    x = torch.rand(2, in_ch, 8, 8)
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(normed(x), plain((x - m) / s), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(normed(x), plain(x), atol=1e-3)


def test_normalize_module():
    norm = Normalize([0.5, 0.25, 0.0], [0.5, 0.25, 2.0])
    assert norm.mean.shape == norm.std.shape == (1, 3, 1, 1)
    assert list(norm.parameters()) == []
    x = torch.ones(1, 3, 2, 2)
    torch.testing.assert_close(norm(x)[0, :, 0, 0], torch.tensor([1.0, 3.0, 0.5]))
    assert norm.to(torch.float64).mean.dtype == torch.float64
    with pytest.raises(ValueError, match="std"):
        Normalize([0.5], [0.0])
    with pytest.raises(ValueError, match="channels"):
        Normalize([0.5, 0.5], [1.0])


# --------------------------------------------------------------------------------------------
# gradients w.r.t. the input (what every attack and saliency map needs)
@pytest.mark.parametrize("name", MODELS)
def test_input_gradients_exist(name):
    model = _tiny(name)
    x = torch.rand(2, model.normalize.mean.shape[1], 8, 8, requires_grad=True)
    logits = model(x)
    (g,) = torch.autograd.grad(logits[:, 3].sum(), x)
    assert g.shape == x.shape
    assert torch.isfinite(g).all()
    # a freshly built model already has informative gradients (TRADES zero-inits SmallCNN's
    # last layer, which would make every logit and gradient exactly 0)
    assert g.abs().sum() > 0
    assert model(x).std() > 0


# --------------------------------------------------------------------------------------------
# factory behaviour
def test_unknown_name_lists_allowed():
    with pytest.raises(ValueError) as err:
        build_model("resnet50", 10)
    for allowed in MODELS:
        assert allowed in str(err.value)


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="wide_resnet", depth=30), "6n\\+4"),
    (dict(name="small_cnn", in_channels=1, mean=[0.1, 0.2, 0.3]), "in_channels"),
    (dict(name="preact_resnet18", dropout=0.3), "dropout"),
    (dict(name="small_cnn", dropout=1.0), "dropout"),
])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_model(num_classes=10, **kwargs)


def test_seed_reproducible_and_global_rng_untouched():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = build_model("small_cnn", 10, 1, image_size=8, seed=7)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = build_model("small_cnn", 10, 1, image_size=8, seed=7)
    c = build_model("small_cnn", 10, 1, image_size=8, seed=8)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert not torch.equal(a.classifier.weight, c.classifier.weight)


def test_wide_resnet_initialization_matches_reference():
    model = build_model("wide_resnet", 10, depth=10, width=4, seed=0)
    conv = model.blocks[-1].conv2                   # 256 -> 256, 3x3
    expected_std = (2.0 / (3 * 3 * conv.out_channels)) ** 0.5   # Kaiming normal, fan_out
    assert abs(conv.weight.std().item() / expected_std - 1) < 0.02
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert (m.weight == 1).all() and (m.bias == 0).all()
    assert (model.classifier.bias == 0).all()


def test_dropout_only_in_train_mode():
    model = build_model("small_cnn", 10, 1, image_size=8, dropout=0.5, seed=0)
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)
        model.train()
        assert not torch.allclose(model(x), model(x))


def test_model_from_config_uses_dataset():
    dataset = SimpleNamespace(num_classes=7, in_channels=1, mean=(0.3,), std=(0.2,),
                              image_size=(8, 8))
    model = model_from_config(ModelConfig(name="small_cnn"), dataset)
    assert model.num_classes == 7
    assert model.normalize.mean.item() == pytest.approx(0.3)
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 7)
    wrn = model_from_config(ModelConfig(name="wide_resnet", depth=10, width=2), dataset)
    assert count_parameters(wrn) == count_parameters(
        build_model("wide_resnet", 7, 1, depth=10, width=2))


def test_import_does_not_touch_cuda():
    code = ("import torch, spatlib.models as m; m.build_model('small_cnn', 10, 1, image_size=8, seed=0); "
            "print(torch.cuda.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False"
