# The two commands a researcher needs: `make run` and `make test`.
# Both build .venv from nothing: torch is installed pinned first, because any
# other torch spec pulls gigabytes of CUDA wheels on a CPU machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedface-installed
TORCH_PIN := torch==2.13.0

.PHONY: run test install bench lint clean deploy-demo

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) -m experiments.train tracking.samples_copy=docs/img/default_run.png

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist worksteal

deploy-demo: $(STAMP)
	$(PY) -m experiments.deploy_demo $(ARGS)

bench: $(STAMP)
	$(PY) -m experiments.bench

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) mlruns outputs multirun .fedface-cache
