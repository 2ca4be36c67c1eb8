# Two entry points for newcomers (see README): `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch==2.13.0 as pip resolves it (see TORCH_INDEX); GPU users: make install TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
# Where pip finds torch. Empty: pip's own configuration (where it is set up to
# find the CPU wheel, as on the project's machines). Plain PyPI on Linux serves
# the multi-GB CUDA build instead: there give
# TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
# Test processes (pytest-xdist, one test file per process at a time): most of
# the suite waits on brokers, workers and sockets rather than the CPU, so two
# on two cores halve the wall time (15.5 -> 8.5 min). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2

.PHONY: install demo test bench clean

# The project's own modules are compiled here, as pip compiles a wheel's:
# an editable install leaves that to the first import, which never writes
# the result where PYTHONDONTWRITEBYTECODE is set (then every deepwatch
# process compiled ~150 modules at every start: ~0.15 s of CPU each).
install: $(VENV)/.installed
	@$(PY) -m compileall -q streams detectors dashboards > /dev/null

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)") "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: install
	$(VENV)/bin/deepwatch demo

test: install
	bash .ci/install-prometheus.sh
	bash .ci/install-chromium.sh
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

# BENCH_ARGS=--quick for a short pass; benches needing ../shared/data skip with the reason.
BENCH_ARGS ?=
bench: install
	$(PY) bench/run_all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) deepwatch-data .pytest_cache
