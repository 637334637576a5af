# Whole set-up from a fresh clone: `make run` (the main job) and `make test` (the test suite).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q -c constraints.txt
# Local data: $VITBN_DATA if set, else ../shared/data when it is there; otherwise files are downloaded.
SHARED_DATA := $(wildcard $(CURDIR)/../shared/data)
export VITBN_DATA ?= $(if $(SHARED_DATA),$(abspath $(SHARED_DATA)),)

.PHONY: run test lint format clean

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test]'
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/vitbn experiment lr-sweep --preset quick --report-dir reports/quick

test: $(VENV)/.installed
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: $(VENV)/.installed
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache mlruns.db mlruns runs reports
