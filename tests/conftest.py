"""Shared test fixtures: tiny models whose logits and gradients are known in closed form."""
import pytest
import torch
from torch import nn

from spatlib.models import Normalize, SpatModel


class _LinearModel(SpatModel):
    """logits z = W x_flat + b, W (K, C, H, W). ``features`` is the identity map (the "conv
    feature map" is x itself), ``head`` a flat linear layer: dz_k/dx = W_k for every x."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        k, c = weight.shape[:2]
        self.gap_linear = False
        self.num_classes = k
        self.normalize = Normalize([0.0] * c, [1.0] * c)
        self.classifier = nn.Linear(weight[0].numel(), k)
        with torch.no_grad():
            self.classifier.weight.copy_(weight.reshape(k, -1))
            self.classifier.bias.copy_(bias if bias is not None else torch.zeros(k))

    def features(self, x):
        return self.normalize(x)

    def head(self, feats):
        return self.classifier(feats.flatten(1))


class _GapLinearModel(SpatModel):
    """features = identity 1x1 conv, head = global average pool + Linear V (K, C): the exact-CAM
    case, CAM_k = relu(sum_c V_kc x_c) at the input resolution."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        k, c = weight.shape
        self.gap_linear = True
        self.num_classes = k
        self.normalize = Normalize([0.0] * c, [1.0] * c)
        self.conv = nn.Conv2d(c, c, 1, bias=False)
        self.classifier = nn.Linear(c, k)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(c).view(c, c, 1, 1))
            self.classifier.weight.copy_(weight)
            self.classifier.bias.copy_(bias if bias is not None else torch.zeros(k))

    def features(self, x):
        return self.conv(self.normalize(x))


@pytest.fixture
def linear_model():
    """Factory: ``linear_model(W (K,C,H,W), b=None)`` -> SpatModel with z = W x_flat + b (eval)."""
    return lambda weight, bias=None: _LinearModel(weight.float(), bias).eval()


@pytest.fixture
def gap_linear_model():
    """Factory: ``gap_linear_model(V (K,C), b=None)`` -> SpatModel with GAP + linear head (eval)."""
    return lambda weight, bias=None: _GapLinearModel(weight.float(), bias).eval()


class _BatchNormModel(nn.Module):
    """Two classes from the mean pixel m through BatchNorm: logits (-z, z), z = (m - mu) /
    sqrt(var + 1e-5). Eval mode: mu = 0.5, var = 1 (the running statistics), so class 1 iff
    m > 0.5. Train mode: mu and var of the batch, so class 1 iff m is above the batch mean:
    the same images get other answers, and the running statistics move."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(1, affine=False)
        with torch.no_grad():
            self.bn.running_mean.fill_(0.5)
            self.bn.running_var.fill_(1.0)

    def forward(self, x):
        z = self.bn(x.mean((1, 2, 3)).unsqueeze(1))
        return torch.cat([-z, z], 1)


@pytest.fixture
def bn_model():
    """Factory: ``bn_model()`` -> a model whose answers differ in train and eval mode (left
    in train mode, as a training loop leaves it)."""
    return lambda: _BatchNormModel().train()


@pytest.fixture(scope="session", autouse=True)
def single_thread():
    """One intra-op thread for the whole suite: the models here are tiny, and on a 2-core
    machine two OpenMP threads wait on each other for time slices (a 10 ms attack can take
    seconds). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
