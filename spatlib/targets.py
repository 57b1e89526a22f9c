"""What ``spat eval`` evaluates (a *target*), loaded, and the test images it is evaluated on.

A target is one of

* a **run folder** of the kit: its config gives the dataset, the eval settings (``eval``
  section) and the seed; ``which`` (``--which best|last|ema``) picks the weights;
* a **kit checkpoint** file (``checkpoint_*.pt``): its config is inside;
* a **TorchScript** file (``torch.jit.save`` of a traced or scripted model);
* ``module:factory`` with ``--weights state_dict.pt``: the module is imported (the current
  folder first on ``sys.path``, as ``python -m`` puts it), the factory called without
  arguments, the state_dict loaded strictly, as public checkpoints come: ``module.``/``model.``
  prefixes and ``{"state_dict": ...}``/``{"model": ...}`` wrappers are undone
  (:func:`spatlib.zoo.load_published_state_dict`);
* ``robustbench:NAME``: a model of RobustBench's zoo (``--threat-model``, default Linf;
  ``--model-dir``, default RobustBench's ``./models``; ``--dataset`` cifar10 or cifar100, default
  cifar10), loaded through the ``robustbench`` package (:func:`spatlib.zoo.load_zoo_model`).

External models (TorchScript, factory, zoo) take images in [0, 1] (normalization inside the
model, as RobustBench's models and the kit's own); TorchScript and factory targets need
``--dataset`` or ``--data-path``. :func:`target_data` gives a target its test images (its own
run's, a named dataset's, an npz file's, or synthetic ones shaped for the model: ``--shape``,
else the model's) and checks the model on two of them: a model that rejects their shape or
gives the wrong number of logits is one line, before any attack.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import re
import sys
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import zoo
from .config import ConfigError, DataConfig, RunConfig, from_dict
from .data import KNOWN_SHAPES, Dataset, dataset_from_config
from .runfolder import (CONFIG, WHICH, CheckpointError, load_checkpoint, load_run_model,
                        model_from_checkpoint)
from .util import eval_mode

__all__ = ["TargetError", "Target", "WHICH", "load_target", "run_target", "target_data",
           "synthetic_shape"]

_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class TargetError(ValueError):
    """A target that cannot be evaluated; the message says why in one line."""


@dataclass
class Target:
    """A loaded target: the model (eval mode, on its device) and what the kit knows about it."""
    kind: str                     # run | checkpoint | torchscript | factory | robustbench
    spec: str                     # as given on the command line
    model: nn.Module | None       # None: a run evaluated elsewhere (run_target), only carded
    file: Path | None             # the file whose sha256 identifies the weights (None: a zoo
                                  # ensemble of several files, or timm's hub weights)
    config: RunConfig | None      # kit targets only
    which: str | None             # kit targets only
    description: str
    dataset: Dataset | None = None   # kit targets: the data of their config
    zoo: zoo.ZooEntry | None = None  # robustbench targets

    @property
    def default_name(self) -> str:
        """The card's name of the model when ``--name`` is not given: the run's name (kit
        targets), the file's stem (TorchScript), the ``module:factory`` spec."""
        if self.config is not None:
            return self.config.name
        if self.zoo is not None:
            return self.zoo.name
        return Path(self.spec).stem if self.kind == "torchscript" else self.spec


# --------------------------------------------------------------------------------------------
# loading a target
def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zips holding ``<name>/code/`` and ``constants.pkl``."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def load_target(spec: str, *, weights: str | None = None, which: str = "best",
                device: str | torch.device = "cpu", threat_model: str | None = None,
                model_dir: str | Path | None = None, zoo_dataset: str = "cifar10") -> Target:
    """Load a run folder, kit checkpoint, TorchScript file, ``module:factory`` (+ ``weights``)
    or ``robustbench:NAME`` (``threat_model``, default Linf; ``model_dir``, default
    :func:`spatlib.zoo.default_model_dir`; the zoo of ``zoo_dataset``). Raises
    :class:`TargetError` (one line) when it cannot be loaded."""
    if which not in WHICH:
        raise TargetError(f"--which: expected one of {', '.join(WHICH)}, got {which!r}")
    device = torch.device(device) if not isinstance(device, torch.device) else device
    if spec.startswith(zoo.ZOO_PREFIX):
        return _load_zoo(spec, weights, threat_model, model_dir, zoo_dataset, device)
    for option, value in (("--threat-model", threat_model), ("--model-dir", model_dir)):
        if value is not None:
            raise TargetError(f"{option}: only a robustbench:NAME target takes it ({spec} is not one)")
    path = Path(spec)
    if weights is not None and not _FACTORY.match(spec):
        raise TargetError(f"--weights: only a module:factory target takes a state_dict "
                          f"({spec} is not one)")
    if _FACTORY.match(spec) and not path.exists():
        return _load_factory(spec, weights, device)
    if not path.exists():
        raise TargetError(f"{spec}: no such file or folder (a run folder, checkpoint_*.pt, "
                          f"TorchScript file, or module:factory with --weights)")
    if path.is_dir():
        if not (path / CONFIG).is_file():
            raise TargetError(f"{spec}: a folder without {CONFIG}: not a spatlib run folder")
        # CheckpointError names a missing/damaged file
        model, cfg, ds = load_run_model(path, which, device)
        return Target("run", spec, model, path / WHICH[which][0], cfg, which,
                      _run_description(cfg, which), ds)
    if _is_torchscript(path):
        try:
            with warnings.catch_warnings():   # torch 2.x marks TorchScript deprecated; it still loads
                warnings.simplefilter("ignore", FutureWarning)
                model = torch.jit.load(str(path), map_location=device)
        except Exception as e:  # a damaged archive: any of torch's reader errors
            raise TargetError(f"{spec}: a TorchScript archive that cannot be loaded: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
        return Target("torchscript", spec, model.eval(), path, None, None,
                      f"TorchScript {path.name}")
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError:
        raise TargetError(f"{spec}: neither a TorchScript file nor a spatlib checkpoint (for a "
                          f"state_dict, give module:factory --weights {spec})") from None
    model, cfg, ds = model_from_checkpoint(ckpt, WHICH[which][1], path)
    return Target("checkpoint", spec, model.to(device).eval(), path, cfg, which,
                  f"checkpoint {path.name} of {_run_description(cfg, which)}", ds)


def _run_description(cfg: RunConfig, which: str) -> str:
    return f"run {cfg.name} ({cfg.train.method}, {cfg.model.name}, {which} weights)"


def run_target(run_dir: str | Path, config: RunConfig, which: str = "best") -> Target:
    """A run folder as :func:`load_target` describes it, without loading its model: what
    :func:`make_card` needs for a run evaluated elsewhere (notebook 03's
    :func:`spatlib.report.collect_results`)."""
    if which not in WHICH:
        raise TargetError(f"which: expected one of {', '.join(WHICH)}, got {which!r}")
    return Target("run", str(run_dir), None, Path(run_dir) / WHICH[which][0], config, which,
                  _run_description(config, which))


@contextlib.contextmanager
def _current_folder_importable():
    """The current folder first on sys.path while the block runs, as ``python -m`` puts it (the
    installed ``spat`` script does not): a ``module:factory`` beside the user imports, and so do
    the modules it imports when its factory runs. Yields the folder."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield cwd
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(cwd)


def _load_factory(spec: str, weights: str | None, device: torch.device) -> Target:
    if weights is None:
        raise TargetError(f"{spec}: a module:factory target needs --weights STATE_DICT.pt")
    module_name, factory_name = spec.split(":")
    with _current_folder_importable() as cwd:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:  # the module itself, or one it imports
            raise TargetError(
                f"{spec}: cannot import {module_name!r}: no module named {e.name!r} (looked in "
                f"the current folder {cwd}, PYTHONPATH {os.environ.get('PYTHONPATH') or '(unset)'}"
                f" and the installed packages)") from None
        except Exception as e:  # whatever the module raises at import
            raise TargetError(f"{spec}: cannot import {module_name!r}: {type(e).__name__}: {e}") from None
        factory = getattr(module, factory_name, None)
        if not callable(factory):
            raise TargetError(f"{spec}: {module_name!r} has no callable {factory_name!r}")
        model = factory()
    if not isinstance(model, nn.Module):
        raise TargetError(f"{spec}: the factory returned a {type(model).__name__}, not a torch.nn.Module")
    wpath = Path(weights)
    if not wpath.is_file():
        raise TargetError(f"--weights {weights}: no such file")
    try:
        state = torch.load(wpath, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TargetError(f"--weights {weights}: cannot be read as a state_dict "
                          f"({type(e).__name__})") from None
    if not isinstance(state, Mapping):
        raise TargetError(f"--weights {weights}: holds a {type(state).__name__}, not a state_dict")
    try:
        zoo.load_published_state_dict(model, state, f"--weights {weights} for {spec}")
    except zoo.ZooError as e:
        raise TargetError(str(e)) from None
    return Target("factory", spec, model.to(device).eval(), wpath, None, None,
                  f"{spec} with {wpath.name}")


def _load_zoo(spec: str, weights: str | None, threat_model: str | None,
              model_dir: str | Path | None, dataset: str, device: torch.device) -> Target:
    if weights is not None:
        raise TargetError(f"--weights: a {zoo.ZOO_PREFIX}NAME target loads RobustBench's own "
                          f"checkpoint (put it under --model-dir)")
    name = spec[len(zoo.ZOO_PREFIX):]
    try:
        model, entry = zoo.load_zoo_model(name, dataset=dataset,
                                          threat_model=threat_model or zoo.DEFAULT_THREAT_MODEL,
                                          model_dir=model_dir)
    except zoo.ZooError as e:
        raise TargetError(str(e)) from None
    file = entry.files[0] if len(entry.files) == 1 else None
    return Target("robustbench", spec, model.to(device).eval(), file, None, None,
                  entry.description, zoo=entry)


# --------------------------------------------------------------------------------------------
# the test images of a target
def target_data(target: Target, dataset: str | None = None, data_path: str | None = None,
                shape: tuple[int, int, int] | None = None,
                device: str | torch.device = "cpu") -> Dataset:
    """The images ``target`` is evaluated on, its model checked on two of them (it takes their
    shape and gives one logit per class). ``dataset`` (a name) or ``data_path`` (an npz); neither:
    a kit target's own data. ``dataset="synthetic"``: images of ``shape`` (C, H, W), else of the
    model's (:func:`synthetic_shape`). Raises :class:`TargetError`, one line, or DataError."""
    device = torch.device(device)
    ds = _data(target, dataset, data_path, shape, device)
    _check_output(target, ds, device)
    return ds


def _data(target: Target, dataset: str | None, data_path: str | None,
          shape: tuple[int, int, int] | None, device: torch.device) -> Dataset:
    if dataset is not None and data_path is not None:
        raise TargetError("--dataset and --data-path: give one of them")
    if shape is not None and dataset != "synthetic":
        raise TargetError("--shape: only --dataset synthetic takes it (a dataset's images have "
                          "their own shape)")
    if data_path is not None:
        if not Path(data_path).is_file():
            raise TargetError(f"--data-path {data_path}: no such file")
        cfg = from_dict({"name": "npz", "path": data_path}, DataConfig)
    elif dataset is not None:
        fields: dict = {"name": dataset}
        if dataset == "synthetic":
            fit, classes = synthetic_shape(target, shape, device)
            fields["synthetic_shape"] = list(fit)
            if classes:
                fields["synthetic_classes"] = classes
        try:
            cfg = from_dict(fields, DataConfig)
        except ConfigError as e:
            raise TargetError(f"--dataset: {e}".replace("name: ", "")) from None
        if dataset == "npz":
            raise TargetError("--dataset npz: give the file with --data-path X.npz")
    elif target.dataset is not None:
        return target.dataset
    else:
        raise TargetError(f"{target.spec}: an external model needs --dataset NAME or --data-path X.npz")
    return dataset_from_config(cfg)


def _forward(target: Target, x: torch.Tensor, data: str) -> torch.Tensor:
    """The model's output for ``x`` (N, C, H, W); a model that cannot take them is one line
    naming it, the images' shape and the last line of its own error (TorchScript's first line
    only says that an operation failed)."""
    try:
        with torch.no_grad(), eval_mode(target.model):
            return target.model(x)
    except Exception as e:  # wrong channels / size: the model's own error
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        raise TargetError(f"{target.spec}: cannot take {data} images of shape "
                          f"{tuple(x.shape[1:])}: {lines[-1] if lines else type(e).__name__}") from None


def synthetic_shape(target: Target, shape: tuple[int, int, int] | None = None,
                    device: str | torch.device = "cpu") -> tuple[tuple[int, int, int], int | None]:
    """(C, H, W) of synthetic images for the target's model, and its number of logits (None:
    not a (N, K >= 2) output; the output check names it). ``shape`` (--shape), else a kit
    model's own data's, else the first of the kit's datasets' shapes (:data:`KNOWN_SHAPES`)
    that the model takes, one forward of two images each."""
    own = shape or (tuple(target.dataset.x_test.shape[1:]) if target.dataset is not None else None)
    for fit in [own] if own else KNOWN_SHAPES:
        try:
            out = _forward(target, torch.full((2, *fit), 0.5, device=device), "synthetic")
        except TargetError:
            if own:
                raise
            continue
        return fit, (out.shape[1] if isinstance(out, torch.Tensor) and out.dim() == 2
                     and out.shape[1] >= 2 else None)
    shapes = ", ".join("x".join(map(str, k)) for k in KNOWN_SHAPES)
    raise TargetError(f"{target.spec}: takes none of the kit's image shapes ({shapes}) as "
                      f"synthetic images; give --shape C,H,W")


def _check_output(target: Target, ds: Dataset, device: torch.device) -> None:
    """One forward on two test images: the model must take them and give K logits."""
    out = _forward(target, ds.x_test[:2].float().div(255).to(device), ds.name)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] != ds.num_classes:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise TargetError(f"{target.spec}: gives outputs of shape {shape} for 2 images; "
                          f"{ds.name} has {ds.num_classes} classes, so logits must be (2, {ds.num_classes})")
