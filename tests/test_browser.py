"""JupyterLab as a user meets it: `make lab`, and notebook 02 run in a real browser.

The browser is Debian's Chromium with its chromedriver (scripts/install_browser.sh), driven by
Selenium with both paths given, so nothing is downloaded when the test runs. JupyterLab, the
`spat` kernel and the notebook are the real ones; the server listens on 127.0.0.1 only, with a
token, and is killed with its kernels whatever happens.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
KERNEL = "spat"
SERVER_START_S = 90      # JupyterLab's first start builds its caches: slow on a busy CPU
NOTEBOOK_RUN_S = 900     # notebook 02 trains 15 epochs and runs the suite: ~1-3 min on a CPU
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,1600"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _jupyter_env(home: Path) -> dict:
    """The caller's environment with Jupyter's per-user state in ``home`` (no user settings,
    workspaces or runtime files leak in or out) and the checkout's spatlib first on the path."""
    env = dict(os.environ)
    for var, sub in (("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_RUNTIME_DIR", "runtime"),
                     ("JUPYTERLAB_SETTINGS_DIR", "lab-settings"),
                     ("JUPYTERLAB_WORKSPACES_DIR", "lab-workspaces")):
        (home / sub).mkdir(parents=True, exist_ok=True)
        env[var] = str(home / sub)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def _server_args(port: int, token: str) -> list[str]:
    return ["--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
            "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}"]


def _api(port: int, token: str, path: str):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                 headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def _wait_for_server(proc: subprocess.Popen, port: int, token: str, log: Path) -> dict:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"JupyterLab exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            return _api(port, token, "/api/status")
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.5)
    pytest.fail(f"JupyterLab did not answer on port {port} within {SERVER_START_S} s:\n"
                f"{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> list[psutil.Process]:
    """Stop the server and everything it started; return what is still alive after that.
    Kernels run in sessions of their own, so the process group is not enough: collect the
    descendants before the server goes."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)      # Jupyter's own shutdown also stops its kernels
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    return psutil.wait_procs(family, timeout=10)[1]


def _start_lab(cmd: list[str], cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def _redirect(port: int, token: str, path: str) -> str | None:
    """Where the server redirects ``path`` (its Location), without following it."""
    class Keep(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                 headers={"Authorization": f"token {token}"})
    try:
        urllib.request.build_opener(Keep).open(req, timeout=10)
    except urllib.error.HTTPError as e:
        return e.headers.get("Location") if 300 <= e.code < 400 else None
    return None


def test_make_lab_starts_jupyterlab_on_the_notebooks(tmp_path: Path):
    """`make lab` serves the repository, opens on notebooks/, and its file browser reaches
    outputs/ (the executed notebooks and figures); it answers as root too (Jupyter refuses root
    unless told --allow-root). The venv is this interpreter's: -o keeps make from reinstalling it."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    port, token = _free_port(), secrets.token_hex(16)
    prefix = Path(sys.prefix)
    cmd = ["make", "-s", "-C", str(REPO), "lab", f"VENV={prefix}", "-o", str(prefix / ".spat-installed"),
           "LAB_ARGS=" + " ".join(_server_args(port, token))]
    log = tmp_path / "lab.log"
    proc = _start_lab(cmd, REPO, _jupyter_env(tmp_path / "home"), log)
    try:
        status = _wait_for_server(proc, port, token, log)
        root = _api(port, token, "/api/contents")
        notebooks = _api(port, token, "/api/contents/notebooks")
        outputs = _api(port, token, "/api/contents/outputs")
        opens = _redirect(port, token, "/")
    finally:
        left = _stop(proc)
    assert left == []
    assert "started" in status, status
    assert {(i["name"], i["type"]) for i in root["content"]} >= {("notebooks", "directory"),
                                                                  ("outputs", "directory")}, root
    names = {item["name"] for item in notebooks["content"]}
    assert {"01_hypothesis.ipynb", "02_training.ipynb", "03_robustness.ipynb"} <= names, names
    assert outputs["type"] == "directory"
    assert opens is not None and opens.split("?")[0].endswith("/lab/tree/notebooks"), opens


@pytest.mark.parametrize("notebook", ["01_hypothesis", "02_training", "03_robustness"])
def test_notebooks_name_the_spat_kernel(notebook: str):
    """JupyterLab opens them on the kit's kernel (no kernel dialog) and papermill picks it by
    name; committed without outputs except the cells nbval compares."""
    nb = json.loads((NOTEBOOKS / f"{notebook}.ipynb").read_text(encoding="utf-8"))
    assert nb["metadata"]["kernelspec"]["name"] == KERNEL
    assert nb["metadata"]["kernelspec"]["language"] == "python"
    with_outputs = [c["source"][:1] for c in nb["cells"] if c["cell_type"] == "code"
                    and c["outputs"] and "# NBVAL_CHECK_OUTPUT" not in "".join(c["source"])]
    assert with_outputs == []


# --- the browser -------------------------------------------------------------------------------

# JupyterLab settings for a reproducible page: every cell in the DOM (no windowing), no news or
# update toasts over the notebook
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings":
        {"fetchNews": "false", "checkForUpdates": False},
}

# Per code cell: its source, its prompt ("[3]:", "[*]:", "[ ]:"), its stderr outputs (where
# JupyterLab also renders tracebacks), its ipywidgets progress bars (tqdm.notebook: an HBox of
# text, a FloatProgress and text; green "success" once complete) and its images' sizes.
CELLS_JS = """
return Array.from(document.querySelectorAll('.jp-Notebook .jp-CodeCell')).map(cell => ({
  source: (cell.querySelector('.jp-InputArea-editor') || cell).innerText,
  prompt: (cell.querySelector('.jp-InputArea-prompt') || {innerText: ''}).innerText.trim(),
  stderr: Array.from(cell.querySelectorAll(
      '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')).map(e => e.innerText),
  progress: Array.from(cell.querySelectorAll(
      '.jp-OutputArea-output .jupyter-widgets.widget-hprogress')).map(e => ({
        text: (e.closest('.widget-hbox') || e).innerText,
        complete: e.querySelector('.progress-bar-success') !== null})),
  images: Array.from(cell.querySelectorAll('.jp-OutputArea-output img')).map(
      e => [e.naturalWidth, e.naturalHeight]),
}));
"""


def _driver(profile: Path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is a dev dependency: "
                                    "pip install -e '.[dev]'")
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    # the driver's path given: Selenium skips selenium-manager, which would download one
    return webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)


def _wait(predicate, timeout: float, what: str, poll: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _screenshot(driver, tmp_path: Path, name: str) -> None:
    """Into the test's tmp_path and, for a reader, outputs/browser/ (git-ignored)."""
    path = tmp_path / name
    driver.save_screenshot(str(path))
    keep = REPO / "outputs" / "browser"
    keep.mkdir(parents=True, exist_ok=True)
    shutil.copy2(path, keep / name)


@pytest.mark.slow
def test_notebook_02_runs_in_jupyterlab_in_chromium(tmp_path: Path):
    """Open notebook 02 in JupyterLab in headless Chromium, run all its cells on the `spat`
    kernel from the Run menu, and read the page: the training's progress widget, the learning
    curves drawn, no error output anywhere."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (Debian: scripts/install_browser.sh)")
    pytest.importorskip("selenium", reason="selenium is a dev dependency: pip install -e '.[dev]'")
    pytest.importorskip("ipywidgets", reason="ipywidgets is a dependency: pip install -e .")
    from jupyter_client.kernelspec import KernelSpecManager
    assert KERNEL in KernelSpecManager().find_kernel_specs(), \
        f"kernel {KERNEL!r} not registered: run `make install`"

    work = tmp_path / "work"
    work.mkdir()
    shutil.copy2(NOTEBOOKS / "02_training.ipynb", work)   # spatlib comes from PYTHONPATH
    home = tmp_path / "home"
    env = _jupyter_env(home)
    for rel, settings in LAB_SETTINGS.items():
        f = Path(env["JUPYTERLAB_SETTINGS_DIR"]) / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(settings))
    port, token = _free_port(), secrets.token_hex(16)
    cmd = [sys.executable, "-m", "jupyter", "lab", *_server_args(port, token),
           f"--ServerApp.root_dir={work}"] + (["--allow-root"] if os.geteuid() == 0 else [])
    log = tmp_path / "jupyterlab.log"
    server = _start_lab(cmd, work, env, log)
    driver = None
    try:
        _wait_for_server(server, port, token, log)
        driver = _driver(tmp_path / "chromium-profile")
        driver.get(f"http://127.0.0.1:{port}/lab/tree/02_training.ipynb?token={token}")
        from selenium.webdriver.common.by import By

        cells = lambda: driver.execute_script(CELLS_JS)                     # noqa: E731
        nb = json.loads((work / "02_training.ipynb").read_text(encoding="utf-8"))
        n_code = sum(c["cell_type"] == "code" for c in nb["cells"])
        _wait(lambda: len(cells()) == n_code, 120, f"the notebook's {n_code} code cells on the page")
        sessions = _wait(lambda: [s for s in _api(port, token, "/api/sessions")
                                  if s["kernel"]["execution_state"] == "idle"],
                         120, "the notebook's kernel to start")
        assert [s["kernel"]["name"] for s in sessions] == [KERNEL]

        # Run > Run All Cells, as a user does
        driver.find_element(By.XPATH, "//li[contains(@class,'lm-MenuBar-item')]"
                                      "[.//div[text()='Run']]").click()
        _wait(lambda: driver.find_elements(By.XPATH, "//li[contains(@class,'lm-Menu-item')]"
                                                     "[.//div[text()='Run All Cells']]"),
              10, "Run All Cells in the Run menu")[0].click()
        started = time.monotonic()
        _wait(lambda: any(c["prompt"] == "[*]:" for c in cells()), 30, "the first cell to run",
              poll=0.2)

        def finished():
            now = cells()
            busy = any(c["prompt"] == "[*]:" for c in now)
            kernel_idle = all(s["kernel"]["execution_state"] == "idle"
                              for s in _api(port, token, "/api/sessions"))
            return (not busy and kernel_idle) and now
        final = _wait(finished, NOTEBOOK_RUN_S, "all cells to finish", poll=2)
        run_s = time.monotonic() - started

        train_cell = next(c for c in final if "train_run(cfg, run_dir)" in c["source"])
        curve_cell = next(c for c in final if "plot_learning_curves" in c["source"])
        driver.execute_script("document.querySelectorAll('.jp-Notebook .jp-CodeCell')[arguments[0]]"
                              ".scrollIntoView()", final.index(train_cell))
        time.sleep(1)
        _screenshot(driver, tmp_path, "02_training-progress.png")
        driver.execute_script("document.querySelectorAll('.jp-Notebook .jp-CodeCell')[arguments[0]]"
                              ".scrollIntoView()", final.index(curve_cell))
        time.sleep(1)
        _screenshot(driver, tmp_path, "02_training-curves.png")

        errors = [(c["source"][:60], c["stderr"]) for c in final
                  if any("Traceback" in s or "Error" in s for s in c["stderr"])]
        assert errors == [], f"error output in the page: {errors}"
        prompts = [c["prompt"] for c in final]
        assert len(final) == n_code and all(p[1:-2].isdigit() for p in prompts), \
            f"not every cell ran (after {run_s:.0f} s): {prompts}"
        # the epochs bar: a widget, not text, and complete (the notebook trains 15 epochs)
        assert train_cell["progress"], "no progress widget in the training cell's output"
        assert any("15/15" in bar["text"] and bar["complete"] for bar in train_cell["progress"]), \
            train_cell["progress"]
        assert curve_cell["images"], "no figure in the learning-curve cell's output"
        width, height = curve_cell["images"][0]
        assert width > 200 and height > 100, f"learning-curve image not drawn: {width}x{height}"
    except BaseException:
        if driver is not None:
            try:
                _screenshot(driver, tmp_path, "02_training-failure.png")
            except Exception:   # the browser may be the thing that failed
                pass
        raise
    finally:
        if driver is not None:
            driver.quit()
        left = _stop(server)
    assert left == [], f"still running after JupyterLab stopped: {left}"
