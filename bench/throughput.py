"""Trainer throughput, the reference loop, SPAT overhead and peak memory: ``spat bench`` as a script.

    python bench/throughput.py                      # this device's defaults (CPU: minutes on 2 cores)
    python bench/throughput.py --models small_cnn --repeats 5
    python bench/throughput.py --device cuda        # all three models, batch 512 (WRN 256), PGD-10

Prints a markdown table and writes bench/results/<device>.json (+ .md). Every option:
``python bench/throughput.py --help``; the method and the figures: bench/README.md.
"""
import sys

from spatlib.benchmark import cli_main

if __name__ == "__main__":
    sys.exit(cli_main())
