"""The run folder's files without training: names, the history CSV, damaged files named in
their errors, the repair of a best checkpoint that a kill left stale, provenance."""
from __future__ import annotations

import csv
import math

import pytest
import torch
from torch import nn

from spatlib import runfolder as rf
from spatlib.config import RunConfig


def _last_state(epoch: int, best_epoch: int, weight: float) -> dict:
    """A checkpoint_last.pt dict as the trainer writes it (the keys repair_best reads)."""
    model = nn.Linear(2, 3)
    with torch.no_grad():
        model.weight.fill_(weight)
    return {"format": rf.CHECKPOINT_FORMAT, "kind": "last", "epoch": epoch,
            "model": model.state_dict(), "best": {"epoch": best_epoch},
            "optimizer": {"state": {}}, "scaler": {}, "rng": [{}], "history": [{"epoch": 1}]}


def test_run_file_names():
    assert rf.RUN_FILES == ("config.yaml", "history.csv", "checkpoint_last.pt",
                            "checkpoint_best.pt", "metrics.json")
    assert rf.eval_cache_path("runs/a", 8 / 255).name == "eval_8-255.json"
    assert rf.eval_cache_path("runs/a", 0.3).as_posix() == "runs/a/eval_0.3.json"


def test_history_csv_keeps_every_float_exactly_and_missing_values_as_nan(tmp_path):
    rows = [{"epoch": 1, "lr": 0.1, "train_loss": 1 / 3, "val_source": "test[:512]"},
            {"epoch": 2, "lr": 0.01, "train_loss": float("nan"), "val_source": "test[:512]"}]
    columns = ["epoch", "lr", "train_loss", "val_clean_acc", "val_source"]
    rf.write_history(tmp_path, rows, columns)
    with open(tmp_path / rf.HISTORY) as f:
        back = list(csv.DictReader(f))
    assert list(back[0]) == columns
    assert float(back[0]["train_loss"]) == 1 / 3           # repr: no digit lost
    assert math.isnan(float(back[1]["train_loss"])) and back[0]["val_clean_acc"] == "nan"
    assert rf.load_history(tmp_path)["lr"].tolist() == [0.1, 0.01]
    assert [p.name for p in tmp_path.iterdir()] == [rf.HISTORY]   # no temp file left


def test_damaged_config_or_metrics_is_an_error_naming_the_file(tmp_path):
    assert rf.read_saved_config(tmp_path) is None and rf.read_finished_metrics(tmp_path) is None
    assert rf.load_metrics(tmp_path) == {}
    (tmp_path / rf.CONFIG).write_text("train: [unclosed")
    with pytest.raises(rf.CheckpointError, match="config.yaml: not valid YAML"):
        rf.read_saved_config(tmp_path)
    with pytest.raises(rf.CheckpointError, match="config.yaml: not valid YAML"):
        rf.read_run_config(tmp_path)        # the one reader of config.yaml, however it is asked
    (tmp_path / rf.CONFIG).write_text("- a list\n- not a config\n")
    with pytest.raises(rf.CheckpointError, match="config.yaml: expected a mapping at the top level"):
        rf.read_saved_config(tmp_path)
    (tmp_path / rf.METRICS).write_text('{"test_clean_acc": 0.9')
    with pytest.raises(rf.CheckpointError, match="metrics.json: not valid JSON"):
        rf.read_finished_metrics(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.yaml"):
        rf.read_run_config(tmp_path / "missing")


def test_config_written_is_read_back_and_checked_against_the_request(tmp_path):
    cfg = RunConfig()
    rf.write_config(tmp_path, cfg)
    assert rf.read_run_config(tmp_path) == cfg
    saved = rf.read_saved_config(tmp_path)
    rf.check_same_run(saved, {**saved, "name": "renamed"}, tmp_path / rf.CONFIG)   # cosmetic
    other = {**saved, "train": {**saved["train"], "epochs": 3}}
    with pytest.raises(rf.CheckpointError, match=r"train\.epochs: 10 -> 3"):
        rf.check_same_run(saved, other, tmp_path / rf.CONFIG)


def test_repair_best_rewrites_a_best_checkpoint_a_kill_left_stale(tmp_path):
    # killed after checkpoint_last.pt of epoch 3 (the best) and before checkpoint_best.pt
    rf.save_checkpoint(tmp_path / rf.BEST, rf.best_of(_last_state(2, 2, 0.5)))
    last = _last_state(3, 3, 1.5)
    rf.repair_best(tmp_path, last)
    best = rf.load_checkpoint(tmp_path / rf.BEST)
    assert best["epoch"] == 3 and best["kind"] == "best"
    assert torch.equal(best["model"]["weight"], last["model"]["weight"])
    assert not {"optimizer", "scaler", "rng", "history"} & set(best)


def test_repair_best_refuses_a_best_checkpoint_of_another_epoch(tmp_path):
    rf.save_checkpoint(tmp_path / rf.BEST, rf.best_of(_last_state(1, 1, 0.5)))
    rf.repair_best(tmp_path, _last_state(3, 1, 1.5))          # best epoch 1 is on disk: fine
    with pytest.raises(rf.CheckpointError, match="holds epoch 1 but .* records epoch 2"):
        rf.repair_best(tmp_path, _last_state(3, 2, 1.5))


class _NotAllowed:
    """A type no checkpoint may hold (module-level, so torch.save can pickle it)."""


def test_unreadable_checkpoints_say_what_is_wrong_without_torchs_unsafe_advice(tmp_path):
    import pickle
    good = tmp_path / "good.pt"
    rf.save_checkpoint(good, _last_state(2, 1, 0.5))
    data = good.read_bytes()
    cases = {
        "random.pt": (torch.Generator().manual_seed(0), None),
        "truncated.pt": (data[: len(data) // 2], r"truncated .*end of the file is missing"),
        "object.pt": (None, r"object of type .*_NotAllowed"),
        "pickle.pt": (pickle.dumps(_NotAllowed()), r"not a PyTorch checkpoint \(not a zip archive\)"),
        "empty.pt": (b"", "empty"),
    }
    rnd = torch.randint(0, 256, (4096,), generator=cases["random.pt"][0], dtype=torch.uint8)
    cases["random.pt"] = (bytes(rnd.tolist()), r"not a PyTorch checkpoint \(not a zip archive\)")
    for name, (content, pattern) in cases.items():
        path = tmp_path / name
        if content is None:
            torch.save({"format": rf.CHECKPOINT_FORMAT, "model": {}, "extra": _NotAllowed()}, path)
        else:
            path.write_bytes(content)
        with pytest.raises(rf.CheckpointError, match=pattern) as info:
            rf.load_checkpoint(path)
        message = str(info.value)
        assert message.startswith(f"{path}: ") and "weights_only" not in message, message
        assert len(message.splitlines()) == 1, message
    assert rf.load_checkpoint(good)["epoch"] == 2   # a whole checkpoint still loads


def test_configs_saved_before_val_split_mean_what_they_meant():
    # config.yaml of a run trained before data.val_split: val_size 150 held out training
    # images (today's val_split: train); val_size 0 selected on the first 512 test images
    today = RunConfig().to_dict()
    held = RunConfig().to_dict()
    held["data"]["val_size"] = 150
    del held["data"]["val_split"]
    assert rf.upgrade_config(held)["data"] == {**today["data"], "val_size": 150, "val_split": "train"}
    on_test = {**held, "data": {**held["data"], "val_size": 0}}
    assert rf.upgrade_config(on_test)["data"] == {**today["data"], "val_size": None, "val_split": "test"}
    # a key added since gets its default; a config that no longer parses is left as saved
    del held["train"]["patience"]
    assert rf.upgrade_config(held)["train"]["patience"] == 0
    assert rf.upgrade_config({"train": {"lr": -1}}) == {"train": {"lr": -1}}
