"""Models: inputs in [0, 1], normalization inside, and a split into features and head.

Every model is a :class:`SpatModel`: ``forward(x) = head(features(x))`` where ``features``
returns the last convolutional feature map (post-activation, normalization included) and
``head`` maps it to logits. The split is what the CAM saliency of ``spatlib.semantics`` needs:

* ``gap_linear = True`` (PreAct ResNet-18, WideResNet): the head is global average pooling
  followed by ``self.classifier`` (an ``nn.Linear``), so the class activation map
  ``A_k = relu(sum_c W_kc F_c)`` is exact (its spatial mean plus the bias is the logit).
* ``gap_linear = False`` (SmallCNN): the head is max-pool + an MLP, so no linear CAM exists;
  ``semantics`` then uses a gradient-times-activation map through the head instead.

Architectures follow the adversarial-robustness literature, with parameter counts that match
the published ones (tests/test_models.py checks them):

* ``small_cnn``: the MNIST SmallCNN of TRADES (Zhang et al. 2019), 312,202 parameters on
  28x28x1.
* ``preact_resnet18``: the CIFAR PreAct ResNet-18 of Rice et al. 2020 ("Overfitting in
  adversarially robust deep learning"), 11,172,170 parameters for 10 classes: the often
  quoted 11,171,146 is the kuangliu variant without the final BatchNorm(512) (2 x 512 fewer).
* ``wide_resnet``: the WideResNet of Madry et al. / TRADES; WRN-34-10 46,160,474 and WRN-28-10
  36,479,194 parameters on CIFAR-10.

Nothing here touches CUDA; device and dtype are the caller's (``model.to(device)``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import MODELS, ModelConfig

if TYPE_CHECKING:  # type hints only: models must not depend on data at runtime
    from .data import Dataset

__all__ = [
    "MODELS", "Normalize", "SpatModel", "SmallCNN", "PreActBlock", "PreActResNet18",
    "WideBasicBlock", "WideResNet", "build_model", "model_from_config", "count_parameters",
]


# --------------------------------------------------------------------------------------------
# building blocks
class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, so models take pixels in [0, 1] and eps stays in pixels.

    ``mean``/``std`` are registered buffers of shape (1, C, 1, 1): they follow ``.to(device)``
    and are saved in the state dict, but are not parameters (an optimizer never moves them).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        # validate as Python floats: works under any default device (also "meta")
        mean_f = [float(v) for v in torch.as_tensor(mean, device="cpu").flatten().tolist()]
        std_f = [float(v) for v in torch.as_tensor(std, device="cpu").flatten().tolist()]
        if len(mean_f) != len(std_f):
            raise ValueError(f"Normalize: mean has {len(mean_f)} channels but std has {len(std_f)}")
        if not all(math.isfinite(m) for m in mean_f) or not all(math.isfinite(v) and v > 0 for v in std_f):
            raise ValueError(f"Normalize: std must be finite and > 0, mean finite; got mean={mean}, std={std}")
        mean_t = torch.tensor(mean_f, dtype=torch.float32)
        std_t = torch.tensor(std_f, dtype=torch.float32)
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1))
        self.register_buffer("std", std_t.view(1, -1, 1, 1))

    @classmethod
    def of_channels(cls, channels: int, mean: Sequence[float] | None = None,
                    std: Sequence[float] | None = None) -> "Normalize":
        """A model's input normalization: ``mean``/``std`` per channel, 0 / 1 for the one not
        given (neither given: no normalization)."""
        return cls(mean if mean is not None else [0.0] * channels,
                   std if std is not None else [1.0] * channels)

    def forward(self, x: Tensor) -> Tensor:
        """x (N, C, H, W) in [0, 1] -> normalized (N, C, H, W)."""
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        def fmt(t: Tensor) -> str:
            if t.is_meta:  # no values to show
                return f"<meta {tuple(t.shape)}>"
            return "(" + ", ".join(f"{v:.4g}" for v in t.flatten().tolist()) + ")"
        return f"mean={fmt(self.mean)}, std={fmt(self.std)}"


class SpatModel(nn.Module):
    """Base of every spatlib model: ``forward(x) = head(features(x))``, x in [0, 1].

    Subclasses set ``num_classes``, ``normalize`` (:meth:`Normalize.of_channels`),
    ``classifier`` (the final ``nn.Linear``) and ``gap_linear`` (True unless set) and implement
    :meth:`features`. The default :meth:`head` is global average pooling followed by
    ``classifier``, the exact-CAM case (``gap_linear = True``).
    """

    normalize: Normalize
    classifier: nn.Linear
    gap_linear: bool = True
    num_classes: int

    def features(self, x: Tensor) -> Tensor:
        """x (N, C, H, W) in [0, 1] -> last conv feature map (N, C_f, h, w), post-activation."""
        raise NotImplementedError

    def head(self, feats: Tensor) -> Tensor:
        """feats (N, C_f, h, w) -> logits (N, K): global average pool, then ``classifier``."""
        return self.classifier(feats.mean(dim=(2, 3)))

    def forward(self, x: Tensor) -> Tensor:
        """x (N, C, H, W) in [0, 1] -> logits (N, K)."""
        return self.head(self.features(x))


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2:
        raise ValueError(f"image_size: expected an int or (H, W), got {size!r}")
    return size  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# SmallCNN (TRADES, MNIST)
class SmallCNN(SpatModel):
    """TRADES' SmallCNN: conv32-conv32-pool-conv64-conv64-pool-fc200-fc200-fcK, ReLU.

    3x3 convolutions use padding 0 when the smaller image side is >= 16 px (the published
    network: 28x28 -> 26 -> 24 -> 12 -> 10 -> 8 -> 4, 312,202 parameters on MNIST) and padding 1
    below that, so 8x8 digits keep a spatial map (8 -> 8 -> 8 -> 4 -> 4 -> 4 -> 2).

    ``features`` is the post-ReLU output of the 4th conv (before the last max-pool, for a finer
    map); ``head`` is max-pool + MLP, so ``gap_linear`` is False and there is no exact CAM:
    ``spatlib.semantics`` uses gradient-times-activation through the head for this model.
    ``dropout`` sits after fc1 as in TRADES (which used 0.5; spatlib's default is 0).

    Initialization: Kaiming-normal convs with zero bias as in TRADES, but PyTorch's default for
    the linear layers. TRADES zeroes the last layer, which makes every logit and every input
    gradient exactly 0 at init; class-evidence maps of a fresh model would then be all zero.
    """

    gap_linear = False

    def __init__(self, num_classes: int = 10, in_channels: int = 1,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None, *,
                 image_size: int | Sequence[int] = 28, dropout: float = 0.0):
        super().__init__()
        h, w = _pair(image_size)
        pad = 0 if min(h, w) >= 16 else 1
        self.num_classes = num_classes
        self.normalize = Normalize.of_channels(in_channels, mean, std)
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=pad), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=pad), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=pad), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=pad), nn.ReLU(),
        )
        # spatial size through the stack: each unpadded conv loses 2 px, each pool halves
        for _ in range(2):
            h, w = h - 2 + 2 * pad, w - 2 + 2 * pad
        h, w = h // 2, w // 2
        for _ in range(2):
            h, w = h - 2 + 2 * pad, w - 2 + 2 * pad
        self.feature_size = (h, w)
        h, w = h // 2, w // 2
        if h < 1 or w < 1:
            raise ValueError(f"small_cnn: image_size {image_size} is too small")
        self.fc1 = nn.Linear(64 * h * w, 200)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(200, 200)
        self.classifier = nn.Linear(200, num_classes)
        for m in self.conv:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, x: Tensor) -> Tensor:
        """x (N, C, H, W) in [0, 1] -> (N, 64, h, w) post-ReLU map of the 4th conv."""
        return self.conv(self.normalize(x))

    def head(self, feats: Tensor) -> Tensor:
        """feats (N, 64, h, w) -> logits (N, K): max-pool, flatten, fc200-fc200-fcK."""
        z = F.max_pool2d(feats, 2).flatten(1)
        z = self.drop(F.relu(self.fc1(z)))
        return self.classifier(F.relu(self.fc2(z)))


# --------------------------------------------------------------------------------------------
# PreAct ResNet-18 (Rice et al. 2020)
# ReLUs are out-of-place throughout: in-place activations can clash with batched
# vector-Jacobian products (torch.func) and with hooks that keep feature maps.
class PreActBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 plus shortcut: the
    identity of the raw input, or where the shape changes a 1x1 projection of the pre-activated
    one (as both references have it). PreAct ResNet-18's block; with dropout, WideResNet's."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.dropout = dropout
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        act = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(act)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        return self.conv2(out) + (x if self.shortcut is None else self.shortcut(act))


class PreActResNet18(SpatModel):
    """CIFAR PreAct ResNet-18 ([2, 2, 2, 2] blocks, 64..512 channels), final BN-ReLU, GAP, linear.

    Adaptive (mean) pooling instead of a fixed 4x4 average pool, so any input >= 8 px works;
    on 32x32 the two are identical. PyTorch default initialization, as in the reference.
    11,172,170 parameters for 10 classes: the final BN-ReLU that ``features`` ends in adds
    2 x 512 to the 11,171,146 of the variant without it (kuangliu/pytorch-cifar).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        super().__init__()
        self.num_classes = num_classes
        self.normalize = Normalize.of_channels(in_channels, mean, std)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        blocks, in_planes = [], 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            for s in (stride, 1):
                blocks.append(PreActBlock(in_planes, planes, s))
                in_planes = planes
        self.layers = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(512)
        self.classifier = nn.Linear(512, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """x (N, C, H, W) in [0, 1] -> (N, 512, H/8, W/8) after the final BN-ReLU."""
        return F.relu(self.bn(self.layers(self.conv1(self.normalize(x)))))


# --------------------------------------------------------------------------------------------
# WideResNet (Madry et al. / TRADES)
class WideBasicBlock(PreActBlock):
    """WRN basic block (the TRADES / Madry reference code): :class:`PreActBlock` with its
    dropout between the two convolutions."""


class WideResNet(SpatModel):
    """WideResNet-depth-width: conv3x3(16), three groups of (depth-4)/6 blocks, BN-ReLU, GAP, fc.

    Same layers and initialization as the TRADES / Madry reference (Kaiming-normal fan-out convs,
    BN weight 1 bias 0, linear bias 0), without TRADES' unused ``sub_block1`` (it never runs in
    forward; the published parameter counts exclude it).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None, *,
                 depth: int = 34, width: int = 10, dropout: float = 0.0):
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"wide_resnet: depth must be 6n+4 >= 10 (e.g. 28, 34), got {depth}")
        if width < 1:
            raise ValueError(f"wide_resnet: width must be >= 1, got {width}")
        n = (depth - 4) // 6
        channels = [16, 16 * width, 32 * width, 64 * width]
        self.num_classes = num_classes
        self.normalize = Normalize.of_channels(in_channels, mean, std)
        self.conv1 = nn.Conv2d(in_channels, channels[0], 3, stride=1, padding=1, bias=False)
        blocks = []
        for g, stride in enumerate((1, 2, 2)):
            for i in range(n):
                blocks.append(WideBasicBlock(channels[g] if i == 0 else channels[g + 1],
                                             channels[g + 1], stride if i == 0 else 1, dropout))
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(channels[3])
        self.classifier = nn.Linear(channels[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # the reference's normal(0, sqrt(2 / (k*k*out_channels)))
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def features(self, x: Tensor) -> Tensor:
        """x (N, C, H, W) in [0, 1] -> (N, 64*width, H/4, W/4) after the final BN-ReLU."""
        return F.relu(self.bn(self.blocks(self.conv1(self.normalize(x)))))


# --------------------------------------------------------------------------------------------
# factory
def build_model(name: str, num_classes: int, in_channels: int = 3,
                mean: Sequence[float] | None = None, std: Sequence[float] | None = None, *,
                image_size: int | Sequence[int] = 32, depth: int = 34, width: int = 10,
                dropout: float = 0.0, seed: int | None = None) -> SpatModel:
    """Build one of ``MODELS`` on the CPU in float32, taking (N, in_channels, H, W) in [0, 1].

    ``mean``/``std`` (per channel, pixel units) default to 0/1, i.e. no normalization.
    ``image_size`` (int or (H, W)) matters for ``small_cnn`` only; ``depth``/``width`` for
    ``wide_resnet`` only; ``dropout`` for ``small_cnn`` (after fc1) and ``wide_resnet``
    (inside blocks). ``seed``: initialize from ``torch.manual_seed(seed)`` inside a forked
    RNG, so the weights are reproducible and the caller's global RNG is left untouched;
    None draws from the global RNG as usual.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(MODELS)}")
    if num_classes < 1 or in_channels < 1:
        raise ValueError(f"num_classes and in_channels must be >= 1, got {num_classes}, {in_channels}")
    for label, stats in (("mean", mean), ("std", std)):
        if stats is not None and len(stats) != in_channels:
            raise ValueError(f"{label} has {len(stats)} values but in_channels is {in_channels}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if name == "preact_resnet18" and dropout > 0:
        raise ValueError("preact_resnet18 has no dropout; use dropout=0 (or small_cnn / wide_resnet)")

    def make() -> SpatModel:
        if name == "small_cnn":
            return SmallCNN(num_classes, in_channels, mean, std, image_size=image_size, dropout=dropout)
        if name == "preact_resnet18":
            return PreActResNet18(num_classes, in_channels, mean, std)
        return WideResNet(num_classes, in_channels, mean, std, depth=depth, width=width, dropout=dropout)

    if seed is None:
        return make()
    # devices=[]: fork only the CPU generator, so building a model never initializes CUDA
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def model_from_config(cfg: ModelConfig, dataset: Dataset, *, seed: int | None = None) -> SpatModel:
    """Build ``cfg.name`` for ``dataset`` (classes, channels, mean/std, image size)."""
    return build_model(cfg.name, dataset.num_classes, dataset.in_channels,
                       dataset.mean, dataset.std, image_size=dataset.image_size,
                       depth=cfg.depth, width=cfg.width, dropout=cfg.dropout, seed=seed)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (BatchNorm running stats and Normalize buffers excluded)."""
    return sum(p.numel() for p in model.parameters())
