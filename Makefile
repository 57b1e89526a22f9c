# Fresh machine: `make smoke` (a few minutes at most: the whole pipeline on a toy experiment), then
# `make reproduce` (the main job) and `make test`. All bootstrap .venv first.
PY     ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PARAMS ?= params/digits.yaml
JOBS   ?= 2
STAMP  := $(VENV)/.spat-installed

.PHONY: reproduce smoke test test-fast lab install clean-outputs

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	# papermill and nbval look the kernel up by name: register it inside the venv
	$(BIN)/python -m ipykernel install --sys-prefix --name spat --display-name "Python (spat)"
	touch $@

install: $(STAMP)

reproduce: $(STAMP)
	$(BIN)/spat batch $(PARAMS) --jobs $(JOBS)

# first contact: 2 runs x 2 epochs and all three notebooks into outputs/smoke/ (the numbers
# mean nothing; it shows that everything works and what `make reproduce` will write)
smoke: $(STAMP)
	$(BIN)/spat batch params/smoke.yaml --jobs $(JOBS)

test: $(STAMP)
	$(BIN)/python -m pytest

# the unit tests without the slow ones (end-to-end batches, Slurm, the browser, the killed-run and
# torchrun tests) and without nbval's notebook runs (minutes of training): a few minutes
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" tests

# JupyterLab serves the repository root, so its file browser reaches the executed notebooks and
# figures under outputs/ too, and opens on notebooks/ (a folder given as an argument would become
# the root instead). Jupyter refuses to start as root unless told so, and root is the usual user
# in containers and CI images. Everything else (token, port, browser) is left to Jupyter's
# defaults or LAB_ARGS, e.g. make lab LAB_ARGS="--no-browser --port 8899"
LAB_ARGS ?=
LAB_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root)
lab: $(STAMP)
	$(BIN)/jupyter lab $(LAB_ROOT) --ServerApp.root_dir="$(CURDIR)" \
		--LabApp.default_url=/lab/tree/notebooks $(LAB_ARGS)

clean-outputs:
	rm -rf outputs/*/ 
