"""spat doctor on this CPU: every check passes on a sound install, and a model whose forward
breaks under bf16 autocast fails the doctor with the check named (the real trainer, attack and
checkpoint code runs in both; the break is a forward hook on the model, no mock)."""
import json

import pytest
import torch

from spatlib.device import doctor

# the fast form: the CPU default (CIFAR-shaped SmallCNN, batch 8), three methods that cover clean training, the PGD-KL
# attack (TRADES) and the SPAT attack; every method and torch.compile: the slow test
FAST = ["--device", "cpu", "--methods", "standard,trades,spat_at", "--attack-steps", "1", "--quiet"]
CHECKS = {"attack under autocast", "loss finite", "loss decreasing", "AWP step",
          "batched VJPs = per-class loop", "channels_last = NCHW", "checkpoint resume bit-equal",
          "DDP world size 1"}


def _printed_checks(stdout: str) -> set[str]:
    """The check names of the printed table's rows."""
    return {line[6:].split("  ")[0] for line in stdout.splitlines() if line[:4] in ("PASS", "FAIL")}


def test_doctor_passes_on_this_cpu(tmp_path, capsys):
    out = tmp_path / "doctor.json"
    code = doctor.cli_main([*FAST, "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    result = json.loads(out.read_text())
    assert result["ok"] is True
    assert {r["check"] for r in result["rows"]} == CHECKS
    assert all(r["ok"] for r in result["rows"])
    assert result["machine"]["torch_version"] == str(torch.__version__)
    assert result["settings"]["precision"] == "bf16"
    by = {(r["check"], r["subject"]): r for r in result["rows"]}
    assert _printed_checks(printed) == CHECKS and "FAIL" not in printed
    for method in ("standard", "trades", "spat_at"):
        losses = by[("loss finite", f"small_cnn {method}")]["values"]["losses"]
        assert len(losses) == 3 and losses[-1] < losses[0]
        assert by[("loss finite", f"small_cnn {method}")]["images_per_s"] > 0
    attack = by[("attack under autocast", "small_cnn spat_at")]["values"]
    assert attack["dtype"] == "float32" and attack["max_linf"] <= 8 / 255 + 1e-6
    assert attack["logits_finite"] is True
    awp = by[("AWP step", "small_cnn trades")]["values"]   # SmallCNN: 4 conv + 3 linear weights
    assert awp["perturbed"] == 7 and awp["size_rel_err"] < 1e-4 and awp["changed_besides"] == []
    assert awp["restore_rel_err"] <= 1e-6
    resume = by[("checkpoint resume bit-equal", "small_cnn pgd_at")]["values"]
    assert resume["loss_uninterrupted"] == resume["loss_resumed"]
    assert by[("DDP world size 1", "gloo")]["values"]["backend"] == "gloo"
    assert not torch.distributed.is_initialized()          # the doctor destroyed its group
    assert f"all {len(result['rows'])} checks passed" in printed


def _nan_under_bf16(model: torch.nn.Module) -> None:
    """The deliberately broken path: logits become NaN whenever CPU bf16 autocast is on."""
    def hook(module, inputs, output):
        return output * float("nan") if torch.is_autocast_enabled("cpu") else output
    model.register_forward_hook(hook)


def test_a_forward_broken_under_bf16_fails_naming_the_check():
    settings = doctor.DoctorSettings(device="cpu", models=["small_cnn"], methods=["pgd_at"],
                                     batch_size=8, attack_steps=1)
    result = doctor.run_doctor(settings, model_hook=_nan_under_bf16)
    assert result["ok"] is False
    status = {(r["check"], r["subject"]): r["ok"] for r in result["rows"]}
    assert status[("loss finite", "small_cnn pgd_at")] is False
    assert status[("loss decreasing", "small_cnn pgd_at")] is False
    assert status[("attack under autocast", "small_cnn pgd_at")] is False   # NaN logits
    assert status[("AWP step", "small_cnn pgd_at")] is False
    # fp32 paths are not broken, and the doctor says so
    assert status[("batched VJPs = per-class loop", "small_cnn")] is True
    assert status[("DDP world size 1", "gloo")] is True
    table = doctor.format_table(result)
    assert "FAIL  loss finite" in table and "checks FAILED: " in table
    assert "loss finite (small_cnn pgd_at)" in table.splitlines()[-1]


def test_bad_settings_are_one_error_before_any_check(capsys):
    assert doctor.cli_main(["--device", "cpu", "--models", "resnet50", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--models: unknown model 'resnet50'" in err[0]
    assert doctor.cli_main(["--device", "cpu", "--steps", "1", "--quiet"]) == 2
    assert "--steps" in capsys.readouterr().err


@pytest.mark.slow
def test_doctor_every_method_and_compile_on_cpu(tmp_path, capsys):
    code = doctor.cli_main(["--device", "cpu", "--compile", "--quiet", "--out", str(tmp_path / "d.json")])
    printed = capsys.readouterr().out
    assert code == 0, printed
    result = json.loads((tmp_path / "d.json").read_text())
    checks = {(r["check"], r["subject"]) for r in result["rows"]}
    assert ("torch.compile = eager", "small_cnn pgd_at") in checks
    assert {s.split()[1] for c, s in checks if c == "loss finite"} == set(doctor.METHODS)


@pytest.mark.parametrize("out, why", [("/proc/x/doctor.json", "cannot create the folder /proc/x"),
                                      ("{tmp}", "a folder, not a file")])
def test_an_unwritable_out_is_refused_before_any_check(out, why, tmp_path, monkeypatch, capsys):
    def never(*a, **k):
        raise AssertionError("the checks ran before --out was checked")
    monkeypatch.setattr(doctor, "run_doctor", never)
    out = out.format(tmp=tmp_path)
    assert doctor.cli_main(["--device", "cpu", "--out", out]) == 2
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    assert captured.out == "" and line.startswith(f"error: --out {out}: ") and why in line, captured
