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
from .batch import (DEFAULT_KERNEL, NOTEBOOKS, ROBUSTNESS_JOB, STATUS_EVERY, build_jobs,
                    gpu_count, notebooks_dir, plan_experiment, report_outcome, run_batch)
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
    parser.add_argument("--dry-run", action="store_true", help="validate and list the jobs, run nothing")
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
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(f"{plan.name}: {len(plan.runs)} run(s) -> {plan.out_dir}")
        for job in build_jobs(plan, nb_dir, threads=None, hypothesis=not args.no_hypothesis):
            print(f"  {job.name:<40} {job.notebook.name} -> {job.output}")
        print(f"  {ROBUSTNESS_JOB:<40} {NOTEBOOKS['robustness']} -> {plan.out_dir / NOTEBOOKS['robustness']}")
        return 0
    if args.status:
        return slurm.status_main([str(plan.out_dir)])
    if args.launcher == "slurm":
        return slurm.run_from_cli(plan, args, nb_dir)
    try:
        outcome = run_batch(plan, jobs=jobs, kernel=args.kernel, hypothesis=not args.no_hypothesis,
                            timeout=args.timeout, notebooks=nb_dir,
                            log=lambda s: print(s, flush=True), status_every=args.status_every,
                            command=["spat", "batch", *(sys.argv[1:] if argv is None else argv)])
    except ConfigError as e:            # locked, or the output folder cannot be written
        print(f"error: {e}", file=sys.stderr)
        return 2
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


if __name__ == "__main__":
    sys.exit(cli_main())
