"""RobustBench's zoo and foreign checkpoints: a real zoo architecture's checkpoint (random
weights, saved as RobustBench's files are) in a temporary model dir loads through robustbench
and gives the logits of the same model loaded by hand; bad names, threat models and a missing
checkpoint offline are one line each; state_dicts load as public checkpoints come. Nothing is
downloaded: the download host is declared unreachable wherever a file is missing."""
from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest
import torch

from spatlib import cards, oracles, targets, zoo
from spatlib.models import build_model

try:
    zoo.import_robustbench()
except zoo.ZooError:    # the dev extra installs it (CI); a bare install may not
    pytest.skip("the zoo extra: pip install 'spatlib[zoo]'", allow_module_level=True)

ZOO_MODEL = "Ding2020MMA"     # a WideResNet-28-4 (5.8M parameters): the cheapest real zoo entry


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Tests never download: the download host does not answer."""
    monkeypatch.setattr(zoo, "download_reachable", lambda *a, **k: False)


def zoo_architecture(name: str = ZOO_MODEL, dataset: str = "cifar10") -> torch.nn.Module:
    zoo.import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
    return model_dicts[BenchmarkDataset(dataset)][ThreatModel.Linf][name]["model"]()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """MODEL_DIR/cifar10/Linf/Ding2020MMA.pt with random weights, wrapped as the authors'
    checkpoints often are ({"state_dict": ...} of a DataParallel model), and the state_dict."""
    torch.manual_seed(0)
    arch = zoo_architecture()
    state = arch.state_dict()
    for k, v in state.items():       # BN statistics away from 0 / 1 too
        if "running_var" in k:
            v.uniform_(0.5, 2.0)
        elif "running_mean" in k:
            v.normal_(0, 0.1)
    root = tmp_path_factory.mktemp("models")
    (root / "cifar10" / "Linf").mkdir(parents=True)
    torch.save({"state_dict": OrderedDict(("module." + k, v) for k, v in state.items())},
               root / "cifar10" / "Linf" / f"{ZOO_MODEL}.pt")
    return root, state


def by_hand(state: dict) -> torch.nn.Module:
    model = zoo_architecture()
    model.load_state_dict(state)
    return model.eval()


def test_a_zoo_model_gives_the_logits_of_the_same_model_loaded_by_hand(model_dir):
    root, state = model_dir
    target = cards.load_target(f"robustbench:{ZOO_MODEL}", model_dir=root)
    assert target.kind == "robustbench" and target.default_name == ZOO_MODEL
    assert target.file == root / "cifar10" / "Linf" / f"{ZOO_MODEL}.pt"
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(target.model(x), by_hand(state)(x))
    assert not target.model.training


def test_spat_eval_of_a_zoo_model_writes_its_card(model_dir, tmp_path, capsys):
    root, state = model_dir
    rng = np.random.default_rng(0)
    images = tmp_path / "rgb.npz"
    np.savez(images, x_train=rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8),
             y_train=np.arange(4) % 10, x_test=rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8),
             y_test=np.arange(6) % 10, class_names=np.array([str(k) for k in range(10)]))
    out = tmp_path / "card.json"
    code = cards.cli_main([f"robustbench:{ZOO_MODEL}", "--model-dir", str(root), "--data-path",
                           str(images), "--suite", "clean", "--device", "cpu", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    card = json.loads(out.read_text())
    x = torch.from_numpy(np.load(images)["x_test"]).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        expected = (by_hand(state)(x).argmax(1) == torch.arange(6) % 10).float().mean().item()
    assert card["clean_acc"] == pytest.approx(expected)
    assert card["name"] == ZOO_MODEL and card["target_kind"] == "robustbench"
    assert card["model"] == f"RobustBench {ZOO_MODEL} (cifar10, Linf)"
    assert len(card["target_sha256"]) == 64
    assert cards.card_row(cards.load_card(out))["method"] == ZOO_MODEL   # notebook 03's row


def test_missing_checkpoint_offline_is_one_line_naming_the_file_before_any_data(
        tmp_path, monkeypatch, capsys):
    def no_data(*a, **k):
        raise AssertionError("the data was loaded before the checkpoint was checked")
    monkeypatch.setattr(targets, "dataset_from_config", no_data)
    code = cards.cli_main([f"robustbench:{ZOO_MODEL}", "--model-dir", str(tmp_path / "empty"),
                           "--device", "cpu", "--out", str(tmp_path / "c.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    want = tmp_path / "empty" / "cifar10" / "Linf" / f"{ZOO_MODEL}.pt"
    assert f"put https://drive.google.com/uc?id=" in err[0] and f" at {want} " in err[0]
    assert "cannot be reached (offline)" in err[0]
    assert not (tmp_path / "c.json").exists()


@pytest.mark.parametrize("args, message", [
    (["robustbench:Ding2020MAM"], "no cifar10 Linf model of that name in RobustBench 1.1.1 "
                                  "(did you mean 'Ding2020MMA'?)"),
    (["robustbench:Ding2020MMA", "--threat-model", "Linfinity"],
     "--threat-model: 'Linfinity' is not one of RobustBench's threat models (did you mean "
     "'Linf'?): Linf, L2, corruptions, corruptions_3d"),
    (["robustbench:Hendrycks2020AugMix_WRN"], "it is a cifar10 corruptions and cifar100 "
                                               "corruptions model: pass --dataset / --threat-model"),
    (["robustbench:Ding2020MMA", "--dataset", "digits"], "no 'digits' models"),
    (["tiny.pt", "--threat-model", "L2"], "--threat-model: only a robustbench:NAME target takes it"),
])
def test_bad_zoo_requests_are_one_line(args, message, tmp_path, capsys):
    code = cards.cli_main([*args, "--device", "cpu", "--out", str(tmp_path / "c.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_a_zoo_model_serves_as_notebook_01s_oracle(model_dir, monkeypatch):
    root, state = model_dir
    monkeypatch.setenv(zoo.MODEL_DIR_ENV, str(root))
    ds = type("Data", (), {"name": "cifar10"})()
    oracle = oracles.build_oracle("ensemble", ds, checkpoints=[f"robustbench:{ZOO_MODEL}"])
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = by_hand(state)(x).softmax(1)
    assert torch.allclose(oracle.predict_proba(x), expected, atol=1e-6)
    npz = type("Data", (), {"name": "npz"})()
    with pytest.raises(ValueError, match="the data is 'npz'"):
        oracles.build_oracle("ensemble", npz, checkpoints=[f"robustbench:{ZOO_MODEL}"])


# --------------------------------------------------------------------------------------------
# foreign checkpoints as they come
@pytest.fixture
def digits_weights():
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1, image_size=8)
    return model.state_dict()


@pytest.mark.parametrize("wrap", [
    lambda s: s,
    lambda s: OrderedDict(("module." + k, v) for k, v in s.items()),
    lambda s: {"state_dict": OrderedDict(("module." + k, v) for k, v in s.items()), "epoch": 7},
    lambda s: {"model": OrderedDict(("model." + k, v) for k, v in s.items())},
    lambda s: {"state_dict": OrderedDict(("module.model." + k, v) for k, v in s.items())},
], ids=["plain", "module", "state_dict+module", "model+model", "module.model"])
def test_published_state_dicts_load_as_they_come(wrap, digits_weights):
    model = build_model("small_cnn", 10, 1, image_size=8)
    zoo.load_published_state_dict(model, wrap(digits_weights), "w.pt")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in digits_weights.items())


def test_a_state_dict_that_does_not_fit_names_its_keys(digits_weights):
    model = build_model("small_cnn", 10, 1, image_size=8)
    bad = OrderedDict(("module." + k, v) for k, v in digits_weights.items() if "fc" not in k)
    bad["module.extra.weight"] = torch.zeros(1)
    with pytest.raises(zoo.ZooError) as e:
        zoo.load_published_state_dict(model, {"state_dict": bad}, "w.pt")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("w.pt: does not fit the model (")
    assert "4 missing key(s): fc1.bias, fc1.weight, fc2.bias, ... (4 in all)" in msg
    assert "1 unexpected key(s): extra.weight" in msg
    shape = OrderedDict(digits_weights)
    shape["classifier.bias"] = torch.zeros(3)
    with pytest.raises(zoo.ZooError, match=r"w\.pt: does not fit the model: size mismatch for "
                                           r"classifier\.bias"):
        zoo.load_published_state_dict(model, shape, "w.pt")
    with pytest.raises(zoo.ZooError, match="not a state_dict"):
        zoo.load_published_state_dict(model, {"epoch": 3, "acc": torch.zeros(1), "x": 1}, "w.pt")
