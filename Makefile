# make train: set up .venv and run the main job; make test: set up .venv, run the linter and the tests;
# make test-slow: the tests marked `slow` (the GPU script's rehearsals, compiled training);
# make test-kernels: the tests marked `exact` again under the kernels of CPUs without AVX-512, and without AVX2.
# Extra training flags: make train ARGS="--dataset fake --num_epochs 6"
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.14.1 torchvision==0.29.1
ARGS ?=

.PHONY: setup train test test-slow test-kernels clean FORCE

setup: $(VENV)/.installed

# installed again when the package's metadata or TORCH changes
$(VENV)/.installed: setup.cfg pyproject.toml $(VENV)/.torch
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet $(TORCH) -e ".[tensorboard,test]"
	touch $@

# the TORCH of the last call, rewritten only when it differs: its date is when TORCH last changed
$(VENV)/.torch: FORCE
	@mkdir -p $(VENV)
	@echo '$(TORCH)' | cmp -s - $@ || echo '$(TORCH)' > $@

# accelerate launch's own settings, all given, so that it starts without its warning about the ones it defaulted:
# one machine, a process per GPU (or one, on the CPU). Its precision 'no' reaches the script as "not set", so the
# script's --mixed_precision auto still decides. LAUNCH="--config_file configs/multi_gpu.yaml" replaces them all.
LAUNCH ?= --num_machines 1 --mixed_precision no --dynamo_backend no $(call processes,$(GPUS))
GPUS = $(shell $(VENV)/bin/python -c "import torch; print(torch.cuda.device_count())")
processes = $(if $(filter-out 0 1,$(1)),--multi_gpu --num_processes $(1),--num_processes 1)

# -q: a bad flag ends in the script's one line, without the launcher's CalledProcessError traceback
train: setup
	$(VENV)/bin/accelerate launch -q $(LAUNCH) launch/train.py --num_epochs 25 $(ARGS)

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadgroup --durations=10 -m "not slow" tests

# the rehearsals and integration runs of a minute or more each (tests marked slow)
test-slow: setup
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadgroup --durations=10 -m slow tests

# A user's CPU is not ours: PyTorch and oneDNN pick their kernels by what the CPU has, and the tests that compare runs
# must hold under every choice (docs/development.md)
test-kernels: setup
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 $(VENV)/bin/python -m pytest -q -n 2 --dist loadgroup -m exact tests
	ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=AVX2 $(VENV)/bin/python -m pytest -q -n 2 --dist loadgroup -m exact tests

clean:
	rm -rf $(VENV) *.egg-info
