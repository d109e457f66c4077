# Two entry points: `make quickstart` (install + small sweep + fit + plots) and `make test`.
# Everything installs into .venv from the project's own files.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# A pinned torch keeps pip on the CPU wheel where the machine has one (a bare `torch`
# requirement can pull a multi-GB CUDA build onto a machine with no GPU).
TORCH ?= torch==2.13.0

.PHONY: install install-dev quickstart test gpu-test slurm-up slurm-down clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e .

install-dev: $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"

# The main job on built-in defaults: a small CPU isoflop sweep, then fits, multipliers and plots.
QUICKSTART := sweeps/quickstart.yaml
quickstart: install
	$(BIN)/isoflop plan $(QUICKSTART)
	$(BIN)/isoflop run $(QUICKSTART)
	$(BIN)/isoflop collect $(QUICKSTART)
	$(BIN)/isoflop fit results/quickstart
	$(BIN)/isoflop report results/quickstart

test: install-dev
	$(BIN)/python -m pytest -q -m "not gpu"

# A real single-node SLURM cluster on this machine (root; installs with apt-get when missing), to
# try `isoflop submit`; `eval "$$(scripts/local-slurm.sh env)"` points SLURM commands at it.
slurm-up:
	scripts/local-slurm.sh up

slurm-down:
	scripts/local-slurm.sh down

gpu-test: install-dev
	$(BIN)/python -m pytest -q -m gpu
	$(BIN)/python benchmarks/kernels.py --paper

clean:
	rm -rf $(VENV) runs .pytest_cache
