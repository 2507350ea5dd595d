# Developer and CI entry points. `make test` is what CI runs (after installing the package
# with `pip install '.[test]'`; see .ci/run).

PYTHON ?= python
CARGO ?= cargo

.PHONY: test lint bench

# Rust tests in the dev profile: they also catch integer overflow (checked there), and they
# build in a third of the time of the release profile's fat LTO.
test: lint
	$(CARGO) test --workspace
	$(PYTHON) -m pytest

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --release -- -D warnings
	ruff check .
	ruff format --check .
	mypy
	$(PYTHON) -m mypy.stubtest ferrogate._core

# route-lookup scaling (10 vs 10,000 routes); needs wrk and taskset
bench:
	bash bench/routes/run.sh
