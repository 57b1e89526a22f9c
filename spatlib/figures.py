"""Every figure of the notebooks, on explicit :class:`matplotlib.figure.Figure` objects (safe in
threads and in a kernel, shown with ``display(fig)``; nothing depends on pyplot's global state).

* experiment figures (notebook 03): robust accuracy vs eps, the per-class accuracy heatmap;
* a run's learning curves (notebook 02); the forest plot of paired comparisons (notebook 03);
* the hypothesis shown (notebook 01): example images, class evidence maps, SPAT's step weights
  per rule, PGD vs SPAT perturbations, the oracle measurements vs eps.

Accuracies come in as fractions and are drawn in percent.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .config import SUITE_ATTACKS as ATTACKS
from .compare import ATTACK_LABELS as COMPARISON_LABELS
from .compare import GROUP_COLUMNS
from .config import format_eps
from .evaluate import ATTACK_LABELS
from .semantics import class_evidence, normalize_maps, shared_pixels


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


# legends under their panel, never on the curves
_BELOW = dict(loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize=8, ncol=2, frameon=False)


def plot_learning_curves(history: pd.DataFrame, title: str | None = None) -> Figure:
    """Clean / robust accuracy (train and validation) and training loss, lr and eps per epoch;
    with a third panel, the manipulation check (history's ``shared_share`` beside
    ``shared_share_pgd``) when the run measured it."""
    import seaborn as sns
    check = ("shared_share" in history and history["shared_share"].notna().any())
    fig, axes = _figure(16.5 if check else 11, 4.8, 1, 3 if check else 2)
    long = learning_curves_long(history)
    ax = axes[0, 0]
    if not long.empty:
        sns.lineplot(data=long, x="epoch", y="accuracy (%)", hue="kind", style="split", marker="o",
                     markersize=4, ax=ax)
        ax.legend(**_BELOW)
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.set_title("accuracy (robust: PGD at the training eps)")
    ax = axes[0, 1]
    ax.plot(history["epoch"], history["train_loss"], "o-", ms=3, label="train loss", color="C3")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss")
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    twin.plot(history["epoch"], history["lr"], "--", color="C7", label="lr (last batch of the epoch)")
    if "eps" in history and history["eps"].max() > 0:
        # eps shares the lr axis: drawn as eps / max(eps) x max(lr), so its ramp (the eps
        # warm-up) reads against the lr axis; the legend gives the eps it reaches
        scale = history["lr"].max() / history["eps"].max()
        twin.plot(history["epoch"], history["eps"] * scale, ":", color="C2",
                  label=f"eps, scaled to the lr axis (max {format_eps(float(history['eps'].max()))})")
    twin.set_ylabel("lr")
    ax.set_ylim(bottom=0)
    twin.set_ylim(bottom=0)
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles=handles, **{**_BELOW, "ncol": 1})
    ax.set_title("loss and schedules")
    panels = [axes[0, 0], axes[0, 1]]
    if check:
        ax = axes[0, 2]
        ax.plot(history["epoch"], 100 * history["shared_share"], "o-", ms=3, color="C4",
                label="training examples")
        ax.plot(history["epoch"], 100 * history["shared_share_pgd"], "s--", ms=3, color="C7",
                label="PGD on the same batches")
        top = 100 * float(np.nanmax(history[["shared_share", "shared_share_pgd"]].to_numpy()))
        ax.set_ylim(0, max(10.0, 1.15 * top))
        ax.set_ylabel("shared share of |delta| (%)")
        ax.set_title("manipulation check (axis from 0)")
        ax.legend(**{**_BELOW, "ncol": 1})
        ax.grid(alpha=0.3)
        panels.append(ax)
    for a in panels:
        a.xaxis.set_major_locator(MaxNLocator(integer=True))   # epochs are whole numbers
        a.set_xlabel("epoch")
    if title:
        fig.suptitle(title)
    return fig


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
    """A row of clean images x (N, C, H, W) in [0, 1], titled ``true -> predicted``."""
    n = min(n, len(x))
    fig, axes = _figure(1.3 * n, 1.9, 1, n)
    for i in range(n):
        title = class_names[int(y[i])]
        if pred is not None:
            title += f" -> {class_names[int(pred[i])]}"
        _show_image(axes[0, i], x[i], title)
    fig.suptitle("true -> predicted" if pred is not None else "true label", fontsize=10)
    return fig


def plot_evidence_maps(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                       class_names: Sequence[str], saliency: str = "input_grad") -> Figure:
    """For one image x (1, C, H, W): the image and the normalized class evidence map P_k of
    every class (docs/design.md step 1), the true class marked with *; the title says so."""
    ev = class_evidence(model, x, y, "all", saliency)
    maps = normalize_maps(ev.maps)[0]                       # (K, H, W)
    k = maps.shape[0]
    vmax = float(maps.max())
    fig, axes = _figure(1.4 * (k + 1) + 0.8, 2.6, 1, k + 1)
    _show_image(axes[0, 0], x[0], f"image ({class_names[int(y[0])]})")
    for j in range(k):
        cls = int(ev.classes[0, j])
        star = "*" if cls == int(y[0]) else ""
        im = axes[0, j + 1].imshow(maps[j].cpu().numpy(), cmap="magma", interpolation="nearest",
                                   vmin=0, vmax=vmax)
        axes[0, j + 1].set_title(f"P[{class_names[cls]}]{star}", fontsize=9)
        axes[0, j + 1].set_xticks([])
        axes[0, j + 1].set_yticks([])
    # one colour scale for every map, so the classes compare
    fig.colorbar(im, ax=list(axes[0, 1:]), shrink=0.9, label="share of evidence")
    fig.suptitle(f"P[k]: where class k's evidence lies ({saliency}, each map sums to 1); "
                 f"* marks the true class", fontsize=9)
    return fig


def plot_shared_pixels(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
                       alpha: float, rules: Sequence[str] = ("intersection", "equality", "random"),
                       radius_rules: Sequence[str] = (), radius_mean: float = 0.5,
                       gamma: float = 1.0, saliency: str = "input_grad", seed: int = 0) -> Figure:
    """For one image: where each SPAT rule spends its budget. Top row, ``rules``: the step
    weights w of the step budget (mean 1, capped at eps/alpha). Bottom row, ``radius_rules``
    (when given): the per-pixel radius r of the radius budget (|delta| <= eps r, mean
    ``radius_mean``). ``random`` is the control (the same values on other pixels)."""
    rows = [("step", list(rules))] + ([("radius", list(radius_rules))] if radius_rules else [])
    rows = [(b, r) for b, r in rows if r]
    ncols = max(len(r) for _, r in rows) + 1
    fig, axes = _figure(2.2 * ncols, 2.4 * len(rows), len(rows), ncols)
    for i, (budget, names) in enumerate(rows):
        _show_image(axes[i, 0], x[0], "image")
        for ax in axes[i, len(names) + 1:]:
            ax.axis("off")
        for ax, rule in zip(axes[i, 1:], names):
            g = torch.Generator(device=x.device).manual_seed(seed)
            sp = shared_pixels(model, x, y, rule, saliency, gamma, eps=eps, alpha=alpha,
                               generator=g, budget=budget, radius_mean=radius_mean)
            value = sp.weights if budget == "step" else sp.radius
            im = ax.imshow(value[0].mean(0).cpu().numpy(), cmap="viridis", interpolation="nearest",
                           vmin=0, vmax=eps / alpha if budget == "step" else 1.0)
            ax.set_title(f"{'w' if budget == 'step' else 'r'}: {rule}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        label = "step weight w (mean 1)" if budget == "step" else f"radius r (mean {radius_mean:g})"
        fig.colorbar(im, ax=list(axes[i, 1:len(names) + 1]), shrink=0.8, label=label)
    if len(rows) == 2:
        fig.suptitle("top: step weights w (the step budget); bottom: radius r, |delta_i| <= eps r_i "
                     "(the radius budget)", fontsize=9)
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
        im = axes[1, j].imshow(delta, cmap="RdBu_r", vmin=-eps, vmax=eps, interpolation="nearest")
        axes[1, j].set_title(f"delta ({format_eps(eps)})", fontsize=9)
        axes[1, j].set_xticks([])
        axes[1, j].set_yticks([])
    fig.colorbar(im, ax=list(axes[1, 1:]), shrink=0.8, label="delta (red +, blue -)")
    return fig


def _dodge(values: pd.Series, index: int, count: int, width: float) -> pd.Series:
    """x positions of series ``index`` of ``count`` drawn side by side around ``values``, so
    that series with equal values stay visible (each its own marker, offset by a fraction of
    ``width``, the spacing of the x values)."""
    return values + (index - (count - 1) / 2) * width / max(count, 1) * 0.6


_MARKERS = "osD^vP*Xhp<>"


def plot_semantic_report(report: pd.DataFrame) -> Figure:
    """Three panels vs eps, one series per attack: attack success on the model, oracle flip
    rate (95% Wilson interval as error bars) and the manipulation check, the share of |delta| on
    shared pixels (PGD's dashed, for reference). Each attack has its own marker and is set a
    little apart along x, so equal values do not hide each other; with a single eps there are no
    lines (nothing to connect). Every y axis starts at 0."""
    df = report.copy()
    df["eps"] = df["eps_nominal"].astype(float)
    eps_values = sorted(df["eps"].unique())
    single = len(eps_values) == 1
    width = (min(np.diff(eps_values)) if not single else 1.0)
    attacks = list(dict.fromkeys(df["attack"]))
    fig, axes = _figure(15, 4.2, 1, 3)
    panels = [("attack_success", "attack success on the model (%)"),
              ("oracle_flip_rate", "oracle flip rate (%), 95% Wilson CI"),
              ("shared_mass_share", "shared share of |delta| (%)")]
    for ax, (col, label) in zip(axes[0], panels):
        for i, name in enumerate(attacks):
            part = df[df["attack"] == name].sort_values("eps")
            xs = pd.Series(range(len(part)), dtype=float) if single else part["eps"].reset_index(drop=True)
            xs = _dodge(xs, i, len(attacks), width)
            value = 100 * part[col].astype(float).to_numpy()
            style = dict(marker=_MARKERS[i % len(_MARKERS)], color=f"C{i % 10}", label=name,
                         linestyle="none" if single else ("--" if name == "pgd" else "-"))
            ax.plot(xs, value, **style)
            if col == "oracle_flip_rate":
                lo = value - 100 * part["oracle_flip_ci_low"].astype(float).to_numpy()
                hi = 100 * part["oracle_flip_ci_high"].astype(float).to_numpy() - value
                ax.errorbar(xs, value, yerr=[lo, hi], fmt="none", capsize=3, ecolor=f"C{i % 10}",
                            alpha=0.6)
        highest = "oracle_flip_ci_high" if col == "oracle_flip_rate" else col
        top = 100 * float(np.nanmax(df[highest].to_numpy(dtype=float)))
        ax.set_ylim(0, max(5.0, 1.12 * top))
        ax.set_ylabel(label)
        if single:
            ax.set_xticks([0.0])
            ax.set_xticklabels([f"eps {format_eps(eps_values[0])}"])
            ax.set_xlim(-0.6, 0.6)
        else:
            ax.set_xlabel("eps (pixel units)")
        ax.grid(alpha=0.3)
    axes[0, 2].set_title("manipulation check: did the examples move?", fontsize=10)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, title="attack", loc="outside right upper", fontsize=8)
    return fig


# --------------------------------------------------------------------------------------------
# the paired comparisons (spatlib.compare): a forest plot
def plot_forest(df: pd.DataFrame, title: str | None = None, *, images: bool = True) -> Figure:
    """One panel per comparison, one row per attack: B - A (points) with its seed-aware
    interval (thick, over seeds and images; coloured where Holm's p is below 0.05), the
    image-level interval given these trained models (thin, below it; ``images=False`` leaves
    it out), a zero line, and a grey band of +- the seed-aware power line (differences inside it
    are not found at 80% power). A row of one seed has no seed-aware interval: its thin bar only,
    marked "1 seed"."""
    if df.empty:
        raise ValueError("plot_forest: no comparisons to plot")
    df = df.copy()
    panel = df["comparison"].astype(str)
    if all(c in df for c in GROUP_COLUMNS) and len(df[GROUP_COLUMNS].drop_duplicates()) > 1:
        # several datasets (or models, or eps) in one table: say which panel is which
        panel = panel + " | " + df["dataset"].astype(str) + ", " + df["model"].astype(str) \
            + ", eps " + df["eps_str"].astype(str)
    df["comparison"] = panel
    comps = list(dict.fromkeys(df["comparison"]))
    n_att = max(len(part) for _, part in df.groupby("comparison", sort=False))
    fig = Figure(figsize=(7.5, max(1.6, 0.45 * n_att + 0.9) * len(comps)), layout="constrained")
    axes = fig.subplots(len(comps), 1, squeeze=False, sharex=True)[:, 0]
    mde = np.nanmax(df["mde_pct"].to_numpy(dtype=float), initial=0.0)
    shown = [df["ci_low_pct"], df["ci_high_pct"]] + ([df["ci_low_images_pct"], df["ci_high_images_pct"]]
                                                     if images else [])
    values = np.concatenate([np.asarray(v, dtype=float) for v in shown] + [[-mde, mde, 0.0]])
    lo_all, hi_all = np.nanmin(values), np.nanmax(values)
    pad = 0.08 * max(hi_all - lo_all, 1.0)
    for ax, comp in zip(axes, comps):
        part = df[df["comparison"] == comp].reset_index(drop=True)
        ys = np.arange(len(part))[::-1]
        for y, (_, r) in zip(ys, part.iterrows()):
            if not math.isnan(r["mde_pct"]):
                ax.fill_betweenx([y - 0.35, y + 0.35], -r["mde_pct"], r["mde_pct"], color="0.88", lw=0)
            if images:
                ax.errorbar(r["diff_pct"], y - 0.2, xerr=[[r["diff_pct"] - r["ci_low_images_pct"]],
                                                           [r["ci_high_images_pct"] - r["diff_pct"]]],
                            fmt="none", ecolor="0.45", elinewidth=0.9, capsize=2)
            seeds_known = not math.isnan(r["p_value"])
            if seeds_known:
                # the verdict's own reading of p_holm (and its alpha), not a second threshold
                color = "C3" if r["verdict"] in ("B better", "A better") else "C0"
                ax.errorbar(r["diff_pct"], y, xerr=[[r["diff_pct"] - r["ci_low_pct"]],
                                                    [r["ci_high_pct"] - r["diff_pct"]]],
                            fmt="o", color=color, elinewidth=2.5, capsize=3, ms=5)
            else:
                ax.plot(r["diff_pct"], y, "o", color="0.45", ms=5)
            note = f"Holm p={r['p_holm']:.2g}" if seeds_known else "1 seed"
            ax.annotate(note, (1.01, y), xycoords=("axes fraction", "data"), va="center", fontsize=8)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(ys, [COMPARISON_LABELS.get(a, a) for a in part["attack"]])
        ax.set_ylim(-0.6, len(part) - 0.4)
        ax.set_title(f"{comp}  ({part['n_images'].iloc[0]} images x {part['n_seeds'].iloc[0]} seeds)",
                     fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[-1].set_xlim(lo_all - pad, hi_all + pad)
    level = float(df["level"].iloc[0]) if "level" in df else 0.95
    thin = ", thin: given these trained models" if images else ""
    axes[-1].set_xlabel(f"B - A (accuracy points)\n{100 * level:.0f}% CI, thick: over seeds and images"
                        f"{thin}; grey: not found at 80% power", fontsize=8)
    if title:
        fig.suptitle(title)
    return fig
