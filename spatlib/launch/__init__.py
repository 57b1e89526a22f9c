"""``spat batch`` and ``spat status``: an experiment's notebooks as jobs, run here or on Slurm.

One job per module, in import order: :mod:`~spatlib.launch.plan` (the experiment's jobs and
notebook parameters, the data checks before any work), :mod:`~spatlib.launch.status` (the state
of every job, read from the experiment folder and the launchers' records), :mod:`~spatlib.launch.local`
(the local launcher), :mod:`~spatlib.launch.slurm` (the Slurm launcher, through submitit) and
:mod:`~spatlib.launch.cli` (the command lines). The names below are the ones notebooks and
scripts call::

    from spatlib import launch
    plan = launch.plan_experiment("params/smoke.yaml", ["train.epochs=1"])
    outcome = launch.run_batch(plan, jobs=2)          # or launch.run_slurm_batch(plan, cfg)
    launch.status_rows(plan.out_dir)
"""
from .local import run_batch
from .plan import (Job, JobResult, Plan, build_jobs, check_jobs_data, plan_experiment,
                   train_missing_runs, write_experiment_file)
from .slurm import LauncherConfig, launcher_config, run_slurm_batch
from .status import BatchOutcome, RunState, run_state, status_rows

__all__ = ["BatchOutcome", "Job", "JobResult", "LauncherConfig", "Plan", "RunState", "build_jobs",
           "check_jobs_data", "launcher_config", "plan_experiment", "run_batch", "run_slurm_batch",
           "run_state", "status_rows", "train_missing_runs", "write_experiment_file"]
