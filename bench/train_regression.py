"""Trainer regression check: the six methods (plus an EMA run and a held-out validation run)
trained for 2 epochs on digits with ``train.deterministic``; prints and writes, per run, the
metrics (timing and provenance fields dropped), the history (timing columns dropped) and the
sha256 of every weight tensor of checkpoint_last.pt and checkpoint_best.pt.

    python bench/train_regression.py OUT.json            # record (e.g. before a refactor)
    python bench/train_regression.py OUT.json --compare BEFORE.json   # and compare: exit 1 on any difference

A refactor of the trainer must leave every figure bit-identical. Under a minute on one CPU core.
Metrics keys and history columns recorded by only one of the two files (a field added or removed
by the change) are listed, not compared; every key and column both hold must agree.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

from spatlib.config import deep_merge, from_dict
from spatlib.train import train

# fields that change from one run to the next by nature (wall clock, machine, code version)
VOLATILE = {"total_time_s", "train_time_s", "images_per_s", "spatlib_version", "git_commit",
            "torch_version", "cuda_version", "device_name", "hostname", "date", "started_at",
            "finished_at", "eval_time_s", "evaluated_at"}
VOLATILE_COLUMNS = {"epoch_time_s", "images_per_s", "wall_time_s"}

BASE = {
    "seed": 3,
    # selection on the 256 test images: what val_size 0 meant before data.val_split existed
    "data": {"name": "digits", "train_limit": 1024, "test_limit": 256, "val_split": "test"},
    "model": {"name": "small_cnn"},
    "attack": {"eps": 0.1, "alpha": 0.04, "steps": 2},
    "train": {"epochs": 2, "batch_size": 64, "lr": 0.1, "schedule": "cosine", "progress": False,
              "deterministic": True, "device": "cpu", "val_steps": 2},
    "eval": {"n_examples": 128},
}
RUNS = {
    "standard": {"train": {"method": "standard"}},
    "pgd_at": {"train": {"method": "pgd_at"}},
    "trades": {"train": {"method": "trades"}},
    "mart": {"train": {"method": "mart"}},
    "spat_at": {"train": {"method": "spat_at"}},
    "spat_trades": {"train": {"method": "spat_trades"}},
    "ema_trades_warmup": {"train": {"method": "trades", "ema": 0.9, "eps_warmup_epochs": 1.0,
                                    "warmup_epochs": 0.5}},
    "val_spat_at_cam": {"data": {"val_size": 64, "val_split": "train"}, "attack": {"saliency": "cam"},
                        "train": {"method": "spat_at", "schedule": "piecewise"}},
}


def weight_hashes(path: Path) -> dict:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    out = {}
    for key in ("model", "ema_model"):
        if ckpt.get(key) is None:
            continue
        h = hashlib.sha256()
        for name, t in ckpt[key].items():
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        out[key] = h.hexdigest()
    return out


def record(folder: Path) -> dict:
    out = {}
    for name, overrides in RUNS.items():
        cfg = from_dict(deep_merge(deep_merge(BASE, {"name": name}), overrides))
        run_dir = folder / name
        metrics = train(cfg, run_dir)
        with open(run_dir / "history.csv") as f:
            history = [{k: v for k, v in row.items() if k not in VOLATILE_COLUMNS}
                       for row in csv.DictReader(f)]
        out[name] = {"metrics": {k: v for k, v in metrics.items() if k not in VOLATILE},
                     "history": history,
                     "last": weight_hashes(run_dir / "checkpoint_last.pt"),
                     "best": weight_hashes(run_dir / "checkpoint_best.pt")}
        print(name, json.dumps(out[name]["metrics"]), out[name]["last"], flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="JSON file the figures are written to")
    p.add_argument("--compare", help="a JSON file from an earlier run: exit 1 unless identical")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="spat-regression-") as tmp:
        result = record(Path(tmp))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.compare:
        before = json.loads(Path(args.compare).read_text())
        bad, only, columns = [], set(), set()
        for run in sorted(set(before) | set(result)):
            old, new = before.get(run, {}), result.get(run, {})
            bad += [f"{run}.{part}" for part in ("last", "best") if old.get(part) != new.get(part)]
            h_old, h_new = old.get("history", []), new.get("history", [])
            c_old, c_new = (set(h[0]) if h else set() for h in (h_old, h_new))
            columns |= {f"{c} ({'before' if c in c_old else 'now'})" for c in c_old ^ c_new}
            shared = c_old & c_new
            if [{c: r[c] for c in shared} for r in h_old] != [{c: r[c] for c in shared} for r in h_new]:
                bad.append(f"{run}.history")
            m_old, m_new = old.get("metrics", {}), new.get("metrics", {})
            only |= {f"{k} ({'before' if k in m_old else 'now'})" for k in set(m_old) ^ set(m_new)}
            bad += [f"{run}.metrics.{k}" for k in sorted(set(m_old) & set(m_new))
                    if m_old[k] != m_new[k]]
        if only:
            print(f"metrics keys in one file only (not compared): {', '.join(sorted(only))}")
        if columns:
            print(f"history columns in one file only (not compared): {', '.join(sorted(columns))}")
        print("identical" if not bad else f"DIFFERENT: {', '.join(bad)}")
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
