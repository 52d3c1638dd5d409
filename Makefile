# chrootwsgi developer targets.  `make demo` and `make test` are all a fresh Debian 12 machine needs
# (after the apt packages that .ci/run installs).

PYTHON ?= /usr/bin/python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: venv install test lint fmt bench demo clean

# Debian's python3.11 has a shared libpython, which mod_wsgi needs; pyenv builds usually do not.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel

venv: $(BIN)/python

# "strict" editable mode installs a link tree on a plain sys.path entry: mod_wsgi, mypy and the jail
# importer all see chroot_helper (which lives in helper/) as ordinary files.
install: venv
	$(BIN)/pip install -q -e '.[test,lint]' --config-settings editable_mode=strict

test: install
	$(BIN)/pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

demo: install
	$(BIN)/python apache/demo/run.py $(DEMO_ARGS)

bench: install
	$(BIN)/python bench/jail_overhead.py
	$(BIN)/python bench/exec_latency.py
	$(BIN)/python bench/dns_stub.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
