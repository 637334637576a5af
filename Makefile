# Whole set-up from a fresh clone: `make run` (the main job) and `make test` (the test suite).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q -c constraints.txt
# Local data: $VITBN_DATA if set, else ../shared/data when it is there; otherwise files are downloaded.
SHARED_DATA := $(wildcard $(CURDIR)/../shared/data)
export VITBN_DATA ?= $(if $(SHARED_DATA),$(abspath $(SHARED_DATA)),)

.PHONY: run test test-kernels lint format clean browser
# The browser test drives Debian's Chromium (Playwright's own browser download is not used).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
CHROMIUM_INSTALL := DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test]'
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/vitbn experiment lr-sweep --preset quick --report-dir reports/quick

browser:
	@command -v chromium >/dev/null || $(CHROMIUM_INSTALL) >/dev/null || \
		{ $(SUDO) apt-get update -qq && $(CHROMIUM_INSTALL) >/dev/null; }

test: $(VENV)/.installed browser
	$(PY) -m pytest -q

# The numerics tests again under the ATen kernels of other CPUs: the portable C++ path and AVX2 (what an AVX-512
# or AMX machine's tolerances must also survive). CI runs this after `make test`.
test-kernels: $(VENV)/.installed
	ATEN_CPU_CAPABILITY=default $(PY) -m pytest -q -m numerics -p no:cacheprovider
	ATEN_CPU_CAPABILITY=avx2 $(PY) -m pytest -q -m numerics -p no:cacheprovider

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: $(VENV)/.installed
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache mlruns.db mlruns runs reports
