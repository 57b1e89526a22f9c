"""``spat train``: one run from a params file into its run folder.

A run params file (a :class:`spatlib.config.RunConfig` YAML) or, with ``--run NAME``, one run
of an experiment file (:func:`spatlib.experiment.run_config_from_params`) is trained by
:func:`spatlib.train.train`, which resumes an unfinished run and returns a finished one as it
is; ``metrics.json`` goes to stdout. Every error is one line on stderr (exit 2: the config,
the data, a checkpoint or the file system; 1: the loss diverged). Under torchrun:
``torchrun --nproc_per_node N -m spatlib.train_cli PARAMS ...``.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path

from . import runfolder as rf
from .config import ConfigError
from .data import DataError
from .experiment import run_config_from_params
from .runfolder import CheckpointError
from .train import TrainingDivergedError, train

__all__ = ["main", "cli_main"]


def _os_error_line(e: OSError, run_dir: Path | None) -> str:
    """One line for a file system error: the path, the reason and its errno name."""
    name = errno.errorcode.get(e.errno, "") if e.errno else ""
    reason = f"{e.strerror or e}" + (f" ({name})" if name else "")
    where = e.filename if e.filename is not None else run_dir
    need = f"; spat train needs a writable run folder ({run_dir})" if run_dir is not None else ""
    return f"error: {where}: {reason}{need}"


def main(argv: list[str] | None = None) -> int:
    """``spat train``: one run from a params file; works under ``torchrun --nproc_per_node N
    -m spatlib.train_cli``."""
    parser = argparse.ArgumentParser(
        prog="spat train",
        description="Train one spat-kit run into a run folder (resumes from its last checkpoint; "
                    "a finished run is returned as it is) and print its metrics.json: training "
                    "facts, no test numbers (spat eval RUN_DIR runs the robustness suite). "
                    "Also run as: python -m spatlib.train_cli.",
        epilog="examples: spat train params/digits.yaml --run pgd_at-digits-s0 --set train.epochs=2\n"
               "          spat train my_run.yaml --run-dir outputs/one-run",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("params", nargs="?",
                        help="an experiment params file (with --run) or one run's params file "
                             "(a RunConfig YAML); defaults when omitted")
    parser.add_argument("--run", metavar="NAME",
                        help="the run of the experiment file to train, e.g. pgd_at-digits-s0")
    parser.add_argument("--run-dir", help="the run folder (with --run, default "
                                          "OUT/<experiment>/runs/<run>: the folder spat batch uses)")
    parser.add_argument("--out", default="outputs",
                        help="output root for the default --run-dir (default: ./outputs, as spat batch)")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[],
                        metavar="KEY=VALUE", help="override params, e.g. train.epochs=2")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bars (default: on a terminal or in a Jupyter kernel; "
                             "without bars, one line per epoch on stderr)")
    args = parser.parse_args(argv)
    if args.run_dir is None and args.run is None:
        parser.error("--run-dir is required (or --run NAME with an experiment file)")
    run_dir = Path(args.run_dir) if args.run_dir is not None else None
    try:
        cfg, experiment = run_config_from_params(args.params, args.overrides, args.run)
        if run_dir is None:
            run_dir = Path(args.out) / experiment / "runs" / args.run
        finished = rf.read_finished_metrics(run_dir)
        metrics = train(cfg, run_dir, progress=args.progress)
        if finished is not None and int(os.environ.get("RANK", "0")) == 0:   # stderr: stdout is JSON
            print(f"already finished (metrics.json of {finished.get('finished_at', '?')}): "
                  f"not retrained", file=sys.stderr)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDivergedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:   # a read-only or full disk, a file where a folder should be
        print(_os_error_line(e, run_dir), file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(metrics, indent=2))
        # metrics.json holds no test numbers: one suite gives them, cached per setting
        print(f"test numbers: spat eval {run_dir} (the robustness suite under the run's eval "
              f"settings, cached in {run_dir / 'eval_<eps>.json'}; notebooks 02 and 03 read the "
              f"same cache)", file=sys.stderr)
    return 0


cli_main = main

if __name__ == "__main__":
    sys.exit(main())
