"""One provenance record, one set of keys (``spatlib.util.provenance``), in everything the kit
writes about a number: a run folder's metrics.json and checkpoints, a result card, and the
machine blocks of ``spat doctor``, ``spat bench`` and the device check; a bench JSON of the
previous release (``torch``, ``gpu``, ...) still reads. And which weights a run's ``best``,
``last`` and ``ema`` are: one table (``runfolder.WHICH``) for ``load_run_model`` and ``spat eval``."""
import datetime
import json
import socket

import pytest
import torch

from spatlib import cards, runfolder as rf
from spatlib.device import bench
from spatlib.device.machine import machine_info, read_machine
from spatlib.train import train
from spatlib.util import PROVENANCE_KEYS, provenance

CPU = torch.device("cpu")
# what stays the same between two records of one process (date: when each was written)
SAME = ("spatlib_version", "git_commit", "torch_version", "cuda_version", "device", "device_name",
        "hostname")


def test_provenance_names_code_torch_device_host_and_date():
    p = provenance(CPU)
    assert tuple(p) == PROVENANCE_KEYS
    assert p["device"] == "cpu" and p["device_name"].startswith("cpu (")
    assert p["torch_version"] == torch.__version__ and p["cuda_version"] == torch.version.cuda
    assert p["hostname"] == socket.gethostname()
    when = datetime.datetime.fromisoformat(p["date"])
    assert when.utcoffset() == datetime.timedelta(0)
    assert abs((datetime.datetime.now(datetime.timezone.utc) - when).total_seconds()) < 60


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("runs") / "tiny"
    train({"name": "tiny", "seed": 0, "data": {"name": "digits", "train_limit": 64, "test_limit": 32},
           "model": {"name": "small_cnn"}, "attack": {"eps": 0.1, "alpha": 0.05, "steps": 1},
           "train": {"method": "pgd_at", "epochs": 1, "batch_size": 32, "val_steps": 1,
                     "ema": 0.9, "progress": False, "device": "cpu"}}, d)
    return d


def test_every_record_the_kit_writes_carries_the_same_provenance(run_dir):
    expected = {k: provenance(CPU)[k] for k in SAME}
    card, _ = cards.evaluate_target(str(run_dir), suite="clean", n_examples=8, device="cpu")
    records = {
        "metrics.json": json.loads((run_dir / rf.METRICS).read_text()),
        rf.LAST: rf.load_checkpoint(run_dir / rf.LAST),
        rf.BEST: rf.load_checkpoint(run_dir / rf.BEST),
        "card": card,
        "doctor machine": machine_info(CPU),
        "bench machine": bench.bench_machine(CPU, threads=1),
    }
    for where, record in records.items():
        assert set(PROVENANCE_KEYS) <= set(record), (where, set(PROVENANCE_KEYS) - set(record))
        assert {k: record[k] for k in SAME} == expected, where


def _old_cuda_bench_result() -> dict:
    """A ``spat bench`` result of the previous release on an H100: its machine block's keys."""
    machine = {"device": "cuda:0", "cpu": "AMD EPYC", "cpu_count": 16, "torch_threads": 16,
               "torch": "2.15.0", "spatlib": "0.1.0", "git_commit": None, "cuda": "12.8",
               "cudnn": 91000, "gpu": "NVIDIA H100 80GB HBM3", "gpu_memory_gb": 79.2}
    settings = {"device": "cuda:0", "repeats": 5, "batches": 20, "warmup": 3, "workers": 4}
    return {"machine": machine, "settings": settings, "rows": [], "ratios": []}


def test_a_bench_result_of_the_previous_release_reads_with_this_releases_keys():
    old = _old_cuda_bench_result()
    m = read_machine(old["machine"])
    assert (m["torch_version"], m["spatlib_version"], m["cuda_version"], m["cudnn_version"],
            m["device_name"]) == ("2.15.0", "0.1.0", "12.8", 91000, "NVIDIA H100 80GB HBM3")
    assert not {"torch", "spatlib", "cuda", "cudnn", "gpu"} & set(m)
    assert read_machine(m) == m                      # a current block reads as it is
    assert bench.device_tag(old["machine"]) == "nvidia-h100-80gb-hbm3"
    report = bench.markdown_report(old)
    assert report.startswith("### spat bench: NVIDIA H100 80GB HBM3\n")
    assert "torch 2.15.0, device cuda:0, 16 threads" in report
    # the current form of the same block prints the same lines
    assert bench.markdown_report({**old, "machine": m}) == report


def test_spat_eval_and_load_run_model_read_the_same_weights_for_each_choice(run_dir):
    weights = {}
    for which, (name, _) in rf.WHICH.items():
        target = cards.load_target(str(run_dir), which=which, device="cpu")
        model = rf.load_run_model(run_dir, which)[0]
        assert target.file == run_dir / name
        a, b = target.model.state_dict(), model.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), which
        weights[which] = b
    # the choices are different weights (an EMA run: best selects the EMA, last is the raw model)
    conv = next(k for k in weights["last"] if k.endswith("weight"))
    assert not torch.equal(weights["last"][conv], weights["ema"][conv])
    assert torch.equal(weights["best"][conv], weights["ema"][conv])
