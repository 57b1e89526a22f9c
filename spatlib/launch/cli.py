"""``spat batch`` and ``spat status``: the command lines that plan an experiment, hand it to a
launcher and say what happened.

``spat batch params/<experiment>.yaml [--jobs N] [--only RUN ...] [--set KEY=VALUE ...]``: the local
launcher (:func:`spatlib.launch.local.run_batch`: papermill processes on this machine, ``--jobs``
at a time) is the default; ``--launcher slurm`` hands the same jobs to
:func:`spatlib.launch.slurm.run_slurm_batch`; ``--dry-run`` lists the jobs and what a run would do
to each; ``--status`` (and ``spat status OUT_DIR``) prints every job's state. A locked experiment
folder (another batch running), an unwritable or full output folder, or a bad value is one
``error:`` line and exit status 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, TextIO

from ..config import ConfigError
from .local import DEFAULT_KERNEL, STATUS_EVERY, gpu_count, run_batch
from .plan import (NOTEBOOKS, ROBUSTNESS_JOB, Plan, build_jobs, check_jobs_data, data_lines,
                   notebooks_dir, plan_experiment)
from .slurm import LAUNCHER_KEYS, launcher_config, run_slurm_batch
from .status import SUMMARY, BatchOutcome, load_summary, plan_mark, status_lines, status_rows


def batch_main(argv: list[str] | None = None) -> int:
    """``spat batch``: the exit status (0 all ok, 1 a job failed, 2 refused, 130 interrupted)."""
    parser = argparse.ArgumentParser(
        prog="spat batch",
        description="Execute the notebooks of an experiment with papermill: 01_hypothesis once, "
                    "02_training per run (several at once), then 03_robustness. Reruns skip "
                    "finished jobs and resume unfinished runs.")
    parser.add_argument("params", help="experiment params file, e.g. params/digits.yaml")
    parser.add_argument("--jobs", "-j", type=int, default=None,
                        help="notebooks at once (default: the number of GPUs, else 1)")
    parser.add_argument("--only", nargs="+", action="extend", default=[], metavar="RUN",
                        help="execute only these runs (names as <variant>-<dataset>-s<seed>)")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override every run (train.epochs=2) or a notebook section "
                             "(hypothesis.n_examples=50); validated like the file")
    parser.add_argument("--out", default="outputs", help="output root (default: ./outputs)")
    parser.add_argument("--kernel", default=None,
                        help=f"Jupyter kernel (default: '{DEFAULT_KERNEL}' if registered, else python3)")
    parser.add_argument("--no-hypothesis", action="store_true", help="skip notebook 01")
    parser.add_argument("--timeout", type=float, default=None, help="per-cell timeout in seconds")
    parser.add_argument("--status-every", type=float, default=STATUS_EVERY, metavar="SECONDS",
                        help=f"print a status line (runs done / running with their epoch / queued / "
                             f"failed) every SECONDS (default {STATUS_EVERY:g}; 0: never)")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate, resolve every job's data, and list the jobs with what a run "
                             "would do to each (done (skipped), resume at epoch k of n, new); run nothing")
    add_slurm_arguments(parser)
    args = parser.parse_args(argv)
    if args.jobs is not None and args.jobs < 1:
        parser.error("--jobs: expected an integer >= 1")
    if args.status_every < 0:
        parser.error("--status-every: expected a number of seconds >= 0")
    try:
        plan = plan_experiment(args.params, args.overrides, args.out, args.only or None)
        nb_dir = notebooks_dir()
        jobs = args.jobs if args.jobs is not None else max(1, gpu_count())
    except (ConfigError, FileNotFoundError) as e:
        return error(e)
    if args.dry_run:
        try:
            return dry_run(plan, nb_dir, hypothesis=not args.no_hypothesis)
        except ConfigError as e:
            return error(e)
    if args.status:
        return status_main([str(plan.out_dir)])
    command = ["spat", "batch", *(sys.argv[1:] if argv is None else argv)]
    if args.launcher == "slurm":
        def start() -> BatchOutcome:
            cfg = launcher_config(plan.experiment.launcher, {k: getattr(args, k) for k in LAUNCHER_KEYS})
            return run_slurm_batch(plan, cfg, kernel=args.kernel, hypothesis=not args.no_hypothesis,
                                   notebooks=nb_dir, log=lambda s: print(s, flush=True),
                                   command=command)
        return run_launcher(start, plan, "the Slurm jobs go on; rerun the same command to wait "
                                         "for them (nothing is submitted twice), or "
                                         f"`spat status {plan.out_dir}`")
    return run_launcher(
        lambda: run_batch(plan, jobs=jobs, kernel=args.kernel, hypothesis=not args.no_hypothesis,
                          timeout=args.timeout, notebooks=nb_dir, log=lambda s: print(s, flush=True),
                          status_every=args.status_every, command=command),
        plan, "running notebooks were stopped; rerun the same command to resume")


def add_slurm_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--launcher`` flag and the Slurm settings of ``spat batch`` (named as the params
    file's ``launcher:`` keys, which they override)."""
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


def run_launcher(start: Callable[[], BatchOutcome], plan: Plan, interrupted: str) -> int:
    """Run a launcher (``start``), then the report; a refusal is one ``error:`` line (2), an
    interrupt one line saying what became of the jobs (130), a failed job exit status 1."""
    try:
        outcome = start()
    except ConfigError as e:    # bad data or settings, locked, the output folder cannot be written
        return error(e)
    except OSError as e:        # e.g. the disk filled up mid-batch: one line, no traceback
        print(f"error: cannot write to {e.filename or plan.out_dir}: {e.strerror or e} "
              f"(errno {e.errno}); finished jobs are kept, rerun to resume", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: {interrupted}", file=sys.stderr)
        return 130
    report_outcome(outcome)
    return 1 if outcome.failures else 0


def dry_run(plan: Plan, nb_dir: Path, *, hypothesis: bool = True) -> int:
    """``spat batch --dry-run``: every job's data resolved (ConfigError naming the run and the
    key), then one line per job: what a batch would do to it, its notebook and its output."""
    jobs = build_jobs(plan, nb_dir, threads=None, hypothesis=hypothesis)
    resolved = check_jobs_data(jobs)
    previous = load_summary(plan.out_dir)
    print(f"{plan.name}: {len(plan.runs)} run(s) -> {plan.out_dir}")
    for line in data_lines(resolved, plan.data_origin):
        print(line)
    marks = {job.name: plan_mark(job, previous) for job in jobs}
    marks[ROBUSTNESS_JOB] = "after the runs"
    width = max(len(n) for n in marks)
    mark_width = max(len(m) for m in marks.values())
    for job in jobs:
        print(f"  {job.name:<{width}}  {marks[job.name]:<{mark_width}}  {job.notebook.name} -> {job.output}")
    print(f"  {ROBUSTNESS_JOB:<{width}}  {marks[ROBUSTNESS_JOB]:<{mark_width}}  "
          f"{NOTEBOOKS['robustness']} -> {plan.out_dir / NOTEBOOKS['robustness']}")
    return 0


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
        return error(e)
    for line in status_lines(rows):
        print(line)
    return 1 if any(r["state"].startswith("failed") for r in rows) else 0


def error(e: Exception) -> int:
    """A command's refusal: ``error: ...`` on stderr, a line per problem; exit status 2."""
    for line in str(e).splitlines() or [""]:
        print(f"error: {line}", file=sys.stderr)
    return 2


def report_outcome(outcome: BatchOutcome, out: TextIO | None = None) -> None:
    """The end of a batch (on ``out``, default stdout): the results table, where the report is,
    and the failures."""
    out = out or sys.stdout
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
