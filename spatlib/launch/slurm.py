"""``spat batch PARAMS --launcher slurm``: the batch's notebooks as Slurm jobs, through submitit.

Every job is the local launcher's job (:func:`spatlib.launch.plan.build_jobs`, executed by
:func:`spatlib.launch.local.run_job`: papermill, the executed notebook in the run folder, the log
in ``logs/``), only it runs inside a Slurm allocation: notebook 01 is a job of its own, the runs
of notebook 02 one job each (one job array per submission), and notebook 03 a job submitted once
every run has ended; the driver waits for them.

* The cluster settings come from the params file's ``launcher:`` section and from flags (the
  flags win); :class:`LauncherConfig` checks them, then :func:`check_cluster` asks Slurm
  (``sinfo``) about the partition and its GPUs before anything is submitted.
* ``<experiment>/slurm_jobs.json`` records every submission (Slurm job id, parameters'
  fingerprint, submitit's files; read by :mod:`spatlib.launch.status`). A rerun of ``spat
  batch`` skips finished jobs, waits for the ones still queued or running instead of submitting
  them again, and resubmits failed or lost ones. The driver can therefore be stopped (or
  killed) at any time.
* Preemption and time limits: jobs are submitted with ``--requeue``; submitit sends the job
  USR2 ahead of its time limit and requeues it (the job is :class:`submitit.helpers.Checkpointable`),
  and a preempted or ``scontrol requeue``-d job restarts on its own. The restarted notebook
  resumes the run from ``checkpoint_last.pt``, so the final metrics are an uninterrupted run's.
* ``tasks_per_run`` (default: ``gpus_per_run``, at least 1) tasks per run, spread over
  ``nodes``: each task gets MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE/LOCAL_RANK from Slurm's
  variables and the trainer's DDP path takes over (NCCL on GPUs, gloo on CPUs). Task 0 executes
  the notebook; the others call the trainer directly (only rank 0 writes the run folder).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..config import ConfigError
from ..util import did_you_mean, utc_now
from .local import job_env, kernel_name, lock_experiment, run_job
from .plan import (Job, JobResult, Plan, build_jobs, check_jobs_data, data_lines, notebooks_dir,
                   robustness_job, write_experiment_file)
from .status import (BatchOutcome, is_done, job_state, load_jobs, load_summary, log_line, read_result,
                     save_jobs, skipped_result, slurm_output, squeue_states, write_summary)

SUBMITIT_DIR = "slurm"
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
    days, a, b, c = _slurm_format("time", r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", s,
                                  "a Slurm time limit (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or "
                                  "D-HH:MM:SS, e.g. 2:00:00)").groups()
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
    if cfg.mem_per_run is not None:
        _slurm_format("mem_per_run", r"\d+[KMGT]?", cfg.mem_per_run.strip(),
                      "a Slurm memory size (an integer with an optional K, M, G or T, e.g. 16G)", re.I)
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
    m = _slurm_format("sbatch_extra", r"--([A-Za-z][A-Za-z0-9-]*)(?:[= ](.+))?", text,
                      "an sbatch option like --constraint=a100 or --exclusive")
    return m.group(1), (m.group(2).strip() if m.group(2) else True)


def _slurm_format(key: str, pattern: str, text: str, expected: str, flags: int = 0) -> re.Match:
    """``text`` matched in full by ``pattern``, or ConfigError ``launcher.KEY: 'TEXT' is not EXPECTED``."""
    m = re.fullmatch(pattern, text, flags)
    if m is None:
        raise ConfigError(f"launcher.{key}: {text!r} is not {expected}")
    return m


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


def partitions() -> dict[str, Partition]:
    """The cluster's partitions from ``sinfo`` (the default one marked by Slurm's ``*``)."""
    parts: dict[str, Partition] = {}
    for line in slurm_output(["sinfo", "-h", "-o", "%P|%G"]).splitlines():
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


# --------------------------------------------------------------------------------------------
# what runs inside the allocation
STEP_END_WAIT_S = 180   # longer than any KillWait a cluster sets (Slurm's default: 30 s)


class NotebookJob:
    """A submitit callable: one batch job (papermill), requeue-safe. Picklable by reference."""

    def __init__(self, job: Job, kernel: str, threads: int, config: dict | None = None):
        self.job, self.kernel, self.threads, self.config = job, kernel, threads, config

    def __call__(self) -> JobResult:
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
        res = run_job(self.job, kernel=self.kernel, env=job_env(self.threads, None))
        if res.returncode is not None and res.returncode < 0 and "SLURM_JOB_ID" in env:
            # papermill was signalled: Slurm is ending this step (requeue, preemption, time
            # limit) and SIGKILL follows after KillWait. Returning now would write a "failed"
            # result that the driver could read before the requeued job runs: wait to be
            # killed instead; a signal from elsewhere is reported after STEP_END_WAIT_S
            time.sleep(STEP_END_WAIT_S)
        res.device = _device_label(self.threads, tasks)
        res.seconds = time.perf_counter() - t0
        return res

    def _train_follower(self) -> JobResult:
        """Ranks > 0 of a multi-task run: the trainer itself (joins rank 0's process group)."""
        import torch
        from ..train import train
        torch.set_num_threads(self.threads)
        t0 = time.perf_counter()
        train(self.config, self.job.run_dir, progress=False)
        return JobResult(self.job.name, "ok", time.perf_counter() - t0, str(self.job.log),
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
# the driver
def _executor(plan: Plan, cfg: LauncherConfig, *, tasks: int, gpus: int, name: str):
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


def slurm_name(plan: Plan) -> str:
    return f"spat-{plan.name}"


def submit(plan: Plan, cfg: LauncherConfig, jobs: list[Job], doc: dict, *, kernel: str,
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


def wait_for(names: list[str], doc: dict, *, on_done: Callable[[JobResult], None],
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
                    on_done(JobResult(name, "failed", log=rec["stderr"], fingerprint=rec["fingerprint"],
                                        error=f"Slurm job {rec['job_id']} ended without a result "
                                              f"(cancelled, killed or its node failed); see {rec['stderr']}"))
            else:
                gone_since.pop(name, None)
                if shown.get(name) != state:
                    shown[name] = state
                    log(f"  {name}: {state} (Slurm job {rec['job_id']})")
        if waiting:
            time.sleep(poll)


def run_slurm_batch(plan: Plan, cfg: LauncherConfig, *, kernel: str | None = None,
                    hypothesis: bool = True, notebooks: Path | None = None,
                    log: Callable[[str], None] = print, poll: float = POLL_S,
                    command: list[str] | None = None) -> BatchOutcome:
    """Execute the plan on Slurm (see the module doc); returns what happened to every job.
    Every job's data (:func:`spatlib.launch.plan.check_jobs_data`) and the cluster
    (:func:`check_cluster`) are checked before anything is written or submitted; then the
    experiment folder's batch lock is taken (one driver per folder, either launcher:
    :func:`spatlib.launch.local.lock_experiment`; ``command`` goes into the lock file)."""
    nb_dir = notebooks or notebooks_dir()
    jobs = build_jobs(plan, nb_dir, threads=cfg.cpus_per_run, hypothesis=hypothesis)
    data = check_jobs_data(jobs)
    check_cluster(cfg)
    with lock_experiment(plan.out_dir, command):
        return _submit_and_wait(plan, cfg, jobs, data, nb_dir, kernel or kernel_name(), log, poll)


def _submit_and_wait(plan: Plan, cfg: LauncherConfig, jobs: list[Job], data: list, nb_dir: Path,
                     kernel: str, log: Callable[[str], None], poll: float) -> BatchOutcome:
    outcome = BatchOutcome(plan)
    previous = load_summary(plan.out_dir)
    write_experiment_file(plan)
    doc = load_jobs(plan.out_dir)
    queue = squeue_states()
    to_submit: list[Job] = []
    waiting: list[str] = []
    for job in jobs:
        rec = doc["jobs"].get(job.name)
        if is_done(job, previous):
            outcome.results[job.name] = skipped_result(job)
            continue
        if rec and rec.get("fingerprint") == job.fingerprint():
            state = job_state(rec, queue)
            res = read_result(rec) if state == "ended" else None
            if state in ("queued", "running"):
                waiting.append(job.name)
                log(f"  {job.name}: already {state} as Slurm job {rec['job_id']}: not submitted again")
                continue
            if res is not None and res.status == "ok" and is_done(job, {"jobs": {job.name: res.__dict__}}):
                log_line(job, "already finished (its Slurm job ended), skipped")
                outcome.results[job.name] = res
                continue
        to_submit.append(job)
    n_skip = len(outcome.results)
    log(f"spat batch (slurm): {plan.name}: {len(plan.runs)} run(s), {len(to_submit)} job(s) to submit"
        + (f", {len(waiting)} already in Slurm" if waiting else "")
        + (f", {n_skip} already finished" if n_skip else "")
        + f"; {cfg.tasks} task(s) x {cfg.cpus_per_run} CPU(s)"
        + (f" + {cfg.gpus_per_run} GPU(s)" if cfg.gpus_per_run else "") + f" per run; output {plan.out_dir}")
    for line in data_lines(data, plan.data_origin):
        log(line)
    if n_skip:
        write_summary(outcome)
    hyp = [j for j in to_submit if j.kind == "hypothesis"]
    runs = [j for j in to_submit if j.kind == "training"]
    submit(plan, cfg, hyp, doc, kernel=kernel, multi_task=False)
    submit(plan, cfg, runs, doc, kernel=kernel, multi_task=True)
    for j in to_submit:
        log(f"  {j.name}: submitted as Slurm job {doc['jobs'][j.name]['job_id']}")
    count = [0]
    total = len(to_submit) + len(waiting)

    def on_done(res: JobResult) -> None:
        count[0] += 1
        log(outcome.record(res, f"{count[0]}/{total}"))

    wait_for([j.name for j in to_submit] + waiting, doc, on_done=on_done, log=log, poll=poll)
    finished = plan.finished_runs()
    if finished:
        job = robustness_job(plan, nb_dir, threads=cfg.cpus_per_run)
        log(f"03_robustness on {len(finished)} finished run(s): submitting ...")
        submit(plan, cfg, [job], doc, kernel=kernel, multi_task=False)
        wait_for([job.name], doc, on_done=lambda r: log(outcome.record(r, "03")), log=log, poll=poll)
    else:
        log("no run finished: 03_robustness not submitted")
    outcome.finish()
    return outcome


