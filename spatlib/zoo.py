"""Models the kit did not train: RobustBench's model zoo, and state_dicts as public checkpoints
come.

* :func:`load_zoo_model` loads a RobustBench model (``spat eval robustbench:NAME``, notebook 01's
  ``oracle_checkpoints: [robustbench:NAME]``) through the ``robustbench`` package (the optional
  extra ``pip install 'spatlib[zoo]'``), from its model dir: ``MODEL_DIR/<dataset>/<threat
  model>/<NAME>.pt`` (an ensemble: ``<NAME>.pt_m0.pt``, ``_m1`` ...), RobustBench's own layout.
  A name, dataset or threat model RobustBench does not have is one line (:class:`ZooError`,
  with the closest names) before anything loads; a checkpoint missing from the model dir is
  downloaded as RobustBench does when its host answers, else one line says which file to put
  where. Zoo models take images in [0, 1] and normalize inside, as the kit's do.
* :func:`load_published_state_dict` loads a state_dict saved the usual public ways into a model:
  as is, from DataParallel/DDP (``module.`` keys) or a wrapper (``model.`` keys), inside
  ``{"state_dict": ...}`` or ``{"model": ...}``; anything else is one line naming the missing
  and unexpected keys.

robustbench 1.1.1 imports the AutoAttack authors' module as ``autoattack``; the registry ships
the same files as ``pyautoattack`` (a dependency of both), so :func:`import_robustbench` aliases
it first. It also imports ``pkg_resources``, which setuptools 81 removed (the extra pins
``setuptools<81``).
"""
from __future__ import annotations

import importlib
import os
import socket
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from torch import Tensor, nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from .util import did_you_mean

__all__ = ["ZOO_PREFIX", "ZOO_DATASETS", "ZooError", "ZooEntry", "import_robustbench",
           "default_model_dir", "zoo_entry", "load_zoo_model", "download_reachable",
           "unwrap_state_dict", "load_published_state_dict"]

ZOO_PREFIX = "robustbench:"
ZOO_DATASETS = ("cifar10", "cifar100")     # RobustBench's datasets the kit has
DEFAULT_THREAT_MODEL = "Linf"
MODEL_DIR_ENV = "SPATLIB_ROBUSTBENCH_DIR"  # else RobustBench's own default, ./models
DOWNLOAD_HOST = ("drive.google.com", 443)  # where RobustBench's checkpoints come from
# robustbench imports these modules of the AutoAttack authors' package (as `autoattack.*`)
_AUTOATTACK_MODULES = ("autoattack", "state")
_WRAPPERS = ("state_dict", "model")        # {"state_dict": ...}, {"model": ...}
_PREFIXES = ("module.", "model.")          # DataParallel / DDP, and wrappers holding self.model
_KEYS_SHOWN = 3                            # keys named per kind in a mismatch line


class ZooError(ValueError):
    """A zoo model or a foreign checkpoint that cannot be loaded; the message is one line."""


@dataclass(frozen=True)
class ZooEntry:
    """A model of RobustBench's zoo and where its checkpoint lives."""
    name: str
    dataset: str               # cifar10 | cifar100
    threat_model: str          # Linf | L2 | corruptions | corruptions_3d
    model_dir: Path
    files: tuple[Path, ...]    # the checkpoint(s) RobustBench reads; () for a timm model
    gdrive_ids: tuple[str, ...]
    timm: bool                 # weights from the Hugging Face hub through timm, not a file here

    @property
    def spec(self) -> str:
        return f"{ZOO_PREFIX}{self.name}"

    @property
    def description(self) -> str:
        """``RobustBench Wu2020Adversarial (cifar10, Linf)``: the card's model."""
        return f"RobustBench {self.name} ({self.dataset}, {self.threat_model})"


def import_robustbench() -> ModuleType:
    """The ``robustbench`` package, importable with the registry's AutoAttack (``pyautoattack``
    aliased as ``autoattack`` unless the authors' git package is installed); its import-time
    deprecation warnings (``pkg_resources``, ``torch.jit``) are not the user's business."""
    try:
        importlib.import_module("autoattack")
    except ImportError:
        try:
            for sub in _AUTOATTACK_MODULES:
                name = "autoattack" if sub == "autoattack" else f"autoattack.{sub}"
                target = "pyautoattack" if sub == "autoattack" else f"pyautoattack.{sub}"
                sys.modules.setdefault(name, importlib.import_module(target))
        except ImportError:
            pass     # robustbench's own import names what is missing
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            return importlib.import_module("robustbench")
    except ImportError as e:
        raise ZooError(f"RobustBench models need the robustbench package: pip install "
                       f"'spatlib[zoo]' (robustbench 1.1.1); import failed: {e}") from None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("robustbench")
    except PackageNotFoundError:
        return "(version unknown)"


def default_model_dir() -> Path:
    """``$SPATLIB_ROBUSTBENCH_DIR``, else RobustBench's own default ``./models``."""
    return Path(os.environ.get(MODEL_DIR_ENV) or "models")


def zoo_entry(name: str, *, dataset: str = "cifar10", threat_model: str = DEFAULT_THREAT_MODEL,
              model_dir: str | Path | None = None) -> ZooEntry:
    """The zoo's entry ``name`` for ``dataset`` and ``threat_model``; :class:`ZooError` (one
    line) for a dataset, threat model or name RobustBench does not have, with the closest names
    (and, for a name of another dataset or threat model, where it is)."""
    import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
    threat_models = [t.value for t in ThreatModel]
    if threat_model not in threat_models:
        raise ZooError(f"--threat-model: {threat_model!r} is not one of RobustBench's threat "
                       f"models{did_you_mean(threat_model, threat_models)}: {', '.join(threat_models)}")
    if dataset not in ZOO_DATASETS:
        raise ZooError(f"{ZOO_PREFIX}{name}: RobustBench's zoo has no {dataset!r} models the kit can "
                       f"evaluate; datasets: {', '.join(ZOO_DATASETS)}")
    models = model_dicts[BenchmarkDataset(dataset)].get(ThreatModel(threat_model), {})
    if name not in models:
        elsewhere = [f"{d.value} {t.value}" for d in BenchmarkDataset for t in ThreatModel
                     if d.value in ZOO_DATASETS and name in model_dicts[d].get(t, {})]
        where = (f"; it is a {' and '.join(elsewhere)} model: pass --dataset / --threat-model"
                 if elsewhere else "")
        raise ZooError(f"{ZOO_PREFIX}{name}: no {dataset} {threat_model} model of that name in "
                       f"RobustBench {_version()}{did_you_mean(name, models)}{where}")
    import timm
    lower = name.lower().replace("-", "_")
    is_timm = timm.is_model(f"{lower}_{dataset}_{threat_model.lower()}")
    ids = models[name]["gdrive_id"]
    ids = tuple(ids) if isinstance(ids, list) else ((ids,) if ids else ())
    root = Path(model_dir) if model_dir is not None else default_model_dir()
    folder = root / dataset / threat_model.replace("_3d", "")   # RobustBench's layout
    if is_timm:
        files: tuple[Path, ...] = ()
    elif len(ids) > 1:
        files = tuple(folder / f"{name}.pt_m{i}.pt" for i in range(len(ids)))
    else:
        files = (folder / f"{name}.pt",)
    return ZooEntry(name, dataset, threat_model, root, files, ids, is_timm)


def download_reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """Whether ``host`` answers on ``port`` (a TCP connection, nothing sent): offline machines
    (a cluster's compute nodes) say so in seconds instead of failing inside a download."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _where_line(entry: ZooEntry, missing: list[Path], reason: str) -> str:
    """The one line that says which file to put where."""
    puts = "; ".join(
        f"put https://drive.google.com/uc?id={entry.gdrive_ids[entry.files.index(f)]} at {f}"
        for f in missing)
    return (f"{entry.spec}: {reason}: {puts} (or pass --model-dir where the checkpoint already is;"
            f" RobustBench's layout: MODEL_DIR/{entry.dataset}/{entry.threat_model}/NAME.pt)")


def load_zoo_model(name: str, *, dataset: str = "cifar10",
                   threat_model: str = DEFAULT_THREAT_MODEL,
                   model_dir: str | Path | None = None) -> tuple[nn.Module, ZooEntry]:
    """(the zoo model in eval mode on the CPU, its entry). Every check (:func:`zoo_entry`, then
    the checkpoint: in the model dir, or its download host reachable) runs before the model is
    built; a failed download or load is one line (:class:`ZooError`) too. A timm entry (XCiT)
    takes its weights from the Hugging Face hub (or its cache), through RobustBench."""
    entry = zoo_entry(name, dataset=dataset, threat_model=threat_model, model_dir=model_dir)
    missing = [f for f in entry.files if not f.is_file()]
    if missing and not download_reachable(*DOWNLOAD_HOST):
        raise ZooError(_where_line(entry, missing, f"the checkpoint is not in {entry.model_dir} "
                                                   f"and Google Drive cannot be reached (offline)"))
    from robustbench.utils import load_model
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = load_model(name, model_dir=str(entry.model_dir), dataset=dataset,
                               threat_model=threat_model)
    except Exception as e:  # gdown, requests, timm/hub, torch.load: each its own error type
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        still = [f for f in entry.files if not f.is_file()]
        if still:
            raise ZooError(_where_line(entry, still, f"the download failed ({first})")) from None
        raise ZooError(f"{entry.spec}: RobustBench could not load it from {entry.model_dir}: "
                       f"{type(e).__name__}: {first}") from None
    return model.eval(), entry


# --------------------------------------------------------------------------------------------
# state_dicts as public checkpoints come
def unwrap_state_dict(obj: Mapping) -> Mapping:
    """The state_dict inside ``{"state_dict": ...}`` / ``{"model": ...}`` (nested ones too), or
    ``obj`` itself."""
    for _ in range(len(_WRAPPERS)):
        inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    return obj


def _candidates(state: Mapping) -> list[dict]:
    """The state_dict as given, without ``module.``, and without ``module.`` then ``model.``."""
    out = [dict(state)]
    for prefix in _PREFIXES:
        d = dict(out[-1])
        consume_prefix_in_state_dict_if_present(d, prefix)
        out.append(d)
    return out


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:_KEYS_SHOWN])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > _KEYS_SHOWN else "")


def load_published_state_dict(model: nn.Module, obj: Mapping, where: str) -> None:
    """Load a published checkpoint ``obj`` (a state_dict, wrapped or prefixed as public
    checkpoints are) into ``model``, strictly. ``where`` names the file in the one-line
    :class:`ZooError` that says which keys are missing and which unexpected (a few of each,
    with counts), or which tensor has the wrong shape."""
    state = unwrap_state_dict(obj)
    if not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise ZooError(f"{where}: not a state_dict (names to tensors), nor one inside "
                       f"{' or '.join(repr(k) for k in _WRAPPERS)}")
    wanted = set(model.state_dict())
    best = min(_candidates(state), key=lambda d: len(wanted ^ set(d)))
    missing = sorted(wanted - set(best))
    unexpected = sorted(set(best) - wanted)
    if missing or unexpected:
        parts = ([f"{len(missing)} missing key(s): {_names(missing)}"] if missing else []) + \
                ([f"{len(unexpected)} unexpected key(s): {_names(unexpected)}"] if unexpected else [])
        raise ZooError(f"{where}: does not fit the model ({'; '.join(parts)}); "
                       f"'module.'/'model.' prefixes and 'state_dict'/'model' wrappers were tried")
    try:
        model.load_state_dict(best, strict=True)
    except RuntimeError as e:   # a size mismatch: the keys fit, a shape does not
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        raise ZooError(f"{where}: does not fit the model: {lines[1] if len(lines) > 1 else lines[0]}") from None
