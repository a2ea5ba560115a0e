# Two commands on a fresh machine:  `make quickstart`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install quickstart test test-fast clean

# torch is pinned first so no dependency can pull a multi-GB CUDA build on a CPU machine.
$(STAMP): setup.py pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[offline,dev]"
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/gad quickstart

# The Slurm tests bring up a real slurmctld + slurmd on 127.0.0.1: Debian's slurm-wlm and munge.
test: $(STAMP)
	bash slurm/dev/install_local_slurm.sh
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache
