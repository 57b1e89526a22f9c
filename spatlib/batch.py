"""``spat batch``: every notebook of an experiment, executed with papermill, several at once.

``spat batch params/<experiment>.yaml [--jobs N] [--only RUN ...] [--set KEY=VALUE ...]``

1. The experiment file is loaded and expanded (:func:`spatlib.config.load_experiment`: base,
   variants x datasets x seeds) with the overrides, and *every* run config and the notebook
   sections (``hypothesis:`` for 01, ``robustness:`` for 03, checked against the parameters
   cells of the notebooks) is validated before anything is written or executed: a typo fails
   at once, naming the key.
2. Jobs run in separate ``python -m papermill`` processes (a crashed kernel cannot take the
   batch down), ``--jobs`` at a time: 01_hypothesis once, 02_training once per run, then
   03_robustness on the runs that finished. On CPU each job gets ``cpu_count // jobs`` threads
   (more would oversubscribe the cores: tiny-model attacks get several times slower); on CUDA
   the jobs take the GPUs round-robin through ``CUDA_VISIBLE_DEVICES``.
3. A failed job is recorded and the others go on; the failures are listed at the end and the
   exit status is 1. A rerun skips the jobs that finished with the same parameters and resumes
   the others (the trainer continues from its last checkpoint, evaluations are cached).

Layout of ``<out>/<experiment>/``::

    experiment.yaml          the resolved experiment: every run's config and labels
    01_hypothesis.ipynb      executed notebooks ...
    03_robustness.ipynb
    hypothesis_model/        the standard model notebook 01 attacks (a run folder)
    runs/<run>/              config.yaml, history.csv, checkpoints, metrics.json, eval_<eps>.json,
                             02_training.ipynb (executed)
    logs/<job>.log           each job's output; logs/<job>.params.yaml its parameters
    results.csv, results.md, runs.csv, figures/*.png   (written by 03)
    batch_summary.json       status, time, log and error of every job; the failures
"""
from __future__ import annotations

import ast
import concurrent.futures as cf
import contextlib
import copy
import difflib
import hashlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from .config import ConfigError, Experiment, load_experiment, read_yaml, to_dict
from .util import utc_now

NOTEBOOKS = {"hypothesis": "01_hypothesis.ipynb", "training": "02_training.ipynb",
             "robustness": "03_robustness.ipynb"}
# parameters the batch itself sets: an experiment file must not set them
RESERVED = {"hypothesis": {"model_dir", "threads"},
            "robustness": {"params", "overrides", "out_dir", "train_missing", "threads"}}
SUMMARY = "batch_summary.json"
EXPERIMENT_FILE = "experiment.yaml"
HYPOTHESIS_JOB, ROBUSTNESS_JOB = "01_hypothesis", "03_robustness"
DEFAULT_KERNEL = "spat"       # registered by `make` inside the venv; python3 otherwise
LOG_TAIL_LINES = 15


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


def gpu_count() -> int:
    """Visible CUDA devices; 0 without torch/CUDA. Counts devices without creating a context."""
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
            close = difflib.get_close_matches(str(key), list(defaults), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown key '{section}.{key}'{hint}; notebook {notebook} takes: "
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
    configs = {name: _absolute_data_paths(to_dict(cfg), Path.cwd()) for name, cfg in exp.runs.items()}
    if only:
        unknown = [r for r in only if r not in configs]
        if unknown:
            close = difflib.get_close_matches(unknown[0], list(configs), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"--only: no run named '{unknown[0]}'{hint}; runs: {', '.join(configs)}")
        configs = {r: c for r, c in configs.items() if r in only}
    labels = run_labels(exp, list((raw.get("variants") or {"default": {}}).keys()))
    out = Path(out_dir) if out_dir is not None else Path(out_root) / exp.name
    return Plan(experiment=exp, params_path=path, overrides=overrides, out_dir=out.resolve(),
                labels=labels, configs=configs)


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
        params = {**section_parameters(plan.experiment.hypothesis, nb),
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
                os.killpg(p.pid, 15)        # the papermill process and its kernel (own group)


def run_job(job: Job, *, kernel: str, env: dict, timeout: float | None = None,
            running: _Running | None = None) -> JobResult:
    """Execute one notebook with ``python -m papermill`` in its own process group; the
    notebook's output goes to ``job.log``. Never raises for a failing notebook."""
    job.output.parent.mkdir(parents=True, exist_ok=True)
    job.log.parent.mkdir(parents=True, exist_ok=True)
    job.cwd.mkdir(parents=True, exist_ok=True)
    job.params_file.write_text(yaml.safe_dump(job.parameters, sort_keys=False))
    cmd = [sys.executable, "-m", "papermill", str(job.notebook), str(job.output),
           "-f", str(job.params_file), "-k", kernel, "--cwd", str(job.cwd),
           "--log-output", "--no-progress-bar", "--log-level", "INFO"]
    if timeout:
        cmd += ["--execution-timeout", str(int(timeout))]
    t0 = time.perf_counter()
    with open(job.log, "w") as logf:
        logf.write(f"$ {' '.join(cmd)}\n")
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


def job_env(threads: int | None, gpu: int | None) -> dict:
    """The environment of one job: its thread budget, its GPU, unbuffered output."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    return env


def run_jobs(jobs: list[Job], *, n_parallel: int, kernel: str, threads: int | None,
             gpus: list[int], timeout: float | None = None,
             on_done: Callable[[JobResult], None] = lambda r: None) -> list[JobResult]:
    """Run jobs ``n_parallel`` at a time; a job takes a free slot, slot i -> GPU gpus[i % len]."""
    slots: queue.Queue[int] = queue.Queue()
    for i in range(max(1, n_parallel)):
        slots.put(i)
    running = _Running()

    def work(job: Job) -> JobResult:
        slot = slots.get()
        try:
            gpu = gpus[slot % len(gpus)] if gpus else None
            try:
                res = run_job(job, kernel=kernel, env=job_env(None if gpus else threads, gpu),
                              timeout=timeout, running=running)
            except Exception as e:   # e.g. an unwritable output folder: this job fails, not the batch
                res = JobResult(job.name, "failed", log=str(job.log), output=str(job.output),
                                error=f"{type(e).__name__}: {e}", fingerprint=job.fingerprint())
            res.device = f"cuda:{gpu}" if gpu is not None else f"cpu ({threads or 'all'} threads)"
            return res
        finally:
            slots.put(slot)

    results = []
    with cf.ThreadPoolExecutor(max_workers=max(1, n_parallel)) as pool:
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
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def run_batch(plan: Plan, *, jobs: int = 1, kernel: str | None = None, hypothesis: bool = True,
              timeout: float | None = None, notebooks: Path | None = None,
              log: Callable[[str], None] = print) -> BatchOutcome:
    """Execute the plan (see the module doc); returns what happened to every job."""
    t0 = time.perf_counter()
    started = utc_now()
    nb_dir = notebooks or notebooks_dir()
    kernel = kernel or kernel_name()
    gpus = list(range(gpu_count()))
    n_parallel = max(1, jobs)
    threads = None if gpus else max(1, cpu_count() // n_parallel)
    previous = load_summary(plan.out_dir)
    write_experiment_file(plan)
    outcome = BatchOutcome(plan)
    todo = []
    for job in build_jobs(plan, nb_dir, threads=threads, hypothesis=hypothesis):
        if is_done(job, previous):
            outcome.results[job.name] = JobResult(job.name, "skipped", 0.0, str(job.log), str(job.output),
                                                  fingerprint=job.fingerprint())
        else:
            todo.append(job)
    n_skip = len(outcome.results)
    where = f"{len(gpus)} GPU(s)" if gpus else f"CPU, {threads} thread(s) per job"
    log(f"spat batch: {plan.name}: {len(plan.runs)} run(s), {len(todo)} job(s) to execute"
        + (f", {n_skip} already finished" if n_skip else "")
        + f"; {n_parallel} at a time on {where}; kernel {kernel}; output {plan.out_dir}")
    done = [0]

    def on_done(res: JobResult) -> None:
        done[0] += 1
        outcome.results[res.name] = res
        outcome.seconds = time.perf_counter() - t0
        write_summary(outcome, started)
        mark = "ok    " if res.status == "ok" else "FAILED"
        extra = f": {res.error.splitlines()[0]}" if res.error else ""
        log(f"[{done[0]}/{len(todo)}] {mark} {res.name} ({res.seconds:.0f} s){extra}")

    run_jobs(todo, n_parallel=n_parallel, kernel=kernel, threads=threads, gpus=gpus,
             timeout=timeout, on_done=on_done)
    finished_runs = [r for r in plan.runs if (plan.run_dir(r) / "metrics.json").is_file()]
    if finished_runs:
        job = robustness_job(plan, nb_dir, threads=None if gpus else cpu_count())
        log(f"03_robustness on {len(finished_runs)} finished run(s) ...")
        res = run_jobs([job], n_parallel=1, kernel=kernel, threads=cpu_count(), gpus=gpus[:1],
                       timeout=timeout)[0]
        outcome.results[res.name] = res
        mark = "ok    " if res.status == "ok" else "FAILED"
        log(f"[03] {mark} {res.name} ({res.seconds:.0f} s)" + (f": {res.error}" if res.error else ""))
    else:
        log("no run finished: 03_robustness not executed")
    outcome.seconds = time.perf_counter() - t0
    write_summary(outcome, started, utc_now())
    return outcome


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
