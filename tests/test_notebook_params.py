"""A notebook refuses an unknown or bad parameter before any work, however it is run: through
papermill's Python API, papermill's command line, or spat batch (its dry run included)."""
import subprocess
import sys
from pathlib import Path

import papermill as pm
import pytest

from spatlib import config
from spatlib.launch.plan import NOTEBOOKS as NOTEBOOK_FILES, notebook_parameters

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def test_check_names_the_unknown_parameter_and_the_closest_one():
    with pytest.raises(config.ConfigError, match=r"'attack_step' is unknown \(did you mean 'attack_steps'\?\)"):
        config.check_notebook_parameters("hypothesis", {"attack_step": 2, "In": [], "Out": {}})
    with pytest.raises(config.ConfigError, match=r"'run_dri' is unknown \(did you mean 'run_dir'\?\)"):
        config.check_notebook_parameters("training", {"run_dri": "/my/run"})
    with pytest.raises(config.ConfigError, match="'threads': 0"):
        config.check_notebook_parameters("robustness", {"threads": 0})
    with pytest.raises(config.ConfigError, match="hypothesis.eps_list"):
        config.check_notebook_parameters("hypothesis", {"eps_list": [2.0]})
    with pytest.raises(config.ConfigError, match="train.lr"):
        config.check_notebook_parameters("training", {"train": {"lr": -1}})
    # the kernel's own names, private names, modules and functions are not parameters
    config.check_notebook_parameters("hypothesis", {"In": [], "Out": {}, "_": None, "_i1": "",
                                                    "get_ipython": print, "config": config})


@pytest.mark.parametrize("notebook", sorted(NOTEBOOK_FILES))
def test_each_parameters_cell_holds_exactly_the_parameters_config_checks(notebook):
    # spat batch checks an experiment's notebook sections with config alone: right only while
    # each parameters cell defines exactly config's names (a key config allows but the cell
    # lacks would be injected and go unused; a cell default config lacks could never be set)
    defaults = notebook_parameters(NOTEBOOKS / NOTEBOOK_FILES[notebook])
    assert sorted(defaults) == sorted(config.notebook_parameter_names(notebook))
    config.check_notebook_parameters(notebook, defaults)        # and its defaults pass the checks


def test_papermill_api_fails_on_a_misspelt_parameter_before_training(tmp_path):
    model_dir = tmp_path / "model"
    with pytest.raises(pm.PapermillExecutionError) as e:
        pm.execute_notebook(str(NOTEBOOKS / "01_hypothesis.ipynb"), str(tmp_path / "out.ipynb"),
                            parameters={"attack_step": 2, "model_dir": str(model_dir)},
                            kernel_name="spat", progress_bar=False, cwd=str(tmp_path))
    assert "attack_step" in str(e.value) and "attack_steps" in str(e.value)
    assert not model_dir.exists()               # nothing was trained: it failed first


def test_papermill_api_fails_on_a_bad_value(tmp_path):
    with pytest.raises(pm.PapermillExecutionError, match="n_examples"):
        pm.execute_notebook(str(NOTEBOOKS / "01_hypothesis.ipynb"), str(tmp_path / "out.ipynb"),
                            parameters={"n_examples": -5, "model_dir": str(tmp_path / "m")},
                            kernel_name="spat", progress_bar=False, cwd=str(tmp_path))
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
def test_papermill_cli_fails_on_an_unknown_parameter_of_02(tmp_path):
    out = subprocess.run([sys.executable, "-m", "papermill", str(NOTEBOOKS / "02_training.ipynb"),
                          str(tmp_path / "out.ipynb"), "-k", "spat", "-p", "run_dri", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode != 0
    assert "'run_dri' is unknown (did you mean 'run_dir'?)" in out.stdout + out.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, key", [
    ("hypothesis.attacks=[pgd,spat_intersectoin]", "hypothesis.attacks"),
    ("hypothesis.eps_list=[2.0]", "hypothesis.eps_list"),
    ("hypothesis.n_examples=-5", "hypothesis.n_examples"),
    ("robustness.which=worst", "robustness.which"),
])
def test_spat_batch_dry_run_checks_notebook_section_values(tmp_path, override, key):
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "spatlib.cli", "batch", str(root / "params" / "smoke.yaml"),
                          "--out", str(tmp_path), "--dry-run", "--set", override],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert key in out.stderr and "Traceback" not in out.stderr
    assert not any(tmp_path.iterdir())          # nothing written
