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
    assert _has_colorbar(fig, "share of the class's evidence")
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


def test_semantic_report_has_one_shared_legend():
    rows = []
    for attack in ("pgd", "spat_intersection"):
        for eps in (0.1, 0.2):
            rows.append({"attack": attack, "eps_nominal": eps, "attack_success": 0.5,
                         "oracle_flip_rate": 0.2, "oracle_flip_ci_low": 0.1,
                         "oracle_flip_ci_high": 0.3, "specific_mass_share": 0.6})
    fig = figures.plot_semantic_report(pd.DataFrame(rows))
    assert all(ax.get_legend() is None for ax in fig.axes)
    assert len(fig.legends) == 1
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["pgd", "spat_intersection"]
