"""``spat eval TARGET``: the robustness suite on any model, and its flat JSON result card.

TARGET: a run folder, a kit checkpoint, a TorchScript file, ``module:factory`` with
``--weights state_dict.pt``, or ``robustbench:NAME`` (:mod:`spatlib.targets` loads it and gives
it its test images). Every check (the output path, the target, the data, the model's input
shape and output width, eps, the suite, the format) runs before any attack
(:func:`prepare_evaluation`); then ``spat eval`` prints a header line (what is evaluated, on
what, where) and, on a terminal, a line per attack as it ends; Ctrl-C is one line.

A run folder is evaluated exactly as :func:`spatlib.report.evaluate_run` evaluates it (same
weights, settings, seed and batches, hence the same numbers): when its ``eval_<eps>.json``
cache matches the weights, the settings and the code (:func:`spatlib.report.eval_cache_key`),
the card is read from it (``source: cache``, no attack runs; a cache that does not match is
named with the reason);
otherwise :func:`spatlib.evaluate.robustness` runs with evaluate_run's arguments, and nothing
is written into the run folder (``spat eval`` reads its target; it does not pay for notebook
03's robustness curve either).

The card (:func:`make_card`) is flat, RobustBench style: the model's name in tables
(``--name``), dataset, threat model, eps, clean and worst-case robust accuracy, per-attack
accuracy (``acc_<attack>``: cascaded, see :mod:`spatlib.evaluate`), n, the threat-model check,
where a kit model's checkpoint was selected (``selection``: held-out training images, or TEST
images, optimistic) and provenance. ``--format robustbench`` writes RobustBench's own
``model_info`` JSON instead (:func:`robustbench_info`): the file a leaderboard submission adds,
with the keys the kit cannot know (the paper's link, title, authors, venue, reported number)
left null and named on stdout.

Notebook 03 reads the same cards: :func:`write_run_cards` writes the card of every run it
evaluated (the card ``spat eval RUN_DIR`` writes, from the same numbers), and
:func:`load_cards` + :func:`card_row` turn cards of models the kit did not train into rows of
its results table (:func:`spatlib.report.aggregate`, :func:`spatlib.report.results_table`).
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import report, zoo
from .config import SUITE_ATTACKS, ConfigError, RunConfig, format_eps, parse_eps
from .data import KNOWN_SHAPES, DataError, Dataset, parse_shape, select_validation, selection_label
from .evaluate import ATTACK_LABELS, RobustnessResult, result_from_json, robustness
from .runfolder import WHICH, CheckpointError, eval_cache_path, load_metrics
from .targets import Target, TargetError, load_target, run_target, target_data
from .util import (atomic_write_text, check_out_path, device_name, provenance, resolve_device,
                   sha256_file)

__all__ = ["CARD_FORMAT", "CARD_KEYS", "TargetError", "Target", "load_target", "run_target",
           "Evaluation", "prepare_evaluation", "run_evaluation", "evaluate_target",
           "checkpoint_selection", "make_card", "write_card", "write_run_cards", "load_card",
           "load_cards", "card_row", "card_lines", "build_parser", "check_out_path", "cli_main",
           "FORMATS", "ROBUSTBENCH_KEYS", "robustbench_info", "robustbench_notes"]

CARD_FORMAT = "spatlib-card/1"
EXTERNAL_EPS = 8 / 255        # RobustBench's CIFAR L-inf budget: the default without a kit config
EXTERNAL_BATCH = 256
# the keys every card holds (load_card checks them); "name" is not among them: a card written
# before --name existed is named by its file's stem
CARD_KEYS = ("format", "dataset", "num_classes", "threat_model", "eps", "eps_float", "clean_acc",
             "robust_acc", "n_examples", "suite", "threat_model_ok", "model", "seed")


FORMATS = ("card", "robustbench")     # spat eval --format
# RobustBench's model_info/<dataset>/Linf/<NAME>.json, its keys in its order (robustbench
# repository, e.g. model_info/cifar10/Linf/Bartoldson2024Adversarial_WRN-94-16.json)
ROBUSTBENCH_KEYS = ("link", "name", "authors", "additional_data", "number_forward_passes",
                    "dataset", "venue", "architecture", "eps", "clean_acc", "reported",
                    "autoattack_acc", "footnote", "unreliable")


# --------------------------------------------------------------------------------------------
# settings
def _suite(text: str | list[str] | None, default: list[str]) -> list[str]:
    names = default if text is None else ([t.strip() for t in text.split(",") if t.strip()]
                                           if isinstance(text, str) else list(text))
    unknown = [a for a in names if a not in SUITE_ATTACKS]
    if unknown:
        raise TargetError(f"--suite: unknown attack(s) {', '.join(unknown)}; allowed: {', '.join(SUITE_ATTACKS)}")
    if "autoattack" in names:
        if importlib.util.find_spec("pyautoattack") is None:   # the authors' AutoAttack
            raise TargetError("--suite: autoattack needs the pyautoattack package "
                              "(pip install pyautoattack), or leave it out of --suite")
    return [a for a in SUITE_ATTACKS if a in names or a == "clean"]   # clean always: the card's clean_acc


# --------------------------------------------------------------------------------------------
def checkpoint_selection(target: Target) -> str | None:
    """Where a kit model's checkpoint was selected, in words (``held-out training images
    (150)``, ``TEST images (512): optimistic``): its run folder's metrics.json, else its
    config and data. None for a model the kit did not train (its selection is not known)."""
    if target.config is None:
        return None
    if target.kind == "run":
        metrics = load_metrics(target.spec)
        if metrics:
            return selection_label(metrics.get("val_source"), metrics.get("n_val"))
    if target.dataset is not None:
        return select_validation(target.config.data, target.dataset, target.config.seed).label
    return selection_label(None)


def make_card(result: RobustnessResult, *, target: Target, dataset: str, num_classes: int,
              suite: list[str], seed: int, batch_size: int, device: torch.device, source: str,
              seconds: float, name: str | None = None) -> dict:
    """The flat JSON result card of one evaluation (accuracies as fractions in [0, 1]);
    ``name``: the model's label in tables (default: ``target.default_name``). ``source``:
    ``cache`` only when the numbers were read from a run's cache whose key (weights, settings,
    code) is this evaluation's; ``selection``: where the model's checkpoint was selected
    (:func:`checkpoint_selection`)."""
    tm = list(result.threat_model.values())
    card = {
        "format": CARD_FORMAT, "name": name or target.default_name,
        "dataset": dataset, "num_classes": num_classes,
        "threat_model": "Linf", "eps": result.eps_str, "eps_float": result.eps,
        "clean_acc": result.accuracy.get("clean"), "robust_acc": result.robust_accuracy,
        **{f"acc_{a}": v for a, v in result.accuracy.items()},
        "n_examples": result.n, "suite": list(suite), "cascade": result.cascade,
        "threat_model_ok": result.threat_model_ok,
        "max_linf": max((r["max_linf"] for r in tm), default=0.0),
        "n_nan": sum(r["n_nan"] for r in tm),
        "min_pixel": min((r["min_pixel"] for r in tm), default=None),
        "max_pixel": max((r["max_pixel"] for r in tm), default=None),
        "model": target.description, "target": str(target.spec), "target_kind": target.kind,
        "which": target.which, "target_file": str(target.file) if target.file else None,
        "target_sha256": sha256_file(target.file) if target.file else None,
        "selection": checkpoint_selection(target),
        "seed": seed, "batch_size": batch_size, "source": source, "seconds": seconds,
        **provenance(device),
    }
    return card


@dataclass
class Evaluation:
    """What ``spat eval`` will do, every check passed (:func:`prepare_evaluation`): the model,
    the data, the settings, and the run's cached result when its key is this evaluation's.
    :func:`run_evaluation` does it."""
    target: Target
    data: Dataset
    suite: list[str]
    eps: float
    n: int                       # the first n test images
    seed: int
    batch_size: int
    pgd100_restarts: int
    cw_steps: int
    device: torch.device
    name: str                    # the model's label in tables
    format: str
    cached: RobustnessResult | None = None
    cache_note: str | None = None   # why a run's existing cache is not used

    def header(self) -> str:
        """The line ``spat eval`` prints before any attack: what is evaluated, on what, where."""
        shape = "x".join(map(str, self.data.x_test.shape[1:]))
        return (f"{self.name}: {self.target.description} on {self.data.name} ({self.n} test "
                f"images of {shape}), {device_name(self.device)}, eps {format_eps(self.eps)}, "
                f"{', '.join(self.suite)}: "
                f"{'computing' if self.cached is None else 'read from the cache'}")


def prepare_evaluation(spec: str, *, weights: str | None = None, dataset: str | None = None,
                       data_path: str | None = None, shape: tuple[int, int, int] | None = None,
                       eps: str | float | None = None, suite: str | list[str] | None = None,
                       n_examples: int | None = None, batch_size: int | None = None,
                       seed: int | None = None, which: str = "best",
                       device: str | torch.device = "auto", name: str | None = None,
                       threat_model: str | None = None, model_dir: str | Path | None = None,
                       format: str = "card") -> Evaluation:
    """Every check of an evaluation (the target, the data, the model's input shape and output
    width, eps, the suite, the format) and the run's cache lookup, before any attack.

    ``spec``: the target (:func:`spatlib.targets.load_target`); ``dataset`` (a name) or
    ``data_path`` (an npz), ``shape`` (C, H, W of ``dataset="synthetic"``; default: the
    model's): its images (:func:`spatlib.targets.target_data`); ``eps``, ``suite``,
    ``n_examples``, ``batch_size``, ``seed``: a kit target's eval settings overridden, or an
    external model's (8/255, the whole suite, every test image, 256, 0); ``name``: the card's
    label of the model in tables (default: :attr:`Target.default_name`); ``threat_model`` and
    ``model_dir``: of a ``robustbench:NAME`` target, whose zoo is ``dataset``'s (default
    cifar10; with ``data_path`` too, the images come from the file). ``format="robustbench"``:
    the evaluation must be one RobustBench takes (its dataset, AutoAttack in the suite). Raises
    :class:`TargetError`, ConfigError, DataError or CheckpointError, one line each."""
    if name is not None and not name.strip():
        raise TargetError("--name: expected a non-empty label for the model in tables")
    if format not in FORMATS:
        raise TargetError(f"--format: expected one of {', '.join(FORMATS)}, got {format!r}")
    dev = resolve_device(device, key="--device")
    if eps is not None:
        eps_f = parse_eps(eps, "--eps")
        if not 0.0 <= eps_f <= 1.0:
            raise TargetError(f"--eps: {eps!r} is outside [0, 1] (pixel units, e.g. 8/255)")
    if n_examples is not None and n_examples < 1:
        raise TargetError(f"--n-examples: expected an integer >= 1, got {n_examples}")
    if batch_size is not None and batch_size < 1:
        raise TargetError(f"--batch-size: expected an integer >= 1, got {batch_size}")
    zoo_dataset = "cifar10"
    if spec.startswith(zoo.ZOO_PREFIX) and dataset not in (None, "synthetic"):
        zoo_dataset = dataset
        if data_path is not None:      # the zoo's dataset names the model, the file the images
            dataset = None
    target = load_target(spec, weights=weights, which=which, device=dev,
                         threat_model=threat_model, model_dir=model_dir, zoo_dataset=zoo_dataset)
    if target.zoo is not None and dataset is None and data_path is None:
        dataset = target.zoo.dataset
    ds = target_data(target, dataset, data_path, shape, dev)

    cfg = target.config
    overrides: dict = {}
    if eps is not None:
        overrides["eps"] = eps_f
    if n_examples is not None:
        overrides["n_examples"] = n_examples
    if batch_size is not None:
        overrides["batch_size"] = batch_size
    if cfg is not None:
        ev = report.resolve_eval(cfg, {**overrides, "suite": _suite(suite, list(cfg.eval.suite))})
        eps_v = cfg.eval_eps(ev)
        seed_v = cfg.seed if seed is None else seed
        n_req, bs, restarts, cw_steps = ev.n_examples, ev.batch_size, ev.pgd100_restarts, ev.cw_steps
        suite_v = list(ev.suite)
    else:
        ev = None
        eps_v = eps_f if eps is not None else EXTERNAL_EPS
        seed_v = 0 if seed is None else seed
        n_req = n_examples
        bs = batch_size or EXTERNAL_BATCH
        restarts, cw_steps = 5, 30
        suite_v = _suite(suite, list(SUITE_ATTACKS))

    if format == "robustbench":
        _check_robustbench(ds, suite_v)
    plan = Evaluation(target=target, data=ds, suite=suite_v, eps=eps_v,
                      n=len(ds.y_test) if n_req is None else min(n_req, len(ds.y_test)),
                      seed=seed_v, batch_size=bs, pgd100_restarts=restarts, cw_steps=cw_steps,
                      device=dev, name=name.strip() if name else target.default_name, format=format)
    if target.kind == "run" and dataset is None and data_path is None and seed_v == cfg.seed:
        plan.cached, plan.cache_note = _cached_result(Path(spec), cfg, ev, target.which)
    return plan


def run_evaluation(plan: Evaluation, *, progress: bool = False,
                   on_attack: Callable[[str, float, float], None] | None = None
                   ) -> tuple[dict, RobustnessResult]:
    """Run a prepared evaluation (the suite, or the cached result); returns (card, result).
    ``progress`` and ``on_attack(name, accuracy, seconds)``: as :func:`spatlib.evaluate.robustness`'s."""
    t0 = time.perf_counter()
    result, source = plan.cached, "cache"
    if result is None:
        # evaluate_run's call: the same arguments give the same numbers
        result = robustness(plan.target.model, plan.data.x_test[:plan.n], plan.data.y_test[:plan.n],
                            plan.suite, eps=plan.eps, batch_size=plan.batch_size,
                            pgd100_restarts=plan.pgd100_restarts, cw_steps=plan.cw_steps,
                            seed=plan.seed, num_classes=plan.data.num_classes, progress=progress,
                            on_attack=on_attack)
        source = "computed"
    card = make_card(result, target=plan.target, dataset=plan.data.name,
                     num_classes=plan.data.num_classes, suite=plan.suite, seed=plan.seed,
                     batch_size=plan.batch_size, device=plan.device, source=source,
                     seconds=time.perf_counter() - t0, name=plan.name)
    if plan.format == "robustbench":
        info = robustbench_info(card, plan.target.config)
        card["robustbench"] = {"model_info": info,
                               "notes": robustbench_notes(info, card, len(plan.data.y_test))}
    return card, result


def evaluate_target(spec: str, *, progress: bool = False, **settings) -> tuple[dict, RobustnessResult]:
    """Evaluate a target (see the module doc): :func:`prepare_evaluation` with ``settings``
    (every check, before any attack; a run's cache that is not used is named in a printed
    line), then :func:`run_evaluation` (``progress``: a tqdm bar over the attacks). Returns
    (card, result); with ``format="robustbench"`` the card also holds ``card["robustbench"]``:
    ``model_info`` (RobustBench's file, :func:`robustbench_info`) and ``notes``
    (:func:`robustbench_notes`)."""
    plan = prepare_evaluation(spec, **settings)
    if plan.cache_note:
        print(plan.cache_note, flush=True)
    return run_evaluation(plan, progress=progress)


# --------------------------------------------------------------------------------------------
# RobustBench's model_info: what a leaderboard submission adds
def _check_robustbench(ds: Dataset, suite: list[str]) -> None:
    if ds.name not in zoo.ZOO_DATASETS:
        raise TargetError(f"--format robustbench: RobustBench's leaderboards are on "
                          f"{', '.join(zoo.ZOO_DATASETS)} (and ImageNet); this evaluation is on "
                          f"{ds.name!r}")
    if "autoattack" not in suite:
        raise TargetError("--format robustbench: RobustBench ranks by AutoAttack accuracy; add "
                          "autoattack to --suite (or the run's eval.suite)")


def _percent(v: float) -> str:
    """RobustBench's way: ``str(round(100 * v, 2))``, so 0.5617 -> ``"56.17"``, 0 -> ``"0.0"``."""
    return str(round(100 * float(v), 2))


def robustbench_info(card: dict, config: RunConfig | None = None) -> dict:
    """RobustBench's model_info of an evaluated card, every key of :data:`ROBUSTBENCH_KEYS`.

    Measured: dataset, eps (as ``8/255``), clean_acc and autoattack_acc (percent strings, the
    way RobustBench writes them). From the kit's ``config`` (a model the kit trained):
    architecture (``WideResNet-34-10``), additional_data (false: trained on the dataset's own
    training images; null for an ``npz`` dataset, whose origin the kit cannot know),
    number_forward_passes 1 and unreliable false (a deterministic network, one forward pass).
    Null: what only the authors know (link, name: the paper's title, authors, venue, reported),
    footnote (optional), and for an external model everything the kit cannot see."""
    info = dict.fromkeys(ROBUSTBENCH_KEYS)
    info.update(dataset=card["dataset"], eps=card["eps"], clean_acc=_percent(card["clean_acc"]),
                autoattack_acc=_percent(card["acc_autoattack"]))
    if config is not None:
        m = config.model
        info.update(
            architecture=(f"WideResNet-{m.depth}-{m.width}" if m.name == "wide_resnet"
                          else report.MODEL_LABELS.get(m.name, m.name)),
            additional_data=False if config.data.name in zoo.ZOO_DATASETS else None,
            number_forward_passes=1, unreliable=False)
    return {k: info[k] for k in ROBUSTBENCH_KEYS}


def robustbench_notes(info: dict, card: dict, n_test: int | None = None) -> list[str]:
    """What to do before submitting ``info``: the null keys to fill, and how the kit's numbers
    differ from a leaderboard evaluation (fewer images than ``n_test``, another eps, the
    cascade)."""
    fill = [k for k in ROBUSTBENCH_KEYS if info[k] is None and k != "footnote"]
    lines = [f"fill in before submitting: {', '.join(fill)} (name: the paper's title; reported: "
             f"the robust accuracy the paper reports); footnote is optional"]
    if n_test is not None and card["n_examples"] < n_test:
        lines.append(f"evaluated on the first {card['n_examples']} of {n_test} test images; the "
                     f"leaderboard's numbers are on all of them (--n-examples)")
    if card["eps"] != "8/255":
        lines.append(f"eps {card['eps']}: RobustBench's {card['dataset']} Linf leaderboard is at "
                     f"8/255 (a model evaluated at another eps needs a footnote)")
    lines.append("autoattack_acc is the kit's cascade (each attack on the points still robust "
                 "after the ones before it): at most AutoAttack's standalone accuracy")
    return lines


def _cached_result(run_dir: Path, cfg: RunConfig, ev,
                   which: str) -> tuple[RobustnessResult | None, str | None]:
    """(the run folder's cached suite result when its key (:func:`spatlib.report.eval_cache_key`:
    weights, settings, code) is this evaluation's, else None; the line that says why an existing
    cache is not used, else None)."""
    path = eval_cache_path(run_dir, cfg.eval_eps(ev))
    data, reason = report.read_cache(path, report.eval_cache_key(run_dir, cfg, ev, which))
    note = f"{run_dir.name}/{path.name}: not used: {reason}" if reason is not None else None
    return (result_from_json(data["result"]) if data is not None else None), note


# --------------------------------------------------------------------------------------------
# notebook 03: the cards of its runs, and cards of other models as rows of its table
def write_card(path: str | Path, card: dict) -> Path:
    """Write a card as ``spat eval --out`` does (indented JSON); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(card, indent=2) + "\n")   # a Ctrl-C leaves no half card
    return path


def write_run_cards(collected: report.Collected, folder: str | Path, *, which: str = "best",
                    device: str | torch.device = "auto") -> list[Path]:
    """``<folder>/<run>.json``: the card of every run :func:`spatlib.report.collect_results`
    evaluated, from its numbers (no attack runs): the card ``spat eval RUN_DIR`` writes for
    the same weights (``which``) and eval settings. Returns the paths, in run order."""
    dev = resolve_device(device)
    paths = []
    for run, ev in collected.evaluations.items():
        card = make_card(ev.result, target=run_target(ev.run_dir, ev.config, which),
                         dataset=ev.config.data.name, num_classes=len(ev.class_names),
                         suite=[a for a in SUITE_ATTACKS if a in ev.result.accuracy],
                         seed=ev.config.seed, batch_size=ev.eval.batch_size, device=dev,
                         source="cache" if ev.cached else "computed", seconds=ev.seconds)
        paths.append(write_card(Path(folder) / f"{run}.json", card))
    return paths


def _fraction(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0


def _card_problem(card: dict) -> str | None:
    """What is wrong with a card's values (None: nothing), in a few words."""
    if card["threat_model"] != "Linf":
        return f"threat_model {card['threat_model']!r}: the kit's tables are L-inf ('Linf')"
    for key in ("dataset", "eps", "model"):
        if not isinstance(card[key], str) or not card[key]:
            return f"{key}: expected a non-empty string, got {card[key]!r}"
    if "name" in card and (not isinstance(card["name"], str) or not card["name"].strip()):
        return f"name: expected a non-empty string, got {card['name']!r}"
    if card.get("selection") is not None and not isinstance(card["selection"], str):
        return f"selection: expected a string or null, got {card['selection']!r}"
    for key in ("n_examples", "num_classes"):
        if isinstance(card[key], bool) or not isinstance(card[key], int) or card[key] < 1:
            return f"{key}: expected an integer >= 1, got {card[key]!r}"
    if not isinstance(card["eps_float"], (int, float)) or isinstance(card["eps_float"], bool):
        return f"eps_float: expected a number, got {card['eps_float']!r}"
    if not isinstance(card["threat_model_ok"], bool):
        return f"threat_model_ok: expected true or false, got {card['threat_model_ok']!r}"
    if not isinstance(card["suite"], list) or any(a not in SUITE_ATTACKS for a in card["suite"]):
        return f"suite: expected a list drawn from {', '.join(SUITE_ATTACKS)}, got {card['suite']!r}"
    for key in ("clean_acc", "robust_acc", *(f"acc_{a}" for a in SUITE_ATTACKS)):
        if key in card and not (_fraction(card[key]) or (key == "clean_acc" and card[key] is None)):
            return f"{key}: expected an accuracy in [0, 1], got {card[key]!r}"
    return None


def load_card(path: str | Path) -> dict:
    """Read and check a result card (``spat eval --out``, :func:`write_run_cards`).

    Returns the card, with ``card_file`` (the path it was read from) added. Raises
    :class:`TargetError`, one line naming the file and the problem: no such file, not JSON,
    not a card (``format``), a missing key, a value of the wrong kind."""
    path = Path(path)
    if path.is_dir():
        raise TargetError(f"{path}: a folder, not a result card (spat eval --out FILE.json)")
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise TargetError(f"{path}: no such result card") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TargetError(f"{path}: cannot be read as a result card ({type(e).__name__})") from None
    try:
        card = json.loads(text)
    except json.JSONDecodeError as e:
        raise TargetError(f"{path}: not JSON ({e.msg} at line {e.lineno}): not a result card") from None
    if not isinstance(card, dict):
        raise TargetError(f"{path}: a JSON {type(card).__name__}, not a result card (a JSON object)")
    if "format" not in card:
        raise TargetError(f"{path}: no 'format' key: not a result card ({CARD_FORMAT}, as "
                          f"spat eval --out writes)")
    if card["format"] != CARD_FORMAT:
        raise TargetError(f"{path}: format {card['format']!r} is not {CARD_FORMAT!r}, the "
                          f"result card spat eval --out writes")
    missing = [k for k in CARD_KEYS if k not in card]
    if missing:
        raise TargetError(f"{path}: a {CARD_FORMAT} card without the key(s) {', '.join(missing)}")
    problem = _card_problem(card)
    if problem:
        raise TargetError(f"{path}: {problem}")
    return {**card, "card_file": str(path)}


def load_cards(patterns: str | Path | list[str | Path]) -> list[dict]:
    """:func:`load_card` on each file or glob (``**`` included), in the order given, globs
    sorted, each file once. A glob that matches no file is an error (:class:`TargetError`):
    nothing asked for is left out silently."""
    if isinstance(patterns, (str, Path)):
        patterns = [patterns]
    files: dict[Path, None] = {}
    for pattern in patterns:
        text = str(pattern)
        if glob.has_magic(text):
            matches = sorted(glob.glob(str(Path(text).expanduser()), recursive=True))
            if not matches:
                raise TargetError(f"{text}: no file matches this pattern (cards: files or globs "
                                  f"of spat eval --out cards)")
            found = [Path(m) for m in matches]
        else:
            found = [Path(text).expanduser()]
        for f in found:
            files.setdefault(f.resolve(), None)
    return [load_card(f) for f in files]


def _card_name(card: dict) -> str:
    """The card's ``name``; a card written before ``--name`` existed: its file's stem."""
    file = card.get("card_file")
    return card.get("name") or (Path(file).stem if file else card["model"])


def card_row(card: dict) -> dict:
    """A card as a row of notebook 03's runs frame: the columns of
    :func:`spatlib.report.evaluation_row` that :func:`spatlib.report.aggregate` and
    :func:`spatlib.report.results_table` read (accuracies as fractions, NaN for attacks the
    card's suite left out), plus ``source``: ``card: <file name>``, the table's Source, and
    ``selection`` (``not recorded`` for a card without one: a model the kit did not train)."""
    file = card.get("card_file")
    name = _card_name(card)
    row = {"run": name, "method": name, "train_method": "", "rule": "",
           "dataset": card["dataset"], "data": card["dataset"], "model": card["model"],
           "seed": card["seed"], "eps": float(card["eps_float"]), "eps_str": card["eps"],
           "n_examples": card["n_examples"]}
    for a in report.ATTACKS:
        v = card.get(f"acc_{a}")
        row[a] = float(v) if v is not None else float("nan")
    row["worst_case"] = float(card["robust_acc"])
    row["threat_model_ok"] = card["threat_model_ok"]
    row["source"] = f"card: {Path(file).name}" if file else "card"
    row["selection"] = card.get("selection") or selection_label(None)
    return row


def card_lines(cards: list[dict], runs=None) -> list[str]:
    """One line per loaded card for notebook 03: its file, name, model, dataset, eps, images
    and threat-model check, with a note when its dataset or eps is not the runs' (``runs``:
    :func:`spatlib.report.collect_results`'s runs frame). Such a card still joins the table:
    its row shows its own dataset and eps."""
    has_runs = runs is not None and len(runs) > 0
    datasets = sorted(set(runs["data"])) if has_runs else []
    eps = [float(e) for e in runs["eps"]] if has_runs else []
    lines = []
    for c in cards:
        line = (f"card {c.get('card_file', '?')}: {_card_name(c)} ({c['model']}), {c['dataset']} "
                f"at eps {c['eps']}, {c['n_examples']} images, threat model "
                f"{'OK' if c['threat_model_ok'] else 'VIOLATED'}")
        other = [what for what, same in (
            ("dataset", c["dataset"] in datasets),
            ("eps", any(abs(c["eps_float"] - e) <= 1e-6 for e in eps))) if has_runs and not same]
        if other:
            line += (f"; note: its {' and '.join(other)} {'differ' if len(other) > 1 else 'differs'} "
                     f"from the runs' ({', '.join(datasets)} at eps "
                     f"{', '.join(dict.fromkeys(runs['eps_str']))})")
        lines.append(line)
    return lines


# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """``spat eval``'s arguments."""
    p = argparse.ArgumentParser(
        prog="spat eval",
        description="Evaluate a model under the L-inf robustness suite and write a flat JSON "
                    "result card. TARGET: a run folder, a kit checkpoint (checkpoint_*.pt), a "
                    "TorchScript file, or module:factory with --weights STATE_DICT.pt. External "
                    "models (TorchScript, factory) take images in [0, 1] (normalize inside the "
                    "model) and need --dataset or --data-path.")
    p.add_argument("target", metavar="TARGET")
    p.add_argument("--weights", help="state_dict file of a module:factory target (loaded "
                                     "strictly; module./model. prefixes and state_dict/model "
                                     "wrappers undone)")
    p.add_argument("--threat-model", default=None,
                   help=f"the RobustBench zoo of a {zoo.ZOO_PREFIX}NAME target: Linf (default), "
                        "L2, corruptions, corruptions_3d (the suite itself is L-inf)")
    p.add_argument("--model-dir", default=None,
                   help=f"RobustBench checkpoints of a {zoo.ZOO_PREFIX}NAME target "
                        f"(MODEL_DIR/<dataset>/<threat model>/NAME.pt; default: "
                        f"${zoo.MODEL_DIR_ENV} or RobustBench's ./models)")
    p.add_argument("--dataset", help="dataset name (digits, cifar10, cifar100, mnist, "
                                     "fashion_mnist, synthetic); default: the run's (a "
                                     f"{zoo.ZOO_PREFIX}NAME target: its zoo's, cifar10)")
    p.add_argument("--data-path", help="an .npz dataset (x_test, y_test) instead of --dataset")
    p.add_argument("--shape", help="C,H,W of --dataset synthetic images (default: the model's: "
                                   "a kit model's data, else the first of "
                                   f"{', '.join('x'.join(map(str, k)) for k in KNOWN_SHAPES)} "
                                   "it takes)")
    p.add_argument("--eps", help="L-inf budget in pixel units, e.g. 8/255 (default: the run's "
                                 "eval eps; 8/255 for external models)")
    p.add_argument("--suite", help="comma-separated attacks of clean,fgsm,pgd20,pgd100,cw,autoattack "
                                   "(default: the run's eval.suite; all for external models)")
    p.add_argument("--n-examples", type=int, help="first N test images (default: the run's; all)")
    p.add_argument("--batch-size", type=int, help=f"default: the run's eval.batch_size; {EXTERNAL_BATCH}")
    p.add_argument("--seed", type=int, help="attack noise seed (default: the run's seed; 0)")
    p.add_argument("--which", default="best", choices=list(WHICH),
                   help="weights of a run folder or checkpoint: best (selected), last, ema")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--name", help="the model's label in results tables (notebook 03's cards "
                                  "parameter); default: the run's name, the TorchScript file's "
                                  "stem, or the module:factory spec")
    p.add_argument("--format", default="card", choices=list(FORMATS),
                   help="card: the kit's result card; robustbench: RobustBench's model_info JSON "
                        "for a leaderboard submission (needs autoattack in the suite)")
    p.add_argument("--out", default=None, help="the file written (default: card.json; with "
                                                "--format robustbench, NAME.json as RobustBench "
                                                "names it)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="a line per attack as it ends: its accuracy so far and its time "
                        "(default: on when stdout is a terminal)")
    return p


def _print_progress(name: str, accuracy: float, seconds: float) -> None:
    print(f"  {ATTACK_LABELS.get(name, name):<11} {100 * accuracy:6.2f}%  {seconds:6.1f} s", flush=True)


def cli_main(argv: list[str] | None = None) -> int:
    """``spat eval``: 0 evaluated (card written), 2 a bad target or setting (one error line),
    130 interrupted (Ctrl-C: one line saying what was written)."""
    args = build_parser().parse_args(argv)
    written: list[str] = []
    try:
        return _eval_command(args, written)
    except (TargetError, ConfigError, DataError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: {'wrote ' + ', '.join(written) if written else 'nothing written'}",
              file=sys.stderr)
        return 130


def _eval_command(args: argparse.Namespace, written: list[str]) -> int:
    """``spat eval`` after its arguments are parsed; appends to ``written`` each file written."""
    shape = parse_shape(args.shape, "--shape") if args.shape is not None else None
    check_out_path(args.out, error=TargetError)   # before any work: minutes of AutoAttack are not lost to it
    plan = prepare_evaluation(
        args.target, weights=args.weights, dataset=args.dataset, data_path=args.data_path,
        shape=shape, eps=args.eps, suite=args.suite, n_examples=args.n_examples,
        batch_size=args.batch_size, seed=args.seed, which=args.which, device=args.device,
        name=args.name, threat_model=args.threat_model, model_dir=args.model_dir,
        format=args.format)
    print(plan.header(), flush=True)
    if plan.cache_note:
        print(plan.cache_note, flush=True)
    progress = sys.stdout.isatty() if args.progress is None else args.progress
    card, result = run_evaluation(plan, on_attack=_print_progress if progress else None)
    print(result)
    print(result.table().to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"threat model {'OK' if card['threat_model_ok'] else 'VIOLATED'}")
    if args.format == "robustbench":
        rb = card.pop("robustbench")
        out = args.out or f"{card['name']}.json"
        _write(out, rb["model_info"], written)
        print(f"wrote {out}: RobustBench's model_info; submit it as "
              f"model_info/{rb['model_info']['dataset']}/Linf/{Path(out).stem}.json")
        for line in rb["notes"]:
            print(f"note: {line}")
        return 0
    out = args.out or "card.json"
    _write(out, card, written)
    print(f"wrote {out}")
    return 0


def _write(out: str, content: dict, written: list[str]) -> None:
    try:
        write_card(out, content)
    except OSError as e:     # the folder went away, the disk filled up: after the check
        raise TargetError(f"--out {out}: cannot be written ({e.strerror or e})") from None
    written.append(out)
