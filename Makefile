# fwi-kaggle-toolkit: every target installs what it needs into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
KERNEL ?= infer
SMOKE_ARGS ?=

.PHONY: venv build smoke test test-slow test-all bench push-kernel kernel-status kernel-output clean

venv: $(STAMP)

$(STAMP): requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

build: venv
	$(PY) -m tools.build

# The main job: synthetic data (if absent) -> build -> papermill train + infer -> submission + local MAE
smoke: venv
	$(PY) -m tools.smoke $(SMOKE_ARGS)

test: venv
	$(PY) -m pytest -q -m "not slow"

test-slow: venv
	$(PY) -m pytest -q -m slow

test-all: venv
	$(PY) -m pytest -q

bench: venv
	$(PY) -m tools.bench

push-kernel: venv
	$(PY) -m tools.kaggle_cli push $(KERNEL)

kernel-status: venv
	$(PY) -m tools.kaggle_cli status $(KERNEL)

kernel-output: venv
	$(PY) -m tools.kaggle_cli output $(KERNEL)

clean:
	rm -rf build .pytest_cache
