"""An experiment as jobs: what ``spat batch`` runs, with which notebook parameters, on which data.

:func:`plan_experiment` loads and expands an experiment file (:func:`spatlib.experiment.load_experiment`:
base, variants x datasets x seeds, the ``--set`` overrides), which validates every run config and
the notebook sections (``hypothesis:`` for 01, ``robustness:`` for 03) before anything is written:
a typo fails at once, naming the key. Paths the user typed are made absolute (the notebooks run in
other folders), and notebook 01's model gets the experiment's data (:func:`hypothesis_section`).

:func:`build_jobs` turns the plan into jobs, each a notebook, its parameters, its executed copy and
its log: 01_hypothesis once, 02_training once per run, and 03_robustness (:func:`robustness_job`)
on what finished. :func:`check_jobs_data` resolves every job's data before any work (a missing
file, a missing key, a wrong shape is one line naming the run, or the section, and the key). The
local and the Slurm launcher (:mod:`spatlib.launch.local`, :mod:`spatlib.launch.slurm`) execute
the same jobs.

Layout of ``<out>/<experiment>/``::

    experiment.yaml          the resolved experiment: every run's config and labels
    01_hypothesis.ipynb      executed notebooks ...
    03_robustness.ipynb
    hypothesis_model/        the standard model notebook 01 attacks (a run folder)
    runs/<run>/              config.yaml, history.csv, checkpoints, metrics.json, eval_<eps>.json,
                             02_training.ipynb (executed)
    logs/<job>.log           each job's output, every attempt; logs/<job>.params.yaml its parameters
    results.csv, results.md, runs.csv, figures/*.png, cards/   (written by 03)
    batch_summary.json       status, time, log and error of every job; the failures
    .batch.lock              the running batch's pid, host, start and command
    slurm_jobs.json, slurm/  the Slurm launcher's submissions and submitit's files
"""
from __future__ import annotations

import ast
import copy
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import yaml

from ..config import (ConfigError, RunConfig, apply_overrides, check_section, deep_merge, from_dict,
                      read_yaml, to_dict)
from ..experiment import Experiment, load_experiment
from ..util import did_you_mean

if TYPE_CHECKING:
    from ..data import DataSummary

NOTEBOOKS = {"hypothesis": "01_hypothesis.ipynb", "training": "02_training.ipynb",
             "robustness": "03_robustness.ipynb"}
# the run sections notebook 01's attacked model takes from the experiment's base (section keys win)
HYPOTHESIS_FROM_BASE = ("data", "model", "train")
EXPERIMENT_FILE = "experiment.yaml"
HYPOTHESIS_JOB, ROBUSTNESS_JOB = "01_hypothesis", "03_robustness"


# --------------------------------------------------------------------------------------------
# where things are
def package_root() -> Path:
    """The folder holding the ``spatlib`` package (the repository root in a checkout)."""
    return Path(__file__).resolve().parents[2]


def notebooks_dir() -> Path:
    """``notebooks/`` of the checkout (``$SPATLIB_NOTEBOOKS`` overrides)."""
    env = os.environ.get("SPATLIB_NOTEBOOKS")
    candidates = [Path(env)] if env else []
    candidates += [package_root() / "notebooks", Path.cwd() / "notebooks"]
    for c in candidates:
        if (c / NOTEBOOKS["training"]).is_file():
            return c.resolve()
    raise FileNotFoundError("cannot find the notebooks folder (looked in "
                            + ", ".join(str(c) for c in candidates)
                            + "); set SPATLIB_NOTEBOOKS to the folder holding 02_training.ipynb")


def locate(path: str | Path) -> Path:
    """A params file path as given (relative to the current folder) or, failing that,
    relative to the repository root, so ``params/smoke.yaml`` works from ``notebooks/`` too."""
    p = Path(path).expanduser()
    if p.is_file() or p.is_absolute():
        return p.resolve()
    alt = package_root() / p
    return alt.resolve() if alt.is_file() else p.resolve()


# --------------------------------------------------------------------------------------------
# notebook parameters
def notebook_parameters(path: str | Path) -> dict:
    """Name -> default value of the assignments in a notebook's ``parameters`` cell (literal
    defaults evaluated, others kept as their source text). Parsed with ``ast``: papermill's own
    inspection skips lines with a second ``=`` (e.g. in a comment)."""
    import nbformat
    nb = nbformat.read(str(path), as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if not cells:
        raise ValueError(f"{path}: no cell tagged 'parameters'")
    src = cells[0].source
    out = {}
    for node in ast.parse(src).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                out[node.targets[0].id] = ast.get_source_segment(src, node.value)
    return out


# --------------------------------------------------------------------------------------------
# the plan
@dataclass
class Plan:
    """A validated experiment and where its outputs go."""
    experiment: Experiment
    params_path: Path
    overrides: list[str]
    out_dir: Path                          # <out>/<experiment>
    labels: dict[str, dict]                # run -> {variant, dataset, seed}
    configs: dict[str, dict]               # run -> resolved config dict (paths made absolute)
    # notebook 01's section with its data/model/train laid over the experiment's base
    hypothesis: dict = field(default_factory=dict)
    data_origin: str = "the notebook's parameters"    # where notebook 01's data comes from
    # the folder relative paths of the params file and the overrides are read from (the one
    # the user typed the command in); notebook 03 re-plans from there, not from its own folder
    base_dir: Path = field(default_factory=Path.cwd)

    @property
    def name(self) -> str:
        return self.experiment.name

    def run_dir(self, run: str) -> Path:
        return self.out_dir / "runs" / run

    @property
    def runs(self) -> list[str]:
        return list(self.configs)

    def finished_runs(self) -> list[str]:
        """The runs whose folder holds metrics.json: what notebook 03 reports."""
        return [r for r in self.runs if (self.run_dir(r) / "metrics.json").is_file()]


def _absolute_data_paths(cfg: dict, base: Path) -> dict:
    """data.path / data.root relative to where the user typed the command, made absolute:
    the notebooks run in another folder."""
    cfg = copy.deepcopy(cfg)
    for key in ("path", "root"):
        v = cfg["data"].get(key)
        if v and not Path(v).expanduser().is_absolute():
            cfg["data"][key] = str((base / Path(v).expanduser()).resolve())
    return cfg


def _absolute_card_paths(section: dict, base: Path) -> dict:
    """robustness.cards (files or globs) relative to where the user typed the command, made
    absolute, like data.path: notebook 03 runs in the experiment's folder."""
    cards = section.get("cards")
    if not cards:
        return section
    return {**section, "cards": [str(base / Path(c).expanduser()) for c in cards]}


def absolute_overrides(overrides: list[str], base: Path) -> list[str]:
    """``data.path=rel/x.npz`` -> ``data.path=/abs/rel/x.npz`` (and data.root): notebook 03
    re-reads the experiment with these overrides from another working folder."""
    out = []
    for text in overrides:
        key, sep, value = text.partition("=")
        if sep and key.strip() in ("data.path", "data.root") and value.strip() and \
                value.strip().lower() not in ("null", "none", "~"):
            p = Path(value.strip()).expanduser()
            text = f"{key.strip()}={p if p.is_absolute() else (base / p).resolve()}"
        out.append(text)
    return out


def hypothesis_section(raw: dict, section: dict, overrides: list[str], base_dir: Path) -> tuple[dict, str]:
    """Notebook 01's section as the batch passes it, and where its data comes from.

    The attacked model trains on the experiment's data: where the experiment's ``base`` (with
    the first entry of ``datasets:`` and the run overrides, as the runs see it) has a ``data``,
    ``model`` or ``train`` section, that section completed by the config's defaults (as a run's
    is) replaces the notebook's default, with the hypothesis section's own keys on top.
    ``train.method`` stays the notebook's (``standard``) unless the section names one: the
    hypothesis is about a standard model's adversarial examples, whatever the runs train."""
    base = copy.deepcopy(raw.get("base") or {})
    datasets = raw.get("datasets")
    first = None
    if isinstance(datasets, list) and datasets:
        first, data = datasets[0], {"name": datasets[0]}
    elif isinstance(datasets, dict) and datasets:
        first, data = next(iter(datasets.items()))
    if first is not None:
        base = deep_merge(base, {"data": data or {}})
    run_overrides = [t for t in overrides
                     if t.split("=", 1)[0].split(".", 1)[0].strip() not in ("hypothesis", "robustness")]
    base = apply_overrides(base, run_overrides)
    defaults = to_dict(RunConfig())
    defaults["train"].pop("method")
    merged = dict(section)
    for key in HYPOTHESIS_FROM_BASE:
        if isinstance(base.get(key), dict) and base[key]:
            layer = {k: v for k, v in base[key].items() if (key, k) != ("train", "method")}
            merged[key] = {**defaults[key], **layer, **(section.get(key) or {})}
    if "data" in section:
        origin = "the hypothesis section"
    elif base.get("data"):
        origin = "the experiment's base" + (f" and its first dataset ({first})" if first is not None else "")
    else:
        origin = "the notebook's parameters"
    if "data" in merged:
        merged["data"] = _absolute_data_paths({"data": merged["data"]}, base_dir)["data"]
    check_section("hypothesis", merged, "hypothesis (over the experiment's base): ")
    return merged, origin


def plan_experiment(params: str | Path, overrides: list[str] | None = None,
                    out_root: str | Path = "outputs", only: list[str] | None = None,
                    out_dir: str | Path | None = None, base_dir: str | Path | None = None) -> Plan:
    """Load, expand and validate an experiment; nothing is written. Raises ConfigError
    (naming the key) for any typo in the runs or the notebook sections (validated by
    :func:`spatlib.experiment.load_experiment`, as a notebook validates its own parameters), or an
    unknown --only. Outputs go to ``out_root/<experiment>`` (or exactly ``out_dir`` when given).
    Relative data paths and cards (in the file or the overrides) are read from ``base_dir``
    (None: the current folder), and the plan holds them absolute."""
    path = locate(params)
    base = Path(base_dir).expanduser().resolve() if base_dir is not None else Path.cwd()
    overrides = absolute_overrides(list(overrides or []), base)
    exp = load_experiment(path, overrides)
    raw = read_yaml(path)
    exp.robustness = _absolute_card_paths(exp.robustness, base)
    configs = {name: _absolute_data_paths(to_dict(cfg), base) for name, cfg in exp.runs.items()}
    if only:
        unknown = [r for r in only if r not in configs]
        if unknown:
            raise ConfigError(f"--only: no run named '{unknown[0]}'{did_you_mean(unknown[0], configs)}; "
                              f"runs: {', '.join(configs)}")
        configs = {r: c for r, c in configs.items() if r in only}
    labels = {name: dict(exp.labels[name]) for name in exp.runs}
    hypothesis, origin = hypothesis_section(raw, exp.hypothesis, overrides, base)
    out = Path(out_dir) if out_dir is not None else Path(out_root) / exp.name
    return Plan(experiment=exp, params_path=path, overrides=overrides, out_dir=out.resolve(),
                labels=labels, configs=configs, hypothesis=hypothesis, data_origin=origin,
                base_dir=base)


def experiment_document(plan: Plan) -> dict:
    """What experiment.yaml holds: the resolved experiment, every run's config and labels."""
    return {"experiment": plan.name, "params": str(plan.params_path), "overrides": plan.overrides,
            "hypothesis": plan.experiment.hypothesis, "robustness": plan.experiment.robustness,
            "runs": {r: {**plan.labels[r], "config": plan.configs[r]} for r in plan.runs}}


def write_experiment_file(plan: Plan) -> Path:
    """``<out>/<experiment>/experiment.yaml`` (creates the folder)."""
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    path = plan.out_dir / EXPERIMENT_FILE
    path.write_text(yaml.safe_dump(experiment_document(plan), sort_keys=False))
    return path


def train_missing_runs(plan: Plan, *, evaluate: bool = True,
                       log: Callable[[str], None] = print) -> dict[str, str]:
    """Train (in this process) every run of the plan without metrics.json, then evaluate it
    (cached); for notebook 03 run on its own. Returns run -> ``trained`` / ``finished`` /
    ``failed: <error>``; a failure does not stop the others."""
    from ..report import evaluate_run
    from ..train import train
    status = {}
    for run in plan.runs:
        run_dir = plan.run_dir(run)
        if (run_dir / "metrics.json").is_file():
            status[run] = "finished"
        else:
            try:
                t0 = time.perf_counter()
                train(plan.configs[run], run_dir, progress=False)
                status[run] = "trained"
                log(f"trained {run} in {time.perf_counter() - t0:.1f} s")
            except Exception as e:      # reported per run, like the batch does
                status[run] = f"failed: {type(e).__name__}: {e}"
                log(f"FAILED {run}: {type(e).__name__}: {e}")
                continue
        if evaluate:
            evaluate_run(run_dir)
    return status


# --------------------------------------------------------------------------------------------
# jobs
@dataclass
class Job:
    name: str
    kind: str                 # hypothesis | training | robustness
    notebook: Path            # the input notebook
    output: Path              # the executed notebook
    parameters: dict
    log: Path
    cwd: Path
    run_dir: Path | None = None

    @property
    def params_file(self) -> Path:
        return self.log.with_suffix(".params.yaml")

    @property
    def train_dir(self) -> Path | None:
        """The run folder this job trains: a run's (02), the attacked model's (01); None (03)."""
        if self.kind == "training":
            return self.run_dir
        if self.kind == "hypothesis" and self.parameters.get("model_dir"):
            return Path(self.parameters["model_dir"])
        return None

    @property
    def epochs(self) -> int | None:
        """The epochs the job's model trains for (its ``train.epochs``)."""
        epochs = (self.parameters.get("train") or {}).get("epochs")
        return int(epochs) if epochs is not None else None

    def fingerprint(self) -> str:
        """Hash of the parameters that change what the job computes (threads do not)."""
        p = {k: v for k, v in self.parameters.items() if k not in ("threads",)}
        return hashlib.sha256(json.dumps(p, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class JobResult:
    name: str
    status: str               # ok | failed | skipped
    seconds: float = 0.0
    log: str = ""
    output: str = ""
    error: str | None = None
    returncode: int | None = None
    fingerprint: str = ""
    device: str = ""


def section_parameters(section: dict, notebook: Path) -> dict:
    """An experiment file's section as notebook parameters: a dict value is laid over the
    notebook's default dict (``train: {epochs: 2}`` changes the epochs and keeps the rest),
    since papermill would replace the whole variable."""
    defaults = notebook_parameters(notebook)
    out = {}
    for key, value in section.items():
        default = defaults.get(key)
        out[key] = {**default, **value} if isinstance(default, dict) and isinstance(value, dict) else value
    return out


def build_jobs(plan: Plan, nb_dir: Path, *, threads: int | None, hypothesis: bool = True) -> list[Job]:
    """01 (unless ``hypothesis`` is False), one 02 per run; 03 is built after they ran."""
    logs = plan.out_dir / "logs"
    jobs = []
    if hypothesis:
        nb = nb_dir / NOTEBOOKS["hypothesis"]
        params = {**section_parameters(plan.hypothesis, nb), "data_origin": plan.data_origin,
                  "model_dir": str(plan.out_dir / "hypothesis_model"), "threads": threads}
        jobs.append(Job(HYPOTHESIS_JOB, "hypothesis", nb,
                        plan.out_dir / NOTEBOOKS["hypothesis"], params,
                        logs / f"{HYPOTHESIS_JOB}.log", plan.out_dir))
    for run in plan.runs:
        cfg = plan.configs[run]
        run_dir = plan.run_dir(run)
        params = {"name": cfg["name"], "seed": cfg["seed"], "run_dir": str(run_dir),
                  "data": cfg["data"], "model": cfg["model"], "attack": cfg["attack"],
                  "train": cfg["train"], "eval": cfg["eval"], "threads": threads}
        jobs.append(Job(run, "training", nb_dir / NOTEBOOKS["training"],
                        run_dir / NOTEBOOKS["training"], params, logs / f"{run}.log", run_dir,
                        run_dir=run_dir))
    return jobs


def robustness_job(plan: Plan, nb_dir: Path, threads: int | None) -> Job:
    params = {**section_parameters(plan.experiment.robustness, nb_dir / NOTEBOOKS["robustness"]),
              "params": str(plan.params_path),
              "overrides": list(plan.overrides), "out_dir": str(plan.out_dir),
              "base_dir": str(plan.base_dir), "train_missing": False, "threads": threads}
    return Job(ROBUSTNESS_JOB, "robustness", nb_dir / NOTEBOOKS["robustness"],
               plan.out_dir / NOTEBOOKS["robustness"], params,
               plan.out_dir / "logs" / f"{ROBUSTNESS_JOB}.log", plan.out_dir)


def job_label(job: Job) -> str:
    """How an error names a job: ``run 'NAME'``, or the notebook section it comes from."""
    return f"run '{job.name}'" if job.kind == "training" else f"section '{job.kind}'"


def check_jobs_data(jobs: list[Job]) -> list[tuple["DataSummary", list[Job]]]:
    """Resolve the data of every job that trains (each run, notebook 01's model) with
    :func:`spatlib.data.check_data`, before any work: each distinct data section once, as
    (its :class:`~spatlib.data.DataSummary`, the jobs that use it). Raises ConfigError, one
    line per bad data section naming the first job that uses it and the key:
    ``run 'pgd_at-cifar10-s0': data.path: /nonexistent/cifar.npz: file not found``."""
    from ..data import DataError, check_data   # lazy: torch
    groups: dict[str, tuple] = {}
    # runs first: an error names a run where one has the data
    for job in sorted((j for j in jobs if j.train_dir is not None), key=lambda j: j.kind != "training"):
        data = from_dict({"data": job.parameters.get("data") or {}}).data
        key = json.dumps(to_dict(data), sort_keys=True, default=str)
        groups.setdefault(key, (data, []))[1].append(job)
    resolved, problems = [], []
    for data, members in groups.values():
        try:
            resolved.append((check_data(data), members))
        except DataError as e:
            more = f" (and {len(members) - 1} more job(s) with this data)" if len(members) > 1 else ""
            problems.append(f"{job_label(members[0])}{more}: {e}")
    if problems:
        raise ConfigError("\n".join(problems))
    return resolved


def data_lines(resolved: list[tuple["DataSummary", list[Job]]], data_origin: str | None = None) -> list[str]:
    """One ``data: ...`` line per distinct data section of a batch, naming its jobs."""
    lines = []
    for summary, members in resolved:
        names = [j.name + (f" (from {data_origin})" if j.kind == "hypothesis" and data_origin else "")
                 for j in members]
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        lines.append(f"data: {summary.describe()}; for {shown}")
    return lines

