"""Every file of a run folder, in one place: names, formats, atomic writes, checkpoints.

``spatlib.train.train(config, run_dir)`` writes::

    config.yaml          the resolved config (RunConfig.to_yaml())
    history.csv          one row per epoch (HISTORY_COLUMNS)
    checkpoint_last.pt   every epoch, written atomically: everything an exact resume needs
    checkpoint_best.pt   the epoch of best validation accuracy (Rice et al. early stopping)
    metrics.json         at the end: test accuracy of the selected model + provenance

and the evaluation caches ``eval_<eps>.json`` (:func:`eval_cache_path`). Every write goes
through a temp file and ``os.replace`` (:func:`spatlib.util.atomic_write_bytes`), so a killed
run leaves each file old or new, never half written. A checkpoint is a dict of tensors, dicts,
lists, numbers and strings only (``torch.load(weights_only=True)`` reads it).
"""
from __future__ import annotations

import csv
import io
import json
import math
import pickle
import re
import zipfile
from pathlib import Path

import torch
from torch import nn

from .config import ConfigError, RunConfig, format_eps, from_dict, read_yaml, to_dict
from .data import Dataset, dataset_from_config
from .models import model_from_config
from .util import atomic_write_bytes, atomic_write_text, remove_stale_temps

__all__ = ["CONFIG", "HISTORY", "LAST", "BEST", "METRICS", "RUN_FILES", "CHECKPOINT_FORMAT",
           "HISTORY_COLUMNS", "COSMETIC_KEYS", "CheckpointError", "eval_cache_path",
           "config_diff", "upgrade_config", "check_same_run", "read_saved_config", "read_finished_metrics",
           "read_run_config", "load_history", "load_metrics", "history_csv", "write_history",
           "write_config", "write_metrics", "save_checkpoint", "best_of", "load_checkpoint",
           "load_weights", "repair_best", "clean_temps", "WHICH", "load_run_model", "model_from_checkpoint"]

CONFIG, HISTORY, METRICS = "config.yaml", "history.csv", "metrics.json"
LAST, BEST = "checkpoint_last.pt", "checkpoint_best.pt"
RUN_FILES = (CONFIG, HISTORY, LAST, BEST, METRICS)
CHECKPOINT_FORMAT = "spatlib-checkpoint/1"
HISTORY_COLUMNS = ["epoch", "lr", "eps", "train_loss", "train_clean_acc", "train_adv_acc",
                   "shared_share", "shared_share_pgd",
                   "val_clean_acc", "val_robust_acc", "ema_val_clean_acc", "ema_val_robust_acc",
                   "val_source", "epoch_time_s", "images_per_s", "wall_time_s"]
# keys that do not change what is trained: a run resumes (or is reused) across them. "eval."
# covers the whole section: evaluation settings (03 re-evaluates with its own cache key) never
# change the weights
COSMETIC_KEYS = ("name", "train.progress", "train.device", "train.tensorboard", "data.root",
                 "data.download", "eval.", "train.share_every")
# what a best checkpoint leaves out of the last one: only a resume needs it
_RESUME_ONLY = ("optimizer", "scaler", "rng", "history")


class CheckpointError(ValueError):
    """A checkpoint (or run folder) is unreadable, not a spatlib checkpoint, does not fit the
    model, or belongs to a different config. The message names the file."""


def eval_cache_path(run_dir: str | Path, eps: float) -> Path:
    """``eval_8-255.json`` / ``eval_0.3.json`` (a slash cannot be in a file name)."""
    return Path(run_dir) / f"eval_{format_eps(eps).replace('/', '-')}.json"


# --------------------------------------------------------------------------------------------
# the config: is this folder this run?
def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def config_diff(old: dict, new: dict, ignore: tuple[str, ...] = COSMETIC_KEYS) -> list[str]:
    """Dotted keys whose values differ between two config dicts, as ``key: old -> new``
    (a config saved by an older release: read it with :func:`upgrade_config` first)."""
    a, b = _flatten(old or {}), _flatten(new or {})
    return [f"{k}: {a.get(k, '<missing>')!r} -> {b.get(k, '<missing>')!r}"
            for k in sorted(set(a) | set(b))
            if not any(k == i or (i.endswith(".") and k.startswith(i)) for i in ignore)
            and a.get(k) != b.get(k)]


def upgrade_config(saved: dict | None) -> dict:
    """A config dict saved by this or an older spatlib (config.yaml, a checkpoint's ``config``)
    in today's keys, meaning what it meant when it was saved: a key added since takes its
    default (a new key's default keeps what runs did before it existed), and a ``data`` section
    from before ``val_split`` with ``val_size: 0``, which then meant "select on the first 512
    test images", becomes ``val_split: test``. One that no longer parses comes back as saved
    (:func:`check_same_run` then names the keys that differ)."""
    saved = dict(saved or {})
    data = saved.get("data")
    if isinstance(data, dict) and "val_split" not in data and data.get("val_size") == 0:
        saved["data"] = {**data, "val_size": None, "val_split": "test"}
    try:
        return to_dict(from_dict(saved))
    except ConfigError:
        return saved


def check_same_run(saved: dict, requested: dict, path: Path) -> None:
    """:class:`CheckpointError` naming the differing keys unless ``saved`` (the config of
    ``path``, as :func:`upgrade_config` reads it) and ``requested`` train the same run."""
    diff = config_diff(upgrade_config(saved), requested)
    if diff:
        raise CheckpointError(
            f"{path} belongs to a run with a different config; differing keys: {'; '.join(diff)}. "
            f"Use another run folder, or delete {path.parent} to start this run afresh.")


def read_saved_config(run_dir: str | Path) -> dict | None:
    """The raw config dict of ``run_dir/config.yaml``; None when the folder has none."""
    path = Path(run_dir) / CONFIG
    try:
        return read_yaml(path) if path.is_file() else None
    except ConfigError as e:     # a damaged config.yaml: the run folder's problem
        raise CheckpointError(str(e)) from None


def read_finished_metrics(run_dir: str | Path) -> dict | None:
    """``metrics.json`` of a finished run; None while unfinished; a damaged file is an error."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); delete it to redo the "
                              f"final evaluation") from None


def read_run_config(run_dir: str | Path) -> RunConfig:
    """The resolved config a run folder was trained with (``config.yaml``)."""
    saved = read_saved_config(run_dir)
    if saved is None:
        raise FileNotFoundError(f"{Path(run_dir) / CONFIG}: no config.yaml; is {run_dir} a "
                                f"spatlib run folder?")
    return from_dict(upgrade_config(saved))


def load_history(run_dir: str | Path):
    """``history.csv`` of a run (one row per epoch) as a pandas DataFrame."""
    import pandas as pd   # lazy: the trainer writes the CSV without pandas
    return pd.read_csv(Path(run_dir) / HISTORY)


def load_metrics(run_dir: str | Path) -> dict:
    """``metrics.json`` of a finished run ({} while unfinished)."""
    path = Path(run_dir) / METRICS
    return json.loads(path.read_text()) if path.is_file() else {}


# --------------------------------------------------------------------------------------------
# writing
def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else repr(v)
    return str(v)


def history_csv(rows: list[dict], columns: list[str]) -> str:
    """The history as CSV text: a header, one line per epoch, missing values as ``nan``."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([_fmt(r.get(c, float("nan"))) for c in columns])
    return buf.getvalue()


def write_history(run_dir: Path, rows: list[dict], columns: list[str]) -> None:
    """``history.csv``, atomically."""
    atomic_write_text(Path(run_dir) / HISTORY, history_csv(rows, columns))


def write_config(run_dir: Path, cfg: RunConfig) -> None:
    """``config.yaml``, atomically."""
    atomic_write_text(Path(run_dir) / CONFIG, cfg.to_yaml())


def write_metrics(run_dir: Path, metrics: dict) -> None:
    """``metrics.json``, atomically: its presence marks the run finished."""
    atomic_write_text(Path(run_dir) / METRICS, json.dumps(metrics, indent=2) + "\n")


def clean_temps(run_dir: Path) -> None:
    """Temp files of a run killed while writing (their pid is gone with it)."""
    remove_stale_temps(run_dir, RUN_FILES)


# --------------------------------------------------------------------------------------------
# checkpoints
def save_checkpoint(path: Path, state: dict) -> None:
    """``torch.save`` through a temp file, fsynced: a kill leaves the old checkpoint or the new."""
    atomic_write_bytes(path, lambda f: torch.save(state, f))


def best_of(last: dict) -> dict:
    """The best checkpoint of a ``last`` state: its weights and run record, without what only
    a resume needs (optimizer, scaler, RNG states, history)."""
    best = {k: v for k, v in last.items() if k not in _RESUME_ONLY}
    best["kind"] = "best"
    return best


def _model_info(model: nn.Module) -> str:
    classifier = getattr(model, "classifier", None)
    k = classifier.out_features if isinstance(classifier, nn.Linear) else "?"
    return f"{type(model).__name__} with {k} classes"


_ZIP_MAGIC = b"PK\x03\x04"


def _unreadable(path: Path) -> str | None:
    """What is wrong with a file that cannot be a torch checkpoint (torch.save writes a zip
    archive), before torch's unpickler sees it; None when it is a whole zip archive."""
    if zipfile.is_zipfile(path):
        return None
    with open(path, "rb") as f:
        head = f.read(4)
    if head == _ZIP_MAGIC:  # a zip that lost its end (the central directory is stored last)
        return ("is a truncated or damaged PyTorch checkpoint (a zip archive without its "
                "central directory: the end of the file is missing)")
    if not head:
        return "is empty (0 bytes): not a PyTorch checkpoint"
    return "is not a PyTorch checkpoint (not a zip archive): truncated or another file"


def _refusal(e: Exception) -> str:
    """One line on why torch refused a zip archive, without torch's advice to load it
    unsafely: a spatlib checkpoint holds only tensors, dicts, lists, numbers and strings."""
    text = str(e)
    unsafe = re.findall(r"GLOBAL ([\w.]+)", text)
    if unsafe:
        return (f"holds an object of type {unsafe[0]}, which a spatlib checkpoint never does "
                f"(tensors, dicts, lists, numbers and strings only); not loaded, since unpickling "
                f"it could run arbitrary code")
    if "data.pkl" in text:
        return "is a zip archive but not a PyTorch checkpoint (it holds no data.pkl)"
    if isinstance(e, pickle.UnpicklingError) or "Unsupported operand" in text:
        return "is a zip archive but not a PyTorch checkpoint (its data.pkl is not a pickle torch can read)"
    first = next((ln.strip() for ln in text.splitlines()
                  if ln.strip() and "weights_only" not in ln.lower()), "")
    return f"is a damaged PyTorch checkpoint ({type(e).__name__}{': ' + first if first else ''})"



def load_checkpoint(path: str | Path, model: nn.Module | None = None, *, weights: str = "model",
                    map_location: str | torch.device = "cpu") -> dict:
    """Read a spatlib checkpoint (``torch.load(weights_only=True)``) and optionally load weights.

    ``weights``: which state to load into ``model``: ``"model"`` (raw weights), ``"ema_model"``
    or ``"selected"`` (what model selection used: the EMA when the run kept one).
    Raises :class:`CheckpointError` naming the file when it is missing, truncated, corrupt, not a
    spatlib checkpoint, or when its weights do not fit ``model`` (architecture / classes).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    problem = _unreadable(path)
    if problem is None:
        try:
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # a zip torch refuses: an unsafe type inside, a damaged member
            problem = _refusal(e)
    if problem is not None:
        raise CheckpointError(f"{path}: {problem}. Delete it to restart the run from scratch.")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or "model" not in ckpt:
        raise CheckpointError(f"{path}: not a spatlib checkpoint (expected a dict with "
                              f"format {CHECKPOINT_FORMAT!r} and model weights)")
    if model is not None:
        load_weights(model, ckpt, weights, path)
    return ckpt


def load_weights(model: nn.Module, ckpt: dict, weights: str, path: Path) -> None:
    """Load ``ckpt[weights]`` (``model``, ``ema_model`` or ``selected``) into ``model``; a
    missing or misfitting state is a :class:`CheckpointError` that says what was saved."""
    key = ckpt.get("selected", "model") if weights == "selected" else weights
    state = ckpt.get(key)
    if state is None:
        raise CheckpointError(f"{path}: holds no {key!r} weights"
                              + (" (the run kept no EMA: train.ema was 0)" if key == "ema_model" else ""))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        saved = ckpt.get("model_info", {})
        lines = str(e).strip().splitlines()
        detail = "; ".join(ln.strip() for ln in lines[1:4]) or lines[0]
        raise CheckpointError(
            f"{path}: its weights do not fit this model. The checkpoint was saved for "
            f"{saved.get('name', '?')} ({saved.get('num_classes', '?')} classes, "
            f"{saved.get('in_channels', '?')} input channels); the model given is "
            f"{_model_info(model)}. Build the model from the checkpoint's config "
            f"(load_run_model). Details: {detail}") from None


def repair_best(run_dir: Path, last: dict) -> None:
    """A kill between writing checkpoint_last.pt and checkpoint_best.pt of the same epoch
    leaves a stale (or no) best file: rewrite it from the last checkpoint, which then holds
    exactly the best weights. Any other mismatch is an error."""
    best_epoch = int(last["best"]["epoch"])
    path = Path(run_dir) / BEST
    if best_epoch == 0:
        return
    if best_epoch == int(last["epoch"]):
        save_checkpoint(path, best_of(last))
        return
    saved = load_checkpoint(path)
    if int(saved["epoch"]) != best_epoch:
        raise CheckpointError(f"{path}: holds epoch {saved['epoch']} but {Path(run_dir) / LAST} "
                              f"records epoch {best_epoch} as the best")


# --------------------------------------------------------------------------------------------
# reading a run back
# which weights of a run folder -> (checkpoint file, its weights key). best: the selected
# weights of checkpoint_best.pt (the EMA when the run kept one); last: the raw weights of
# checkpoint_last.pt; ema: the EMA of checkpoint_last.pt
WHICH = {"best": (BEST, "selected"), "last": (LAST, "model"), "ema": (LAST, "ema_model")}


def load_run_model(run_dir: str | Path, which: str = "best",
                   device: str | torch.device = "cpu") -> tuple[nn.Module, RunConfig, Dataset]:
    """(model in eval mode on ``device``, its RunConfig, its Dataset) from a run folder.

    ``which``: a key of :data:`WHICH` (``best``, ``last`` or ``ema``).
    """
    if which not in WHICH:
        raise ValueError(f"which: expected one of {', '.join(WHICH)}, got {which!r}")
    name, weights = WHICH[which]
    path = Path(run_dir) / name
    model, cfg, dataset = model_from_checkpoint(load_checkpoint(path), weights, path)
    return model.to(device).eval(), cfg, dataset


def model_from_checkpoint(ckpt: dict, weights: str, path: Path) -> tuple[nn.Module, RunConfig, Dataset]:
    """(model with the ``weights`` of a loaded kit checkpoint, on the CPU, its RunConfig read
    through :func:`upgrade_config`, its Dataset); ``path`` names the file in errors."""
    cfg = from_dict(upgrade_config(ckpt["config"]))
    dataset = dataset_from_config(cfg.data)
    model = model_from_config(cfg.model, dataset, seed=cfg.seed)  # seeded: the caller's RNG is untouched
    load_weights(model, ckpt, weights, path)
    return model, cfg, dataset
