"""The benchmark's acceptance targets and their verdicts on a ``spat bench`` result.

The installed library measures and prints figures (``spatlib.device.bench``); what counts as fast
enough is this script's business: ``bench/throughput.py`` prints the verdicts below the figures.
"""
from __future__ import annotations

import math

from spatlib.device.bench import MANY_CLASSES, TOPK
from spatlib.device.machine import read_machine
from spatlib.device.slices import CLASSES

# (figure, comparison, threshold, where it applies)
TARGETS = [
    ("spat_overhead:cam", "<=", 1.15, f"{CLASSES} classes"),
    ("spat_overhead:input_grad", "<=", 1.6, f"{CLASSES} classes"),
    (f"spat_overhead:input_grad:{TOPK}", "<=", 1.6, f"{MANY_CLASSES} classes"),
    ("memory:spat_at:input_grad/pgd_at", "<=", 1.5, f"{CLASSES} classes"),
    ("trainer/reference", ">=", 1.5, "CPU (small_cnn, preact_resnet18)"),
    ("trainer/reference", ">=", 3.0, "GPU"),
    ("images_per_s:pgd_at:preact_resnet18", ">=", 8000.0, "H100, PGD-10"),
    ("images_per_s:pgd_at:wide_resnet", ">=", 1200.0, "H100, PGD-10, WRN-34-10"),
]
CPU_REFERENCE_MODELS = ("small_cnn", "preact_resnet18")


def check_targets(result: dict) -> list[dict]:
    """Each target with the measured figure(s) and whether it is met (None: not measured)."""
    device = result["settings"]["device"]
    cuda = device.startswith("cuda")
    gpu = read_machine(result["machine"]).get("device_name", "") if cuda else ""
    out = []
    for name, op, threshold, where in TARGETS:
        if name == "trainer/reference" and (where == "GPU") != cuda:
            continue
        if name.startswith("images_per_s"):
            if not (cuda and "H100" in gpu):
                out.append({"target": name, "where": where, "threshold": f"{op} {threshold:g}",
                            "measured": None, "met": None,
                            "note": "not measured: needs an H100" if not cuda else f"not an H100 ({gpu})"})
                continue
            _, method, model = name.split(":")
            rows = [r for r in result["rows"] if r["model"] == model and r["method"] == method
                    and r["num_classes"] == CLASSES and r["steps"] == 10]
            values = [(model, r["images_per_s"]) for r in rows]
        else:
            many = where.startswith(str(MANY_CLASSES))
            values = [(r["model"], r["ratio"]) for r in result["ratios"]
                      if r["name"] == name and (r["num_classes"] == MANY_CLASSES) == many
                      and not (name == "trainer/reference" and not cuda
                               and r["model"] not in CPU_REFERENCE_MODELS)]
        for model, v in values:
            met = None if v is None or math.isnan(v) else (v <= threshold if op == "<=" else v >= threshold)
            out.append({"target": name, "where": where, "model": model, "threshold": f"{op} {threshold:g}",
                        "measured": v, "met": met})
        if not values:
            out.append({"target": name, "where": where, "threshold": f"{op} {threshold:g}",
                        "measured": None, "met": None, "note": "not measured in this run"})
    return out


def _f(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def targets_markdown(targets: list[dict]) -> str:
    """The verdicts as a markdown table."""
    lines = ["| target | where | model | threshold | measured | met |", "|---|---|---|---|---|---|"]
    for t in targets:
        met = {True: "yes", False: "**no**", None: t.get("note", "-")}[t["met"]]
        lines.append(f"| {t['target']} | {t['where']} | {t.get('model', '-')} | {t['threshold']} | "
                     f"{_f(t['measured'])} | {met} |")
    return "\n".join(lines) + "\n"
