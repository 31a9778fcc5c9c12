# make train: set up .venv and run the main job; make test: set up .venv, run the linter and the tests.
# Extra training flags: make train ARGS="--dataset folder --data_dir data/cifar10-jpeg"
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.14.1 torchvision==0.29.1
ARGS ?=

.PHONY: setup train test clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet $(TORCH) -e ".[tensorboard,test]"
	touch $@

train: setup
	$(VENV)/bin/accelerate launch launch/train.py --num_epochs 25 $(ARGS)

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadgroup --durations=10 tests

clean:
	rm -rf $(VENV) *.egg-info
