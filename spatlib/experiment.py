"""Experiments: an experiment file expanded into runs, and the names of those runs.

An experiment file (``params/*.yaml``) holds a ``base`` run config, ``variants`` (partial
configs layered on it), ``seeds`` and ``datasets``; :func:`expand_experiment` turns it into one
validated :class:`spatlib.config.RunConfig` per variant x dataset x seed, named
``<variant>-<dataset>-s<seed>`` (:func:`run_name`, the one place that builds the name), with
the notebook sections (``hypothesis:``, ``robustness:``) checked by
:func:`spatlib.config.check_section`, the one validator of notebook sections. Every key and
value is checked here, so a typo fails before any work starts. :func:`run_config_from_params`
picks one run's config out of a params file for ``spat train``.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .config import (ConfigError, RunConfig, apply_overrides, check_section, deep_merge, from_dict,
                     load_config, parse_override, read_yaml)
from .util import unknown_line

__all__ = ["run_name", "split_run_name", "Experiment", "EXPERIMENT_KEYS", "expand_experiment",
           "load_experiment", "run_config_from_params"]


# --------------------------------------------------------------------------------------------
# run names: ``<variant>-<dataset>-s<seed>``, built here and nowhere else
_RUN_NAME = re.compile(r"^(?P<variant>.+)-(?P<dataset>[^-]+)-s(?P<seed>-?\d+)$")


def run_name(variant: str, dataset: str, seed: int) -> str:
    """The name of an experiment's run: ``spat_at-digits-s0``."""
    return f"{variant}-{dataset}-s{seed}"


def split_run_name(name: str, variants: Iterable[str] | None = None) -> dict:
    """``"spat_at-digits-s2"`` -> ``{"variant": "spat_at", "dataset": "digits", "seed": 2}``;
    for run folders without the experiment's labels (:attr:`Experiment.labels` has them).

    A variant name may itself contain ``-``; ``variants`` (the experiment's variant names)
    settles such names, the longest matching variant first.
    """
    for v in sorted(variants or (), key=len, reverse=True):
        if name.startswith(v + "-"):
            m = re.fullmatch(r"(?P<dataset>.+)-s(?P<seed>-?\d+)", name[len(v) + 1:])
            if m:
                return {"variant": v, "dataset": m["dataset"], "seed": int(m["seed"])}
    m = _RUN_NAME.match(name)
    if not m:
        return {"variant": name, "dataset": "", "seed": None}
    return {"variant": m["variant"], "dataset": m["dataset"], "seed": int(m["seed"])}


# --------------------------------------------------------------------------------------------
# experiments: a base, a list of variants, seeds and datasets
@dataclass
class Experiment:
    """An experiment file expanded into runs (variants x datasets x seeds)."""
    name: str
    runs: dict[str, RunConfig]          # run name -> resolved config, in order
    hypothesis: dict                    # notebook 01's parameters as written (checked: HypothesisConfig)
    robustness: dict                    # notebook 03's parameters as written (checked: RobustnessConfig)
    path: str | None = None
    labels: dict[str, dict] = field(default_factory=dict)   # run -> {variant, dataset, seed}
    launcher: dict = field(default_factory=dict)   # cluster settings (validated by spatlib.launch.slurm)


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
            raise ConfigError(unknown_line(key, EXPERIMENT_KEYS, f"{where}unknown key '{key}'",
                                           "allowed top-level keys"))
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
    labels: dict[str, dict] = {}
    name_overridden = any(parse_override(t)[0] == ["data", "name"] for t in run_over)
    for ds_label, ds_data in datasets.items():
        for variant, vdata in variants.items():
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(variant)):
                raise ConfigError(f"{where}variants: bad variant name {variant!r}")
            for seed in seeds:
                layered = deep_merge(base, vdata or {})
                if ds_label is not None:
                    layered = deep_merge(layered, {"data": ds_data or {}})
                layered["seed"] = seed
                layered["name"] = provisional = run_name(
                    variant, ds_label if ds_label is not None else layered.get("data", {}).get("name", "digits"), seed)
                try:
                    cfg = from_dict(apply_overrides(layered, run_over))
                except ConfigError as e:
                    raise ConfigError(f"{where}run '{provisional}': {e}") from None
                # the dataset part names the data the run trains on: the label of `datasets:`
                # (or the file's data.name), unless an override changed data.name to another
                # dataset. An override to npz keeps it: the .npz holds the data the experiment
                # names (a CIFAR-10 prefix stays cifar10, so published rows still match)
                file_name = ds_label if ds_label is not None else layered.get("data", {}).get("name", "digits")
                ds_part = (cfg.data.name if name_overridden and cfg.data.name != "npz" else file_name)
                cfg.name = run_name(variant, ds_part, seed)
                if cfg.name in runs:
                    raise ConfigError(f"{where}run '{cfg.name}' appears twice (two datasets labels "
                                      f"with the same data after overrides)")
                runs[cfg.name] = cfg
                labels[cfg.name] = {"variant": str(variant), "dataset": ds_part, "seed": seed}
    sections = {}
    for sec in ("hypothesis", "robustness"):
        sdata = data.get(sec) or {}
        if not isinstance(sdata, dict):
            raise ConfigError(f"{where}{sec}: expected a mapping of notebook parameters")
        stripped = [t.split(".", 1)[1] if "." in t.split("=", 1)[0] else t for t in nb_over[sec]]
        merged = apply_overrides(sdata, stripped)
        check_section(sec, merged, where)   # values too: a bad attack name fails before any work
        sections[sec] = merged
    launcher = data.get("launcher") or {}
    if not isinstance(launcher, dict):
        raise ConfigError(f"{where}launcher: expected a mapping of cluster settings")
    return Experiment(name=name, runs=runs, hypothesis=sections["hypothesis"],
                      robustness=sections["robustness"], path=str(path) if path else None,
                      labels=labels, launcher=launcher)


def load_experiment(path: str | Path, overrides: list[str] | None = None) -> Experiment:
    """Read and expand an experiment params file (see :func:`expand_experiment`)."""
    return expand_experiment(read_yaml(path), overrides, str(path))


# --------------------------------------------------------------------------------------------
# one run's config for spat train: a run params file, or one run of an experiment file
_EXPERIMENT_ONLY = set(EXPERIMENT_KEYS) - {"name", "seed", "data", "model", "attack", "train", "eval"}


def run_config_from_params(params: str | None, overrides: list[str], run: str | None = None
                           ) -> tuple[RunConfig, str | None]:
    """(the run's config, its experiment's name or None) from a params file: a run params file
    (a RunConfig YAML; defaults when ``params`` is None), or with ``run`` one run of an
    experiment file (:func:`load_experiment`). ConfigError names what is wrong:
    an unknown run (with the runs it has), or an experiment file given without ``run``."""
    if run is not None:
        if params is None:
            raise ConfigError("--run: needs the experiment params file it names a run of")
        exp = load_experiment(params, overrides)
        if run not in exp.runs:
            raise ConfigError(unknown_line(run, exp.runs, f"{params}: no run named '{run}'", "runs"))
        cfg = exp.runs[run]
        if cfg.data.path and not Path(cfg.data.path).expanduser().is_absolute():
            # spat batch makes it absolute too, so that the two share the run folder
            cfg.data.path = str(Path(cfg.data.path).expanduser().resolve())
        return cfg, exp.name
    if params is not None:
        data = read_yaml(params)
        found = sorted(_EXPERIMENT_ONLY & set(data))
        if found:
            runs = ", ".join(load_experiment(params, overrides).runs)
            raise ConfigError(f"{params}: an experiment file (it has {', '.join(found)}), not one "
                              f"run's params: pick a run with --run NAME; runs: {runs}")
    return load_config(params, overrides), None
