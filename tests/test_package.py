"""The installed package: imports touch no GPU, the `spat` command dispatches, the build
metadata is current."""
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import spatlib


def test_importing_every_module_does_not_initialize_cuda():
    modules = [m.name for m in pkgutil.walk_packages(spatlib.__path__, "spatlib.")]   # subpackages too
    assert {"spatlib.attacks", "spatlib.semantics", "spatlib.train", "spatlib.evaluate",
            "spatlib.launch.cli", "spatlib.device.doctor", "spatlib.device.bench"} <= set(modules)
    code = ("import importlib, torch\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "assert not torch.cuda.is_initialized(), 'CUDA initialized at import'\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_the_build_lists_every_subpackage():
    # a subpackage the build does not find is missing from the wheel
    tomllib = pytest.importorskip("tomllib")     # Python >= 3.11
    from setuptools import find_packages
    root = Path(__file__).resolve().parents[1]
    include = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    listed = find_packages(str(root), include=include)
    found = ["spatlib"] + [m.name for m in pkgutil.walk_packages(spatlib.__path__, "spatlib.") if m.ispkg]
    assert sorted(listed) == sorted(found)


def test_spat_command_lists_commands_and_rejects_unknown_ones():
    ok = subprocess.run([sys.executable, "-m", "spatlib.cli", "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "batch" in ok.stdout and "train" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "spatlib.cli", "trian"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown command 'trian'" in bad.stderr


def test_building_the_package_raises_no_deprecation_warning(tmp_path):
    """pip install ran setuptools' metadata step and warned (three times) that project.license
    as a TOML table is deprecated: the SPDX string needs setuptools >= 77 at build time."""
    root = Path(__file__).resolve().parents[1]
    packages = [p.relative_to(root).as_posix() for p in sorted(root.glob("spatlib/**/__init__.py"))]
    for name in ("pyproject.toml", "README.md", *packages):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, tmp_path / name)
    code = ("import tempfile\nfrom setuptools import build_meta\n"
            "build_meta.prepare_metadata_for_build_wheel(tempfile.mkdtemp())")
    out = subprocess.run([sys.executable, "-W", "always", "-c", code], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Deprecat" not in out.stdout + out.stderr, out.stderr
    text = (root / "pyproject.toml").read_text()
    assert 'license = "MIT"' in text and 'requires = ["setuptools>=77"]' in text
