"""The local launcher: an experiment's jobs as papermill processes on this machine, several at once.

:func:`run_batch` executes a :class:`~spatlib.launch.plan.Plan`:

1. Every job's data is resolved first (:func:`spatlib.launch.plan.check_jobs_data`), then the
   experiment folder is created and locked: one batch per experiment folder,
   ``<out>/<experiment>/.batch.lock`` (``fcntl.flock``, held for the batch's life, naming its
   holder) makes a second batch fail at once (:class:`BatchLocked`); a folder that cannot be
   written is one line (:class:`OutputNotWritable`).
2. Jobs run in separate ``python -m papermill`` processes (a crashed kernel cannot take the batch
   down), ``--jobs`` at a time: 01_hypothesis once, 02_training once per run, then 03_robustness
   on the runs that finished. On CPU each job gets ``cpu_count // jobs`` threads (more would
   oversubscribe the cores: tiny-model attacks get several times slower); on CUDA each job holds
   one GPU of its own (``CUDA_VISIBLE_DEVICES``) while it runs, so ``--jobs`` is capped at the
   GPU count, and a finished job hands its GPU to the next.
3. Every job dies with the batch, even under SIGKILL: papermill gets ``PR_SET_PDEATHSIG`` and its
   kernel's parent poller ends the kernel within a second; a rerun waits for such leftovers
   first (found by the batch folder their environment names).
4. A failed job is recorded and the others go on; the failures are listed at the end and the
   exit status is 1. A rerun skips the jobs that finished with the same parameters and resumes
   the others (:mod:`spatlib.launch.status`: the trainer continues from its last checkpoint,
   evaluations are cached); each job's log keeps every attempt.
5. Every ``status_every`` seconds one line (:class:`Progress`) tells runs done / running (with
   their epoch) / queued / failed.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import errno
import fcntl
import json
import os
import queue
import shlex
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import yaml

from ..config import ConfigError
from ..util import cpu_count, utc_now
from .plan import (Job, JobResult, Plan, build_jobs, check_jobs_data, data_lines, notebooks_dir,
                   robustness_job, write_experiment_file)
from .status import (BATCH_DIR_ENV, BatchOutcome, epochs_done, is_done, leftover_processes,
                     load_summary, skipped_result, start_line, log_line)

DEFAULT_KERNEL = "spat"       # registered by `make` inside the venv; python3 otherwise
LOG_TAIL_LINES = 15
LOCK_FILE = ".batch.lock"
# test hook: pretend this many CUDA devices exist (placement is tested on machines without one)
FAKE_GPUS_ENV = "SPAT_FAKE_GPUS"
STATUS_EVERY = 30.0
LEFTOVER_WAIT = 15.0


# --------------------------------------------------------------------------------------------
# this machine
def kernel_name(preferred: str = DEFAULT_KERNEL) -> str:
    """``preferred`` when jupyter_client's KernelSpecManager knows it, else ``python3``."""
    try:
        from jupyter_client.kernelspec import KernelSpecManager
        if preferred in KernelSpecManager().find_kernel_specs():
            return preferred
    except Exception:   # a broken jupyter install must not stop the batch from trying python3
        pass
    return "python3"


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


# --------------------------------------------------------------------------------------------
# one job: a papermill process that dies with the batch
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


# --------------------------------------------------------------------------------------------
# several jobs at once, one GPU each
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
# the whole batch
class Progress:
    """The state of every job of a batch (queued, running, done, failed, skipped) and the one
    status line :func:`run_batch` prints every ``status_every`` seconds."""

    def __init__(self):
        self.lock = threading.Lock()
        self.state: dict[str, str] = {}
        self.jobs: dict[str, Job] = {}
        self.t0 = time.perf_counter()

    def queued(self, job: Job) -> None:
        self._set(job.name, "queued", job)

    def skipped(self, name: str) -> None:
        self._set(name, "skipped")

    def started(self, job: Job) -> None:
        self._set(job.name, "running", job)

    def finished(self, res: JobResult) -> None:
        self._set(res.name, "failed" if res.status == "failed" else "done")

    def _set(self, name: str, state: str, job: Job | None = None) -> None:
        with self.lock:    # the pool's threads report while the ticker reads
            if job is not None:
                self.jobs[name] = job
            self.state[name] = state

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


def run_batch(plan: Plan, *, jobs: int = 1, kernel: str | None = None, hypothesis: bool = True,
              timeout: float | None = None, notebooks: Path | None = None,
              log: Callable[[str], None] = print, status_every: float | None = STATUS_EVERY,
              gpus: list[int] | None = None, command: list[str] | None = None) -> BatchOutcome:
    """Execute the plan (see the module doc); returns what happened to every job.

    Before any notebook runs, the experiment folder is created and locked (BatchLocked when
    another batch holds it, OutputNotWritable when it cannot be written). ``gpus`` (default:
    every visible device, :func:`gpu_count`) are handed one per running job; ``status_every``
    seconds between status lines (None or 0: none); ``command`` goes into the lock file."""
    outcome = BatchOutcome(plan)
    nb_dir = notebooks or notebooks_dir()
    gpus = list(range(gpu_count())) if gpus is None else list(gpus)
    n_parallel = min(max(1, jobs), len(gpus)) if gpus else max(1, jobs)
    threads = None if gpus else max(1, cpu_count() // n_parallel)
    batch_jobs = build_jobs(plan, nb_dir, threads=threads, hypothesis=hypothesis)
    # every job's data resolved before the folder is touched: a missing file is one line now
    data = check_jobs_data(batch_jobs)
    kernel = kernel or kernel_name()
    with lock_experiment(plan.out_dir, command):
        wait_for_leftovers(plan.out_dir)
        previous = load_summary(plan.out_dir)
        try:
            write_experiment_file(plan)
            (plan.out_dir / "logs").mkdir(exist_ok=True)
        except OSError as e:
            raise not_writable(plan.out_dir, e) from None
        progress = Progress()
        todo = []
        for job in batch_jobs:
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
            log(outcome.record(res, f"{done[0]}/{len(todo)}"))

        try:
            run_jobs(todo, n_parallel=n_parallel, kernel=kernel, threads=threads, gpus=gpus,
                     timeout=timeout, on_done=on_done, on_start=progress.started,
                     batch_dir=plan.out_dir)
            finished_runs = plan.finished_runs()
            if finished_runs:
                job = robustness_job(plan, nb_dir, threads=None if gpus else cpu_count())
                progress.queued(job)
                log(f"03_robustness on {len(finished_runs)} finished run(s) ...")
                res = run_jobs([job], n_parallel=1, kernel=kernel, threads=cpu_count(), gpus=gpus[:1],
                               timeout=timeout, on_start=progress.started, on_done=progress.finished,
                               batch_dir=plan.out_dir)[0]
                log(outcome.record(res, "03"))
            else:
                log("no run finished: 03_robustness not executed")
        finally:
            stop.set()
        outcome.finish()
    return outcome

