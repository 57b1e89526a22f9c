"""The state of every job of an experiment folder, whichever launcher ran it (or was interrupted
running it), read from the files: ``spat status``, and what a rerun does with each job.

* A run folder (:func:`run_state`): done (``metrics.json`` and its ``finished_at``), interrupted
  at epoch k of n (``checkpoint_last.pt``'s epoch, read memory-mapped), or not started. This is
  the one count of epochs done: both launchers' resume decisions, the local batch's status line
  and ``spat status`` read it.
* An executed notebook (:func:`notebook_state`): papermill's record says whether it ended, and
  with an error or not.
* The batch's summary (``batch_summary.json``, :class:`BatchOutcome`): both launchers write it as
  jobs end; a rerun skips the jobs that finished with the same parameters (:func:`is_done`) and
  resumes the others (:func:`next_step`: ``--dry-run`` marks, the dated line of each attempt in a
  job's log).
* What only a launcher knows: the papermill processes of a local batch running now (their
  environment names the batch folder, :func:`running_jobs`), and the Slurm launcher's jobs file
  (``slurm_jobs.json``) with ``squeue``: queued, running, ended with a result, or lost
  (:func:`job_state`).
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import pickle
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..config import ConfigError
from ..util import atomic_write_text, utc_now
from .plan import EXPERIMENT_FILE, HYPOTHESIS_JOB, NOTEBOOKS, ROBUSTNESS_JOB, Job, JobResult, Plan

SUMMARY = "batch_summary.json"
# every job's environment names its batch folder: how a rerun finds a killed batch's leftovers
BATCH_DIR_ENV = "SPAT_BATCH_DIR"
JOBS_FILE = "slurm_jobs.json"
# squeue states in which a job will still run (or is running): never submit it again
ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED",
                 "REQUEUE_HOLD", "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT",
                 "RESV_DEL_HOLD", "PREEMPTED"}
QUEUED_STATES = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"}


# --------------------------------------------------------------------------------------------
# the batch's summary: what happened to every job
@dataclass
class BatchOutcome:
    """Every job's result in one batch (either launcher), kept in ``batch_summary.json``."""
    plan: Plan
    results: dict[str, JobResult] = field(default_factory=dict)
    seconds: float = 0.0
    started: str = field(default_factory=utc_now)
    t0: float = field(default_factory=time.perf_counter, repr=False)

    @property
    def failures(self) -> list[JobResult]:
        return [r for r in self.results.values() if r.status == "failed"]

    def record(self, res: JobResult, label: str) -> str:
        """Keep a job's result and rewrite the summary (a killed driver leaves what ended);
        returns the job's line: ``[LABEL] ok     NAME (N s)`` or ``[LABEL] FAILED NAME (N s): ERROR``."""
        self.results[res.name] = res
        self.seconds = time.perf_counter() - self.t0
        write_summary(self)
        mark = "ok    " if res.status == "ok" else "FAILED"
        extra = f": {res.error.splitlines()[0]}" if res.error else ""
        return f"[{label}] {mark} {res.name} ({res.seconds:.0f} s){extra}"

    def finish(self) -> None:
        """The batch has ended: its time, and the summary with its end date."""
        self.seconds = time.perf_counter() - self.t0
        write_summary(self, utc_now())


def write_summary(outcome: BatchOutcome, finished: str | None = None) -> Path:
    """``<out>/<experiment>/batch_summary.json``: every job's status, time, log and error."""
    path = outcome.plan.out_dir / SUMMARY
    doc = {"experiment": outcome.plan.name, "params": str(outcome.plan.params_path),
           "overrides": outcome.plan.overrides, "started": outcome.started, "finished": finished,
           "seconds": round(outcome.seconds, 1),
           "jobs": {n: r.__dict__ for n, r in outcome.results.items()},
           "failures": [{"job": r.name, "error": r.error, "log": r.log} for r in outcome.failures]}
    atomic_write_text(path, json.dumps(doc, indent=2) + "\n")
    return path


def load_summary(out_dir: Path) -> dict:
    """The last batch's ``batch_summary.json`` ({} when absent or unreadable)."""
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


# --------------------------------------------------------------------------------------------
# run folders (the one count of epochs done) and executed notebooks
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
    from .. import runfolder as rf     # lazy: torch, for a command that may not need it
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


def epochs_done(job: Job) -> tuple[int, int] | None:
    """(epochs done, epochs asked for) of a job that trains (02, and 01's model); None for 03."""
    state = job_run_state(job)
    if state is None:
        return None
    total = state.epochs or 0
    return (total if state.state == "done" else state.epoch), total


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


# --------------------------------------------------------------------------------------------
# what a batch does with a job: skip, resume, or start it
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


# --------------------------------------------------------------------------------------------
# a local batch's processes
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


def running_jobs(out_dir: Path) -> set[str]:
    """Names of the jobs a local batch on ``out_dir`` is running now: its papermill processes
    (:func:`leftover_processes`) name their ``logs/<job>.params.yaml``."""
    logs = re.escape(str(Path(out_dir) / "logs")) + r"/([A-Za-z0-9_.-]+)\.params\.yaml"
    return {m.group(1) for _, cmd in leftover_processes(out_dir) for m in re.finditer(logs, cmd)}


# --------------------------------------------------------------------------------------------
# the Slurm launcher's records
def slurm_output(cmd: list[str], timeout: float = 60) -> str:
    """The stdout of a Slurm command (``squeue``, ``sinfo``); RuntimeError with its stderr if it fails."""
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout


def squeue_states() -> dict[str, tuple[str, str]]:
    """Slurm job id (array tasks as ``123_4``) -> (state, job name) of this user's jobs that
    slurmctld still knows, finished ones included."""
    user = os.environ.get("USER") or slurm_output(["id", "-un"]).strip()
    out = {}
    for line in slurm_output(["squeue", "-h", "-r", "-t", "all", "-u", user, "-o", "%i|%T|%j"]).splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3:
            out[parts[0]] = (parts[1], parts[2])
    return out


def jobs_file(out_dir: Path) -> Path:
    """``<out>/<experiment>/slurm_jobs.json``: every Slurm submission of the batch."""
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
    """Write ``slurm_jobs.json`` (atomically: a killed driver leaves the old or the new one)."""
    atomic_write_text(jobs_file(out_dir), json.dumps(doc, indent=2) + "\n")


def read_result(record: dict) -> JobResult | None:
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
    if kind == "success" and isinstance(value, JobResult):
        return value
    last = str(value).strip().splitlines()[-1] if str(value).strip() else str(kind)
    return JobResult(record.get("name", "?"), "failed", log=record.get("stderr", ""),
                     error=last, fingerprint=record.get("fingerprint", ""))


def job_state(record: dict, queue: dict[str, tuple[str, str]]) -> str:
    """queued | running | ended (a result to read) | lost (gone from Slurm without a result)."""
    if read_result(record) is not None:
        return "ended"
    entry = queue.get(str(record.get("job_id")))
    if entry and entry[1] == record.get("slurm_name") and entry[0] in ACTIVE_STATES:
        return "queued" if entry[0] in QUEUED_STATES else "running"
    return "lost"


# --------------------------------------------------------------------------------------------
# spat status
def folder_state(out: Path, name: str, epochs: int | None) -> tuple[str, str, RunState | None]:
    """(state, detail, run state) of one job from the experiment folder alone, whichever
    launcher ran it: a run's folder (done / interrupted at epoch k of n / not started), or an
    executed notebook's papermill record (01 also names its model's state)."""
    if name not in (HYPOTHESIS_JOB, ROBUSTNESS_JOB):
        rs = run_state(out / "runs" / name, epochs)
        if rs.state == "done":
            return "done", f"metrics.json of {rs.finished_at}", rs
        return rs.describe(), "", rs
    state, ended = notebook_state(out / NOTEBOOKS["hypothesis" if name == HYPOTHESIS_JOB else "robustness"])
    if state == "done":
        return "done", f"executed, ended {ended}", None
    rs = run_state(out / "hypothesis_model") if name == HYPOTHESIS_JOB else None
    detail = f"its model: {rs.describe()}" if rs is not None and rs.state != "not started" else ""
    return state, detail, rs


def _running(rs: RunState | None) -> str:
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
    exp_file = out / EXPERIMENT_FILE
    if not exp_file.is_file():
        raise ConfigError(f"{out}: no {EXPERIMENT_FILE} (not a spat batch output folder)")
    exp = yaml.safe_load(exp_file.read_text()) or {}
    doc = load_jobs(out)
    summary = (load_summary(out).get("jobs") or {})
    try:
        queue = squeue_states() if doc["jobs"] and shutil.which("squeue") else {}
    except (RuntimeError, subprocess.TimeoutExpired):
        queue = {}
    local = running_jobs(out)
    runs = exp.get("runs") or {}
    names = [HYPOTHESIS_JOB] + list(runs) + [ROBUSTNESS_JOB]
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
        elif (name == HYPOTHESIS_JOB and state == "not started" and not rec and not prev
              and not Path(log_path).exists()):
            continue        # the batch ran with --no-hypothesis
        rows.append(row)
    return rows


def status_lines(rows: list[dict]) -> list[str]:
    """``spat status``'s lines: a job, its state and detail in columns; a failure's log below it."""
    width = max(len(r["job"]) for r in rows)
    state_width = max(len(r["state"]) for r in rows)
    lines = []
    for r in rows:
        line = f"{r['job']:<{width}}  {r['state']:<{state_width}}"
        if r["detail"]:
            line += f"  {r['detail'].splitlines()[0]}"
        line = line.rstrip()
        if r["state"].startswith("failed"):
            line += f"\n{'':<{width}}  log: {r['log']}"
        lines.append(line)
    return lines
