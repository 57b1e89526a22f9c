"""The installed package: imports touch no GPU, the `spat` command dispatches."""
import pkgutil
import subprocess
import sys

import spatlib


def test_importing_every_module_does_not_initialize_cuda():
    modules = [m.name for m in pkgutil.iter_modules(spatlib.__path__, "spatlib.")]
    assert {"spatlib.attacks", "spatlib.semantics", "spatlib.train", "spatlib.evaluate"} <= set(modules)
    code = ("import importlib, torch\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "assert not torch.cuda.is_initialized(), 'CUDA initialized at import'\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_spat_command_lists_commands_and_rejects_unknown_ones():
    ok = subprocess.run([sys.executable, "-m", "spatlib.cli", "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "batch" in ok.stdout and "train" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "spatlib.cli", "trian"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown command 'trian'" in bad.stderr
