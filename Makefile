# Quick start: `make demo` (install + run the demo), `make test` (install + run the tests).
VENV ?= .venv
# the interpreter that creates the venv (TPU VM images may need PYTHON=python3.11)
PYTHON ?= python3
PY := $(VENV)/bin/python
# two workers (one per core on the CI machines); a test file stays on one worker so its cached
# jitted setups are compiled once
PYTEST_ARGS ?= -n 2 --dist loadfile

.PHONY: install demo test test-slow lint bench clean

$(VENV)/.installed: requirements.txt constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -r requirements.txt
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m launch.demo --workdir runs/demo

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: install
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) -m bench.dit_throughput

clean:
	rm -rf runs .pytest_cache .ruff_cache
