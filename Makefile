# fwi-kaggle-toolkit: every target installs what it needs into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
KERNEL ?= infer
SMOKE_ARGS ?=
REHEARSE_ARGS ?=

.PHONY: venv peers build smoke rehearse test test-slow test-all bench bench-peers push-kernel kernel-status kernel-output clean

venv: $(STAMP)

$(STAMP): requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

# the simulator's peers (Devito, deepwave) for the "peers" benchmark section
PEERS_STAMP := $(VENV)/.peers-installed
peers: $(PEERS_STAMP)

$(PEERS_STAMP): requirements-peers.txt $(STAMP)
	$(PY) -m pip install --quiet -r requirements-peers.txt
	$(PY) -m pip install --quiet --no-deps devito==4.8.23
	touch $(PEERS_STAMP)

build: venv
	$(PY) -m tools.build

# The main job: synthetic data (if absent) -> build -> papermill train + infer -> submission + local MAE
smoke: venv
	$(PY) -m tools.smoke $(SMOKE_ARGS)

# A scaled competition from the simulator, the built notebooks under papermill within a budget,
# the MAE per family after each stage (tools/rehearse.py; REHEARSE_ARGS="--budget 1800 --compare-budgets 200 600")
rehearse: venv
	$(PY) -m tools.rehearse $(REHEARSE_ARGS)

test: venv
	$(PY) -m pytest -q -m "not slow"

test-slow: venv
	$(PY) -m pytest -q -m slow

test-all: venv
	$(PY) -m pytest -q

bench: venv peers
	$(PY) -m tools.bench

bench-peers: venv peers
	$(PY) -m tools.bench --sections peers

push-kernel: venv
	$(PY) -m tools.kaggle_cli push $(KERNEL)

kernel-status: venv
	$(PY) -m tools.kaggle_cli status $(KERNEL)

kernel-output: venv
	$(PY) -m tools.kaggle_cli output $(KERNEL)

clean:
	rm -rf build .pytest_cache
