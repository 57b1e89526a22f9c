"""``spat batch PARAMS --launcher slurm``: the batch's notebooks as Slurm jobs, through submitit.

Every job is the local launcher's job (:func:`spatlib.batch.build_jobs`, executed by
:func:`spatlib.batch.run_job`: papermill, the executed notebook in the run folder, the log in
``logs/``), only it runs inside a Slurm allocation: notebook 01 is a job of its own, the runs of
notebook 02 one job each (one job array per submission), and notebook 03 a job submitted once
every run has ended; the driver waits for them.

* The cluster settings come from the params file's ``launcher:`` section and from flags (the
  flags win); :class:`LauncherConfig` checks them, then :func:`check_cluster` asks Slurm
  (``sinfo``) about the partition and its GPUs before anything is submitted.
* ``<experiment>/slurm_jobs.json`` records every submission (Slurm job id, parameters'
  fingerprint, submitit's files). A rerun of ``spat batch`` skips finished jobs, waits for the
  ones still queued or running instead of submitting them again, and resubmits failed or lost
  ones. The driver can therefore be stopped (or killed) at any time.
* Preemption and time limits: jobs are submitted with ``--requeue``; submitit sends the job
  USR2 ahead of its time limit and requeues it (the job is :class:`submitit.helpers.Checkpointable`),
  and a preempted or ``scontrol requeue``-d job restarts on its own. The restarted notebook
  resumes the run from ``checkpoint_last.pt``, so the final metrics are an uninterrupted run's.
* ``tasks_per_run`` (default: ``gpus_per_run``, at least 1) tasks per run, spread over
  ``nodes``: each task gets MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE/LOCAL_RANK from Slurm's
  variables and the trainer's DDP path takes over (NCCL on GPUs, gloo on CPUs). Task 0 executes
  the notebook; the others call the trainer directly (only rank 0 writes the run folder).

``spat status OUT_DIR`` prints each job's state, for a batch of either launcher: from the run
folders (done, interrupted at epoch k of n, not started) and the launcher's records (queued,
running (epoch k of n), failed with its log).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from . import batch as B
from .config import ConfigError
from .util import atomic_write_text, did_you_mean, utc_now

JOBS_FILE = "slurm_jobs.json"
SUBMITIT_DIR = "slurm"
# squeue states in which a job will still run (or is running): never submit it again
ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED",
                 "REQUEUE_HOLD", "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT",
                 "RESV_DEL_HOLD", "PREEMPTED"}
POLL_S = 3.0
# a job out of squeue without a result file: wait this long (files land after the state) before
# calling it lost
LOST_GRACE_S = 20.0


# --------------------------------------------------------------------------------------------
# settings
@dataclass
class LauncherConfig:
    """The ``launcher:`` section of an experiment file (flags override it)."""
    partition: str | None = None        # None: the cluster's default partition
    account: str | None = None
    qos: str | None = None
    time: str | None = None             # a Slurm time limit: MM, HH:MM:SS, D-HH:MM, ...
    gpus_per_run: int = 0
    cpus_per_run: int = 1               # per task; also the notebook's torch threads
    mem_per_run: str | None = None      # --mem, e.g. 16G (per node)
    nodes: int = 1
    tasks_per_run: int | None = None    # None: gpus_per_run, at least 1
    array_parallelism: int = 256        # runs of one array at once (--array %N)
    sbatch_extra: list[str] = field(default_factory=list)   # extra #SBATCH options: --constraint=a100
    setup: list[str] = field(default_factory=list)          # shell lines before the job: module load ...

    @property
    def tasks(self) -> int:
        return self.tasks_per_run if self.tasks_per_run is not None else max(1, self.gpus_per_run)

    @property
    def time_minutes(self) -> int | None:
        return None if self.time is None else parse_time_minutes(self.time)


_INT_KEYS = {"gpus_per_run": 0, "cpus_per_run": 1, "nodes": 1, "tasks_per_run": 1, "array_parallelism": 1}
_STR_KEYS = ("partition", "account", "qos", "time", "mem_per_run")
_LIST_KEYS = ("sbatch_extra", "setup")
LAUNCHER_KEYS = tuple(f.name for f in dataclasses.fields(LauncherConfig))


def parse_time_minutes(text: str) -> int:
    """Minutes (rounded up) of a Slurm time limit, in the formats sbatch takes: ``M``, ``M:S``,
    ``H:M:S``, ``D-H``, ``D-H:M``, ``D-H:M:S``; ``0``, ``infinite`` and ``unlimited`` are 0
    (no limit). Raises ConfigError for anything else."""
    s = str(text).strip()
    if s.lower() in ("infinite", "unlimited"):
        return 0
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", s)
    if not m:
        raise ConfigError(f"launcher.time: Slurm cannot parse {text!r}; expected minutes, MM:SS, "
                          "HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS (e.g. 2:00:00)")
    days, a, b, c = m.groups()
    if days is not None:      # D-H[:M[:S]]
        seconds = int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
        fields = [b, c]
    elif c is not None:       # H:M:S
        seconds, fields = int(a) * 3600 + int(b) * 60 + int(c), [b, c]
    elif b is not None:       # M:S
        seconds, fields = int(a) * 60 + int(b), [b]
    else:                     # M
        seconds, fields = int(a) * 60, []
    if any(f is not None and int(f) >= 60 for f in fields):
        raise ConfigError(f"launcher.time: {text!r}: minutes and seconds must be below 60")
    return math.ceil(seconds / 60)


def launcher_config(section: dict | None, flags: dict | None = None) -> LauncherConfig:
    """A validated LauncherConfig from an experiment's ``launcher:`` section and flag values
    (``None`` flags leave the section's value; list flags extend it). Raises ConfigError naming
    the key for an unknown key, a wrong type or an out-of-range value."""
    values = dict(section or {})
    for key in values:
        if key not in LAUNCHER_KEYS:
            raise ConfigError(f"unknown key 'launcher.{key}'{did_you_mean(key, LAUNCHER_KEYS)}; "
                              f"allowed: {', '.join(LAUNCHER_KEYS)}")
    for key, value in (flags or {}).items():
        if value is None or value == []:
            continue
        values[key] = list(values.get(key) or []) + list(value) if key in _LIST_KEYS else value
    for key, value in values.items():
        if value is None and key != "gpus_per_run" and key not in _LIST_KEYS:
            continue
        if key in _INT_KEYS:
            if isinstance(value, bool) or not isinstance(value, int) or value < _INT_KEYS[key]:
                raise ConfigError(f"launcher.{key}: expected an integer >= {_INT_KEYS[key]}, got {value!r}")
        elif key in _STR_KEYS:
            if key == "time" and isinstance(value, int) and not isinstance(value, bool):
                values[key] = value = str(value)      # YAML reads `time: 30` as a number
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"launcher.{key}: expected a string, got {value!r}")
        elif key in _LIST_KEYS:
            if isinstance(value, str):
                values[key] = value = [value]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"launcher.{key}: expected a list of strings, got {value!r}")
    cfg = LauncherConfig(**values)
    cfg.time_minutes        # parses (raises) now
    if cfg.mem_per_run is not None and not re.fullmatch(r"\d+[KMGT]?", cfg.mem_per_run.strip(), re.I):
        raise ConfigError(f"launcher.mem_per_run: {cfg.mem_per_run!r} is not a Slurm memory size "
                          "(an integer with an optional K, M, G or T, e.g. 16G)")
    for line in cfg.sbatch_extra:
        _sbatch_option(line)
    if cfg.tasks % cfg.nodes:
        raise ConfigError(f"launcher: {cfg.tasks} task(s) per run do not split over {cfg.nodes} node(s)")
    if cfg.gpus_per_run and cfg.gpus_per_run % cfg.nodes:
        raise ConfigError(f"launcher.gpus_per_run: {cfg.gpus_per_run} GPU(s) do not split over "
                          f"{cfg.nodes} node(s)")
    return cfg


def _sbatch_option(line: str) -> tuple[str, str | bool]:
    """``--constraint=a100`` / ``#SBATCH --exclusive`` -> (key, value) for submitit."""
    text = line.strip()
    if text.startswith("#SBATCH"):
        text = text[len("#SBATCH"):].strip()
    m = re.fullmatch(r"--([A-Za-z][A-Za-z0-9-]*)(?:[= ](.+))?", text)
    if not m:
        raise ConfigError(f"launcher.sbatch_extra: {line!r} is not an sbatch option like "
                          "--constraint=a100 or --exclusive")
    return m.group(1), (m.group(2).strip() if m.group(2) else True)


# --------------------------------------------------------------------------------------------
# the cluster
@dataclass
class Partition:
    name: str
    default: bool
    gres: str                  # sinfo %G of its nodes, joined

    @property
    def has_gpus(self) -> bool:
        return "gpu" in self.gres.lower()


def _run(cmd: list[str], timeout: float = 60) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout


def partitions() -> dict[str, Partition]:
    """The cluster's partitions from ``sinfo`` (the default one marked by Slurm's ``*``)."""
    parts: dict[str, Partition] = {}
    for line in _run(["sinfo", "-h", "-o", "%P|%G"]).splitlines():
        if "|" not in line:
            continue
        name, gres = line.split("|", 1)
        default = name.endswith("*")
        name = name.rstrip("*")
        p = parts.setdefault(name, Partition(name, default, ""))
        p.default = p.default or default
        if gres and gres != "(null)":
            p.gres = ",".join(x for x in (p.gres, gres) if x)
    return parts


def check_cluster(cfg: LauncherConfig) -> Partition:
    """Raise ConfigError, before anything is submitted, when Slurm is not there, the partition is
    unknown (asking ``sinfo``) or GPUs are requested on a partition without them."""
    if shutil.which("sbatch") is None:
        raise ConfigError("--launcher slurm: no 'sbatch' on PATH (is this a Slurm login node? "
                          "`module load slurm`?); use --launcher local to run here")
    if shutil.which("sinfo") is None:
        raise ConfigError("--launcher slurm: no 'sinfo' on PATH next to sbatch")
    try:
        parts = partitions()
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        raise ConfigError(f"--launcher slurm: Slurm does not answer: {e}") from None
    if not parts:
        raise ConfigError("--launcher slurm: sinfo lists no partition")
    if cfg.partition is None:
        chosen = next((p for p in parts.values() if p.default), None)
        if chosen is None:
            raise ConfigError("launcher.partition: the cluster has no default partition; choose one of "
                              + ", ".join(parts))
    elif cfg.partition not in parts:
        raise ConfigError(f"launcher.partition: no partition '{cfg.partition}' on this cluster"
                          f"{did_you_mean(cfg.partition, parts)}; sinfo lists: {', '.join(parts)}")
    else:
        chosen = parts[cfg.partition]
    if cfg.gpus_per_run and not chosen.has_gpus:
        raise ConfigError(f"launcher.gpus_per_run: {cfg.gpus_per_run} GPU(s) requested, but partition "
                          f"'{chosen.name}' has no GPUs (sinfo Gres: {chosen.gres or '(null)'}); "
                          "choose a GPU partition or gpus_per_run: 0")
    return chosen


def squeue_states() -> dict[str, tuple[str, str]]:
    """Slurm job id (array tasks as ``123_4``) -> (state, job name) of this user's jobs that
    slurmctld still knows, finished ones included."""
    user = os.environ.get("USER") or _run(["id", "-un"]).strip()
    out = {}
    for line in _run(["squeue", "-h", "-r", "-t", "all", "-u", user, "-o", "%i|%T|%j"]).splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3:
            out[parts[0]] = (parts[1], parts[2])
    return out


# --------------------------------------------------------------------------------------------
# what runs inside the allocation
STEP_END_WAIT_S = 180   # longer than any KillWait a cluster sets (Slurm's default: 30 s)


class NotebookJob:
    """A submitit callable: one batch job (papermill), requeue-safe. Picklable by reference."""

    def __init__(self, job: B.Job, kernel: str, threads: int, config: dict | None = None):
        self.job, self.kernel, self.threads, self.config = job, kernel, threads, config

    def __call__(self) -> B.JobResult:
        env = os.environ
        tasks = int(env.get("SLURM_NTASKS", "1"))
        if tasks > 1:
            import submitit
            # set_cuda_visible_devices=False: the trainer picks cuda:LOCAL_RANK itself
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        rank = int(env.get("RANK", "0"))
        if rank != 0:
            return self._train_follower()
        t0 = time.perf_counter()
        res = B.run_job(self.job, kernel=self.kernel, env=B.job_env(self.threads, None))
        if res.returncode is not None and res.returncode < 0 and "SLURM_JOB_ID" in env:
            # papermill was signalled: Slurm is ending this step (requeue, preemption, time
            # limit) and SIGKILL follows after KillWait. Returning now would write a "failed"
            # result that the driver could read before the requeued job runs: wait to be
            # killed instead; a signal from elsewhere is reported after STEP_END_WAIT_S
            time.sleep(STEP_END_WAIT_S)
        res.device = _device_label(self.threads, tasks)
        res.seconds = time.perf_counter() - t0
        return res

    def _train_follower(self) -> B.JobResult:
        """Ranks > 0 of a multi-task run: the trainer itself (joins rank 0's process group)."""
        import torch
        from .train import train
        torch.set_num_threads(self.threads)
        t0 = time.perf_counter()
        train(self.config, self.job.run_dir, progress=False)
        return B.JobResult(self.job.name, "ok", time.perf_counter() - t0, str(self.job.log),
                           fingerprint=self.job.fingerprint())

    def checkpoint(self):
        """submitit calls this on USR2 (time limit near, or preemption): resubmit the same job;
        the notebook resumes the run from checkpoint_last.pt."""
        import submitit
        return submitit.helpers.DelayedSubmission(self)


def _device_label(threads: int, tasks: int) -> str:
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
    node = os.environ.get("SLURMD_NODENAME", "?")
    where = f"cuda ({gpus})" if gpus else f"cpu ({threads} threads)"
    return f"slurm job {os.environ.get('SLURM_JOB_ID', '?')} on {node}: {where}" + (f", {tasks} tasks" if tasks > 1 else "")


# --------------------------------------------------------------------------------------------
# the jobs file
def jobs_file(out_dir: Path) -> Path:
    return Path(out_dir) / JOBS_FILE


def load_jobs(out_dir: Path) -> dict:
    """``slurm_jobs.json``: {"jobs": {job name: record}}; empty when absent or unreadable."""
    path = jobs_file(out_dir)
    try:
        doc = json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        doc = {}
    doc.setdefault("jobs", {})
    return doc


def save_jobs(out_dir: Path, doc: dict) -> None:
    atomic_write_text(jobs_file(out_dir), json.dumps(doc, indent=2) + "\n")


def read_result(record: dict) -> B.JobResult | None:
    """The JobResult of a job that ended (submitit's result pickle of task 0), else None; an
    exception in the job becomes a failed JobResult with the traceback's last line."""
    path = Path(record.get("result", ""))
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as f:
            kind, value = pickle.load(f)
    except Exception:           # half-written: the job is still ending
        return None
    if kind == "success" and isinstance(value, B.JobResult):
        return value
    last = str(value).strip().splitlines()[-1] if str(value).strip() else str(kind)
    return B.JobResult(record.get("name", "?"), "failed", log=record.get("stderr", ""),
                       error=last, fingerprint=record.get("fingerprint", ""))


def job_state(record: dict, queue: dict[str, tuple[str, str]]) -> str:
    """queued | running | ended (a result to read) | lost (gone from Slurm without a result)."""
    if read_result(record) is not None:
        return "ended"
    entry = queue.get(str(record.get("job_id")))
    if entry and entry[1] == record.get("slurm_name") and entry[0] in ACTIVE_STATES:
        return "queued" if entry[0] in ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED") else "running"
    return "lost"


# --------------------------------------------------------------------------------------------
# the driver
def _executor(plan: B.Plan, cfg: LauncherConfig, *, tasks: int, gpus: int, name: str):
    import submitit
    ex = submitit.SlurmExecutor(folder=str(plan.out_dir / SUBMITIT_DIR), max_num_timeout=3)
    extra: dict = {"requeue": True}
    if cfg.mem_per_run:
        extra["mem"] = cfg.mem_per_run.strip()
    for line in cfg.sbatch_extra:
        key, value = _sbatch_option(line)
        extra[key] = value
    params = dict(job_name=name, nodes=cfg.nodes, ntasks_per_node=tasks // cfg.nodes,
                  cpus_per_task=cfg.cpus_per_run, array_parallelism=cfg.array_parallelism,
                  setup=list(cfg.setup), additional_parameters=extra, stderr_to_stdout=True)
    if cfg.time_minutes:
        params["time"] = cfg.time_minutes
        # USR2 (checkpoint and requeue) ahead of the limit, at most a tenth of it
        params["signal_delay_s"] = max(10, min(90, cfg.time_minutes * 6))
    for key in ("partition", "account", "qos"):
        if getattr(cfg, key):
            params[key] = getattr(cfg, key)
    if gpus:
        params["gpus_per_node"] = gpus // cfg.nodes
    ex.update_parameters(**params)
    return ex


def slurm_name(plan: B.Plan) -> str:
    return f"spat-{plan.name}"


def submit(plan: B.Plan, cfg: LauncherConfig, jobs: list[B.Job], doc: dict, *, kernel: str,
           multi_task: bool) -> None:
    """Submit ``jobs`` (one array when several) and record them in the jobs file at once."""
    if not jobs:
        return
    tasks = cfg.tasks if multi_task else 1
    gpus = cfg.gpus_per_run if multi_task else min(cfg.gpus_per_run, 1)
    nodes_cfg = cfg if multi_task else dataclasses.replace(cfg, nodes=1)
    ex = _executor(plan, nodes_cfg, tasks=tasks, gpus=gpus, name=slurm_name(plan))
    calls = [NotebookJob(j, kernel, cfg.cpus_per_run, plan.configs.get(j.name)) for j in jobs]
    with ex.batch():
        handles = [ex.submit(c) for c in calls]
    now = utc_now()
    for job, h in zip(jobs, handles):
        prev = doc["jobs"].get(job.name, {})
        doc["jobs"][job.name] = {
            "name": job.name, "kind": job.kind, "job_id": str(h.job_id), "slurm_name": slurm_name(plan),
            "fingerprint": job.fingerprint(), "submitted": now, "log": str(job.log),
            "output": str(job.output), "run_dir": str(job.run_dir) if job.run_dir else None,
            "stderr": str(h.paths.stdout), "result": str(h.paths.result_pickle),
            "submissions": list(prev.get("submissions", [])) + [str(h.job_id)]}
    save_jobs(plan.out_dir, doc)


def wait_for(names: list[str], doc: dict, *, on_done: Callable[[B.JobResult], None],
             log: Callable[[str], None], poll: float = POLL_S) -> None:
    """Poll Slurm until every job in ``names`` has ended (a result) or is lost."""
    waiting = set(names)
    gone_since: dict[str, float] = {}
    shown: dict[str, str] = {}
    while waiting:
        queue = squeue_states()
        for name in sorted(waiting):
            rec = doc["jobs"][name]
            state = job_state(rec, queue)
            if state == "ended":
                waiting.discard(name)
                on_done(read_result(rec))
            elif state == "lost":
                first = gone_since.setdefault(name, time.monotonic())
                if time.monotonic() - first > LOST_GRACE_S:
                    waiting.discard(name)
                    on_done(B.JobResult(name, "failed", log=rec["stderr"], fingerprint=rec["fingerprint"],
                                        error=f"Slurm job {rec['job_id']} ended without a result "
                                              f"(cancelled, killed or its node failed); see {rec['stderr']}"))
            else:
                gone_since.pop(name, None)
                if shown.get(name) != state:
                    shown[name] = state
                    log(f"  {name}: {state} (Slurm job {rec['job_id']})")
        if waiting:
            time.sleep(poll)


def run_slurm_batch(plan: B.Plan, cfg: LauncherConfig, *, kernel: str | None = None,
                    hypothesis: bool = True, notebooks: Path | None = None,
                    log: Callable[[str], None] = print, poll: float = POLL_S) -> B.BatchOutcome:
    """Execute the plan on Slurm (see the module doc); returns what happened to every job.
    Every job's data (:func:`spatlib.batch.check_jobs_data`) and the cluster
    (:func:`check_cluster`) are checked before anything is written or submitted."""
    nb_dir = notebooks or B.notebooks_dir()
    data = B.check_jobs_data(B.build_jobs(plan, nb_dir, threads=cfg.cpus_per_run, hypothesis=hypothesis))
    check_cluster(cfg)
    t0 = time.perf_counter()
    started = utc_now()
    kernel = kernel or B.kernel_name()
    previous = B.load_summary(plan.out_dir)
    B.write_experiment_file(plan)
    doc = load_jobs(plan.out_dir)
    outcome = B.BatchOutcome(plan)
    queue = squeue_states()
    to_submit: list[B.Job] = []
    waiting: list[str] = []
    for job in B.build_jobs(plan, nb_dir, threads=cfg.cpus_per_run, hypothesis=hypothesis):
        rec = doc["jobs"].get(job.name)
        if B.is_done(job, previous):
            outcome.results[job.name] = B.skipped_result(job)
            continue
        if rec and rec.get("fingerprint") == job.fingerprint():
            state = job_state(rec, queue)
            res = read_result(rec) if state == "ended" else None
            if state in ("queued", "running"):
                waiting.append(job.name)
                log(f"  {job.name}: already {state} as Slurm job {rec['job_id']}: not submitted again")
                continue
            if res is not None and res.status == "ok" and B.is_done(job, {"jobs": {job.name: res.__dict__}}):
                B.log_line(job, "already finished (its Slurm job ended), skipped")
                outcome.results[job.name] = res
                continue
        to_submit.append(job)
    n_skip = len(outcome.results)
    log(f"spat batch (slurm): {plan.name}: {len(plan.runs)} run(s), {len(to_submit)} job(s) to submit"
        + (f", {len(waiting)} already in Slurm" if waiting else "")
        + (f", {n_skip} already finished" if n_skip else "")
        + f"; {cfg.tasks} task(s) x {cfg.cpus_per_run} CPU(s)"
        + (f" + {cfg.gpus_per_run} GPU(s)" if cfg.gpus_per_run else "") + f" per run; output {plan.out_dir}")
    for line in B.data_lines(data, plan.data_origin):
        log(line)
    if n_skip:
        B.write_summary(outcome, started)
    hyp = [j for j in to_submit if j.kind == "hypothesis"]
    runs = [j for j in to_submit if j.kind == "training"]
    submit(plan, cfg, hyp, doc, kernel=kernel, multi_task=False)
    submit(plan, cfg, runs, doc, kernel=kernel, multi_task=True)
    for j in to_submit:
        log(f"  {j.name}: submitted as Slurm job {doc['jobs'][j.name]['job_id']}")
    count = [0]
    total = len(to_submit) + len(waiting)

    def on_done(res: B.JobResult) -> None:
        count[0] += 1
        outcome.results[res.name] = res
        outcome.seconds = time.perf_counter() - t0
        B.write_summary(outcome, started)
        mark = "ok    " if res.status == "ok" else "FAILED"
        extra = f": {res.error.splitlines()[0]}" if res.error else ""
        log(f"[{count[0]}/{total}] {mark} {res.name} ({res.seconds:.0f} s){extra}")

    wait_for([j.name for j in to_submit] + waiting, doc, on_done=on_done, log=log, poll=poll)
    finished = [r for r in plan.runs if (plan.run_dir(r) / "metrics.json").is_file()]
    if finished:
        job = B.robustness_job(plan, nb_dir, threads=cfg.cpus_per_run)
        log(f"03_robustness on {len(finished)} finished run(s): submitting ...")
        submit(plan, cfg, [job], doc, kernel=kernel, multi_task=False)
        wait_for([job.name], doc, on_done=lambda r: outcome.results.__setitem__(r.name, r), log=log, poll=poll)
        res = outcome.results[job.name]
        mark = "ok    " if res.status == "ok" else "FAILED"
        log(f"[03] {mark} {res.name} ({res.seconds:.0f} s)" + (f": {res.error}" if res.error else ""))
    else:
        log("no run finished: 03_robustness not submitted")
    outcome.seconds = time.perf_counter() - t0
    B.write_summary(outcome, started, utc_now())
    return outcome


# --------------------------------------------------------------------------------------------
# command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--launcher`` flag and the Slurm settings of ``spat batch``."""
    g = parser.add_argument_group("Slurm (--launcher slurm; override the params file's launcher: section)")
    parser.add_argument("--launcher", choices=("local", "slurm"), default="local",
                        help="where the notebooks run: this machine (default) or Slurm jobs")
    g.add_argument("--partition", default=None)
    g.add_argument("--account", default=None)
    g.add_argument("--qos", default=None)
    g.add_argument("--time", default=None, help="time limit per job, e.g. 2:00:00 or 1-00:00")
    g.add_argument("--gpus-per-run", type=int, default=None)
    g.add_argument("--cpus-per-run", type=int, default=None, help="CPUs per task (and torch threads)")
    g.add_argument("--mem-per-run", default=None, help="memory per node, e.g. 16G")
    g.add_argument("--nodes", type=int, default=None, help="nodes per run")
    g.add_argument("--tasks-per-run", type=int, default=None,
                   help="processes per run (torch.distributed; default: --gpus-per-run, at least 1)")
    g.add_argument("--array-parallelism", type=int, default=None, help="runs of one array at once")
    g.add_argument("--sbatch-extra", action="append", default=[], metavar="OPTION",
                   help="extra sbatch option, e.g. --sbatch-extra=--constraint=a100 (repeatable)")
    g.add_argument("--setup", action="append", default=[], metavar="LINE",
                   help="shell line run before each job, e.g. 'module load cuda' (repeatable)")
    g.add_argument("--status", action="store_true", help="print every job's state and exit")


def flag_values(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in LAUNCHER_KEYS}


def run_from_cli(plan: B.Plan, args: argparse.Namespace, nb_dir: Path) -> int:
    """``spat batch ... --launcher slurm``: validate, submit, wait, report; the exit status."""
    try:
        cfg = launcher_config(plan.experiment.launcher, flag_values(args))
        # one driver per experiment folder, whichever launcher: the local batch's lock
        with B.lock_experiment(plan.out_dir, sys.argv):
            outcome = run_slurm_batch(plan, cfg, kernel=args.kernel, hypothesis=not args.no_hypothesis,
                                      notebooks=nb_dir, log=lambda s: print(s, flush=True))
    except ConfigError as e:
        return B.error(e)
    except KeyboardInterrupt:
        print("\ninterrupted: the Slurm jobs go on; rerun the same command to wait for them "
              f"(nothing is submitted twice), or `spat status {plan.out_dir}`", file=sys.stderr)
        return 130
    B.report_outcome(outcome)
    return 1 if outcome.failures else 0


# --------------------------------------------------------------------------------------------
# spat status
def folder_state(out: Path, name: str, epochs: int | None) -> tuple[str, str, B.RunState | None]:
    """(state, detail, run state) of one job from the experiment folder alone, whichever
    launcher ran it: a run's folder (done / interrupted at epoch k of n / not started), or an
    executed notebook's papermill record (01 also names its model's state)."""
    if name not in (B.HYPOTHESIS_JOB, B.ROBUSTNESS_JOB):
        rs = B.run_state(out / "runs" / name, epochs)
        if rs.state == "done":
            return "done", f"metrics.json of {rs.finished_at}", rs
        return rs.describe(), "", rs
    state, ended = B.notebook_state(out / B.NOTEBOOKS["hypothesis" if name == B.HYPOTHESIS_JOB else "robustness"])
    if state == "done":
        return "done", f"executed, ended {ended}", None
    rs = B.run_state(out / "hypothesis_model") if name == B.HYPOTHESIS_JOB else None
    detail = f"its model: {rs.describe()}" if rs is not None and rs.state != "not started" else ""
    return state, detail, rs


def _running(rs: B.RunState | None) -> str:
    """``running (epoch k of n)``: the epoch in progress, one past those its checkpoint holds."""
    if rs is None or not rs.epochs:
        return "running"
    return f"running (epoch {min(rs.epochs, rs.epoch + 1)} of {rs.epochs})"


def status_rows(out_dir: str | Path) -> list[dict]:
    """One row per job of an experiment folder: name, state, detail (and the log).

    The run folders and executed notebooks say what is done, interrupted (at epoch k of n) or
    not started, whichever launcher ran the batch (or was interrupted running it); the
    launcher's records add what only they know: a Slurm job queued or running, a job running
    in a local batch now, a failure and its error."""
    out = Path(out_dir).resolve()      # as the batch's jobs name it (absolute)
    exp_file = out / B.EXPERIMENT_FILE
    if not exp_file.is_file():
        raise ConfigError(f"{out}: no {B.EXPERIMENT_FILE} (not a spat batch output folder)")
    exp = yaml.safe_load(exp_file.read_text()) or {}
    doc = load_jobs(out)
    summary = (B.load_summary(out).get("jobs") or {})
    try:
        queue = squeue_states() if doc["jobs"] and shutil.which("squeue") else {}
    except (RuntimeError, subprocess.TimeoutExpired):
        queue = {}
    local = B.running_jobs(out)
    runs = exp.get("runs") or {}
    names = [B.HYPOTHESIS_JOB] + list(runs) + [B.ROBUSTNESS_JOB]
    rows = []
    for name in names:
        rec = doc["jobs"].get(name)
        prev = summary.get(name) or {}
        log_path = (rec or {}).get("log") or prev.get("log") or str(out / "logs" / f"{name}.log")
        epochs = (((runs.get(name) or {}).get("config") or {}).get("train") or {}).get("epochs")
        state, detail, rs = folder_state(out, name, epochs)
        row = {"job": name, "state": state, "detail": detail, "log": log_path}
        slurm = job_state(rec, queue) if rec else None
        failure = None
        if slurm == "ended":
            res = read_result(rec)
            failure = (res.error or "failed", res.log or log_path) if res.status == "failed" else None
        elif slurm == "lost":
            failure = (f"Slurm job {rec['job_id']} ended without a result", rec.get("stderr") or log_path)
        elif slurm is None and prev.get("status") == "failed":
            failure = (prev.get("error") or "failed", prev.get("log") or log_path)
        if slurm in ("queued", "running"):
            row["state"] = "queued" if slurm == "queued" else _running(rs)
            row["detail"] = f"Slurm job {rec['job_id']}"
        elif name in local:
            row["state"], row["detail"] = _running(rs), "in the local batch"
        elif state != "done" and failure is not None:
            at = f" at epoch {rs.epoch} of {rs.epochs}" if rs and rs.state == "interrupted" and rs.epoch else ""
            row.update(state=f"failed{at}", detail=failure[0], log=failure[1])
        elif (name == B.HYPOTHESIS_JOB and state == "not started" and not rec and not prev
              and not Path(log_path).exists()):
            continue        # the batch ran with --no-hypothesis
        rows.append(row)
    return rows


def status_main(argv: list[str] | None = None) -> int:
    """``spat status OUT_DIR``: every job's state; exit 1 when one failed."""
    parser = argparse.ArgumentParser(prog="spat status",
                                     description="State of every job of a spat batch output folder "
                                                 "(outputs/<experiment>), from its run folders and the "
                                                 "launcher's records: done (metrics.json of DATE), "
                                                 "interrupted at epoch k of n, not started, queued, "
                                                 "running (epoch k of n), failed (with its log)")
    parser.add_argument("out_dir", help="the experiment's output folder, e.g. outputs/smoke")
    args = parser.parse_args(argv)
    try:
        rows = status_rows(args.out_dir)
    except ConfigError as e:
        return B.error(e)
    width = max(len(r["job"]) for r in rows)
    state_width = max(len(r["state"]) for r in rows)
    for r in rows:
        line = f"{r['job']:<{width}}  {r['state']:<{state_width}}"
        if r["detail"]:
            line += f"  {r['detail'].splitlines()[0]}"
        line = line.rstrip()
        if r["state"].startswith("failed"):
            line += f"\n{'':<{width}}  log: {r['log']}"
        print(line)
    return 1 if any(r["state"].startswith("failed") for r in rows) else 0


cli_main = status_main
