"""Oracles: what an image means, decided by a classifier the attacks never see.

:mod:`spatlib.hypothesis` asks whether an attack changed what an image means; an oracle
answers for every image: :class:`KNNOracle` (k nearest neighbours on clean training pixels, for
small aligned data such as digits) or :class:`EnsembleOracle` (independently trained models:
robust runs of other seeds or architectures, or RobustBench's zoo, for CIFAR).
:func:`build_oracle` builds either from notebook 01's parameters. Inputs are images
(N, C, H, W) in [0, 1] (or uint8, :func:`as_unit_float`) on any device.
"""
from __future__ import annotations

import abc
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .util import device_of, eval_mode
from .zoo import ZOO_DATASETS, ZOO_PREFIX, load_zoo_model

__all__ = ["as_unit_float", "Oracle", "KNNOracle", "EnsembleOracle", "build_oracle"]


def as_unit_float(x, name: str = "x") -> Tensor:
    """uint8 (0..255) or float in [0, 1], tensor or numpy -> float32 tensor in [0, 1]."""
    x = torch.as_tensor(x)
    if x.dtype == torch.uint8:
        return x.float().div(255)
    x = x.float()
    if x.numel() and (float(x.min()) < 0.0 or float(x.max()) > 1.0):
        raise ValueError(f"{name}: expected uint8 images or floats in [0, 1], got values in "
                         f"[{float(x.min()):.3g}, {float(x.max()):.3g}]")
    return x


class Oracle(abc.ABC):
    """A classifier the attack never sees; it stands in for "what the image means".

    Subclasses implement :meth:`predict_proba`. Inputs are images (N, C, H, W) in [0, 1] on any
    device; outputs are on the input's device.
    """

    num_classes: int

    @abc.abstractmethod
    def predict_proba(self, x: Tensor) -> Tensor:
        """x (N, C, H, W) in [0, 1] -> class probabilities (N, K), float32, rows sum to 1."""

    def predict(self, x: Tensor) -> Tensor:
        """x (N, C, H, W) in [0, 1] -> labels (N,) long (ties: the smallest class index)."""
        return self.predict_proba(x).argmax(1)

    def accuracy(self, x: Tensor, y: Tensor, batch_size: int = 1024) -> float:
        """Clean accuracy on (x, y); x uint8 or [0, 1] floats."""
        x, y = as_unit_float(x), torch.as_tensor(y)
        if len(y) == 0:
            return float("nan")
        hits = sum(int((self.predict(x[i:i + batch_size]).cpu() == y[i:i + batch_size].cpu()).sum())
                   for i in range(0, len(y), batch_size))
        return hits / len(y)


class KNNOracle(Oracle):
    """k nearest neighbours (Euclidean) on the flattened clean training pixels in [0, 1].

    The "probability" of class c is the share of the k neighbours' votes that c gets
    (``weights="uniform"``) or its inverse-distance-weighted share (``weights="distance"``), so
    with uniform votes it moves in steps of 1/k. A kNN classifier on pixels is a fair oracle for
    small, aligned images (digits, MNIST): it knows nothing of the attacked network, and an
    image moves to another class only by coming to look like that class's training images.
    """

    def __init__(self, x_train, y_train, k: int = 5, *, weights: str = "uniform",
                 num_classes: int | None = None):
        from sklearn.neighbors import KNeighborsClassifier   # import here: sklearn is slow to load

        x = as_unit_float(x_train, "x_train")
        y = torch.as_tensor(y_train).long().cpu()
        if x.ndim < 2 or len(x) != len(y):
            raise ValueError(f"KNNOracle: {len(x)} images but {len(y)} labels")
        if not 1 <= k <= len(y):
            raise ValueError(f"KNNOracle: k must be in [1, {len(y)}], got {k}")
        self.k = int(k)
        self.weights = weights
        self.num_classes = int(num_classes if num_classes is not None else int(y.max()) + 1)
        self.image_shape = tuple(x.shape[1:])
        self._knn = KNeighborsClassifier(n_neighbors=self.k, weights=weights)
        self._knn.fit(x.reshape(len(x), -1).cpu().numpy(), y.numpy())
        # sklearn's columns are the classes present in y_train; map them into 0..K-1
        self._columns = torch.as_tensor(self._knn.classes_, dtype=torch.long)

    def predict_proba(self, x: Tensor) -> Tensor:
        """x (N, C, H, W) in [0, 1] -> neighbour vote shares (N, K)."""
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"KNNOracle: fitted on images {self.image_shape}, got {tuple(x.shape[1:])}")
        flat = as_unit_float(x.detach()).reshape(len(x), -1).cpu().numpy()
        votes = torch.as_tensor(self._knn.predict_proba(flat), dtype=torch.float32)
        out = torch.zeros(len(x), self.num_classes)
        out[:, self._columns] = votes
        return out.to(x.device)

    def __repr__(self) -> str:
        return (f"KNNOracle(k={self.k}, weights={self.weights!r}, n_train={self._knn.n_samples_fit_}, "
                f"classes={self.num_classes})")


class EnsembleOracle(Oracle):
    """The mean softmax of several independently trained models (each in eval mode, no grad).

    For CIFAR-sized data, where pixel-space neighbours mean little: e.g. robust models of other
    seeds or architectures than the attacked one, or of RobustBench's zoo. Each model runs on
    its own device.
    """

    def __init__(self, models: Sequence[nn.Module], *, batch_size: int = 512):
        self.models = list(models)
        if not self.models:
            raise ValueError("EnsembleOracle: needs at least one model")
        ks = {getattr(m, "num_classes", None) for m in self.models} - {None}
        if len(ks) > 1:
            raise ValueError(f"EnsembleOracle: the models disagree on the number of classes: {sorted(ks)}")
        self.num_classes = ks.pop() if ks else None   # else known after the first prediction
        self.batch_size = int(batch_size)

    @torch.no_grad()
    def predict_proba(self, x: Tensor) -> Tensor:
        """x (N, C, H, W) in [0, 1] -> mean softmax over the models (N, K)."""
        x = as_unit_float(x)
        total = 0
        with eval_mode(*self.models):
            for m in self.models:
                dev = device_of(m)
                probs = [F.softmax(m(x[i:i + self.batch_size].to(dev)).float(), 1).to(x.device)
                         for i in range(0, max(len(x), 1), self.batch_size)]
                total = total + torch.cat(probs)
        self.num_classes = total.shape[1]
        return total / len(self.models)

    @classmethod
    def from_checkpoints(cls, paths: Iterable[str | Path], *, which: str = "best",
                         device: str | torch.device = "cpu", batch_size: int = 512,
                         dataset: str | None = None) -> "EnsembleOracle":
        """An ensemble of trained runs on ``device``, via ``spatlib.runfolder.load_run_model``,
        and of RobustBench zoo models.

        paths: run folders (``which``: ``best``, ``last`` or ``ema`` weights) or their
        ``checkpoint_best.pt`` / ``checkpoint_last.pt`` files (the file decides best or last;
        ``which="ema"`` picks the EMA of a last checkpoint). The model is rebuilt from the
        config saved in the checkpoint, so runs of other architectures mix freely.
        ``robustbench:NAME``: the Linf zoo model of ``dataset`` (cifar10 or cifar100) from
        :func:`spatlib.zoo.default_model_dir` (:func:`spatlib.zoo.load_zoo_model`).
        """
        from . import runfolder   # lazy: loading runs is the caller's choice

        by_file = {runfolder.BEST: "best", runfolder.LAST: "last"}
        models = []
        for entry in paths:
            if str(entry).startswith(ZOO_PREFIX):
                if dataset not in ZOO_DATASETS:
                    raise ValueError(f"EnsembleOracle: {entry}: a zoo model is looked up in the "
                                     f"dataset's zoo ({', '.join(ZOO_DATASETS)}), and the data is "
                                     f"{dataset!r}")
                zoo_model, _ = load_zoo_model(str(entry)[len(ZOO_PREFIX):], dataset=dataset)
                models.append(zoo_model.to(device))
                continue
            p = Path(entry)
            if p.is_file():
                if p.name not in by_file:
                    raise ValueError(f"EnsembleOracle: {p} is not a run's {runfolder.BEST} or {runfolder.LAST}; "
                                     f"pass the run folder")
                run_dir = p.parent
                kind = "ema" if (by_file[p.name] == "last" and which == "ema") else by_file[p.name]
            elif p.is_dir():
                run_dir, kind = p, which
            else:
                raise FileNotFoundError(f"EnsembleOracle: no run folder or checkpoint at {p}")
            models.append(runfolder.load_run_model(run_dir, which=kind, device=device)[0])
        return cls(models, batch_size=batch_size)

    def __repr__(self) -> str:
        names = ", ".join(type(m).__name__ for m in self.models)
        return f"EnsembleOracle([{names}])"


def build_oracle(kind: str, dataset=None, *, k: int = 5, checkpoints: Sequence[str | Path] = (),
                 which: str = "best", device: str | torch.device = "cpu") -> Oracle:
    """An oracle from notebook parameters: ``"knn"`` (needs ``dataset``, fits on its clean
    training split) or ``"ensemble"`` (needs ``checkpoints``: run folders, checkpoint files or
    ``robustbench:NAME`` zoo models of ``dataset``'s zoo)."""
    if kind == "knn":
        if dataset is None:
            raise ValueError("oracle 'knn' needs the dataset (it fits on the clean training images)")
        return KNNOracle(dataset.x_train, dataset.y_train, k=k, num_classes=dataset.num_classes)
    if kind == "ensemble":
        if not checkpoints:
            raise ValueError("oracle 'ensemble' needs checkpoints: run folders of independently "
                             "trained models (other seeds or architectures than the attacked one)")
        return EnsembleOracle.from_checkpoints(checkpoints, which=which, device=device,
                                               dataset=getattr(dataset, "name", None))
    raise ValueError(f"oracle: expected 'knn' or 'ensemble', got {kind!r}")
