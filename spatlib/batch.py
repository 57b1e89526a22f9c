"""``spat batch``: every notebook of an experiment, executed with papermill, several at once.

``spat batch params/<experiment>.yaml [--jobs N] [--only RUN ...] [--set KEY=VALUE ...]``

1. The experiment file is loaded and expanded (:func:`spatlib.experiment.load_experiment`: base,
   variants x datasets x seeds) with the overrides, and *every* run config and the notebook
   sections (``hypothesis:`` for 01, ``robustness:`` for 03, checked against the parameters
   cells of the notebooks) is validated before anything is written or executed: a typo fails
   at once, naming the key.
2. Jobs run in separate ``python -m papermill`` processes (a crashed kernel cannot take the
   batch down), ``--jobs`` at a time: 01_hypothesis once, 02_training once per run, then
   03_robustness on the runs that finished. On CPU each job gets ``cpu_count // jobs`` threads
   (more would oversubscribe the cores: tiny-model attacks get several times slower); on CUDA
   each job holds one GPU of its own (``CUDA_VISIBLE_DEVICES``) while it runs, so ``--jobs``
   is capped at the GPU count, and a finished job hands its GPU to the next.
   Before that, every job's data is resolved (:func:`check_jobs_data`): a missing file, a
   missing key, a wrong shape is one line naming the run (or the section) and the key, before
   anything is written. Notebook 01's model trains on the experiment's data
   (:func:`hypothesis_section`).
3. A failed job is recorded and the others go on; the failures are listed at the end and the
   exit status is 1. A rerun skips the jobs that finished with the same parameters and resumes
   the others (the trainer continues from its last checkpoint, evaluations are cached); each
   job's log keeps every attempt, each opened by a dated ``=== started`` / ``=== resumed at
   epoch k of n`` / ``=== already finished, skipped`` line. ``--dry-run`` says which
   (:func:`plan_mark`); ``spat status`` reads the same run folders (:func:`run_state`).
4. One batch per experiment folder: ``<out>/<experiment>/.batch.lock`` (``fcntl.flock``, held
   for the batch's life, naming its holder) makes a second batch fail at once. Every job dies
   with the batch, even under SIGKILL: papermill gets ``PR_SET_PDEATHSIG`` and its kernel's
   parent poller ends the kernel within a second; a rerun waits for such leftovers first.
5. Every ``status_every`` seconds one line tells runs done / running (with their epoch) /
   queued / failed.

Layout of ``<out>/<experiment>/``::

    experiment.yaml          the resolved experiment: every run's config and labels
    01_hypothesis.ipynb      executed notebooks ...
    03_robustness.ipynb
    hypothesis_model/        the standard model notebook 01 attacks (a run folder)
    runs/<run>/              config.yaml, history.csv, checkpoints, metrics.json, eval_<eps>.json,
                             02_training.ipynb (executed)
    logs/<job>.log           each job's output, every attempt; logs/<job>.params.yaml its parameters
    results.csv, results.md, runs.csv, figures/*.png   (written by 03)
    batch_summary.json       status, time, log and error of every job; the failures
    .batch.lock              the running batch's pid, host, start and command
"""
from __future__ import annotations

import ast
import concurrent.futures as cf
import contextlib
import copy
import datetime
import errno
import fcntl
import hashlib
import json
import os
import queue
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import yaml

from .config import (BATCH_PARAMETERS, ConfigError, RunConfig, apply_overrides,
                     check_section as check_section_values, deep_merge, from_dict, read_yaml,
                     to_dict)
from .experiment import Experiment, load_experiment
from .util import atomic_write_text, did_you_mean, utc_now

if TYPE_CHECKING:
    from .data import DataSummary

NOTEBOOKS = {"hypothesis": "01_hypothesis.ipynb", "training": "02_training.ipynb",
             "robustness": "03_robustness.ipynb"}
# parameters the batch itself sets: an experiment file must not set them
RESERVED = {nb: set(names) for nb, names in BATCH_PARAMETERS.items()}
# the run sections notebook 01's attacked model takes from the experiment's base (section keys win)
HYPOTHESIS_FROM_BASE = ("data", "model", "train")
SUMMARY = "batch_summary.json"
EXPERIMENT_FILE = "experiment.yaml"
HYPOTHESIS_JOB, ROBUSTNESS_JOB = "01_hypothesis", "03_robustness"
DEFAULT_KERNEL = "spat"       # registered by `make` inside the venv; python3 otherwise
LOG_TAIL_LINES = 15
LOCK_FILE = ".batch.lock"
# every job's environment names its batch folder: how a rerun finds a killed batch's leftovers
BATCH_DIR_ENV = "SPAT_BATCH_DIR"
# test hook: pretend this many CUDA devices exist (placement is tested on machines without one)
FAKE_GPUS_ENV = "SPAT_FAKE_GPUS"
STATUS_EVERY = 30.0
LEFTOVER_WAIT = 15.0


# --------------------------------------------------------------------------------------------
# where things are
def package_root() -> Path:
    """The folder holding the ``spatlib`` package (the repository root in a checkout)."""
    return Path(__file__).resolve().parent.parent


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


def kernel_name(preferred: str = DEFAULT_KERNEL) -> str:
    """``preferred`` when jupyter_client's KernelSpecManager knows it, else ``python3``."""
    try:
        from jupyter_client.kernelspec import KernelSpecManager
        if preferred in KernelSpecManager().find_kernel_specs():
            return preferred
    except Exception:   # a broken jupyter install must not stop the batch from trying python3
        pass
    return "python3"


def cpu_count() -> int:
    """Cores this process may use (the affinity mask, not the machine's total)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:      # not on Linux
        return max(1, os.cpu_count() or 1)


def gpu_count(override: int | None = None) -> int:
    """Visible CUDA devices; 0 without torch/CUDA. Counts devices without creating a context.

    ``override`` (or, for tests of the placement on machines without a GPU, the environment
    variable ``SPAT_FAKE_GPUS``) replaces the count."""
    if override is None and os.environ.get(FAKE_GPUS_ENV, "").strip():
        try:
            override = int(os.environ[FAKE_GPUS_ENV])
        except ValueError:
            raise ConfigError(f"{FAKE_GPUS_ENV}={os.environ[FAKE_GPUS_ENV]!r}: expected an integer") from None
    if override is not None:
        if override < 0:
            raise ConfigError(f"fake GPU count: expected an integer >= 0, got {override}")
        return override
    try:
        import torch
        return torch.cuda.device_count()
    except Exception:
        return 0


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


def _kind(v) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "str"
    if isinstance(v, (list, tuple)):
        return "list"
    if isinstance(v, dict):
        return "dict"
    return type(v).__name__


def check_section(section: str, values: dict, defaults: dict, notebook: str) -> None:
    """Raise ConfigError when ``values`` (an experiment file's section) names a parameter the
    notebook does not have, one the batch sets itself, or a value of another kind than the
    default (numbers mix freely; a None default takes anything; a str default takes a number,
    e.g. eps written as 0.3 where 8/255 is the default)."""
    for key, value in values.items():
        if key not in defaults:
            raise ConfigError(f"unknown key '{section}.{key}'{did_you_mean(key, defaults)}; "
                              f"notebook {notebook} takes: "
                              + ", ".join(k for k in defaults if k not in RESERVED.get(section, ())))
        if key in RESERVED.get(section, ()):
            raise ConfigError(f"{section}.{key}: set by spat batch itself; leave it out of the params file")
        want, got = _kind(defaults[key]), _kind(value)
        if want in ("none", got) or (want == "str" and got == "number"):
            continue
        raise ConfigError(f"{section}.{key}: expected a {want} like the notebook's default "
                          f"{defaults[key]!r}, got {value!r}")


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

    @property
    def name(self) -> str:
        return self.experiment.name

    def run_dir(self, run: str) -> Path:
        return self.out_dir / "runs" / run

    @property
    def runs(self) -> list[str]:
        return list(self.configs)


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
    check_section_values("hypothesis", merged, "hypothesis (over the experiment's base): ")
    return merged, origin


def run_labels(exp: Experiment, variants: list[str]) -> dict[str, dict]:
    """run name -> {variant, dataset, seed}, as the experiment named its runs."""
    return {name: dict(exp.labels[name]) for name in exp.runs}


def plan_experiment(params: str | Path, overrides: list[str] | None = None,
                    out_root: str | Path = "outputs", only: list[str] | None = None,
                    notebooks: Path | None = None, out_dir: str | Path | None = None) -> Plan:
    """Load, expand and validate an experiment; nothing is written. Raises ConfigError
    (naming the key) for any typo in the runs or the notebook sections, or an unknown --only.
    Outputs go to ``out_root/<experiment>`` (or exactly ``out_dir`` when given)."""
    path = locate(params)
    overrides = absolute_overrides(list(overrides or []), Path.cwd())
    exp = load_experiment(path, overrides)
    raw = read_yaml(path)
    nb_dir = notebooks or notebooks_dir()
    for section, nb in (("hypothesis", NOTEBOOKS["hypothesis"]), ("robustness", NOTEBOOKS["robustness"])):
        values = getattr(exp, section)
        if values:
            check_section(section, values, notebook_parameters(nb_dir / nb), nb)
    exp.robustness = _absolute_card_paths(exp.robustness, Path.cwd())
    configs = {name: _absolute_data_paths(to_dict(cfg), Path.cwd()) for name, cfg in exp.runs.items()}
    if only:
        unknown = [r for r in only if r not in configs]
        if unknown:
            raise ConfigError(f"--only: no run named '{unknown[0]}'{did_you_mean(unknown[0], configs)}; "
                              f"runs: {', '.join(configs)}")
        configs = {r: c for r, c in configs.items() if r in only}
    labels = run_labels(exp, list((raw.get("variants") or {"default": {}}).keys()))
    hypothesis, origin = hypothesis_section(raw, exp.hypothesis, overrides, Path.cwd())
    out = Path(out_dir) if out_dir is not None else Path(out_root) / exp.name
    return Plan(experiment=exp, params_path=path, overrides=overrides, out_dir=out.resolve(),
                labels=labels, configs=configs, hypothesis=hypothesis, data_origin=origin)


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
    from .report import evaluate_run
    from .train import train
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
              "train_missing": False, "threads": threads}
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
    from .data import DataError, check_data   # lazy: torch
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


def load_summary(out_dir: Path) -> dict:
    path = out_dir / SUMMARY
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def is_done(job: Job, previous: dict) -> bool:
    """Finished before with the same parameters, and its outputs are still there."""
    prev = (previous.get("jobs") or {}).get(job.name) or {}
    if prev.get("status") not in ("ok", "skipped") or prev.get("fingerprint") != job.fingerprint():
        return False
    if not job.output.is_file():
        return False
    return job.run_dir is None or (job.run_dir / "metrics.json").is_file()


def notebook_state(path: Path) -> tuple[str, str | None]:
    """(state, end time) of an executed notebook, from papermill's record in it: ``done`` (it
    ended without an error), ``failed`` (an error), ``interrupted`` (started, never ended: the
    batch was stopped), ``not started`` (no notebook)."""
    try:
        meta = (json.loads(path.read_text()).get("metadata") or {}).get("papermill") or {}
    except FileNotFoundError:
        return "not started", None
    except (OSError, json.JSONDecodeError):   # half written by a killed papermill
        return "interrupted", None
    ended = meta.get("end_time")
    with contextlib.suppress(TypeError, ValueError):     # to the second, as every other date here
        ended = datetime.datetime.fromisoformat(ended).isoformat(timespec="seconds")
    if meta.get("exception"):
        return "failed", ended
    return ("done", ended) if ended else ("interrupted", None)


def running_jobs(out_dir: Path) -> set[str]:
    """Names of the jobs a local batch on ``out_dir`` is running now: its papermill processes
    (:func:`leftover_processes`) name their ``logs/<job>.params.yaml``."""
    logs = re.escape(str(Path(out_dir) / "logs")) + r"/([A-Za-z0-9_.-]+)\.params\.yaml"
    return {m.group(1) for _, cmd in leftover_processes(out_dir) for m in re.finditer(logs, cmd)}


def notebook_error(path: Path) -> str | None:
    """``ename: evalue`` of the first error output in an executed notebook, if any."""
    try:
        import nbformat
        nb = nbformat.read(str(path), as_version=4)
    except Exception:
        return None
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                return f"{out.get('ename', 'Error')}: {out.get('evalue', '')}".strip()
    return None


def _log_tail(path: Path, n: int = LOG_TAIL_LINES) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return "\n".join(lines[-n:])


# --------------------------------------------------------------------------------------------
# one batch per experiment folder, writable before anything runs, nothing left behind
class BatchLocked(ConfigError):
    """Another batch holds the experiment folder (or its killed jobs are still running)."""


class OutputNotWritable(ConfigError):
    """The output folder cannot be created or written."""


def not_writable(out_dir: Path, err: OSError) -> OutputNotWritable:
    """One line naming the folder, the reason and its errno (and the path, when another)."""
    where = f" (at {err.filename})" if err.filename and str(err.filename) != str(out_dir) else ""
    return OutputNotWritable(f"cannot write to {out_dir}: {err.strerror or err} "
                             f"(errno {err.errno}){where}; choose another --out or fix the folder")


class BatchLock:
    """An exclusive ``flock`` on ``<out>/<experiment>/.batch.lock``, held until :meth:`release`
    (or the holder's death: the kernel drops a flock with the last descriptor, so a lock left by
    a killed batch is free). The file names the holder: pid, host, start, command."""

    def __init__(self, path: Path, fd: int, holder: dict):
        self.path, self.fd, self.holder = path, fd, holder

    def release(self) -> None:
        """Drop the lock (closing the descriptor releases the flock)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "BatchLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _describe_holder(path: Path) -> str:
    try:
        h = json.loads(path.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        h = {}
    if not h.get("pid"):
        return "a batch that has not written its details yet"
    return (f"pid {h['pid']} on {h.get('host', '?')}, started {h.get('started', '?')}: "
            f"{h.get('command', '?')}")


def lock_experiment(out_dir: str | Path, command: list[str] | None = None) -> BatchLock:
    """Create ``out_dir`` and take its batch lock, or fail at once: :class:`BatchLocked` naming
    the holder, or :class:`OutputNotWritable` when the folder cannot be written."""
    out_dir = Path(out_dir)
    path = out_dir / LOCK_FILE
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise not_writable(out_dir, e) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise BatchLocked(f"another spat batch is running on {out_dir} ({_describe_holder(path)}); "
                          "wait for it to finish or stop it, then rerun") from None
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": utc_now(),
              "command": shlex.join(command if command is not None else sys.argv)}
    try:
        os.ftruncate(fd, 0)
        data = (json.dumps(holder) + "\n").encode()
        if os.pwrite(fd, data, 0) != len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    except OSError as e:
        os.close(fd)
        if e.filename is None:
            e.filename = str(path)
        raise not_writable(out_dir, e) from None
    return BatchLock(path, fd, holder)


def leftover_processes(out_dir: str | Path) -> list[tuple[int, str]]:
    """(pid, command line) of the live processes started for the batch in ``out_dir``: their
    environment names it (``SPAT_BATCH_DIR``, which kernels inherit from papermill). Linux
    (``/proc``); elsewhere, and for processes this user may not read, nothing is found."""
    marker = f"{BATCH_DIR_ENV}={Path(out_dir)}".encode()
    found = []
    try:
        pids = [int(d) for d in os.listdir("/proc") if d.isdigit()]
    except OSError:
        return []
    for pid in pids:
        if pid == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if marker not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{pid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":   # exited, not yet reaped
                    continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, IndexError):
            continue
        found.append((pid, cmd))
    return found


def wait_for_leftovers(out_dir: Path, wait: float = LEFTOVER_WAIT) -> None:
    """Give the jobs of a killed batch on ``out_dir`` ``wait`` seconds to die (their kernels
    notice the lost parent within a second); raise BatchLocked naming them if they do not."""
    deadline = time.monotonic() + wait
    while True:
        left = leftover_processes(out_dir)
        if not left:
            return
        if time.monotonic() >= deadline:
            names = "; ".join(f"pid {pid}: {cmd[:120]}" for pid, cmd in left[:5])
            raise BatchLocked(f"processes of an earlier batch on {out_dir} are still running "
                              f"({names}); stop them before rerunning")
        time.sleep(0.2)


class _Running:
    """The papermill processes in flight, so an interrupt can end exactly them."""

    def __init__(self):
        self.lock = threading.Lock()
        self.procs: set[subprocess.Popen] = set()

    def add(self, p):
        with self.lock:
            self.procs.add(p)

    def discard(self, p):
        with self.lock:
            self.procs.discard(p)

    def terminate_all(self):
        with self.lock:
            procs = list(self.procs)
        for p in procs:
            with contextlib.suppress(ProcessLookupError, OSError):
                os.killpg(p.pid, 15)        # the papermill process (own group); its kernel
                                            # ends with it (ipykernel's parent poller)


# Runs first in the job's process, then becomes papermill (exec keeps the setting): on Linux
# the job gets SIGKILL when the thread that started it dies, so a killed batch takes its jobs
# along (a preexec_fn would do the same, but is unsafe with the launcher's threads). If the
# batch died before prctl took effect, the parent is already another process: stop there.
_DIE_WITH_PARENT = (
    "import os, signal, sys\n"
    "if sys.platform.startswith('linux'):\n"
    "    import ctypes\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)\n"
    "    if os.getppid() != int(sys.argv[1]):\n"
    "        os._exit(137)\n"
    "os.execv(sys.executable, [sys.executable] + sys.argv[2:])\n")


def run_job(job: Job, *, kernel: str, env: dict, timeout: float | None = None,
            running: _Running | None = None) -> JobResult:
    """Execute one notebook with ``python -m papermill`` in its own process group, killed
    with this process (see ``_DIE_WITH_PARENT``); the notebook's output goes to ``job.log``.
    Never raises for a failing notebook."""
    job.output.parent.mkdir(parents=True, exist_ok=True)
    job.log.parent.mkdir(parents=True, exist_ok=True)
    job.cwd.mkdir(parents=True, exist_ok=True)
    job.params_file.write_text(yaml.safe_dump(job.parameters, sort_keys=False))
    papermill = ["-m", "papermill", str(job.notebook), str(job.output),
                 "-f", str(job.params_file), "-k", kernel, "--cwd", str(job.cwd),
                 "--log-output", "--no-progress-bar", "--log-level", "INFO"]
    if timeout:
        papermill += ["--execution-timeout", str(int(timeout))]
    cmd = [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *papermill]
    t0 = time.perf_counter()
    log_line(job, start_line(job))
    with open(job.log, "a") as logf:
        logf.write(f"$ {shlex.join([sys.executable, *papermill])}\n")
        logf.flush()
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        if running:
            running.add(proc)
        try:
            rc = proc.wait()
        finally:
            if running:
                running.discard(proc)
    seconds = time.perf_counter() - t0
    result = JobResult(job.name, "ok" if rc == 0 else "failed", seconds, str(job.log),
                       str(job.output), returncode=rc, fingerprint=job.fingerprint())
    if rc != 0:
        result.error = notebook_error(job.output) or _log_tail(job.log, 3) or f"papermill exited with {rc}"
    return result


def job_env(threads: int | None, gpu: int | None, batch_dir: Path | None = None) -> dict:
    """The environment of one job: its thread budget, its GPU, unbuffered output, and the
    batch folder it belongs to (how a rerun finds the jobs of a killed batch)."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    if batch_dir is not None:
        env[BATCH_DIR_ENV] = str(batch_dir)
    return env


def run_jobs(jobs: list[Job], *, n_parallel: int, kernel: str, threads: int | None,
             gpus: list[int], timeout: float | None = None,
             on_done: Callable[[JobResult], None] = lambda r: None,
             on_start: Callable[[Job], None] = lambda j: None,
             batch_dir: Path | None = None) -> list[JobResult]:
    """Run jobs ``n_parallel`` at a time. With GPUs, a job holds one GPU of its own from start
    to end (a pool of free devices: two running jobs never share one, a finished job frees
    its GPU for the next), so at most ``len(gpus)`` jobs run at once whatever ``n_parallel``."""
    free: queue.Queue[int | None] = queue.Queue()
    if gpus:
        n_parallel = min(max(1, n_parallel), len(gpus))
        for g in gpus:
            free.put(g)
    else:
        n_parallel = max(1, n_parallel)
        for _ in range(n_parallel):
            free.put(None)
    running = _Running()

    def work(job: Job) -> JobResult:
        gpu = free.get()
        try:
            on_start(job)
            try:
                res = run_job(job, kernel=kernel, env=job_env(None if gpus else threads, gpu, batch_dir),
                              timeout=timeout, running=running)
            except Exception as e:   # e.g. an unwritable output folder: this job fails, not the batch
                res = JobResult(job.name, "failed", log=str(job.log), output=str(job.output),
                                error=f"{type(e).__name__}: {e}", fingerprint=job.fingerprint())
            res.device = f"cuda:{gpu}" if gpu is not None else f"cpu ({threads or 'all'} threads)"
            return res
        finally:
            free.put(gpu)

    results = []
    # the pool's threads start the papermill processes and live until every job has ended
    # (a job dies with the thread that started it)
    with cf.ThreadPoolExecutor(max_workers=n_parallel) as pool:
        futures = [pool.submit(work, j) for j in jobs]
        try:
            for fut in cf.as_completed(futures):
                res = fut.result()
                results.append(res)
                on_done(res)
        except KeyboardInterrupt:
            for f in futures:
                f.cancel()
            running.terminate_all()
            raise
    order = {j.name: i for i, j in enumerate(jobs)}
    return sorted(results, key=lambda r: order[r.name])


# --------------------------------------------------------------------------------------------
# the live view
@dataclass(frozen=True)
class RunState:
    """What a run folder says about its run, whichever launcher ran it (or none)."""
    state: str                      # done | interrupted | not started
    epoch: int = 0                  # epochs completed (checkpoint_last.pt)
    epochs: int | None = None       # epochs asked for (its config)
    finished_at: str | None = None  # metrics.json's finished_at (done)
    problem: str | None = None      # why checkpoint_last.pt could not be read

    @property
    def at(self) -> str:
        """``epoch k of n`` (or why the checkpoint could not say)."""
        if self.problem:
            return f"an unknown epoch ({self.problem})"
        return f"epoch {self.epoch}" + (f" of {self.epochs}" if self.epochs else "")

    def describe(self) -> str:
        """``done (metrics.json of DATE)``, ``interrupted at epoch k of n``, ``not started``."""
        if self.state == "done":
            return f"done (metrics.json of {self.finished_at})"
        if self.state == "interrupted":
            return f"interrupted at {self.at}"
        return self.state


def run_state(run_dir: Path | None, epochs: int | None = None) -> RunState:
    """The state of a run folder: done (``metrics.json``, with its ``finished_at``),
    interrupted at epoch k of n (k: the epochs ``checkpoint_last.pt`` holds, n: its config's
    ``train.epochs``, else ``epochs``; a folder with ``config.yaml`` but no checkpoint is at
    epoch 0), or not started. The one count of epochs done that both launchers, the status line
    and ``spat status`` use. Reads the checkpoint memory-mapped: no tensor is loaded."""
    from . import runfolder as rf     # lazy: torch, for a command that may not need it
    if run_dir is None or not Path(run_dir).is_dir():
        return RunState("not started", epochs=epochs)
    run_dir = Path(run_dir)
    metrics = run_dir / rf.METRICS
    if metrics.is_file():
        try:
            finished = json.loads(metrics.read_text()).get("finished_at")
        except (OSError, json.JSONDecodeError, AttributeError):
            finished = None
        if not finished:    # metrics.json without its date (damaged, or an old one)
            finished = datetime.datetime.fromtimestamp(metrics.stat().st_mtime, datetime.timezone.utc
                                                       ).isoformat(timespec="seconds")
        return RunState("done", epochs=epochs, finished_at=finished)
    last = run_dir / rf.LAST
    if last.is_file():
        import torch
        try:
            ckpt = torch.load(last, map_location="cpu", weights_only=True, mmap=True)
            saved = ((ckpt.get("config") or {}).get("train") or {}).get("epochs")
            return RunState("interrupted", int(ckpt["epoch"]), int(saved) if saved else epochs)
        except Exception as e:      # truncated, damaged, not a checkpoint: the trainer says which
            return RunState("interrupted", epochs=epochs,
                            problem=f"{rf.LAST} unreadable: {type(e).__name__}")
    if (run_dir / rf.CONFIG).is_file():
        return RunState("interrupted", 0, epochs)
    return RunState("not started", epochs=epochs)


def job_run_state(job: Job) -> RunState | None:
    """:func:`run_state` of the folder a job trains (None for 03, which trains nothing)."""
    return run_state(job.train_dir, job.epochs) if job.train_dir is not None else None


def next_step(job: Job, previous: dict) -> tuple[str, RunState | None]:
    """What a batch does with a job, given the last batch's summary: ``skip`` (finished with
    the same parameters), ``resume`` (its run folder holds epochs), ``again`` (its model
    finished, its notebook runs again: other parameters, or no executed notebook; nothing is
    retrained) or ``new``; with the state of the folder it trains."""
    if is_done(job, previous):
        return "skip", None
    state = job_run_state(job)
    if state is None or state.state == "not started" or (
            state.state == "interrupted" and not state.epoch and not state.problem):
        return "new", state   # no epoch saved: the run starts from scratch
    return ("again" if state.state == "done" else "resume"), state


def plan_mark(job: Job, previous: dict) -> str:
    """A job's ``--dry-run`` mark: ``done (skipped)``, ``resume at epoch k of n``, ``new``, or
    ``notebook again; trained before: not retrained``."""
    step, state = next_step(job, previous)
    if step == "resume":
        return f"resume at {state.at}"
    return {"skip": "done (skipped)", "new": "new",
            "again": "notebook again; trained before: not retrained"}[step]


def log_line(job: Job, text: str) -> None:
    """Append ``=== TEXT (DATE)`` to the job's log: a log keeps every attempt of its job."""
    job.log.parent.mkdir(parents=True, exist_ok=True)
    with open(job.log, "a") as f:
        f.write(f"=== {text} ({utc_now()})\n")


def start_line(job: Job) -> str:
    """The line a job's log gets when it starts: ``resumed at epoch k of n`` (its run folder
    has a checkpoint), ``started``, or ``started; trained before: not retrained``."""
    step, state = next_step(job, {})
    if step == "resume":
        return f"resumed at {state.at}"
    return "started" + ("; trained before: not retrained" if step == "again" else "")


def skipped_result(job: Job) -> JobResult:
    """The result of a job a rerun skips (finished before, same parameters); its log says so."""
    log_line(job, "already finished, skipped")
    return JobResult(job.name, "skipped", 0.0, str(job.log), str(job.output), fingerprint=job.fingerprint())


def epochs_done(job: Job) -> tuple[int, int] | None:
    """(epochs done, epochs asked for) of a job that trains (02, and 01's model); None for 03."""
    state = job_run_state(job)
    if state is None:
        return None
    total = state.epochs or 0
    return (total if state.state == "done" else state.epoch), total


class Progress:
    """The state of every job of a batch (queued, running, done, failed, skipped) and the one
    status line :func:`run_batch` prints every ``status_every`` seconds."""

    def __init__(self):
        self.lock = threading.Lock()
        self.state: dict[str, str] = {}
        self.jobs: dict[str, Job] = {}
        self.t0 = time.perf_counter()

    def queued(self, job: Job) -> None:
        with self.lock:
            self.jobs[job.name], self.state[job.name] = job, "queued"

    def skipped(self, name: str) -> None:
        with self.lock:
            self.state[name] = "skipped"

    def started(self, job: Job) -> None:
        with self.lock:
            self.jobs[job.name], self.state[job.name] = job, "running"

    def finished(self, res: JobResult) -> None:
        with self.lock:
            self.state[res.name] = "failed" if res.status == "failed" else "done"

    def line(self) -> str:
        """``[status 2m05s] 1 done, 2 running, 3 queued, 0 failed; running: RUN epoch 1/5, ...``"""
        with self.lock:
            state = dict(self.state)
            jobs = dict(self.jobs)
        count = {k: 0 for k in ("done", "running", "queued", "failed")}
        for s in state.values():
            count["done" if s == "skipped" else s] += 1
        running = []
        for name, s in state.items():
            if s == "running":
                ep = epochs_done(jobs[name])
                running.append(f"{name} epoch {ep[0]}/{ep[1]}" if ep else name)
        m, sec = divmod(int(time.perf_counter() - self.t0), 60)
        text = (f"[status {m}m{sec:02d}s] {count['done']} done, {count['running']} running, "
                f"{count['queued']} queued, {count['failed']} failed")
        return text + ("; running: " + ", ".join(running) if running else "")


# --------------------------------------------------------------------------------------------
# the whole batch
@dataclass
class BatchOutcome:
    plan: Plan
    results: dict[str, JobResult] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def failures(self) -> list[JobResult]:
        return [r for r in self.results.values() if r.status == "failed"]


def write_summary(outcome: BatchOutcome, started: str, finished: str | None = None) -> Path:
    path = outcome.plan.out_dir / SUMMARY
    doc = {"experiment": outcome.plan.name, "params": str(outcome.plan.params_path),
           "overrides": outcome.plan.overrides, "started": started, "finished": finished,
           "seconds": round(outcome.seconds, 1),
           "jobs": {n: r.__dict__ for n, r in outcome.results.items()},
           "failures": [{"job": r.name, "error": r.error, "log": r.log} for r in outcome.failures]}
    atomic_write_text(path, json.dumps(doc, indent=2) + "\n")
    return path


def run_batch(plan: Plan, *, jobs: int = 1, kernel: str | None = None, hypothesis: bool = True,
              timeout: float | None = None, notebooks: Path | None = None,
              log: Callable[[str], None] = print, status_every: float | None = STATUS_EVERY,
              gpus: list[int] | None = None, command: list[str] | None = None) -> BatchOutcome:
    """Execute the plan (see the module doc); returns what happened to every job.

    Before any notebook runs, the experiment folder is created and locked (BatchLocked when
    another batch holds it, OutputNotWritable when it cannot be written). ``gpus`` (default:
    every visible device, :func:`gpu_count`) are handed one per running job; ``status_every``
    seconds between status lines (None or 0: none); ``command`` goes into the lock file."""
    t0 = time.perf_counter()
    started = utc_now()
    nb_dir = notebooks or notebooks_dir()
    # every job's data resolved before the folder is touched: a missing file is one line now
    data = check_jobs_data(build_jobs(plan, nb_dir, threads=None, hypothesis=hypothesis))
    kernel = kernel or kernel_name()
    gpus = list(range(gpu_count())) if gpus is None else list(gpus)
    n_parallel = min(max(1, jobs), len(gpus)) if gpus else max(1, jobs)
    threads = None if gpus else max(1, cpu_count() // n_parallel)
    with lock_experiment(plan.out_dir, command):
        wait_for_leftovers(plan.out_dir)
        previous = load_summary(plan.out_dir)
        try:
            write_experiment_file(plan)
            (plan.out_dir / "logs").mkdir(exist_ok=True)
        except OSError as e:
            raise not_writable(plan.out_dir, e) from None
        outcome = BatchOutcome(plan)
        progress = Progress()
        todo = []
        for job in build_jobs(plan, nb_dir, threads=threads, hypothesis=hypothesis):
            if is_done(job, previous):
                outcome.results[job.name] = skipped_result(job)
                progress.skipped(job.name)
            else:
                todo.append(job)
                progress.queued(job)
        n_skip = len(outcome.results)
        where = f"{len(gpus)} GPU(s), one per job" if gpus else f"CPU, {threads} thread(s) per job"
        capped = f" (--jobs {jobs} capped at the GPU count)" if gpus and jobs > len(gpus) else ""
        log(f"spat batch: {plan.name}: {len(plan.runs)} run(s), {len(todo)} job(s) to execute"
            + (f", {n_skip} already finished" if n_skip else "")
            + f"; {n_parallel} at a time{capped} on {where}; kernel {kernel}; output {plan.out_dir}")
        for line in data_lines(data, plan.data_origin):
            log(line)
        done = [0]
        stop = threading.Event()

        def report_status() -> None:
            while not stop.wait(status_every):
                log(progress.line())

        ticker = threading.Thread(target=report_status, name="spat-batch-status", daemon=True)
        if status_every:
            ticker.start()

        def on_done(res: JobResult) -> None:
            done[0] += 1
            progress.finished(res)
            outcome.results[res.name] = res
            outcome.seconds = time.perf_counter() - t0
            write_summary(outcome, started)
            mark = "ok    " if res.status == "ok" else "FAILED"
            extra = f": {res.error.splitlines()[0]}" if res.error else ""
            log(f"[{done[0]}/{len(todo)}] {mark} {res.name} ({res.seconds:.0f} s){extra}")

        try:
            run_jobs(todo, n_parallel=n_parallel, kernel=kernel, threads=threads, gpus=gpus,
                     timeout=timeout, on_done=on_done, on_start=progress.started,
                     batch_dir=plan.out_dir)
            finished_runs = [r for r in plan.runs if (plan.run_dir(r) / "metrics.json").is_file()]
            if finished_runs:
                job = robustness_job(plan, nb_dir, threads=None if gpus else cpu_count())
                progress.queued(job)
                log(f"03_robustness on {len(finished_runs)} finished run(s) ...")
                res = run_jobs([job], n_parallel=1, kernel=kernel, threads=cpu_count(), gpus=gpus[:1],
                               timeout=timeout, on_start=progress.started, on_done=progress.finished,
                               batch_dir=plan.out_dir)[0]
                outcome.results[res.name] = res
                mark = "ok    " if res.status == "ok" else "FAILED"
                log(f"[03] {mark} {res.name} ({res.seconds:.0f} s)" + (f": {res.error}" if res.error else ""))
            else:
                log("no run finished: 03_robustness not executed")
        finally:
            stop.set()
        outcome.seconds = time.perf_counter() - t0
        write_summary(outcome, started, utc_now())
    return outcome


def error(e: Exception) -> int:
    """A command's refusal: ``error: ...`` on stderr, a line per problem; exit status 2."""
    for line in str(e).splitlines() or [""]:
        print(f"error: {line}", file=sys.stderr)
    return 2


def report_outcome(outcome: BatchOutcome, out=sys.stdout) -> None:
    """The end of a batch: the results table, where the report is, and the failures."""
    plan = outcome.plan
    md = plan.out_dir / "results.md"
    rob = outcome.results.get(ROBUSTNESS_JOB)
    if md.is_file() and rob is not None and rob.status == "ok":
        text = md.read_text()
        table = text.split("## Figures")[0].split("## Published")[0].strip()
        print("\n" + table + "\n", file=out)
        print(f"report: {plan.out_dir / NOTEBOOKS['robustness']}", file=out)
        print(f"        {md}", file=out)
        print(f"        {plan.out_dir / 'results.csv'}, figures in {plan.out_dir / 'figures'}", file=out)
    print(f"done in {outcome.seconds / 60:.1f} min; summary: {plan.out_dir / SUMMARY}", file=out)
    if outcome.failures:
        print(f"\n{len(outcome.failures)} job(s) FAILED:", file=out)
        for r in outcome.failures:
            print(f"  {r.name}: {r.error or 'failed'}\n    log: {r.log}", file=out)
