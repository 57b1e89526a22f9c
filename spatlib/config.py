"""Typed, strict configuration.

One dataclass per concern (data, model, attack, train, eval) nested in a :class:`RunConfig`,
and one per notebook section (:class:`HypothesisConfig`, :class:`RobustnessConfig`). Each
field's range check sits beside it (``spec(default, check)``) and is verified at import.
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
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import yaml

from .semantics import BUDGETS, RULES, SALIENCIES, parse_classes
from .util import ConfigError, unknown_line

DATASETS = ("digits", "cifar10", "cifar100", "mnist", "fashion_mnist", "npz", "synthetic")
MODELS = ("small_cnn", "preact_resnet18", "wide_resnet")
METHODS = ("standard", "pgd_at", "trades", "mart", "spat_at", "spat_trades")
BN_MODES = ("eval", "train")
SCHEDULES = ("piecewise", "cosine", "onecycle")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
SUITE_ATTACKS = ("clean", "fgsm", "pgd20", "pgd100", "cw", "autoattack")   # the suite, in order
CHECKPOINTS = ("best", "last", "ema")
ORACLES = ("knn", "ensemble")
VAL_SPLITS = ("train", "test")       # where model selection takes its images


# --------------------------------------------------------------------------------------------
# range checks, declared beside their fields: ``name: int = spec(10, at_least(1))``
@dataclass(frozen=True)
class Check:
    """A value check: ``ok(value)`` and the allowed values in words (a callable when the
    allowed set can grow after import, as the SPAT rule registry does)."""
    ok: Callable[[Any], bool]
    allowed: str | Callable[[], str]

    def describe(self) -> str:
        return self.allowed() if callable(self.allowed) else self.allowed


def spec(default: Any = dataclasses.MISSING, check: Check | None = None, *,
         factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field with its check in the field's metadata."""
    meta = {"check": check} if check else {}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def choice(options: Sequence[str] | Mapping) -> Check:
    """One of ``options`` (a mapping: its keys, read at check time)."""
    return Check(lambda v: v in options, lambda: "one of " + ", ".join(options))


def at_least(lo: float, kind: str = "an integer") -> Check:
    return Check(lambda v: v >= lo, f"{kind} >= {lo:g}")


def in_range(lo: float, hi: float, *, closed_low: bool = True, closed_high: bool = True,
             note: str = "") -> Check:
    left, right = "[" if closed_low else "(", "]" if closed_high else ")"
    return Check(lambda v: (v >= lo if closed_low else v > lo) and (v <= hi if closed_high else v < hi),
                 f"a number in {left}{lo:g}, {hi:g}{right}{note}")


def optional(check: Check) -> Check:
    """None, or what ``check`` allows."""
    return Check(lambda v: v is None or check.ok(v), lambda: "None or " + check.describe())


def each(check: Check, what: str = "") -> Check:
    """A list whose every item passes ``check``."""
    return Check(lambda v: all(check.ok(x) for x in v),
                 lambda: what or "a list of " + check.describe())


def _classes_ok(v: str) -> bool:
    try:
        parse_classes(v)
    except ValueError:
        return False
    return True


EPS_RANGE = in_range(0.0, 1.0, note=" (pixel units, e.g. 8/255)")
POSITIVE_INT = at_least(1)
NON_NEGATIVE_INT = at_least(0)


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
    name: str = spec("digits", choice(DATASETS))
    root: str | None = None            # download/cache folder; None: $SPATLIB_DATA or ~/.cache/spatlib
    path: str | None = None            # the .npz file for name=npz
    download: bool = True
    train_limit: int | None = spec(None, optional(POSITIVE_INT))   # first N training images
    test_limit: int | None = spec(None, optional(POSITIVE_INT))    # first N test images
    # model selection: val_size images of the val_split. train (default): a stratified hold-out
    # of the training images (after train_limit), never trained on; None: a tenth of them, at
    # least one per class, at most 1000 (data.validation_size). test: the first val_size (None:
    # 512) TEST images, as checkpoint selection on test images: optimistic, and every metrics
    # file, table and card says so
    val_size: int | None = spec(None, optional(NON_NEGATIVE_INT))
    val_split: str = spec("train", choice(VAL_SPLITS))
    augment: bool = True               # per-dataset pad-crop / flip defaults
    synthetic_classes: int = spec(10, at_least(2))                 # name=synthetic only
    synthetic_shape: list[int] = spec(factory=lambda: [1, 8, 8], check=Check(
        lambda v: len(v) == 3 and all(d >= 1 for d in v), "[C, H, W], each >= 1"))
    synthetic_train: int = spec(512, POSITIVE_INT)
    synthetic_test: int = spec(256, POSITIVE_INT)


@dataclass
class ModelConfig:
    name: str = spec("small_cnn", choice(MODELS))
    depth: int = spec(34, Check(lambda v: v >= 10 and (v - 4) % 6 == 0, "6n+4 (e.g. 28, 34)"))  # wide_resnet
    width: int = spec(10, POSITIVE_INT)                            # wide_resnet only
    dropout: float = spec(0.0, in_range(0.0, 1.0, closed_high=False))


@dataclass
class AttackConfig:
    """The attack used to craft training examples (and the validation PGD)."""
    eps: float = spec(8 / 255, EPS_RANGE)          # L-inf budget in pixel units ([0,1] images)
    alpha: float = spec(2 / 255, in_range(0.0, 1.0, closed_low=False, note=" (e.g. 2/255)"))  # step
    steps: int = spec(10, NON_NEGATIVE_INT)
    random_start: bool = True
    bn_mode: str = spec("eval", choice(BN_MODES))  # BatchNorm mode while crafting
    # SPAT (docs/design.md "The SPAT attack"); ignored by the non-SPAT methods
    rule: str = spec("intersection", choice(RULES))  # a rule of spatlib.semantics.RULES
    saliency: str = spec("input_grad", choice(SALIENCIES))   # input_grad (exact) | cam (fast)
    gamma: float = spec(1.0, at_least(0, "a number"))  # sharpening of the shared-pixel score
    classes: str = spec("all", Check(_classes_ok, "'all' or 'topk:N' with N >= 1"))
    class_chunk: int = spec(16, POSITIVE_INT)      # classes per batched backward (memory bound)
    refresh: int = spec(0, NON_NEGATIVE_INT)       # recompute weights every k steps; 0: once at clean x
    # how the score shapes the budget: step (weighted steps, every pixel keeps the eps-ball) or
    # radius (|delta_i| <= eps * r_i, r in [0, 1] from the score with mean radius_mean)
    budget: str = spec("step", choice(BUDGETS))
    radius_mean: float = spec(0.5, in_range(0.0, 1.0, closed_low=False,
                                            note=" (the mean per-pixel radius, a fraction of eps)"))


DEVICE = Check(lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", v) is not None,
               "auto, cpu, cuda, cuda:N or mps")


@dataclass
class TrainConfig:
    method: str = spec("pgd_at", choice(METHODS))
    epochs: int = spec(10, POSITIVE_INT)
    batch_size: int = spec(128, POSITIVE_INT)
    lr: float = spec(0.1, Check(lambda v: v > 0, "a number > 0"))
    momentum: float = spec(0.9, in_range(0, 1, closed_high=False))
    weight_decay: float = spec(5e-4, at_least(0, "a number"))
    nesterov: bool = False
    schedule: str = spec("piecewise", choice(SCHEDULES))
    milestones: list[float] = spec(factory=lambda: [0.5, 0.75], check=Check(   # fractions of epochs
        lambda v: all(0 < m < 1 for m in v), "fractions of the epochs in (0, 1)"))
    lr_decay: float = spec(0.1, in_range(0, 1, closed_low=False))   # piecewise factor per milestone
    warmup_epochs: float = spec(0.0, at_least(0, "a number"))       # linear lr warm-up
    eps_warmup_epochs: float = spec(0.0, at_least(0, "a number"))   # linear eps ramp from 0
    beta: float = spec(6.0, at_least(0, "a number"))   # TRADES / MART / SPAT-TRADES trade-off
    precision: str = spec("auto", choice(PRECISIONS))  # auto: bf16 on CUDA, fp32 on CPU
    channels_last: bool = True
    compile: bool = False
    ema: float = spec(0.0, in_range(0, 1, closed_high=False))  # EMA decay of the weights; 0: off
    eval_every: int = spec(1, POSITIVE_INT)        # robust validation every k epochs
    val_steps: int = spec(10, POSITIVE_INT)        # PGD-k on the validation slice
    patience: int = spec(0, NON_NEGATIVE_INT)      # early stop after k evals without gain; 0: off
    device: str = spec("auto", DEVICE)
    deterministic: bool = False
    max_batches: int | None = spec(None, optional(POSITIVE_INT))  # cap batches per epoch
    progress: bool = True
    # the manipulation check on every k-th batch of an epoch (from the first): the share of the
    # training examples' |delta| on shared pixels, and PGD's on the same batch (history.csv's
    # shared_share, shared_share_pgd); 0: off. It never changes what is trained
    share_every: int = spec(10, NON_NEGATIVE_INT)
    # adversarial weight perturbation (Wu et al. 2020; spatlib.awp), adversarial methods only:
    # the size of the weight step relative to each layer's norm (0: off; the authors: 0.01
    # AT-AWP, 0.005 TRADES-AWP) and the epochs trained before it starts
    awp_gamma: float = spec(0.0, at_least(0, "a number"))
    awp_warmup: int = spec(0, NON_NEGATIVE_INT)
    tensorboard: bool = False          # the per-epoch history also as TensorBoard events (run_dir/tensorboard)


@dataclass
class EvalConfig:
    suite: list[str] = spec(factory=lambda: list(SUITE_ATTACKS),
                            check=each(choice(SUITE_ATTACKS), "a list drawn from " + ", ".join(SUITE_ATTACKS)))
    eps: float | None = spec(None, optional(EPS_RANGE))   # None: the training attack's eps
    batch_size: int = spec(256, POSITIVE_INT)
    n_examples: int | None = spec(None, optional(POSITIVE_INT))  # the first N test images; None: all
    pgd100_restarts: int = spec(5, POSITIVE_INT)
    cw_steps: int = spec(30, POSITIVE_INT)
    eps_curve: list[float] = spec(factory=list, check=each(EPS_RANGE, "numbers in [0, 1]"))  # PGD-20 curve


@dataclass
class RunConfig:
    name: str = "run"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def eval_eps(self, ev: EvalConfig | None = None) -> float:
        """The evaluation budget: ``eps`` of the eval settings ``ev`` (default: this run's own
        ``eval`` section), or the training attack's eps where that is None."""
        ev = self.eval if ev is None else ev
        return float(ev.eps if ev.eps is not None else self.attack.eps)

    def to_dict(self) -> dict:
        return to_dict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------------------------
# the notebook sections: notebook 01's ``hypothesis:`` and notebook 03's ``robustness:``
RADIUS_SUFFIX = ":radius"   # notebook 01's name of a SPAT attack with budget 'radius'


def attack_names(saliency: str = "input_grad") -> list[str]:
    """The attacks notebook 01 compares: ``pgd``, ``spat_<rule>`` (the step budget) and
    ``spat_<rule>:radius`` (the per-pixel radius budget) for every rule of the registry
    (:data:`spatlib.semantics.RULES`) but ``none`` (that is ``pgd``), without the rules that
    read input gradients when ``saliency`` is ``cam``."""
    rules = [r.name for r in RULES.values()
             if r.score is not None and not (r.needs_grads and saliency != "input_grad")]
    return ["pgd"] + [f"spat_{r}" for r in rules] + [f"spat_{r}{RADIUS_SUFFIX}" for r in rules]


def parse_attack_name(name: str) -> tuple[str, str]:
    """notebook 01's attack name -> (rule, budget): ``pgd`` -> (none, step), ``spat_equality``
    -> (equality, step), ``spat_random:radius`` -> (random, radius)."""
    if name == "pgd":
        return "none", "step"
    if not name.startswith("spat_"):
        raise ConfigError(f"attack {name!r}: expected pgd, spat_<rule> or spat_<rule>{RADIUS_SUFFIX}")
    rule = name[len("spat_"):]
    if rule.endswith(RADIUS_SUFFIX):
        return rule[:-len(RADIUS_SUFFIX)], "radius"
    return rule, "step"


@dataclass
class HypothesisConfig:
    """Notebook 01's parameters (its ``parameters`` cell; ``model_dir`` and ``threads`` are set
    by the batch). ``data``/``model``/``train``: partial run sections for the attacked model,
    checked key by key like a run's (see ``PARTIAL_SECTIONS``)."""
    data: dict = spec(factory=lambda: {"name": "digits", "val_size": 150})
    model: dict = spec(factory=lambda: {"name": "small_cnn"})
    train: dict = spec(factory=lambda: {"method": "standard", "epochs": 15, "batch_size": 64,
                                        "lr": 0.05, "schedule": "onecycle", "weight_decay": 0.0005})
    seed: int = 0
    eps_list: list[float] = spec(factory=lambda: [0.05, 0.1, 0.15, 0.2],
                                 check=Check(lambda v: len(v) >= 1 and all(0 <= e <= 1 for e in v),
                                             "a non-empty list of numbers in [0, 1] (pixel units)"))
    attacks: list[str] = spec(factory=lambda: attack_names(), check=Check(
        lambda v: len(v) >= 1 and all(a in attack_names() for a in v),
        lambda: "a non-empty list drawn from " + ", ".join(attack_names())))
    attack_steps: int = spec(20, POSITIVE_INT)
    saliency: str = spec("input_grad", choice(SALIENCIES))
    gamma: float = spec(1.0, at_least(0, "a number"))     # the SPAT attacks' score sharpening
    radius_mean: float = spec(0.5, in_range(0.0, 1.0, closed_low=False,
                                            note=" (the mean per-pixel radius of the :radius attacks)"))
    n_examples: int = spec(200, POSITIVE_INT)
    oracle: str = spec("knn", choice(ORACLES))
    oracle_k: int = spec(5, POSITIVE_INT)
    oracle_checkpoints: list[str] = spec(factory=list)
    match_success: bool = False
    example: int = spec(0, NON_NEGATIVE_INT)
    device: str = spec("auto", DEVICE)


@dataclass
class RobustnessConfig:
    """Notebook 03's parameters (``params``, ``overrides``, ``out_dir``, ``base_dir``, ``train_missing`` and
    ``threads`` are set by the batch)."""
    eval: dict | None = None             # EvalConfig keys on top of each run's own
    which: str = spec("best", choice(CHECKPOINTS))
    heatmap_attack: str | None = spec(None, optional(choice(SUITE_ATTACKS)))
    comparisons: list[list[str]] | None = spec(None, optional(Check(   # [[A, B], ...]: B - A
        lambda v: all(len(p) == 2 and p[0] != p[1] for p in v), "a list of [A, B] method pairs")))
    # result cards (spat eval --out) of models the kit did not train: files or globs, a row each
    cards: list[str] = spec(factory=list, check=Check(
        lambda v: all(p.strip() for p in v), "a list of result card files or globs (spat eval --out)"))
    # comparisons.csv's seeds_needed: seeds per method for 80% power at this true difference,
    # a fraction of accuracy like every accuracy in spatlib (0.02 = 2 points; the csv's *_pct
    # columns are points)
    plan_diff: float = spec(0.02, in_range(0.0, 1.0, closed_low=False, closed_high=False,
                                           note=" (a fraction of accuracy: 0.02 = 2 points)"))
    device: str = spec("auto", DEVICE)


# dict-valued notebook parameters that are partial run sections: checked key by key
PARTIAL_SECTIONS = {(HypothesisConfig, "data"): DataConfig, (HypothesisConfig, "model"): ModelConfig,
                    (HypothesisConfig, "train"): TrainConfig, (RobustnessConfig, "eval"): EvalConfig}
SECTIONS = {"hypothesis": HypothesisConfig, "robustness": RobustnessConfig}


def _check_declarations(classes: Sequence[type] = ()) -> None:
    """At import: every check is a Check, and every default passes its own check (a range
    declared wrongly fails here, not silently in a user's run)."""
    for cls in classes or (DataConfig, ModelConfig, AttackConfig, TrainConfig, EvalConfig,
                           HypothesisConfig, RobustnessConfig):
        for f in dataclasses.fields(cls):
            check = f.metadata.get("check")
            if check is None:
                continue
            if not isinstance(check, Check):
                raise TypeError(f"{cls.__name__}.{f.name}: metadata 'check' must be a Check")
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            if not check.ok(default):
                raise TypeError(f"{cls.__name__}.{f.name}: default {default!r} fails its own check "
                                f"({check.describe()})")


_check_declarations()


_EPS_KEYS = {"eps", "alpha", "eps_curve", "eps_list"}   # fractions like 8/255 allowed


# --------------------------------------------------------------------------------------------
# strict conversion
def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "None")


_EXACT = {bool: "true or false", str: "a string"}   # annotation -> the value it takes, in words


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
    if tp in _EXACT:    # bool and str take no conversion at all
        if not isinstance(value, tp):
            raise ConfigError(f"{key}: expected {_EXACT[tp]}, got {value!r}")
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
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a bug in this module


def _from_dict(cls, data: Any, prefix: str = "", *, partial: bool = False):
    """Build ``cls`` from a mapping, strictly: each key known, each value of its field's type
    and passing its field's check (the message names the key path and the allowed values).
    ``partial``: return the checked mapping itself instead of an instance (notebook sections
    that hold some of a run section's keys)."""
    if isinstance(data, cls):
        data = to_dict(data)
    if not isinstance(data, dict):
        where = prefix or "the params"
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise ConfigError(unknown_line(key, fields, f"unknown key '{path}'",
                                           "allowed keys" + (f" under {prefix}" if prefix else "")))
        nested = PARTIAL_SECTIONS.get((cls, key))
        if nested is not None and value is not None:
            kwargs[key] = _from_dict(nested, value, path, partial=True)
            continue
        kwargs[key] = _coerce(value, hints[key], path)
        check = fields[key].metadata.get("check")
        if check is not None and not check.ok(kwargs[key]):
            raise ConfigError(f"{path}: {value!r} is not allowed; expected {check.describe()}")
    return kwargs if partial else cls(**kwargs)


def _check_consistency(cfg: RunConfig) -> None:
    if cfg.data.name == "npz" and not cfg.data.path:
        raise ConfigError("data.path: required when data.name is 'npz' (a .npz with "
                          "x_train, y_train, x_test, y_test)")
    if cfg.data.val_size == 0:
        # 0 once meant "select on the first 512 test images", silently: it is refused instead
        raise ConfigError(f"data.val_size: 0 leaves model selection no images; leave it out "
                          f"(None: a tenth of the training images, at most 1000) or give a "
                          f"number >= 1" + ("" if cfg.data.val_split == "test" else
                                            "; selecting on test images takes data.val_split: "
                                            "test (optimistic, and every table says so)"))
    if RULES[cfg.attack.rule].needs_grads and cfg.attack.saliency != "input_grad":
        raise ConfigError(f"attack.rule: {cfg.attack.rule!r} needs attack.saliency 'input_grad' "
                          f"(it reads the input gradients)")
    if cfg.attack.budget == "radius" and RULES[cfg.attack.rule].score is None:
        raise ConfigError(f"attack.budget: 'radius' needs a shared-pixel rule with a score; "
                          f"attack.rule {cfg.attack.rule!r} has none (it is plain PGD): use budget "
                          f"'step' or a rule of {', '.join(r for r in RULES if RULES[r].score)}")
    tc = cfg.train
    if tc.awp_gamma > 0 and tc.method == "standard":
        raise ConfigError("train.awp_gamma: AWP perturbs the weights against the adversarial "
                          "loss, and method 'standard' has none; use an adversarial method or "
                          "awp_gamma 0")
    if tc.awp_gamma == 0 and tc.awp_warmup > 0:
        raise ConfigError(f"train.awp_warmup: {tc.awp_warmup} has no effect with train.awp_gamma "
                          f"0 (AWP off); set awp_gamma > 0 or leave awp_warmup out")
    if tc.awp_gamma > 0 and tc.awp_warmup >= tc.epochs:
        raise ConfigError(f"train.awp_warmup: {tc.awp_warmup} epochs before AWP starts, but the "
                          f"run has train.epochs {tc.epochs}: AWP would never switch on")


def _check_section_consistency(cfg: HypothesisConfig, where: str) -> None:
    allowed = attack_names(cfg.saliency)
    bad = [a for a in cfg.attacks if a not in allowed]
    if bad:
        raise ConfigError(f"{where}attacks: {', '.join(bad)} not available with saliency "
                          f"{cfg.saliency!r} (it reads input gradients); available: {', '.join(allowed)}")
    if cfg.example >= cfg.n_examples:
        raise ConfigError(f"{where}example: {cfg.example} is not among the first n_examples "
                          f"({cfg.n_examples}) test images")
    if cfg.oracle == "ensemble" and not cfg.oracle_checkpoints:
        raise ConfigError(f"{where}oracle_checkpoints: required when oracle is 'ensemble' (run "
                          f"folders of independently trained models)")


def check_section(section: str, values: Mapping, where: str = "") -> dict:
    """Validate a notebook section (``hypothesis`` or ``robustness``: the keys a user may set,
    values included) and return it as given, but parsed (``8/255`` -> float)."""
    if section not in SECTIONS:
        raise ConfigError(f"{where}{section}: expected one of {', '.join(SECTIONS)}")
    cls = SECTIONS[section]
    for key in values or {}:
        if key in BATCH_PARAMETERS[section]:
            raise ConfigError(f"{where}{section}.{key}: set by spat batch (paths and threads); "
                              f"an experiment file must not set it")
    checked = _from_dict(cls, dict(values or {}), section, partial=True)
    if cls is HypothesisConfig:
        _check_section_consistency(cls(**checked), f"{where}{section}.")
    return checked


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
    """A YAML file's top-level mapping ({} for an empty file); one ConfigError naming the file
    when it is missing, not YAML, or not a mapping."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise ConfigError(f"params file not found: {path}") from None
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
# a notebook's own parameters, however it was run (spat batch, papermill's CLI or API, nbval)
NOTEBOOKS = ("hypothesis", "training", "robustness")    # 01, 02, 03
# parameters the batch sets besides a section's (paths, threads): name -> (check, allowed)
BATCH_PARAMETERS = {
    "hypothesis": {"model_dir": "path", "threads": "threads", "data_origin": "text"},
    "training": {"run_dir": "path", "threads": "threads"},
    "robustness": {"params": "path", "overrides": "strings", "out_dir": "path",
                   "base_dir": "path", "train_missing": "bool", "threads": "threads"},
}
_BATCH_KINDS = {
    "path": (lambda v: v is None or isinstance(v, (str, Path)), "None or a path"),
    "threads": (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1),
                "None or an integer >= 1"),
    "strings": (lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v),
                "a list of KEY=VALUE strings"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "text": (lambda v: v is None or isinstance(v, str), "None or a string"),
}
_PLAIN = (int, float, str, bool, list, dict, tuple, Path, type(None))
_KERNEL_NAMES = {"In", "Out", "exit", "quit", "open", "get_ipython"}


def notebook_parameter_names(notebook: str) -> list[str]:
    """Every parameter a notebook takes: its section's keys and the batch's."""
    if notebook not in NOTEBOOKS:
        raise ConfigError(f"notebook: expected one of {', '.join(NOTEBOOKS)}, got {notebook!r}")
    section = ([f.name for f in dataclasses.fields(RunConfig)] if notebook == "training"
               else [f.name for f in dataclasses.fields(SECTIONS[notebook])])
    return section + list(BATCH_PARAMETERS[notebook])


def check_notebook_parameters(notebook: str, namespace: Mapping[str, Any]) -> None:
    """Fail at once on a parameter the notebook does not take, or on a bad value, naming it.

    ``namespace``: the notebook's globals right after its parameters cell (and the cell that
    papermill injects below it). Papermill only warns about a parameter the parameters cell
    does not define, and would run on with the default; this makes it an error, for every way
    the notebook runs. Plain values (numbers, strings, lists, dicts, None) with a public name
    are parameters; the kernel's own names are not.
    """
    allowed = notebook_parameter_names(notebook)
    given = {k: v for k, v in namespace.items()
             if not k.startswith("_") and k not in _KERNEL_NAMES and isinstance(v, _PLAIN)}
    where = f"{notebook} notebook parameter"
    for name in given:
        if name not in allowed:
            raise ConfigError(unknown_line(name, allowed, f"{where} '{name}' is unknown", "parameters"))
    for name, kind in BATCH_PARAMETERS[notebook].items():
        ok, text = _BATCH_KINDS[kind]
        if name in given and not ok(given[name]):
            raise ConfigError(f"{where} '{name}': {given[name]!r} is not allowed; expected {text}")
    section = {k: v for k, v in given.items() if k not in BATCH_PARAMETERS[notebook]}
    if notebook == "training":
        from_dict(section)
    else:
        check_section(notebook, section)


