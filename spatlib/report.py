"""Results tables and figures: the logic behind notebooks 01, 02 and 03, where tests reach it.

* :func:`evaluate_run` runs the evaluation suite (:func:`spatlib.evaluate.robustness`) and the
  PGD-20 robustness curve on a finished run folder and caches both in ``eval_<eps>.json`` beside
  the checkpoint, keyed by every setting that changes the numbers (and the checkpoint's hash):
  notebook 02 pays for it inside the parallel batch jobs, notebook 03 reads it back for free.
* :func:`collect_results` turns run folders into one tidy row per run; :func:`aggregate` takes
  mean and standard deviation over seeds per (method, dataset, model); :func:`results_table`
  formats them as ``mean ± std`` (percent) beside the published reference rows
  (:func:`load_references`, ``spatlib/references.csv``), marked ``(published)``.
* Figures (seaborn on explicit :class:`matplotlib.figure.Figure` objects, so nothing depends on
  pyplot's global state): robust accuracy vs eps, per-class accuracy heatmap, learning curves,
  and the hypothesis figures of notebook 01 (class evidence maps, shared-pixel weights, PGD vs
  SPAT perturbations, oracle measurements).
* :func:`save_results` writes ``results.csv``, ``results.md`` and ``figures/*.png``.

Accuracies are fractions in [0, 1] in data frames and caches, percent in formatted tables and
figures. Suite accuracies are cascaded (see :mod:`spatlib.evaluate`): the AutoAttack column is
the worst case over the whole suite, at most AutoAttack's standalone number.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import pandas as pd
import torch
from matplotlib.figure import Figure

from .config import EvalConfig, RunConfig, format_eps, from_dict, parse_eps, to_dict
from .evaluate import (ATTACK_LABELS, RobustnessResult, accuracy_vs_eps, result_from_json,
                       result_to_json, robustness)
from .runfolder import (BEST, LAST, eval_cache_path, load_history, load_metrics, load_run_model,
                        read_run_config)

EVAL_FORMAT = "spatlib-eval/1"
ATTACKS = ("clean", "fgsm", "pgd20", "pgd100", "cw", "autoattack")   # suite order (config.SUITE_ATTACKS)
GROUP_KEYS = ["method", "dataset", "model"]
RUN_NAME = re.compile(r"^(?P<variant>.+)-(?P<dataset>[^-]+)-s(?P<seed>-?\d+)$")
REFERENCES_CSV = Path(__file__).with_name("references.csv")
REFERENCE_COLUMNS = ["dataset", "threat_model", "eps", "method", "model", "clean", "robust",
                     "robust_attack", "source", "note"]
MODEL_LABELS = {"small_cnn": "SmallCNN", "preact_resnet18": "PreActResNet-18"}


# --------------------------------------------------------------------------------------------
# small helpers
def _atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file and ``os.replace``: a reader never sees half a cache file."""
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto``: CUDA when available, else CPU (decided at call time, never at import)."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def model_label(cfg: RunConfig) -> str:
    """``WRN-34-10``, ``PreActResNet-18``, ``SmallCNN``: how papers name the architectures."""
    if cfg.model.name == "wide_resnet":
        return f"WRN-{cfg.model.depth}-{cfg.model.width}"
    return MODEL_LABELS.get(cfg.model.name, cfg.model.name)


def split_run_name(name: str, variants: Iterable[str] | None = None) -> dict:
    """``"spat_at-digits-s2"`` -> ``{"variant": "spat_at", "dataset": "digits", "seed": 2}``.

    Runs are named ``<variant>-<dataset>-s<seed>`` (:func:`spatlib.config.expand_experiment`).
    A variant name may itself contain ``-``; ``variants`` (the experiment's variant names)
    settles such names, the longest matching variant first.
    """
    for v in sorted(variants or (), key=len, reverse=True):
        if name.startswith(v + "-"):
            m = re.fullmatch(r"(?P<dataset>.+)-s(?P<seed>-?\d+)", name[len(v) + 1:])
            if m:
                return {"variant": v, "dataset": m["dataset"], "seed": int(m["seed"])}
    m = RUN_NAME.match(name)
    if not m:
        return {"variant": name, "dataset": "", "seed": None}
    return {"variant": m["variant"], "dataset": m["dataset"], "seed": int(m["seed"])}


def describe_dataset(cfg: RunConfig) -> str:
    """One stable line about the data a config trains on (sizes after limits and val split)."""
    from .data import dataset_from_config   # lazy: loading data is the caller's choice
    ds = dataset_from_config(cfg.data)
    n_train, val = len(ds.y_train), cfg.data.val_size
    c, h, w = ds.x_train.shape[1:]
    return (f"{cfg.data.name}: {n_train - val} train + {val} validation + {len(ds.y_test)} test "
            f"images of {c}x{h}x{w}, {ds.num_classes} classes")


# --------------------------------------------------------------------------------------------
# the cached evaluation of one run
@dataclass
class RunEvaluation:
    """A run's suite result at the eval eps and its PGD-20 accuracy-vs-eps curve."""
    run: str
    run_dir: Path
    config: RunConfig
    eval: EvalConfig                   # the settings used (the run's eval section + overrides)
    result: RobustnessResult
    curve: pd.DataFrame                # eps, eps_str, accuracy (fractions)
    class_names: list[str]
    cached: bool                       # read from eval_<eps>.json (no attack ran)
    path: Path                         # the cache file
    seconds: float                     # what computing it cost (when it was computed)


def resolve_eval(cfg: RunConfig, overrides: EvalConfig | Mapping | None = None) -> EvalConfig:
    """The run's ``eval`` section with ``overrides`` (an EvalConfig or a partial dict) on top;
    validated strictly, so a typo'd key raises ConfigError naming it."""
    if isinstance(overrides, EvalConfig):
        return from_dict(to_dict(overrides), EvalConfig)
    merged = {**to_dict(cfg.eval), **dict(overrides or {})}
    return from_dict(merged, EvalConfig)


def eval_eps(cfg: RunConfig, ev: EvalConfig) -> float:
    """The eval budget: ``eval.eps``, or the training attack's eps when it is None."""
    return float(ev.eps if ev.eps is not None else cfg.attack.eps)


def eval_cache_key(run_dir: str | Path, cfg: RunConfig, ev: EvalConfig, which: str = "best") -> dict:
    """Everything the cached numbers depend on: the weights (sha256 of the checkpoint file)
    and every evaluation setting, including the batch size (the attack noise is drawn per batch)."""
    ckpt = Path(run_dir) / (BEST if which == "best" else LAST)
    if not ckpt.is_file():
        raise FileNotFoundError(f"{ckpt}: no checkpoint; the run has not finished an epoch")
    return {"format": EVAL_FORMAT, "which": which, "checkpoint_sha256": _sha256(ckpt),
            "suite": [a for a in ATTACKS if a in ev.suite], "eps": eval_eps(cfg, ev),
            "n_examples": ev.n_examples, "batch_size": ev.batch_size,
            "pgd100_restarts": ev.pgd100_restarts, "cw_steps": ev.cw_steps,
            "eps_curve": [float(e) for e in ev.eps_curve], "seed": cfg.seed}


def _evaluation_from_cache(data: dict, run_dir: Path, cfg: RunConfig, ev: EvalConfig,
                           path: Path, cached: bool) -> RunEvaluation:
    curve = pd.DataFrame(data.get("curve") or [], columns=["eps", "eps_str", "accuracy"])
    return RunEvaluation(run=cfg.name, run_dir=run_dir, config=cfg, eval=ev,
                         result=result_from_json(data["result"]), curve=curve,
                         class_names=list(data.get("class_names") or []), cached=cached,
                         path=path, seconds=float(data.get("seconds", 0.0)))


def evaluate_run(run_dir: str | Path, eval: EvalConfig | Mapping | None = None, *,
                 which: str = "best", device: str | torch.device = "auto",
                 force: bool = False, progress: bool = False) -> RunEvaluation:
    """The suite (and the PGD-20 curve over ``eval.eps_curve``) on a run's test images, cached.

    ``eval``: settings on top of the run's own ``eval`` section (None: the run's). The result
    is read from ``eval_<eps>.json`` in the run folder when its key (:func:`eval_cache_key`)
    matches, else computed on ``device`` and written there; ``force`` recomputes.
    """
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    ev = resolve_eval(cfg, eval)
    eps = eval_eps(cfg, ev)
    key = eval_cache_key(run_dir, cfg, ev, which)
    path = eval_cache_path(run_dir, eps)
    if path.is_file() and not force:
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            data = {}          # a damaged cache is recomputed, not trusted
        if data.get("key") == key:
            return _evaluation_from_cache(data, run_dir, cfg, ev, path, cached=True)

    t0 = time.perf_counter()
    model, _, ds = load_run_model(run_dir, which=which, device=resolve_device(device))
    n = len(ds.y_test) if ev.n_examples is None else min(ev.n_examples, len(ds.y_test))
    x, y = ds.x_test[:n], ds.y_test[:n]
    result = robustness(model, x, y, ev.suite, eps=eps, batch_size=ev.batch_size,
                        pgd100_restarts=ev.pgd100_restarts, cw_steps=ev.cw_steps, seed=cfg.seed,
                        num_classes=ds.num_classes, progress=progress)
    curve = (accuracy_vs_eps(model, x, y, list(ev.eps_curve), batch_size=ev.batch_size, seed=cfg.seed)
             if ev.eps_curve else pd.DataFrame(columns=["eps", "eps_str", "accuracy"]))
    seconds = time.perf_counter() - t0
    data = {"key": key, "run": cfg.name, "class_names": list(ds.class_names), "seconds": seconds,
            "result": result_to_json(result), "curve": curve.to_dict("records")}
    _atomic_write_text(path, json.dumps(data) + "\n")
    return _evaluation_from_cache(data, run_dir, cfg, ev, path, cached=False)


# --------------------------------------------------------------------------------------------
# many runs -> one tidy table
def find_run_dirs(runs_root: str | Path, names: Iterable[str] | None = None) -> list[Path]:
    """Finished run folders (holding metrics.json) under ``runs_root``, in ``names`` order
    when given (missing or unfinished ones left out), else sorted by name."""
    root = Path(runs_root)
    if names is not None:
        dirs = [root / n for n in names]
    else:
        dirs = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    return [d for d in dirs if (d / "metrics.json").is_file()]


@dataclass
class Collected:
    """What :func:`collect_results` gathered: tidy frames plus the evaluations themselves."""
    runs: pd.DataFrame          # one row per run
    curves: pd.DataFrame        # one row per (run, eps)
    per_class: pd.DataFrame     # one row per (run, attack, class)
    evaluations: dict[str, RunEvaluation] = field(default_factory=dict)


def evaluation_row(ev: RunEvaluation, labels: Mapping | None = None) -> dict:
    """One tidy row of a run: labels, settings, suite accuracies (fractions; NaN where the
    suite left the attack out), worst case, and what metrics.json says of training."""
    cfg, r = ev.config, ev.result
    lab = dict(labels or split_run_name(cfg.name))
    metrics = load_metrics(ev.run_dir)
    method = lab.get("variant") or cfg.name
    row = {"run": cfg.name, "method": method, "train_method": cfg.train.method,
           "rule": cfg.attack.rule if cfg.train.method.startswith("spat") else "",
           "dataset": lab.get("dataset") or cfg.data.name, "data": cfg.data.name,
           "model": model_label(cfg), "seed": cfg.seed, "eps": r.eps, "eps_str": r.eps_str,
           "n_examples": r.n}
    for a in ATTACKS:
        row[a] = r.accuracy.get(a, float("nan"))
    row["worst_case"] = r.robust_accuracy
    row["threat_model_ok"] = r.threat_model_ok
    row["eval_seconds"] = ev.seconds
    row["eval_cached"] = ev.cached
    for k in ("best_epoch", "epochs_trained", "train_time_s", "test_clean_acc", "test_pgd20_acc"):
        row[k] = metrics.get(k, float("nan"))
    return row


def collect_results(run_dirs: Iterable[str | Path], eval: EvalConfig | Mapping | None = None, *,
                    labels: Mapping[str, Mapping] | None = None, which: str = "best",
                    device: str | torch.device = "auto", progress: bool = False) -> Collected:
    """Evaluate (cache first) every run folder and gather tidy frames.

    ``labels``: run name -> {variant, dataset, seed} (the batch's experiment.yaml); names are
    parsed with :func:`split_run_name` otherwise.
    """
    rows, curves, per_class, evals = [], [], [], {}
    for d in run_dirs:
        ev = evaluate_run(d, eval, which=which, device=device, progress=progress)
        row = evaluation_row(ev, (labels or {}).get(ev.run))
        rows.append(row)
        evals[ev.run] = ev
        ids = {k: row[k] for k in ("run", "method", "dataset", "model", "seed")}
        for rec in ev.curve.to_dict("records"):
            curves.append({**ids, **rec})
        names = ev.class_names
        for attack, accs in ev.result.per_class.items():
            for k, acc in enumerate(accs):
                per_class.append({**ids, "attack": attack, "class": k,
                                  "class_name": names[k] if k < len(names) else str(k), "accuracy": acc})
    return Collected(runs=pd.DataFrame(rows), curves=pd.DataFrame(curves),
                     per_class=pd.DataFrame(per_class), evaluations=evals)


def aggregate(runs: pd.DataFrame, keys: Sequence[str] = GROUP_KEYS) -> pd.DataFrame:
    """Mean and sample std (ddof 1; NaN for one seed) over seeds, in percent.

    One row per ``keys`` group in order of first appearance, with ``n_seeds``, ``seeds``, ``eps_str``,
    and ``<attack>_mean`` / ``<attack>_std`` for each attack the runs measured, plus
    ``worst_case_mean`` / ``worst_case_std``.
    """
    if runs.empty:
        return pd.DataFrame(columns=[*keys, "n_seeds"])
    cols = [a for a in (*ATTACKS, "worst_case") if a in runs and runs[a].notna().any()]
    out = []
    for group, part in runs.groupby(list(keys), sort=False):
        row = dict(zip(keys, group if isinstance(group, tuple) else (group,)))
        row["eps_str"] = ", ".join(dict.fromkeys(part["eps_str"]))
        row["n_seeds"] = len(part)
        row["seeds"] = ", ".join(str(s) for s in part["seed"])
        for a in cols:
            v = 100 * part[a].astype(float)
            row[f"{a}_mean"] = v.mean()
            row[f"{a}_std"] = v.std(ddof=1) if len(v) > 1 else float("nan")
        out.append(row)
    return pd.DataFrame(out)


def format_mean_std(mean: float, std: float, digits: int = 2) -> str:
    """``"53.10 ± 1.20"``; just the mean when std is NaN (one seed); ``""`` when mean is NaN."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return ""
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


# --------------------------------------------------------------------------------------------
# published reference rows
def load_references(path: str | Path | None = None) -> pd.DataFrame:
    """The published rows readers compare against (``spatlib/references.csv``, with sources).

    Columns: dataset, threat_model, eps, method, model, clean, robust (percent, NaN where the
    source gives none), robust_attack, source, note.
    """
    path = Path(path) if path else REFERENCES_CSV
    df = pd.read_csv(path, dtype={"eps": str}, keep_default_na=False, na_values=[""])
    missing = [c for c in REFERENCE_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}; expected {REFERENCE_COLUMNS}")
    for c in ("clean", "robust"):
        df[c] = pd.to_numeric(df[c])
    return df[REFERENCE_COLUMNS]


def _same_eps(a: str, b: str) -> bool:
    try:
        return math.isclose(parse_eps(a), parse_eps(b), rel_tol=0, abs_tol=2e-4)  # 0.031 ~ 8/255
    except Exception:
        return False


def matching_references(refs: pd.DataFrame, agg: pd.DataFrame) -> pd.DataFrame:
    """Published AutoAttack rows of the datasets and eps that the measured rows cover."""
    if refs is None or refs.empty or agg.empty:
        return refs.iloc[0:0] if refs is not None else pd.DataFrame(columns=REFERENCE_COLUMNS)
    keep = []
    for _, r in refs.iterrows():
        if r["robust_attack"] != "AutoAttack":
            continue
        same = agg[agg["dataset"] == r["dataset"]]
        if any(_same_eps(r["eps"], e) for eps in same["eps_str"] for e in eps.split(", ")):
            keep.append(r)
    return pd.DataFrame(keep, columns=refs.columns)


def results_table(agg: pd.DataFrame, refs: pd.DataFrame | None = None) -> pd.DataFrame:
    """The results table: measured rows (``mean ± std`` percent over seeds) then the
    published AutoAttack rows of the same datasets and eps, marked ``(published)``.

    Columns: Method, Dataset, Model, eps, Clean, FGSM, PGD-20, PGD-100, CW-inf, AutoAttack,
    Seeds, Source. Attacks no measured row ran are left out.
    """
    attacks = [a for a in ATTACKS if f"{a}_mean" in agg]
    rows = []
    for _, r in agg.iterrows():
        row = {"Method": r["method"], "Dataset": r["dataset"], "Model": r["model"], "eps": r["eps_str"]}
        for a in attacks:
            row[ATTACK_LABELS[a]] = format_mean_std(r[f"{a}_mean"], r.get(f"{a}_std", float("nan")))
        row["Seeds"] = str(r["n_seeds"])
        row["Source"] = "measured"
        rows.append(row)
    for _, r in matching_references(refs, agg).iterrows():
        row = {"Method": f"{r['method']} (published)", "Dataset": r["dataset"], "Model": r["model"],
               "eps": r["eps"]}
        for a in attacks:
            row[ATTACK_LABELS[a]] = ""
        if "clean" in attacks:
            row["Clean"] = format_mean_std(r["clean"], float("nan"))
        if "autoattack" in attacks:
            row["AutoAttack"] = format_mean_std(r["robust"], float("nan"))
        row["Seeds"] = ""
        row["Source"] = r["source"]
        rows.append(row)
    return pd.DataFrame(rows)


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub pipe table (no dependency on ``tabulate``); ``|`` in cells is escaped."""
    def cell(v) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        return str(v).replace("|", "\\|").replace("\n", " ")
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def references_table(refs: pd.DataFrame) -> pd.DataFrame:
    """Every published row, formatted for results.md (numbers in percent)."""
    out = refs.copy()
    for c in ("clean", "robust"):
        out[c] = out[c].map(lambda v: "" if pd.isna(v) else f"{v:.2f}")
    return out.rename(columns={"robust_attack": "attack"})


# --------------------------------------------------------------------------------------------
# figures (explicit Figure objects: safe in threads and in a kernel, shown with display(fig))
def _figure(width: float, height: float, nrows: int = 1, ncols: int = 1, **kw):
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def plot_accuracy_vs_eps(curves: pd.DataFrame, title: str | None = None) -> Figure:
    """PGD-20 robust accuracy (%) vs eps, one line per method (mean over seeds, band: ± sd),
    one panel per dataset."""
    import seaborn as sns
    datasets = list(dict.fromkeys(curves["dataset"])) if not curves.empty else [""]
    fig, axes = _figure(5.0 * len(datasets), 3.8, 1, len(datasets))
    for ax, ds in zip(axes[0], datasets):
        part = curves[curves["dataset"] == ds].copy() if not curves.empty else curves
        if part.empty:
            ax.text(0.5, 0.5, "no eps_curve in the eval settings", ha="center", va="center")
            continue
        part["accuracy (%)"] = 100 * part["accuracy"].astype(float)
        sns.lineplot(data=part, x="eps", y="accuracy (%)", hue="method", marker="o",
                     errorbar="sd", ax=ax)
        ax.set_ylim(-2, 102)
        ax.set_title(f"{ds}: PGD-20 accuracy vs eps" if ds else "PGD-20 accuracy vs eps")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig


def per_class_matrix(per_class: pd.DataFrame, attack: str | None = None,
                     dataset: str | None = None) -> pd.DataFrame:
    """method x class accuracy (%) under ``attack`` (default: the last attack of the cascade,
    i.e. the worst case), mean over seeds."""
    df = per_class
    if dataset is not None:
        df = df[df["dataset"] == dataset]
    if attack is None:
        present = [a for a in ATTACKS if a in set(df["attack"])]
        attack = present[-1] if present else None
    df = df[df["attack"] == attack]
    mat = df.pivot_table(index="method", columns="class_name", values="accuracy", aggfunc="mean",
                         sort=False) * 100
    order = list(dict.fromkeys(df.sort_values("class")["class_name"]))
    mat = mat[[c for c in order if c in mat.columns]]
    mat.attrs["attack"] = attack
    return mat


def plot_per_class_heatmap(per_class: pd.DataFrame, attack: str | None = None) -> Figure:
    """Per-class accuracy (%) heatmap, one panel per dataset, methods x classes."""
    import seaborn as sns
    datasets = list(dict.fromkeys(per_class["dataset"])) if not per_class.empty else []
    fig, axes = _figure(max(6.0, 0.55 * 10 + 3), 0.5 * 6 + 1.6, max(1, len(datasets)), 1)
    for ax, ds in zip(axes[:, 0], datasets):
        mat = per_class_matrix(per_class, attack, ds)
        many = mat.shape[1] > 20           # CIFAR-100: 100 columns, numbers would not fit
        sns.heatmap(mat, annot=not many, fmt=".0f", vmin=0, vmax=100, cmap="viridis", ax=ax,
                    cbar_kws={"label": "accuracy (%)"}, xticklabels=not many or "auto")
        label = ATTACK_LABELS.get(mat.attrs["attack"], mat.attrs["attack"])
        ax.set_title(f"{ds}: per-class accuracy, worst case up to {label}")
        ax.set_xlabel("class")
        ax.set_ylabel("")
    return fig


HISTORY_ACC = {"train_clean_acc": ("clean", "train"), "train_adv_acc": ("robust", "train"),
               "val_clean_acc": ("clean", "validation"), "val_robust_acc": ("robust", "validation")}


def learning_curves_long(history: pd.DataFrame) -> pd.DataFrame:
    """history.csv -> long rows (epoch, accuracy %, kind clean|robust, split train|validation).
    Train robust accuracy is on the training attack's examples (eps ramps up with warm-up)."""
    rows = []
    for col, (kind, split) in HISTORY_ACC.items():
        if col in history:
            for e, v in zip(history["epoch"], history[col]):
                if pd.notna(v):
                    rows.append({"epoch": int(e), "accuracy (%)": 100 * float(v), "kind": kind, "split": split})
    return pd.DataFrame(rows, columns=["epoch", "accuracy (%)", "kind", "split"])


def plot_learning_curves(history: pd.DataFrame, title: str | None = None) -> Figure:
    """Clean / robust accuracy (train and validation) and training loss, lr and eps per epoch."""
    import seaborn as sns
    fig, axes = _figure(11, 3.8, 1, 2)
    long = learning_curves_long(history)
    ax = axes[0, 0]
    if not long.empty:
        sns.lineplot(data=long, x="epoch", y="accuracy (%)", hue="kind", style="split", marker="o",
                     markersize=4, ax=ax)
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.set_title("accuracy (robust: PGD at the training eps)")
    ax = axes[0, 1]
    ax.plot(history["epoch"], history["train_loss"], "o-", ms=3, label="train loss", color="C3")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss")
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    twin.plot(history["epoch"], history["lr"], "--", color="C7", label="lr")
    if "eps" in history and history["eps"].max() > 0:
        scale = history["lr"].max() / history["eps"].max()
        twin.plot(history["epoch"], history["eps"] * scale, ":", color="C2", label="eps (scaled)")
    twin.set_ylabel("lr")
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper right", fontsize=8)
    ax.set_title("loss and schedules")
    if title:
        fig.suptitle(title)
    return fig


# --------------------------------------------------------------------------------------------
# writing the results
def results_markdown(table: pd.DataFrame, refs: pd.DataFrame | None, *, experiment: str,
                     runs: pd.DataFrame | None = None, figures: Sequence[str] = ()) -> str:
    """The text of results.md: the table, how to read it, every published row with sources."""
    lines = [f"# Results: {experiment}", "",
             "Accuracy (%) on the test images, mean ± sample std over seeds. Attacks run as a "
             "cascade (each one on the points still robust after the ones before it), so every "
             "column is the accuracy under that attack *and all before it*; the last column is "
             "the worst case per example (for AutoAttack: at most AutoAttack's standalone number). "
             "Rows marked *(published)* are numbers reported elsewhere, not measured here; "
             "their sources are listed below.", ""]
    if runs is not None and not runs.empty:
        n = sorted(set(int(v) for v in runs["n_examples"]))
        lines += [f"Runs: {len(runs)}; test images per run: {', '.join(map(str, n))}; threat-model "
                  f"check passed: {bool(runs['threat_model_ok'].all())}.", ""]
    lines += [to_markdown(table), ""]
    if figures:
        lines += ["## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in figures] + [""]
    if refs is not None and not refs.empty:
        lines += ["## Published reference numbers", "",
                  "Clean and robust accuracy (%) as published; `attack` says what the robust number "
                  "was measured with. Only rows of a dataset and eps measured above join the main table.",
                  "", to_markdown(references_table(refs)), ""]
    return "\n".join(lines)


def save_results(out_dir: str | Path, collected: Collected, agg: pd.DataFrame, table: pd.DataFrame,
                 refs: pd.DataFrame | None, figures: Mapping[str, Figure] | None = None, *,
                 experiment: str = "experiment", dpi: int = 120) -> dict[str, Path]:
    """Write results.csv (aggregated numbers + published rows), runs.csv (one row per run),
    results.md and figures/<name>.png into ``out_dir``; returns the paths."""
    out = Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    fig_files = []
    for name, fig in (figures or {}).items():
        p = out / "figures" / f"{name}.png"
        fig.savefig(p, dpi=dpi)
        paths[f"figure:{name}"] = p
        fig_files.append(f"figures/{name}.png")
    measured = agg.copy()
    measured.insert(0, "source", "measured")
    published = matching_references(refs, agg) if refs is not None else pd.DataFrame()
    pub = pd.DataFrame({"source": "published", "method": published.get("method", []),
                        "dataset": published.get("dataset", []), "model": published.get("model", []),
                        "eps_str": published.get("eps", []), "clean_mean": published.get("clean", []),
                        "autoattack_mean": published.get("robust", []),
                        "reference": published.get("source", [])})
    combined = pd.concat([measured, pub], ignore_index=True) if not pub.empty else measured
    paths["results.csv"] = out / "results.csv"
    combined.to_csv(paths["results.csv"], index=False, quoting=csv.QUOTE_MINIMAL)
    paths["runs.csv"] = out / "runs.csv"
    collected.runs.to_csv(paths["runs.csv"], index=False)
    paths["results.md"] = out / "results.md"
    paths["results.md"].write_text(results_markdown(table, refs, experiment=experiment,
                                                    runs=collected.runs, figures=fig_files))
    return paths


# --------------------------------------------------------------------------------------------
# notebook 01: the hypothesis, shown
def _show_image(ax, img: torch.Tensor, title: str = "", cmap: str = "gray") -> None:
    """img (C, H, W) in [0, 1] (or a map (H, W))."""
    a = img.detach().float().cpu()
    if a.ndim == 3:
        a = a.permute(1, 2, 0)
        a = a[..., 0] if a.shape[-1] == 1 else a.clamp(0, 1)
    ax.imshow(a.numpy(), cmap=cmap if a.ndim == 2 else None, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_examples(x: torch.Tensor, y: torch.Tensor, class_names: Sequence[str],
                  pred: torch.Tensor | None = None, n: int = 10) -> Figure:
    """A row of clean images x (N, C, H, W) in [0, 1] with label (and prediction)."""
    n = min(n, len(x))
    fig, axes = _figure(1.3 * n, 1.7, 1, n)
    for i in range(n):
        title = class_names[int(y[i])]
        if pred is not None:
            title += f" -> {class_names[int(pred[i])]}"
        _show_image(axes[0, i], x[i], title)
    return fig


def plot_evidence_maps(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                       class_names: Sequence[str], saliency: str = "input_grad") -> Figure:
    """For one image x (1, C, H, W): the image and the normalized class evidence map P_k of
    every class (DESIGN.md step 1), the true class marked with *."""
    from .semantics import class_evidence, normalize_maps
    ev = class_evidence(model, x, y, "all", saliency)
    maps = normalize_maps(ev.maps)[0]                       # (K, H, W)
    k = maps.shape[0]
    fig, axes = _figure(1.4 * (k + 1), 1.9, 1, k + 1)
    _show_image(axes[0, 0], x[0], f"image ({class_names[int(y[0])]})")
    for j in range(k):
        cls = int(ev.classes[0, j])
        star = "*" if cls == int(y[0]) else ""
        axes[0, j + 1].imshow(maps[j].cpu().numpy(), cmap="magma", interpolation="nearest")
        axes[0, j + 1].set_title(f"P[{class_names[cls]}]{star}", fontsize=9)
        axes[0, j + 1].set_xticks([])
        axes[0, j + 1].set_yticks([])
    return fig


def plot_shared_pixels(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
                       alpha: float, rules: Sequence[str] = ("intersection", "equality", "random"),
                       saliency: str = "input_grad", seed: int = 0) -> Figure:
    """For one image: the SPAT step weights w of each rule (mean 1, capped at eps/alpha),
    i.e. where SPAT spends its budget; ``random`` is the control."""
    from .semantics import shared_pixel_weights
    fig, axes = _figure(2.2 * (len(rules) + 1), 2.4, 1, len(rules) + 1)
    _show_image(axes[0, 0], x[0], "image")
    for ax, rule in zip(axes[0, 1:], rules):
        g = torch.Generator(device=x.device).manual_seed(seed)
        w = shared_pixel_weights(model, x, y, rule, saliency, eps=eps, alpha=alpha, generator=g)
        im = ax.imshow(w[0].mean(0).cpu().numpy(), cmap="viridis", interpolation="nearest",
                       vmin=0, vmax=eps / alpha)
        ax.set_title(f"w: {rule}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=list(axes[0, 1:]), shrink=0.8, label="step weight")
    return fig


def plot_perturbations(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                       attacks: Mapping[str, object], eps: float, class_names: Sequence[str], *,
                       oracle=None, seed: int = 0) -> Figure:
    """For one image x (1, C, H, W): each attack's x_adv and perturbation delta (red +, blue -),
    titled with the attacked model's prediction and the oracle's. ``attacks``: name ->
    factory(model, eps, generator) (:func:`spatlib.hypothesis.standard_attacks`)."""
    names = list(attacks)
    fig, axes = _figure(2.0 * (len(names) + 1), 4.2, 2, len(names) + 1)
    with torch.no_grad():
        p0 = int(model(x).argmax(1)[0])
    o0 = f", oracle {class_names[int(oracle.predict(x)[0])]}" if oracle is not None else ""
    _show_image(axes[0, 0], x[0], f"clean: {class_names[p0]}{o0}")
    axes[1, 0].axis("off")
    for j, name in enumerate(names, start=1):
        g = torch.Generator(device=x.device).manual_seed(seed)
        x_adv = attacks[name](model, eps, g)(x, y)
        with torch.no_grad():
            p = int(model(x_adv).argmax(1)[0])
        o = f"\noracle {class_names[int(oracle.predict(x_adv)[0])]}" if oracle is not None else ""
        _show_image(axes[0, j], x_adv[0], f"{name}\nmodel {class_names[p]}{o}")
        delta = (x_adv - x)[0].mean(0).cpu().numpy()
        axes[1, j].imshow(delta, cmap="RdBu_r", vmin=-eps, vmax=eps, interpolation="nearest")
        axes[1, j].set_title(f"delta ({format_eps(eps)})", fontsize=9)
        axes[1, j].set_xticks([])
        axes[1, j].set_yticks([])
    return fig


def plot_semantic_report(report: pd.DataFrame) -> Figure:
    """Three panels vs eps, one line per attack: attack success on the model, oracle flip rate
    (95% Wilson interval as error bars) and the class-specific share of the perturbation."""
    import seaborn as sns
    fig, axes = _figure(15, 4.0, 1, 3)
    df = report.copy()
    df["eps"] = df["eps_nominal"].astype(float)
    for ax, (col, label) in zip(axes[0], [("attack_success", "attack success on the model (%)"),
                                          ("oracle_flip_rate", "oracle flip rate (%)"),
                                          ("specific_mass_share", "class-specific share of |delta| (%)")]):
        d = df.assign(value=100 * df[col].astype(float))
        sns.lineplot(data=d, x="eps", y="value", hue="attack", marker="o", ax=ax, errorbar=None)
        if col == "oracle_flip_rate":
            for i, (name, part) in enumerate(d.groupby("attack", sort=False)):
                lo = 100 * (part["oracle_flip_rate"] - part["oracle_flip_ci_low"])
                hi = 100 * (part["oracle_flip_ci_high"] - part["oracle_flip_rate"])
                ax.errorbar(part["eps"], part["value"], yerr=[lo, hi], fmt="none", capsize=3,
                            ecolor=ax.get_lines()[i].get_color() if i < len(ax.get_lines()) else None,
                            alpha=0.6)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax is not axes[0, 0] and ax.get_legend():
            ax.get_legend().remove()
    return fig


def comparison_names(attacks: Sequence[str]) -> tuple[str, str, str | None]:
    """(attack, baseline, control) for :func:`spatlib.hypothesis.compare_attacks`: SPAT's
    default rule (or the first SPAT rule given) against PGD, with the random rule as control."""
    if "pgd" not in attacks:
        raise ValueError(f"attacks: the comparison needs 'pgd' as the baseline, got {list(attacks)}")
    spat = [a for a in attacks if a.startswith("spat_") and a != "spat_random"]
    if not spat:
        raise ValueError(f"attacks: the comparison needs a SPAT rule besides the control, got {list(attacks)}")
    attack = "spat_intersection" if "spat_intersection" in spat else spat[0]
    return attack, "pgd", "spat_random" if "spat_random" in attacks else None


def semantic_summary(report: pd.DataFrame) -> pd.DataFrame:
    """attack x eps table of the measurements a reader compares (percent, one decimal)."""
    cols = {"attack_success": "success %", "oracle_flip_rate": "oracle flips %",
            "oracle_p_drop": "oracle p(y) drop %", "specific_mass_share": "specific share %"}
    df = report.copy()
    for c in cols:
        df[c] = (100 * df[c].astype(float)).round(1)
    df["oracle flips 95% CI"] = [f"[{100 * lo:.1f}, {100 * hi:.1f}]"
                                 for lo, hi in zip(df["oracle_flip_ci_low"], df["oracle_flip_ci_high"])]
    keep = ["attack", "eps_str", *cols, "oracle flips 95% CI", "l2"]
    return df[keep].rename(columns={**cols, "eps_str": "eps", "l2": "mean L2"}).round({"mean L2": 3})


__all__ = ["ATTACKS", "RunEvaluation", "Collected", "evaluate_run", "eval_cache_key", "eval_cache_path",
           "resolve_eval", "collect_results", "find_run_dirs", "aggregate", "results_table",
           "format_mean_std", "load_references", "matching_references", "to_markdown",
           "results_markdown", "save_results", "split_run_name", "read_run_config", "load_history",
           "load_metrics", "describe_dataset", "plot_accuracy_vs_eps", "per_class_matrix",
           "plot_per_class_heatmap", "plot_learning_curves", "learning_curves_long", "plot_examples",
           "plot_evidence_maps", "plot_shared_pixels", "plot_perturbations", "plot_semantic_report",
           "semantic_summary", "comparison_names", "model_label", "resolve_device"]
