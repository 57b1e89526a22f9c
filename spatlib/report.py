"""The evaluated runs of an experiment and their tables: notebooks 02 and 03's logic.

* :func:`evaluate_run` runs the evaluation suite (:func:`spatlib.evaluate.robustness`) and the
  PGD-20 robustness curve on a finished run folder and caches both in ``eval_<eps>.json`` beside
  the checkpoint, keyed by every setting that changes the numbers, the checkpoint's hash and a
  fingerprint of the code that computes them (:func:`eval_code`): notebook 02 pays for it
  inside the parallel batch jobs, notebook 03 reads it back for free. These are a run's only
  test numbers (its metrics.json holds training facts).
* :func:`collect_results` turns run folders into one tidy row per run; :func:`aggregate` takes
  mean and standard deviation over seeds per (method, dataset, model); :func:`results_table`
  formats them as ``mean ± std`` (percent) beside the published reference rows
  (:func:`load_references`, ``spatlib/references.csv``), marked ``(published)``. Rows of
  other origins (``spatlib.cards.card_row``: a result card of a model the kit did not train)
  carry a ``source`` column: each source is a group of its own, and the table's Source.
* :func:`save_results` writes ``results.csv``, ``results.md`` and the figures it is given
  (drawn by :mod:`spatlib.figures`) as ``figures/*.png``.

Accuracies are fractions in [0, 1] in data frames and caches, percent in formatted tables and
figures. Suite accuracies are cascaded (see :mod:`spatlib.evaluate`): the AutoAttack column is
the worst case over the whole suite, at most AutoAttack's standalone number.
"""
from __future__ import annotations

import csv
import importlib.metadata
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import pandas as pd
import torch
from matplotlib.figure import Figure

from .config import SUITE_ATTACKS, EvalConfig, RunConfig, from_dict, parse_eps, to_dict
from .evaluate import (ATTACK_LABELS, RobustnessResult, accuracy_vs_eps, result_from_json,
                       result_to_json, robustness)
from .experiment import split_run_name
from .data import selection_label
from .util import atomic_write_text, code_fingerprint, resolve_device, sha256_file
from .runfolder import (BEST, LAST, eval_cache_path, load_history, load_metrics, load_run_model,
                        read_run_config)

EVAL_FORMAT = "spatlib-eval/2"   # 2: the key holds the code fingerprint (eval_code)
# The code behind a cached evaluation (util.code_fingerprint follows what these use): the suite,
# the attacks and what they import, the models, and the path from the run folder to the numbers
# (compute_evaluation: the weights, the test images). Not the cache's own machinery (its key,
# reader, messages): editing those keeps the numbers. config is not followed: its settings enter
# the key as values (the eval settings, the checkpoint's resolved config), not as code.
EVAL_CODE = (("evaluate", None), ("attacks", None), ("semantics", None), ("models", None),
             ("report", "compute_evaluation"))
EVAL_CODE_SKIP = ("config",)
ATTACKS = SUITE_ATTACKS      # the suite's order, defined once in config
GROUP_KEYS = ["method", "dataset", "model"]
MEASURED = "measured"        # the source of the rows of run folders (evaluation_row)
REFERENCES_CSV = Path(__file__).with_name("references.csv")
REFERENCE_COLUMNS = ["dataset", "threat_model", "eps", "method", "model", "clean", "robust",
                     "robust_attack", "source", "note", "selection", "selection_source"]
MODEL_LABELS = {"small_cnn": "SmallCNN", "preact_resnet18": "PreActResNet-18"}


# --------------------------------------------------------------------------------------------
# small helpers
def model_label(cfg: RunConfig) -> str:
    """``WRN-34-10``, ``PreActResNet-18``, ``SmallCNN``: how papers name the architectures."""
    if cfg.model.name == "wide_resnet":
        return f"WRN-{cfg.model.depth}-{cfg.model.width}"
    return MODEL_LABELS.get(cfg.model.name, cfg.model.name)


def describe_dataset(cfg: RunConfig) -> str:
    """One stable line about the data a config trains on (sizes after limits and val split;
    validation on test images is named as such)."""
    from .data import dataset_from_config, select_validation   # lazy: loading data is the caller's choice
    ds = dataset_from_config(cfg.data)
    val = select_validation(cfg.data, ds, cfg.seed)
    c, h, w = ds.x_train.shape[1:]
    where = "validation" if val.split == "train" else "validation (TEST images: optimistic)"
    return (f"{cfg.data.name}: {len(val.train_index)} train + {len(val.index)} {where} + "
            f"{len(ds.y_test)} test images of {c}x{h}x{w}, {ds.num_classes} classes")


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


def resolve_eval(cfg: RunConfig, overrides: EvalConfig | Mapping | None = None,
                 base: EvalConfig | None = None) -> EvalConfig:
    """``base`` (default: the run's saved ``eval`` section) with ``overrides`` (an EvalConfig or
    a partial dict) on top; validated strictly, so a typo'd key raises ConfigError naming it.

    ``base`` is how an experiment's *current* eval settings win over those the run was trained
    with (evaluation settings change what is measured, never the weights)."""
    if isinstance(overrides, EvalConfig):
        return from_dict(to_dict(overrides), EvalConfig)
    merged = {**to_dict(base if base is not None else cfg.eval), **dict(overrides or {})}
    return from_dict(merged, EvalConfig)


def eval_code(suite: Sequence[str]) -> dict[str, str]:
    """The code a suite's numbers come from: an AST hash per module of what :data:`EVAL_CODE`
    runs (:func:`spatlib.util.code_fingerprint`: a docstring or comment edit keeps it), the
    torch version, and pyautoattack's when the suite runs AutoAttack."""
    code = code_fingerprint(EVAL_CODE, skip=EVAL_CODE_SKIP)
    code["torch"] = str(torch.__version__)
    if "autoattack" in suite:
        try:
            code["pyautoattack"] = importlib.metadata.version("pyautoattack")
        except importlib.metadata.PackageNotFoundError:
            code["pyautoattack"] = "not installed"
    return code


def eval_cache_key(run_dir: str | Path, cfg: RunConfig, ev: EvalConfig, which: str = "best") -> dict:
    """Everything the cached numbers depend on: the weights (sha256 of the checkpoint file),
    every evaluation setting, including the batch size (the attack noise is drawn per batch),
    and the code that computes them (:func:`eval_code`)."""
    ckpt = Path(run_dir) / (BEST if which == "best" else LAST)
    if not ckpt.is_file():
        raise FileNotFoundError(f"{ckpt}: no checkpoint; the run has not finished an epoch")
    suite = [a for a in ATTACKS if a in ev.suite]
    return {"format": EVAL_FORMAT, "which": which, "checkpoint_sha256": sha256_file(ckpt),
            "suite": suite, "eps": cfg.eval_eps(ev),
            "n_examples": ev.n_examples, "batch_size": ev.batch_size,
            "pgd100_restarts": ev.pgd100_restarts, "cw_steps": ev.cw_steps,
            "eps_curve": [float(e) for e in ev.eps_curve], "seed": cfg.seed,
            "code": eval_code(suite)}


def cache_mismatch(saved: Mapping | None, key: Mapping) -> str | None:
    """Why a cache keyed ``saved`` cannot stand for ``key`` (:func:`eval_cache_key`), in a few
    words (``code changed (attacks.py)``, ``weights changed``, ``settings changed: n_examples
    150 -> 50``; several joined by ``; ``); None when it can."""
    if not isinstance(saved, Mapping):
        return "unreadable"
    if saved.get("format") != key["format"]:
        return f"written by other code (format {saved.get('format')!r}, now {key['format']!r})"
    why = []
    if saved.get("checkpoint_sha256") != key["checkpoint_sha256"]:
        why.append("weights changed")
    old_code, new_code = saved.get("code") or {}, key["code"]
    changed = [k for k in sorted(set(old_code) | set(new_code)) if old_code.get(k) != new_code.get(k)]
    if changed:
        why.append("code changed (" + ", ".join(
            k if k.endswith(".py") else f"{k} {old_code.get(k)} -> {new_code.get(k)}"
            for k in changed) + ")")
    settings = [f"{k} {saved.get(k)} -> {key[k]}" for k in key
                if k not in ("format", "checkpoint_sha256", "code") and saved.get(k) != key[k]]
    if settings:
        why.append("settings changed: " + ", ".join(settings))
    return "; ".join(why) or None


def read_cache(path: Path, key: Mapping) -> tuple[dict | None, str | None]:
    """(the cache at ``path`` when its key is ``key``, else None; why it is not, or None when
    there is no file at all)."""
    if not path.is_file():
        return None, None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, "unreadable (not JSON)"
    reason = cache_mismatch(data.get("key") if isinstance(data, dict) else None, key)
    return (data, None) if reason is None else (None, reason)


def _evaluation_from_cache(data: dict, run_dir: Path, cfg: RunConfig, ev: EvalConfig,
                           path: Path, cached: bool) -> RunEvaluation:
    curve = pd.DataFrame(data.get("curve") or [], columns=["eps", "eps_str", "accuracy"])
    return RunEvaluation(run=cfg.name, run_dir=run_dir, config=cfg, eval=ev,
                         result=result_from_json(data["result"]), curve=curve,
                         class_names=list(data.get("class_names") or []), cached=cached,
                         path=path, seconds=float(data.get("seconds", 0.0)))


def evaluate_run(run_dir: str | Path, eval: EvalConfig | Mapping | None = None, *,
                 which: str = "best", device: str | torch.device = "auto",
                 force: bool = False, progress: bool = False,
                 base: EvalConfig | None = None) -> RunEvaluation:
    """The suite (and the PGD-20 curve over ``eval.eps_curve``) on a run's test images, cached.

    ``eval``: settings on top of ``base`` (default: the run's own ``eval`` section). The result
    is read from ``eval_<eps>.json`` in the run folder when its key (:func:`eval_cache_key`:
    the weights, the settings and the code) matches, else computed on ``device`` and written
    there, with one printed line saying why an existing cache was not used
    (:func:`cache_mismatch`); ``force`` recomputes.
    """
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    ev = resolve_eval(cfg, eval, base)
    eps = cfg.eval_eps(ev)
    key = eval_cache_key(run_dir, cfg, ev, which)
    path = eval_cache_path(run_dir, eps)
    if not force:
        data, reason = read_cache(path, key)
        if data is not None:
            return _evaluation_from_cache(data, run_dir, cfg, ev, path, cached=True)
        if reason is not None:   # a damaged or stale cache is recomputed, never trusted
            print(f"{run_dir.name}/{path.name}: recomputed: {reason}", flush=True)

    t0 = time.perf_counter()
    numbers = compute_evaluation(run_dir, cfg, ev, which=which, device=device, progress=progress)
    data = {"key": key, "run": cfg.name, "class_names": numbers["class_names"],
            "seconds": time.perf_counter() - t0, "result": numbers["result"], "curve": numbers["curve"]}
    atomic_write_text(path, json.dumps(data) + "\n", fsync=False)   # a cache: recomputable
    return _evaluation_from_cache(data, run_dir, cfg, ev, path, cached=False)


def compute_evaluation(run_dir: Path, cfg: RunConfig, ev: EvalConfig, *, which: str = "best",
                       device: str | torch.device = "auto", progress: bool = False) -> dict:
    """What a cache entry of :func:`evaluate_run` holds, computed (no cache read or written):
    ``class_names``, ``result`` (:func:`spatlib.evaluate.result_to_json`) and ``curve``. The
    root of :data:`EVAL_CODE`."""
    model, _, ds = load_run_model(run_dir, which=which, device=resolve_device(device))
    n = len(ds.y_test) if ev.n_examples is None else min(ev.n_examples, len(ds.y_test))
    x, y = ds.x_test[:n], ds.y_test[:n]
    eps = cfg.eval_eps(ev)
    result = robustness(model, x, y, ev.suite, eps=eps, batch_size=ev.batch_size,
                        pgd100_restarts=ev.pgd100_restarts, cw_steps=ev.cw_steps, seed=cfg.seed,
                        num_classes=ds.num_classes, progress=progress)
    curve = (accuracy_vs_eps(model, x, y, list(ev.eps_curve), batch_size=ev.batch_size, seed=cfg.seed)
             if ev.eps_curve else pd.DataFrame(columns=["eps", "eps_str", "accuracy"]))
    return {"class_names": list(ds.class_names), "result": result_to_json(result),
            "curve": curve.to_dict("records")}


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
    suite left the attack out), worst case, and what metrics.json says of training (where
    its checkpoint was selected: ``selection``, :func:`spatlib.data.selection_label`). The
    suite's numbers are the run's only test numbers."""
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
    row["source"] = MEASURED
    row["selection"] = selection_label(metrics.get("val_source"), metrics.get("n_val"))
    for k in ("best_epoch", "epochs_trained", "train_time_s"):
        row[k] = metrics.get(k, float("nan"))
    row.update(manipulation_check(ev.run_dir, cfg))
    return row


def manipulation_check(run_dir: str | Path, cfg: RunConfig) -> dict:
    """A run's manipulation check from its history.csv: ``shared_share`` (the share of its
    training examples' |delta| on shared pixels) and ``shared_share_pgd`` (PGD's on the same
    batches), each the mean over the epochs after the eps warm-up (every epoch when none
    reaches past it), and ``budget`` (SPAT's budget shape; "" for the other methods). NaN where
    the run measured none (clean training, ``train.share_every: 0``, a run of an older release)."""
    out = {"budget": cfg.attack.budget if cfg.train.method.startswith("spat") else "",
           "shared_share": float("nan"), "shared_share_pgd": float("nan")}
    try:
        history = load_history(run_dir)
    except FileNotFoundError:
        return out
    if "shared_share" not in history or not history["shared_share"].notna().any():
        return out
    late = history[history["epoch"] > cfg.train.eps_warmup_epochs]
    late = late if late["shared_share"].notna().any() else history
    out["shared_share"] = float(late["shared_share"].mean())
    out["shared_share_pgd"] = float(late["shared_share_pgd"].mean())
    return out


def collect_results(run_dirs: Iterable[str | Path], eval: EvalConfig | Mapping | None = None, *,
                    labels: Mapping[str, Mapping] | None = None, which: str = "best",
                    device: str | torch.device = "auto", progress: bool = False,
                    configs: Mapping[str, RunConfig] | None = None) -> Collected:
    """Evaluate (cache first) every run folder and gather tidy frames.

    ``labels``: run name -> {variant, dataset, seed} (the batch's experiment.yaml); names are
    parsed with :func:`split_run_name` otherwise. ``configs``: run name -> the experiment's
    current RunConfig, whose ``eval`` section is then the base (the batch passes its plan, so
    ``--set eval.n_examples=50`` on finished runs re-evaluates them; it never retrains).
    """
    rows, curves, per_class, evals = [], [], [], {}
    for d in run_dirs:
        current = (configs or {}).get(Path(d).name)
        ev = evaluate_run(d, eval, which=which, device=device, progress=progress,
                          base=current.eval if current is not None else None)
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
    ``worst_case_mean`` / ``worst_case_std``, ``selection`` (where the runs' checkpoints
    were selected, each wording once) when ``runs`` has it, and the manipulation check
    ``shared_share_mean`` / ``shared_share_pgd_mean`` (percent) where the runs measured it. When ``runs`` has a ``source`` column (every
    :func:`evaluation_row` and ``spatlib.cards.card_row`` has), ``source`` is a key too, so a
    result card never averages with a run.
    """
    if runs.empty:
        return pd.DataFrame(columns=[*keys, "n_seeds"])
    if "source" in runs and "source" not in keys:
        keys = [*keys, "source"]
    cols = [a for a in (*ATTACKS, "worst_case") if a in runs and runs[a].notna().any()]
    out = []
    for group, part in runs.groupby(list(keys), sort=False):
        row = dict(zip(keys, group if isinstance(group, tuple) else (group,)))
        row["eps_str"] = ", ".join(dict.fromkeys(part["eps_str"]))
        row["n_examples"] = ", ".join(str(int(n)) for n in dict.fromkeys(part["n_examples"]))
        row["n_seeds"] = len(part)
        row["seeds"] = ", ".join(str(s) for s in part["seed"])
        if "selection" in part:    # how the rows' checkpoints were chosen (results_table's Selected on)
            row["selection"] = ", ".join(dict.fromkeys(part["selection"].fillna("").astype(str)))
        if "shared_share" in part and part["shared_share"].notna().any():
            row["shared_share_mean"] = 100 * float(part["shared_share"].mean())
            row["shared_share_pgd_mean"] = 100 * float(part["shared_share_pgd"].mean())
        for a in cols:
            v = 100 * part[a].astype(float)
            row[f"{a}_mean"] = v.mean()
            row[f"{a}_std"] = v.std(ddof=1) if len(v) > 1 else float("nan")
        out.append(row)
    return pd.DataFrame(out)


SHARED_COLUMN = "Shared share % (x PGD)"   # the results table's manipulation-check column


def format_shared_share(share: float, pgd: float) -> str:
    """``"28.1 (1.61x PGD)"``: a method's shared share of |delta| (percent) and its ratio to
    PGD's on the same batches; ``"18.4 (PGD)"`` when the two are one; ``""`` when not measured."""
    if share is None or math.isnan(share):
        return ""
    if pgd is None or math.isnan(pgd) or pgd <= 0:
        return f"{share:.1f}"
    if abs(share - pgd) < 1e-9:
        return f"{share:.1f} (PGD)"
    return f"{share:.1f} ({share / pgd:.2f}x PGD)"


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
    source gives none), robust_attack, source, note, selection (how the published checkpoint was
    chosen: ``test PGD-20`` where the authors' code keeps the epoch of best test-set PGD-20
    accuracy, ``not stated`` where neither their code nor their README says) and
    selection_source (where that is written).
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

    Columns: Method, Dataset, Model, eps, Images (test images each run was evaluated on),
    Clean, FGSM, PGD-20, PGD-100, CW-inf, AutoAttack, Seeds, the manipulation check where runs
    measured it (:data:`SHARED_COLUMN`: ``28.1 (1.61x PGD)``, the share of the training
    examples' |delta| on shared pixels and its ratio to PGD's on the same batches), Selected on
    (how the checkpoint was chosen: a published row's ``selection``, a measured row's
    ``selection`` when its runs carry one), Source (``measured``, or the ``source`` of a row
    that is not a run's, e.g. ``card: FILE``). Attacks no measured row ran are left out.
    """
    attacks = [a for a in ATTACKS if f"{a}_mean" in agg]
    check = "shared_share_mean" in agg and agg["shared_share_mean"].notna().any()
    rows = []
    for _, r in agg.iterrows():
        row = {"Method": r["method"], "Dataset": r["dataset"], "Model": r["model"], "eps": r["eps_str"],
               "Images": r.get("n_examples", "")}
        for a in attacks:
            row[ATTACK_LABELS[a]] = format_mean_std(r[f"{a}_mean"], r.get(f"{a}_std", float("nan")))
        row["Seeds"] = str(r["n_seeds"])
        if check:
            row[SHARED_COLUMN] = format_shared_share(r.get("shared_share_mean", float("nan")),
                                                     r.get("shared_share_pgd_mean", float("nan")))
        row["Selected on"] = r.get("selection", "")
        row["Source"] = r.get("source", MEASURED)
        rows.append(row)
    for _, r in matching_references(refs, agg).iterrows():
        row = {"Method": f"{r['method']} (published)", "Dataset": r["dataset"], "Model": r["model"],
               "eps": r["eps"], "Images": "full test set"}
        for a in attacks:
            row[ATTACK_LABELS[a]] = ""
        if "clean" in attacks:
            row["Clean"] = format_mean_std(r["clean"], float("nan"))
        if "autoattack" in attacks:
            row["AutoAttack"] = format_mean_std(r["robust"], float("nan"))
        row["Seeds"] = ""
        if check:
            row[SHARED_COLUMN] = ""
        row["Selected on"] = r["selection"]
        row["Source"] = r["source"]
        rows.append(row)
    return pd.DataFrame(rows)


def selected_on_test(frame: pd.DataFrame) -> bool:
    """True when a row of ``frame`` (runs or :func:`aggregate`'s groups) selected its
    checkpoint on test images: its test numbers are optimistic, and the tables say so."""
    return "selection" in frame and frame["selection"].astype(str).str.contains("TEST").any()


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
# writing the results
def results_markdown(table: pd.DataFrame, refs: pd.DataFrame | None, *, experiment: str,
                     runs: pd.DataFrame | None = None, figures: Sequence[str] = (),
                     cards: pd.DataFrame | None = None) -> str:
    """The text of results.md: the table, how to read it, every published row with sources.
    ``cards``: the rows of result cards (``source``, ``threat_model_ok``) that joined the table."""
    lines = [f"# Results: {experiment}", "",
             "Accuracy (%) on the test images, mean ± sample std over seeds. Attacks run as a "
             "cascade (each one on the points still robust after the ones before it), so every "
             "column is the accuracy under that attack *and all before it*; the last column is "
             "the worst case per example (for AutoAttack: at most AutoAttack's standalone number). "
             "Rows marked *(published)* are numbers reported elsewhere, not measured here; "
             "their sources are listed below. *Selected on* says how each row's checkpoint was "
             "chosen: a published checkpoint kept at its best test-set PGD-20 (or PGD-10) epoch "
             "was picked on the very images it is scored on, which favours it over a checkpoint "
             "selected on held-out training images; *not stated* where the authors' code and "
             "README do not say.", ""]
    if runs is not None and not runs.empty:
        n = sorted(set(int(v) for v in runs["n_examples"]))
        lines += [f"Runs: {len(runs)}; test images per run: {', '.join(map(str, n))}; threat-model "
                  f"check passed: {bool(runs['threat_model_ok'].all())}.", ""]
    if selected_on_test(table.rename(columns={"Selected on": "selection"})):
        lines += ["**Checkpoints selected on test images.** A row whose *Selected on* names TEST "
                  "images chose its checkpoint (the epoch of best validation accuracy) on test "
                  "images (`data.val_split: test`): its test numbers are optimistic, since the "
                  "images that picked the epoch also score it.", ""]
    if cards is not None and not cards.empty:
        lines += [f"Result cards: {len(cards)} ({', '.join(cards['source'])}); threat-model check "
                  f"passed: {bool(cards['threat_model_ok'].all())}. A card's row is a model "
                  f"evaluated by `spat eval` (its own eps, images and seed: see its columns), "
                  f"one row per card; it has no per-example data, so it is in no paired "
                  f"comparison and no figure.", ""]
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
                 experiment: str = "experiment", dpi: int = 120,
                 cards: pd.DataFrame | None = None) -> dict[str, Path]:
    """Write results.csv (aggregated numbers + published rows), runs.csv (one row per run),
    results.md and figures/<name>.png into ``out_dir``; returns the paths. ``cards``: the
    rows of result cards in ``agg`` (``spatlib.cards.card_row``), named in results.md."""
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
    measured.insert(0, "source", measured.pop("source") if "source" in measured else MEASURED)
    published = matching_references(refs, agg) if refs is not None else pd.DataFrame()
    pub = pd.DataFrame({"source": "published", "method": published.get("method", []),
                        "dataset": published.get("dataset", []), "model": published.get("model", []),
                        "eps_str": published.get("eps", []), "clean_mean": published.get("clean", []),
                        "autoattack_mean": published.get("robust", []),
                        "selection": published.get("selection", []),
                        "reference": published.get("source", [])})
    combined = pd.concat([measured, pub], ignore_index=True) if not pub.empty else measured
    paths["results.csv"] = out / "results.csv"
    combined.to_csv(paths["results.csv"], index=False, quoting=csv.QUOTE_MINIMAL)
    paths["runs.csv"] = out / "runs.csv"
    collected.runs.to_csv(paths["runs.csv"], index=False)
    paths["results.md"] = out / "results.md"
    paths["results.md"].write_text(results_markdown(table, refs, experiment=experiment,
                                                    runs=collected.runs, figures=fig_files,
                                                    cards=cards))
    return paths


__all__ = ["ATTACKS", "RunEvaluation", "Collected", "evaluate_run", "eval_cache_key", "eval_cache_path",
           "eval_code", "cache_mismatch", "read_cache", "selected_on_test", "resolve_eval", "collect_results", "find_run_dirs", "aggregate", "results_table",
           "format_mean_std", "load_references", "matching_references", "to_markdown",
           "results_markdown", "save_results", "read_run_config", "load_history",
           "load_metrics", "describe_dataset", "model_label"]
