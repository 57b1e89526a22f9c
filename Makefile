# Fresh machine: `make reproduce` (the main job) and `make test`. Both bootstrap .venv first.
PY     ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PARAMS ?= params/digits.yaml
JOBS   ?= 2
STAMP  := $(VENV)/.spat-installed

.PHONY: reproduce test test-fast lab install clean-outputs

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

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks/

clean-outputs:
	rm -rf outputs/*/ 
