"""``spat batch``: the command line that plans an experiment and hands it to a launcher.

The local launcher (:func:`spatlib.batch.run_batch`: papermill processes on this machine,
``--jobs`` at a time) is the default; ``--launcher slurm`` hands the same jobs to
:mod:`spatlib.slurm`. ``--status`` (and ``spat status OUT_DIR``) prints every job's state.
A locked experiment folder (another batch running), an unwritable or full output folder, or a
bad value is one ``error:`` line and exit status 2.
"""
from __future__ import annotations

import argparse
import sys

from . import slurm
from .batch import (DEFAULT_KERNEL, NOTEBOOKS, ROBUSTNESS_JOB, STATUS_EVERY, Plan, build_jobs,
                    check_jobs_data, data_lines, error, gpu_count, load_summary, notebooks_dir,
                    plan_mark, plan_experiment, report_outcome, run_batch)
from .config import ConfigError


def cli_main(argv: list[str] | None = None) -> int:
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
    slurm.add_arguments(parser)     # --launcher and the cluster settings live with the launcher
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
        return slurm.status_main([str(plan.out_dir)])
    if args.launcher == "slurm":
        return slurm.run_from_cli(plan, args, nb_dir)
    try:
        outcome = run_batch(plan, jobs=jobs, kernel=args.kernel, hypothesis=not args.no_hypothesis,
                            timeout=args.timeout, notebooks=nb_dir,
                            log=lambda s: print(s, flush=True), status_every=args.status_every,
                            command=["spat", "batch", *(sys.argv[1:] if argv is None else argv)])
    except ConfigError as e:            # bad data, locked, or the output folder cannot be written
        return error(e)
    except OSError as e:                # e.g. the disk filled up mid-batch: one line, no traceback
        print(f"error: cannot write to {e.filename or plan.out_dir}: {e.strerror or e} "
              f"(errno {e.errno}); finished jobs are kept, rerun to resume", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: running notebooks were stopped; rerun the same command to resume",
              file=sys.stderr)
        return 130
    report_outcome(outcome)
    return 1 if outcome.failures else 0


def dry_run(plan: Plan, nb_dir, *, hypothesis: bool = True) -> int:
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


if __name__ == "__main__":
    sys.exit(cli_main())
