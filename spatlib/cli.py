"""The ``spat`` command: ``spat train``, ``spat batch``, ``spat bench``, ``spat eval``, ``spat doctor``.

Each subcommand lives in its module (``module:function``, the function ``cli_main`` when not
named; it takes the arguments after the command and returns the exit status); this file only
dispatches, so that ``spat --help`` stays fast and nothing heavy is imported before it is needed.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("spatlib.train_cli", "train one run from a params file (resumes an unfinished run)"),
    "batch": ("spatlib.launch.cli:batch_main",
              "execute the notebooks for every run of an experiment with papermill"),
    "status": ("spatlib.launch.cli:status_main",
               "state of every job of a batch folder: queued, running, done, failed"),
    "bench": ("spatlib.device.bench", "trainer throughput, SPAT overhead and memory figures"),
    "eval": ("spatlib.cards", "evaluate a run, checkpoint or external model; a JSON result card"),
    "doctor": ("spatlib.device.doctor", "check this machine's training path (PASS/FAIL table, JSON)"),
}


def _usage() -> str:
    lines = ["usage: spat COMMAND [ARGS]   (spat COMMAND --help for its arguments)", "", "commands:"]
    lines += [f"  {name:<6} {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from spatlib import __version__
        print(f"spatlib {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"spat: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, _, function = COMMANDS[name][0].partition(":")
    return int(getattr(importlib.import_module(module), function or "cli_main")(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
