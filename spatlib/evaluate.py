"""Robustness evaluation: the standard L-inf suite, worst case per example.

Suite (in this order): clean, FGSM, PGD-20, PGD-100 with restarts, CW-inf, and standard
AutoAttack (the authors' code, the ``pyautoattack`` package). Step sizes are eps/4 (2/255 at
eps 8/255, the usual PGD-20 setting) so that one suite serves every eps. The iterative attacks
keep, per example, the first iterate that fools the model (as AutoAttack does): PGD and CW-inf
ascend a loss, not the error, and a point fooled midway can be correct again at the last step.

``cascade=True`` (default) attacks only the points still robust after the attacks before it,
as AutoAttack does: each accuracy in the table is then the robust accuracy under that attack
*and all before it*, and the last one is the worst case per example. ``cascade=False`` runs
each attack on every clean-correct point: standalone accuracies (more compute).
Every result carries the threat-model check AutoAttack prints (max |x_adv - x|, NaN, pixel
range) per attack.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import pandas as pd
import torch
from torch import Tensor, nn

from . import allocator
from .attacks import PGD, check_threat_model, make_attack
from .config import SUITE_ATTACKS, format_eps
from .util import device_of, eval_mode

ATTACK_LABELS = {"clean": "Clean", "fgsm": "FGSM", "pgd20": "PGD-20", "pgd100": "PGD-100",
                 "cw": "CW-inf", "autoattack": "AutoAttack"}


@dataclass
class RobustnessResult:
    """What ``robustness`` measured. Accuracies are fractions in [0, 1]."""
    eps: float
    eps_str: str
    n: int
    cascade: bool
    accuracy: dict[str, float]                 # attack -> accuracy (see module doc for cascade)
    robust: Tensor                             # (N,) bool: robust to every attack of the suite
    correct: dict[str, Tensor]                 # attack -> (N,) bool per example
    threat_model: dict[str, dict]              # attack -> check_threat_model report (merged)
    seconds: dict[str, float]
    per_class: dict[str, list[float]] = field(default_factory=dict)  # attack -> acc per class

    @property
    def robust_accuracy(self) -> float:
        """Worst case over the suite: the share of points no attack broke."""
        return float(self.robust.double().mean()) if self.n else float("nan")

    @property
    def threat_model_ok(self) -> bool:
        return all(r["ok"] for r in self.threat_model.values())

    def table(self) -> pd.DataFrame:
        """One row per attack: accuracy (%), time, threat-model check."""
        rows = []
        for a, acc in self.accuracy.items():
            tm = self.threat_model.get(a, {})
            rows.append({"attack": ATTACK_LABELS.get(a, a), "accuracy_pct": 100 * acc,
                         "seconds": self.seconds.get(a, 0.0), "max_linf": tm.get("max_linf", 0.0),
                         "n_nan": tm.get("n_nan", 0), "threat_model_ok": tm.get("ok", True)})
        rows.append({"attack": "worst case", "accuracy_pct": 100 * self.robust_accuracy,
                     "seconds": sum(self.seconds.values()), "threat_model_ok": self.threat_model_ok})
        return pd.DataFrame(rows)

    def __str__(self) -> str:
        lines = [f"eps {self.eps_str} on {self.n} examples ({'cascade' if self.cascade else 'standalone'})"]
        lines += [f"  {ATTACK_LABELS.get(a, a):<11} {100 * v:6.2f}%" for a, v in self.accuracy.items()]
        lines.append(f"  {'worst case':<11} {100 * self.robust_accuracy:6.2f}%")
        tm = [r for r in self.threat_model.values()]
        if tm:
            lines.append("  threat model: max |x_adv - x| {:.5f} (eps {:.5f}), NaN {}, pixels [{:.4f}, {:.4f}]".format(
                max(r["max_linf"] for r in tm), self.eps, sum(r["n_nan"] for r in tm),
                min(r["min_pixel"] for r in tm), max(r["max_pixel"] for r in tm)))
        return "\n".join(lines)


def _merge_checks(old: dict | None, new: dict) -> dict:
    if old is None:
        return new
    out = {"max_linf": max(old["max_linf"], new["max_linf"]), "n_nan": old["n_nan"] + new["n_nan"],
           "min_pixel": min(old["min_pixel"], new["min_pixel"]),
           "max_pixel": max(old["max_pixel"], new["max_pixel"]), "eps": new["eps"]}
    out["ok"] = old["ok"] and new["ok"]
    return out


SUITE_STEP = 0.25   # the suite's iterative attacks step eps/4 (alpha in pixel units: eps * 0.25)


def suite_attack(name: str, model: nn.Module, eps: float, *, pgd100_restarts: int = 5,
                 cw_steps: int = 30, generator: torch.Generator | None = None) -> PGD:
    """The attack a suite entry stands for (not ``clean`` or ``autoattack``)."""
    alpha = max(eps * SUITE_STEP, 1e-12)
    specs = {"fgsm": dict(kind="fgsm"),
             "pgd20": dict(kind="pgd", steps=20, alpha=alpha, keep_fooled=True),
             "pgd100": dict(kind="pgd", steps=100, alpha=alpha, restarts=pgd100_restarts, keep_fooled=True),
             "cw": dict(kind="cw", steps=cw_steps, alpha=alpha, keep_fooled=True)}
    if name not in specs:
        raise ValueError(f"no attack object for suite entry {name!r}; entries: {', '.join(specs)}")
    return make_attack(model=model, eps=eps, generator=generator, **specs[name])


def _autoattack(model: nn.Module, x: Tensor, y: Tensor, eps: float, num_classes: int,
                batch_size: int, seed: int) -> Tensor:
    """Standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square) on x; returns x_adv."""
    from pyautoattack import AutoAttack  # the authors' code; imported only when used

    device = x.device
    aa = AutoAttack(model, eps=eps, norm="Linf", version="standard", device=device, seed=seed)
    # targeted attacks aim at the 9 runner-up classes; fewer classes leave fewer targets
    aa.apgd_targeted.n_target_classes = min(9, num_classes - 1)
    aa.fab.n_target_classes = min(9, num_classes - 1)
    logging.getLogger("auto-attack").setLevel(logging.WARNING)
    # AutoAttack seeds the global RNG inside its attacks; keep the caller's RNG untouched
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=batch_size)
    return x_adv


def robustness(model: nn.Module, x: Tensor, y: Tensor, suite: list[str] | tuple = SUITE_ATTACKS, *,
               eps: float = 8 / 255, batch_size: int = 256, cascade: bool = True,
               pgd100_restarts: int = 5, cw_steps: int = 30, seed: int = 0,
               num_classes: int | None = None, progress: bool = False,
               on_attack: Callable[[str, float, float], None] | None = None) -> RobustnessResult:
    """Evaluate ``model`` under the suite at L-inf ``eps``.

    x: (N, C, H, W) in [0, 1] (float, or uint8 which is divided by 255); y: (N,) long.
    Runs on the model's device in batches; the model is put in eval mode and restored.
    ``progress``: a tqdm bar over the attacks; ``on_attack(name, accuracy, seconds)`` is called
    as each attack of the suite ends (the accuracy as in the result: cascaded, so far).
    """
    unknown = [a for a in suite if a not in SUITE_ATTACKS]
    if unknown:
        raise ValueError(f"suite: unknown attack(s) {unknown}; allowed: {', '.join(SUITE_ATTACKS)}")
    if not (0.0 <= eps <= 1.0):
        raise ValueError(f"eps: expected a number in [0, 1] (pixel units, e.g. 8/255), got {eps!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size}")
    device = device_of(model)
    if device.type == "cpu":
        allocator.keep_freed_memory()   # attack steps reuse their pages (spatlib.allocator)
    x = x.float().div(255) if x.dtype == torch.uint8 else x.float()
    n = len(x)
    order = [a for a in SUITE_ATTACKS if a in suite]
    generator = torch.Generator(device=device).manual_seed(seed)
    correct: dict[str, Tensor] = {}
    checks: dict[str, dict] = {}
    seconds: dict[str, float] = {}
    accuracy: dict[str, float] = {}

    from tqdm.auto import tqdm
    bar = tqdm(total=len(order), desc=f"robustness eps {format_eps(eps)}", disable=not progress, leave=False)
    with eval_mode(model), bar:
        with torch.no_grad():
            logits = [model(x[i:i + batch_size].to(device)) for i in range(0, n, batch_size)]
        clean = (torch.cat([l.argmax(1).cpu() for l in logits]) == y.cpu() if n
                 else torch.zeros(0, dtype=torch.bool))
        if num_classes is None:      # the model's output width, not the labels that occur
            num_classes = logits[0].shape[1] if n else 1
        del logits
        robust = clean.clone()
        for name in order:
            t0 = time.perf_counter()
            if name == "clean":
                flags = clean.clone()
            else:
                base = robust if cascade else clean
                idx = base.nonzero().squeeze(1)
                flags = torch.zeros(n, dtype=torch.bool)
                if len(idx):
                    xs, ys = x[idx].to(device), y[idx].to(device)
                    if name == "autoattack":
                        x_adv = _autoattack(model, xs, ys, eps, num_classes, batch_size, seed)
                        checks[name] = check_threat_model(xs, x_adv, eps)
                        with torch.no_grad():
                            pred = torch.cat([model(x_adv[i:i + batch_size]).argmax(1)
                                              for i in range(0, len(idx), batch_size)])
                        flags[idx] = (pred == ys).cpu()
                    else:
                        attack = suite_attack(name, model, eps, pgd100_restarts=pgd100_restarts,
                                              cw_steps=cw_steps, generator=generator)
                        for i in range(0, len(idx), batch_size):
                            xb, yb = xs[i:i + batch_size], ys[i:i + batch_size]
                            x_adv = attack(xb, yb)
                            checks[name] = _merge_checks(checks.get(name), check_threat_model(xb, x_adv, eps))
                            with torch.no_grad():
                                flags[idx[i:i + batch_size]] = (model(x_adv).argmax(1) == yb).cpu()
                robust &= flags
                if cascade:
                    flags = robust.clone()
            correct[name] = flags
            accuracy[name] = float(flags.double().mean()) if n else float("nan")
            seconds[name] = time.perf_counter() - t0
            bar.update(1)
            if on_attack is not None:
                on_attack(name, accuracy[name], seconds[name])
    ycpu = y.cpu()
    per_class = {a: [float(f[ycpu == k].double().mean()) if bool((ycpu == k).any()) else float("nan")
                     for k in range(num_classes)] for a, f in correct.items()}
    return RobustnessResult(eps=float(eps), eps_str=format_eps(eps), n=n, cascade=cascade,
                            accuracy=accuracy, robust=robust, correct=correct, threat_model=checks,
                            seconds=seconds, per_class=per_class)


def accuracy_vs_eps(model: nn.Module, x: Tensor, y: Tensor, eps_list: list[float], *,
                    batch_size: int = 256, seed: int = 0) -> pd.DataFrame:
    """PGD-20 (alpha eps/4) robust accuracy at each eps: the robustness curve."""
    rows = []
    for eps in eps_list:
        suite = ["clean"] if eps == 0 else ["clean", "pgd20"]
        r = robustness(model, x, y, suite, eps=eps, batch_size=batch_size, seed=seed)
        rows.append({"eps": float(eps), "eps_str": format_eps(eps),
                     "accuracy": r.accuracy.get("pgd20", r.accuracy["clean"])})
    return pd.DataFrame(rows)


def result_to_json(result: RobustnessResult) -> dict:
    """JSON-safe dict of a result (tensors as lists of 0/1)."""
    d = asdict(result)
    d["robust"] = result.robust.int().tolist()
    d["correct"] = {k: v.int().tolist() for k, v in result.correct.items()}
    d["robust_accuracy"] = result.robust_accuracy
    return d


def result_from_json(d: dict) -> RobustnessResult:
    """Inverse of :func:`result_to_json` (cached evaluations)."""
    d = dict(d)
    d.pop("robust_accuracy", None)
    d["robust"] = torch.tensor(d["robust"], dtype=torch.bool)
    d["correct"] = {k: torch.tensor(v, dtype=torch.bool) for k, v in d["correct"].items()}
    return RobustnessResult(**d)

