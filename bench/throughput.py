"""Trainer throughput, the reference loop, SPAT overhead and peak memory, with the verdicts on
the acceptance targets (bench/targets.py): ``spat bench`` plus the targets.

    python bench/throughput.py                      # this device's defaults (CPU: minutes on 2 cores)
    python bench/throughput.py --models small_cnn --repeats 5
    python bench/throughput.py --device cuda        # all three models, batch 512 (WRN 256), PGD-10

Prints the markdown tables and writes bench/results/<device>.json (+ .md), the targets
included. Every option: ``python bench/throughput.py --help``; the method and the figures:
docs/benchmarks.md.
"""
from __future__ import annotations

import sys

from targets import check_targets, targets_markdown

from spatlib.device import bench


def judge(result: dict) -> str:
    """The targets' verdicts on ``result`` (added to it as ``targets``), as markdown."""
    result["targets"] = check_targets(result)
    return targets_markdown(result["targets"])


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print figures and verdicts, write JSON and markdown."""
    return bench.cli_main(argv, prog="python bench/throughput.py", judge=judge)


if __name__ == "__main__":
    sys.exit(main())
