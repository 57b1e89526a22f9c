"""Trainer throughput, the reference loop, SPAT overhead and peak memory, with the verdicts on
the acceptance targets (bench/targets.py): ``spat bench`` plus the targets.

    python bench/throughput.py                      # this device's defaults (CPU: minutes on 2 cores)
    python bench/throughput.py --models small_cnn --repeats 5
    python bench/throughput.py --device cuda        # all three models, batch 512 (WRN 256), PGD-10

Prints the markdown tables and writes bench/results/<device>.json (+ .md), the targets
included. Every option: ``python bench/throughput.py --help``; the method and the figures:
bench/README.md.
"""
from __future__ import annotations

import sys

from targets import check_targets, targets_markdown

from spatlib import benchmark


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print figures and verdicts, write JSON and markdown."""
    parser = benchmark.build_parser()
    parser.prog = "python bench/throughput.py"
    args = parser.parse_args(argv)
    try:
        result = benchmark.run_benchmark(benchmark.settings_from_args(args),
                                         benchmark.progress_log(args.quiet))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result["targets"] = check_targets(result)
    report = benchmark.markdown_report(result) + "\n" + targets_markdown(result["targets"])
    print(report)
    out = benchmark.write_result(result, report, args.out)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
