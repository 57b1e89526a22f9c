"""What the figures show a reader: colour scales, legends, whole-number epochs, captions."""
import pandas as pd
import torch

from spatlib import figures, hypothesis

K = 3
NAMES = ["zero", "one", "two"]


def _model(linear_model):
    return linear_model(torch.randn(K, 1, 4, 4, generator=torch.Generator().manual_seed(0)))


def _image():
    return torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([1])


def _has_colorbar(fig, label: str) -> bool:
    return any(ax.get_ylabel() == label for ax in fig.axes if ax.get_label() == "<colorbar>")


def test_evidence_maps_share_one_colour_scale_with_a_colour_bar(linear_model):
    x, y = _image()
    fig = figures.plot_evidence_maps(_model(linear_model), x, y, NAMES)
    assert _has_colorbar(fig, "share of evidence")
    assert "* marks the true class" in fig.get_suptitle()
    images = [ax.images[0] for ax in fig.axes[1:K + 1]]
    assert len({im.get_clim() for im in images}) == 1            # one scale for every class


def test_perturbations_have_a_colour_bar_in_eps_units(linear_model):
    x, y = _image()
    attacks = hypothesis.standard_attacks(["pgd", "spat_intersection"], steps=2)
    fig = figures.plot_perturbations(_model(linear_model), x, y, attacks, 0.1, NAMES)
    assert _has_colorbar(fig, "delta (red +, blue -)")
    deltas = [ax.images[0] for ax in fig.axes if ax.images and ax.get_title().startswith("delta")]
    assert len(deltas) == 2 and all(im.get_clim() == (-0.1, 0.1) for im in deltas)


def test_example_grid_says_true_then_predicted():
    x = torch.rand(3, 1, 4, 4)
    fig = figures.plot_examples(x, torch.tensor([0, 1, 2]), NAMES, pred=torch.tensor([0, 2, 2]))
    assert fig.get_suptitle() == "true -> predicted"
    assert [ax.get_title() for ax in fig.axes] == ["zero -> zero", "one -> two", "two -> two"]


def test_learning_curves_have_whole_epochs_and_explain_the_scaled_eps():
    h = pd.DataFrame({"epoch": [1, 2, 3], "lr": [0.1, 0.05, 0.01], "eps": [0.05, 0.1, 0.1],
                      "train_loss": [2.0, 1.5, 1.0], "train_clean_acc": [0.5, 0.6, 0.7],
                      "train_adv_acc": [0.2, 0.3, 0.4], "val_clean_acc": [0.4, 0.5, 0.6],
                      "val_robust_acc": [0.1, 0.2, 0.3]})
    fig = figures.plot_learning_curves(h)
    fig.canvas.draw()
    for ax in fig.axes[:2]:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        assert ax.get_xlabel() == "epoch"
    labels = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert "eps, scaled to the lr axis (max 0.1)" in labels


def _semantic_rows(eps_values, attacks=("pgd", "spat_intersection")):
    return pd.DataFrame([{"attack": a, "eps_nominal": e, "attack_success": 0.5,
                          "oracle_flip_rate": 0.2, "oracle_flip_ci_low": 0.1,
                          "oracle_flip_ci_high": 0.3, "shared_mass_share": 0.18 + 0.1 * i}
                         for i, a in enumerate(attacks) for e in eps_values])


def test_semantic_report_has_one_shared_legend_and_axes_from_zero():
    fig = figures.plot_semantic_report(_semantic_rows((0.1, 0.2)))
    assert all(ax.get_legend() is None for ax in fig.axes)
    assert len(fig.legends) == 1
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["pgd", "spat_intersection"]
    assert all(ax.get_ylim()[0] == 0 for ax in fig.axes)
    assert fig.axes[2].get_ylabel() == "shared share of |delta| (%)"


def test_semantic_report_keeps_equal_series_apart_and_draws_markers_for_one_eps():
    # two attacks with equal success and flips at one eps: both markers visible, no lines
    fig = figures.plot_semantic_report(_semantic_rows((0.1,)))
    ax = fig.axes[0]
    lines = [l for l in ax.get_lines() if l.get_label() in ("pgd", "spat_intersection")]
    assert len(lines) == 2 and all(l.get_linestyle() == "None" for l in lines)
    xs = [float(l.get_xdata()[0]) for l in lines]
    assert xs[0] != xs[1]                                  # side by side, not on top
    assert len({l.get_marker() for l in lines}) == 2       # and told apart by their marker
    assert [t.get_text() for t in ax.get_xticklabels()] == ["eps 0.1"]


def test_learning_curves_show_the_manipulation_check_when_measured():
    h = pd.DataFrame({"epoch": [1, 2], "lr": [0.1, 0.05], "eps": [0.1, 0.1], "train_loss": [2.0, 1.5],
                      "train_clean_acc": [0.5, 0.6], "train_adv_acc": [0.2, 0.3],
                      "val_clean_acc": [0.4, 0.5], "val_robust_acc": [0.1, 0.2],
                      "shared_share": [0.30, 0.32], "shared_share_pgd": [0.18, 0.19]})
    fig = figures.plot_learning_curves(h)
    check = fig.axes[2]
    assert check.get_ylim()[0] == 0 and "manipulation check" in check.get_title()
    assert [t.get_text() for t in check.get_legend().get_texts()] == ["training examples",
                                                                        "PGD on the same batches"]
    h = h.assign(shared_share=float("nan"), shared_share_pgd=float("nan"))
    assert len([a for a in figures.plot_learning_curves(h).axes if a.get_title()]) == 2


def test_shared_pixels_show_step_weights_and_radii(linear_model):
    x, y = _image()
    fig = figures.plot_shared_pixels(_model(linear_model), x, y, eps=0.1, alpha=0.025,
                                     rules=["intersection", "random"],
                                     radius_rules=["intersection"], radius_mean=0.5)
    assert _has_colorbar(fig, "step weight w (mean 1)")
    assert _has_colorbar(fig, "radius r (mean 0.5)")
    assert "|delta_i| <= eps r_i" in fig.get_suptitle()
    radius = [ax.images[0] for ax in fig.axes if ax.get_title() == "r: intersection"]
    assert len(radius) == 1 and radius[0].get_clim() == (0.0, 1.0)
    assert abs(float(radius[0].get_array().mean()) - 0.5) < 1e-6


# --------------------------------------------------------------------------------------------
# nothing clipped: every text of every figure lies inside its canvas
def _clipped_texts(fig) -> list[str]:
    """What of the drawn figure lies outside its canvas: each panel's drawn extent (its ticks,
    labels, title, its legend; a colour bar is a panel too), the figure's legends and texts."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    canvas = FigureCanvasAgg(fig)      # what savefig renders with: constrained layout included
    canvas.draw()
    renderer = canvas.get_renderer()
    width, height = canvas.get_width_height()
    drawn = [(f"panel {ax.get_title() or ax.get_ylabel() or ax.get_label()!r}", ax.get_tightbbox(renderer))
             for ax in fig.axes if ax.get_visible()]
    drawn += [(f"figure legend {leg.get_title().get_text()!r}", leg.get_window_extent(renderer))
              for leg in fig.legends]
    drawn += [(f"figure text {t.get_text()!r}", t.get_window_extent(renderer))
              for t in [*fig.texts, getattr(fig, "_suptitle", None)] if t is not None and t.get_text()]
    return [f"{name} at ({b.x0:.0f}, {b.y0:.0f})-({b.x1:.0f}, {b.y1:.0f}) outside {width}x{height}"
            for name, b in drawn
            if b is not None and (b.x0 < -1 or b.y0 < -1 or b.x1 > width + 1 or b.y1 > height + 1)]


def _every_figure(linear_model):
    import numpy as np
    x, y = _image()
    model = _model(linear_model)
    history = pd.DataFrame({"epoch": [1, 2, 3], "lr": [0.1, 0.05, 0.01], "eps": [0.05, 0.1, 0.1],
                            "train_loss": [2.0, 1.5, 1.0], "train_clean_acc": [0.5, 0.6, 0.7],
                            "train_adv_acc": [0.2, 0.3, 0.4], "val_clean_acc": [0.4, 0.5, 0.6],
                            "val_robust_acc": [0.1, 0.2, 0.3], "shared_share": [0.3, 0.3, 0.31],
                            "shared_share_pgd": [0.18, 0.18, 0.19]})
    curves = pd.DataFrame([{"run": f"{m}-s0", "method": m, "dataset": "digits", "model": "SmallCNN",
                            "seed": 0, "eps": e, "eps_str": str(e), "accuracy": 0.9 - e}
                           for m in ("pgd_at", "spat_at") for e in (0.0, 0.1, 0.2)])
    per_class = pd.DataFrame([{"run": f"{m}-s0", "method": m, "dataset": "digits", "model": "SmallCNN",
                               "seed": 0, "attack": "worst_case", "class": k, "class_name": NAMES[k],
                               "accuracy": 0.5} for m in ("pgd_at", "spat_at") for k in range(K)])
    attacks = hypothesis.standard_attacks(["pgd", "spat_intersection", "spat_intersection:radius"],
                                          steps=2)
    return {
        "examples": figures.plot_examples(torch.rand(3, 1, 4, 4), torch.tensor([0, 1, 2]), NAMES,
                                          pred=torch.tensor([0, 2, 2])),
        "evidence_maps": figures.plot_evidence_maps(model, x, y, NAMES),
        "shared_pixels": figures.plot_shared_pixels(model, x, y, eps=0.1, alpha=0.025,
                                                    rules=["intersection", "random"],
                                                    radius_rules=["intersection", "random"]),
        "perturbations": figures.plot_perturbations(model, x, y, attacks, 0.1, NAMES),
        "semantic_report": figures.plot_semantic_report(_semantic_rows((0.1, 0.2))),
        "semantic_report_one_eps": figures.plot_semantic_report(_semantic_rows((0.1,))),
        "learning_curves": figures.plot_learning_curves(history, title="pgd_at-digits-s0"),
        "accuracy_vs_eps": figures.plot_accuracy_vs_eps(curves),
        "per_class": figures.plot_per_class_heatmap(per_class),
    }


def test_no_text_of_any_figure_is_clipped(linear_model):
    clipped = {name: _clipped_texts(fig) for name, fig in _every_figure(linear_model).items()}
    assert not any(clipped.values()), {k: v for k, v in clipped.items() if v}


def test_learning_curve_legends_sit_beside_the_curves_not_on_them(linear_model):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    fig = _every_figure(linear_model)["learning_curves"]
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    legends = [(ax, ax.get_legend()) for ax in fig.axes if ax.get_legend() is not None]
    assert len(legends) == 3
    for ax, legend in legends:
        assert not legend.get_window_extent(renderer).overlaps(ax.get_window_extent(renderer)), \
            ax.get_title()
