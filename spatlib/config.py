"""Typed, strict configuration.

One dataclass per concern (data, model, attack, train, eval) nested in a :class:`RunConfig`.
YAML params are loaded with ``yaml.safe_load`` and checked strictly: an unknown key, a wrong
type or an out-of-range value raises one :class:`ConfigError` that names the key path and the
allowed values. Papermill does not catch typos, so this module must.

Epsilons may be written as fractions of 255 (``eps: 8/255``); they are stored as floats and
formatted back as fractions (:func:`format_eps`) wherever results are written.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

DATASETS = ("digits", "cifar10", "cifar100", "mnist", "fashion_mnist", "npz", "synthetic")
MODELS = ("small_cnn", "preact_resnet18", "wide_resnet")
METHODS = ("standard", "pgd_at", "trades", "mart", "spat_at", "spat_trades")
RULES = ("intersection", "equality", "agreement", "random", "none")
SALIENCIES = ("input_grad", "cam")
BN_MODES = ("eval", "train")
SCHEDULES = ("piecewise", "cosine", "onecycle")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
ATTACK_LOSSES = ("ce", "kl", "margin")
SUITE_ATTACKS = ("clean", "fgsm", "pgd20", "pgd100", "cw", "autoattack")


class ConfigError(ValueError):
    """A parameter is unknown, of the wrong type, or out of range. The message names the key."""


# --------------------------------------------------------------------------------------------
# epsilon helpers
_FRACTION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*/\s*([0-9]*\.?[0-9]+)\s*$")


def parse_eps(value: Any, key: str = "eps") -> float:
    """Accept ``0.03``, ``8/255`` or ``"8/255"``; return a float. Raises ConfigError otherwise."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a number or a fraction like 8/255, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        m = _FRACTION.match(value)
        if m:
            den = float(m.group(2))
            if den == 0:
                raise ConfigError(f"{key}: division by zero in {value!r}")
            return float(m.group(1)) / den
        try:
            return float(value)
        except ValueError:
            pass
    raise ConfigError(f"{key}: expected a number or a fraction like 8/255, got {value!r}")


def format_eps(eps: float) -> str:
    """A short decimal when eps has one (``0.3``, ``0.15``, ``0.2``), else ``8/255`` when eps
    is a whole number of 255ths (to 1e-6), else the decimal."""
    if abs(eps - round(eps, 3)) < 1e-9:
        return f"{round(eps, 3):g}"
    n = eps * 255.0
    if abs(n - round(n)) < 1e-6:
        return f"{int(round(n))}/255"
    return f"{eps:g}"


# --------------------------------------------------------------------------------------------
# the concerns
@dataclass
class DataConfig:
    name: str = "digits"               # one of DATASETS
    root: str | None = None            # download/cache folder; None: $SPATLIB_DATA or ~/.cache/spatlib
    path: str | None = None            # the .npz file for name=npz
    download: bool = True
    train_limit: int | None = None     # first N training images (CPU-sized runs on real data)
    test_limit: int | None = None      # first N test images
    val_size: int = 0                  # images held out of train for model selection (0: none)
    augment: bool = True               # per-dataset pad-crop / flip defaults
    synthetic_classes: int = 10        # name=synthetic only
    synthetic_shape: list[int] = field(default_factory=lambda: [1, 8, 8])  # C, H, W
    synthetic_train: int = 512
    synthetic_test: int = 256


@dataclass
class ModelConfig:
    name: str = "small_cnn"            # one of MODELS
    depth: int = 34                    # wide_resnet only
    width: int = 10                    # wide_resnet only
    dropout: float = 0.0


@dataclass
class AttackConfig:
    """The attack used to craft training examples (and the validation PGD)."""
    eps: float = 8 / 255               # L-inf budget in pixel units ([0,1] images)
    alpha: float = 2 / 255             # step size
    steps: int = 10
    random_start: bool = True
    bn_mode: str = "eval"              # BatchNorm mode while crafting: eval | train
    # SPAT (DESIGN.md "The SPAT attack"); ignored by the non-SPAT methods
    rule: str = "intersection"         # one of RULES
    saliency: str = "input_grad"       # input_grad (exact) | cam (fast)
    gamma: float = 1.0                 # sharpening of the shared-pixel score
    classes: str = "all"               # all | topk:N
    class_chunk: int = 16              # classes per batched backward (memory bound)
    refresh: int = 0                   # recompute weights every k steps; 0: once at clean x


@dataclass
class TrainConfig:
    method: str = "pgd_at"             # one of METHODS
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "piecewise"        # piecewise | cosine | onecycle
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # fractions of epochs
    lr_decay: float = 0.1              # piecewise factor at each milestone
    warmup_epochs: float = 0.0         # linear lr warm-up
    eps_warmup_epochs: float = 0.0     # linear eps ramp from 0 (stabilizes small models)
    beta: float = 6.0                  # TRADES / MART / SPAT-TRADES trade-off
    precision: str = "auto"            # auto: bf16 on CUDA, fp32 on CPU
    channels_last: bool = True
    compile: bool = False
    ema: float = 0.0                   # EMA decay of the weights; 0 disables
    eval_every: int = 1                # robust validation every k epochs
    val_steps: int = 10                # PGD-k on the validation slice
    patience: int = 0                  # early stopping after k evals without improvement; 0: off
    device: str = "auto"               # auto | cpu | cuda | cuda:N
    deterministic: bool = False
    max_batches: int | None = None     # cap batches per epoch (benchmarks, smoke runs)
    progress: bool = True


@dataclass
class EvalConfig:
    suite: list[str] = field(default_factory=lambda: list(SUITE_ATTACKS))
    eps: float | None = None           # None: the training attack's eps
    batch_size: int = 256
    n_examples: int | None = None      # evaluate the first N test images; None: all
    pgd100_restarts: int = 5
    cw_steps: int = 30
    eps_curve: list[float] = field(default_factory=list)  # extra eps for PGD-20 curves


@dataclass
class RunConfig:
    name: str = "run"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return to_dict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------------------------
# range checks: key path -> predicate and the allowed values, checked after the type
_EPS_KEYS = {"eps", "alpha", "eps_curve"}


def _choice(options):
    return (lambda v: v in options, "one of " + ", ".join(options))


def _suite_ok(v):
    return all(a in SUITE_ATTACKS for a in v)


def _classes_ok(v):
    if v == "all":
        return True
    m = re.fullmatch(r"topk:(\d+)", v)
    return bool(m) and int(m.group(1)) >= 1


_RULES: dict[str, tuple] = {
    "data.name": _choice(DATASETS),
    "data.train_limit": (lambda v: v is None or v >= 1, "None or an integer >= 1"),
    "data.test_limit": (lambda v: v is None or v >= 1, "None or an integer >= 1"),
    "data.val_size": (lambda v: v >= 0, "an integer >= 0"),
    "data.synthetic_classes": (lambda v: v >= 2, "an integer >= 2"),
    "data.synthetic_shape": (lambda v: len(v) == 3 and all(d >= 1 for d in v), "[C, H, W], each >= 1"),
    "data.synthetic_train": (lambda v: v >= 1, "an integer >= 1"),
    "data.synthetic_test": (lambda v: v >= 1, "an integer >= 1"),
    "model.name": _choice(MODELS),
    "model.depth": (lambda v: v >= 10 and (v - 4) % 6 == 0, "6n+4 (e.g. 28, 34)"),
    "model.width": (lambda v: v >= 1, "an integer >= 1"),
    "model.dropout": (lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    "attack.eps": (lambda v: 0.0 <= v <= 1.0, "a number in [0, 1] (e.g. 8/255)"),
    "attack.alpha": (lambda v: 0.0 < v <= 1.0, "a number in (0, 1] (e.g. 2/255)"),
    "attack.steps": (lambda v: v >= 0, "an integer >= 0"),
    "attack.bn_mode": _choice(BN_MODES),
    "attack.rule": _choice(RULES),
    "attack.saliency": _choice(SALIENCIES),
    "attack.gamma": (lambda v: v >= 0, "a number >= 0"),
    "attack.classes": (_classes_ok, "'all' or 'topk:N' with N >= 1"),
    "attack.class_chunk": (lambda v: v >= 1, "an integer >= 1"),
    "attack.refresh": (lambda v: v >= 0, "an integer >= 0"),
    "train.method": _choice(METHODS),
    "train.epochs": (lambda v: v >= 1, "an integer >= 1"),
    "train.batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "train.lr": (lambda v: v > 0, "a number > 0"),
    "train.momentum": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "train.weight_decay": (lambda v: v >= 0, "a number >= 0"),
    "train.schedule": _choice(SCHEDULES),
    "train.milestones": (lambda v: all(0 < m < 1 for m in v), "fractions of the epochs in (0, 1)"),
    "train.lr_decay": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "train.warmup_epochs": (lambda v: v >= 0, "a number >= 0"),
    "train.eps_warmup_epochs": (lambda v: v >= 0, "a number >= 0"),
    "train.beta": (lambda v: v >= 0, "a number >= 0"),
    "train.precision": _choice(PRECISIONS),
    "train.ema": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "train.eval_every": (lambda v: v >= 1, "an integer >= 1"),
    "train.val_steps": (lambda v: v >= 1, "an integer >= 1"),
    "train.patience": (lambda v: v >= 0, "an integer >= 0"),
    "train.device": (lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", v) is not None,
                     "auto, cpu, cuda, cuda:N or mps"),
    "train.max_batches": (lambda v: v is None or v >= 1, "None or an integer >= 1"),
    "eval.suite": (_suite_ok, "a list drawn from " + ", ".join(SUITE_ATTACKS)),
    "eval.eps": (lambda v: v is None or 0.0 <= v <= 1.0, "None or a number in [0, 1]"),
    "eval.batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "eval.n_examples": (lambda v: v is None or v >= 1, "None or an integer >= 1"),
    "eval.pgd100_restarts": (lambda v: v >= 1, "an integer >= 1"),
    "eval.cw_steps": (lambda v: v >= 1, "an integer >= 1"),
    "eval.eps_curve": (lambda v: all(0.0 <= e <= 1.0 for e in v), "numbers in [0, 1]"),
}


# --------------------------------------------------------------------------------------------
# strict conversion
def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "None")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert only losslessly (int -> float)."""
    origin = typing.get_origin(tp)
    leaf = key.rsplit(".", 1)[-1]
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: must not be null")
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]" if leaf not in _EPS_KEYS else key) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        base = key.split("[")[0].rsplit(".", 1)[-1]
        if base in _EPS_KEYS:
            return parse_eps(value, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a bug in this module


def _from_dict(cls, data: Any, prefix: str = ""):
    if isinstance(data, cls):
        data = to_dict(data)
    if not isinstance(data, dict):
        where = prefix or "the params"
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            import difflib
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown key '{path}'{hint}; allowed keys"
                              f"{' under ' + prefix if prefix else ''}: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], path)
        if path in _RULES:
            ok, allowed = _RULES[path]
            if not ok(kwargs[key]):
                raise ConfigError(f"{path}: {value!r} is not allowed; expected {allowed}")
    return cls(**kwargs)


def _check_consistency(cfg: RunConfig) -> None:
    if cfg.data.name == "npz" and not cfg.data.path:
        raise ConfigError("data.path: required when data.name is 'npz' (a .npz with "
                          "x_train, y_train, x_test, y_test)")
    if cfg.attack.rule == "agreement" and cfg.attack.saliency != "input_grad":
        raise ConfigError("attack.rule: 'agreement' needs attack.saliency 'input_grad'")
    if cfg.model.name == "wide_resnet" and cfg.model.depth < 10:
        raise ConfigError("model.depth: expected 6n+4 >= 10")


def from_dict(data: dict | None, cls=RunConfig):
    """Build ``cls`` (default :class:`RunConfig`) from a nested dict, strictly."""
    cfg = _from_dict(cls, data or {}, "")
    if isinstance(cfg, RunConfig):
        _check_consistency(cfg)
    return cfg


def to_dict(cfg) -> dict:
    """A plain nested dict (YAML-safe) of a config dataclass."""
    return copy.deepcopy(dataclasses.asdict(cfg))


# --------------------------------------------------------------------------------------------
# overrides and files
def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=0.05"`` -> (["train", "lr"], 0.05). The value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. train.lr=0.05")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Return a deep copy of ``data`` with dotted ``KEY=VALUE`` overrides set."""
    out = copy.deepcopy(data or {})
    for text in overrides or []:
        keys, value = parse_override(text)
        node = out
        for k in keys[:-1]:
            if not isinstance(node.get(k, {}), dict):
                raise ConfigError(f"override {text!r}: '{k}' is not a section")
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return out


def deep_merge(base: dict, update: dict) -> dict:
    """Nested dict merge: ``update`` wins; neither input is modified."""
    out = copy.deepcopy(base or {})
    for k, v in (update or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load one run's params file (or defaults when ``path`` is None) with overrides."""
    data = read_yaml(path) if path else {}
    try:
        return from_dict(apply_overrides(data, overrides))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


# --------------------------------------------------------------------------------------------
# experiments: a base, a list of variants, seeds and datasets
@dataclass
class Experiment:
    """An experiment file expanded into runs (variants x datasets x seeds)."""
    name: str
    runs: dict[str, RunConfig]          # run name -> resolved config, in order
    hypothesis: dict                    # parameters for notebook 01 (validated by spatlib.hypothesis)
    robustness: dict                    # parameters for notebook 03
    path: str | None = None
    launcher: dict = field(default_factory=dict)   # cluster settings (validated by spatlib.slurm)


EXPERIMENT_KEYS = ("experiment", "base", "variants", "seeds", "datasets", "hypothesis", "robustness",
                   "launcher")


def expand_experiment(data: dict, overrides: list[str] | None = None,
                      path: str | None = None) -> Experiment:
    """Expand ``{experiment, base, variants, seeds, datasets}`` into validated runs.

    ``variants`` maps a variant name to a partial config layered on ``base``; ``datasets`` maps a
    dataset label to a partial ``data`` section (or is a list of dataset names). Each run is
    named ``<variant>-<dataset>-s<seed>``. Overrides (``train.epochs=2``) apply to every run's
    config; ``hypothesis.KEY=...`` and ``robustness.KEY=...`` to the notebook sections.
    Every run is validated here, so a typo fails before any work starts.
    """
    where = f"{path}: " if path else ""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}expected a mapping at the top level")
    for key in data:
        if key not in EXPERIMENT_KEYS:
            import difflib
            close = difflib.get_close_matches(str(key), EXPERIMENT_KEYS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{where}unknown key '{key}'{hint}; allowed top-level keys: "
                              + ", ".join(EXPERIMENT_KEYS))
    run_over, nb_over = [], {"hypothesis": [], "robustness": []}
    for text in overrides or []:
        head = text.split("=", 1)[0].split(".", 1)[0].strip()
        (nb_over[head] if head in nb_over else run_over).append(text)
    name = data.get("experiment") or (Path(path).stem if path else "experiment")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ConfigError(f"{where}experiment: expected a name of letters, digits, _ . -, got {name!r}")
    base = data.get("base") or {}
    variants = data.get("variants") or {"default": {}}
    if not isinstance(variants, dict):
        raise ConfigError(f"{where}variants: expected a mapping of variant name to overrides")
    seeds = data.get("seeds", [0])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"{where}seeds: expected a list of integers, got {seeds!r}")
    datasets = data.get("datasets")
    if datasets is None:
        datasets = {None: {}}
    elif isinstance(datasets, list):
        datasets = {d: {"name": d} for d in datasets}
    elif not isinstance(datasets, dict):
        raise ConfigError(f"{where}datasets: expected a list of names or a mapping label -> data section")
    runs: dict[str, RunConfig] = {}
    for ds_label, ds_data in datasets.items():
        for variant, vdata in variants.items():
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(variant)):
                raise ConfigError(f"{where}variants: bad variant name {variant!r}")
            for seed in seeds:
                layered = deep_merge(base, vdata or {})
                if ds_label is not None:
                    layered = deep_merge(layered, {"data": ds_data or {}})
                ds_part = ds_label if ds_label is not None else layered.get("data", {}).get("name", "digits")
                run_name = f"{variant}-{ds_part}-s{seed}"
                layered["seed"] = seed
                layered["name"] = run_name
                try:
                    runs[run_name] = from_dict(apply_overrides(layered, run_over))
                except ConfigError as e:
                    raise ConfigError(f"{where}run '{run_name}': {e}") from None
    sections = {}
    for sec in ("hypothesis", "robustness"):
        sdata = data.get(sec) or {}
        if not isinstance(sdata, dict):
            raise ConfigError(f"{where}{sec}: expected a mapping of notebook parameters")
        stripped = [t.split(".", 1)[1] if "." in t.split("=", 1)[0] else t for t in nb_over[sec]]
        sections[sec] = apply_overrides(sdata, stripped)
    launcher = data.get("launcher") or {}
    if not isinstance(launcher, dict):
        raise ConfigError(f"{where}launcher: expected a mapping of cluster settings")
    return Experiment(name=name, runs=runs, hypothesis=sections["hypothesis"],
                      robustness=sections["robustness"], path=str(path) if path else None,
                      launcher=launcher)


def load_experiment(path: str | Path, overrides: list[str] | None = None) -> Experiment:
    """Read and expand an experiment params file (see :func:`expand_experiment`)."""
    return expand_experiment(read_yaml(path), overrides, str(path))
