# chrootwsgi developer targets.  `make demo` and `make test` are all a fresh Debian 12 machine needs
# (after the apt packages that .ci/run installs).

PYTHON ?= /usr/bin/python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
PORT ?= 8080
INSTALLED := $(VENV)/.installed
# What `make demo` needs from Debian on a fresh machine (and the build of mod_wsgi by pip).
DEMO_PACKAGES := apache2 apache2-dev python3.11 python3.11-dev python3.11-venv libpython3.11 \
	build-essential ca-certificates tzdata

.PHONY: venv install test test-docker lint fmt bench fuzz demo demo-stop system-packages clean \
	security-report

# Debian's python3.11 has a shared libpython, which mod_wsgi needs; pyenv builds usually do not.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel

venv: $(BIN)/python

# "strict" editable mode installs a link tree on a plain sys.path entry: mod_wsgi, mypy and the jail
# importer all see chroot_helper (which lives in helper/) as ordinary files.
install: venv
	$(BIN)/pip install -q -e '.[test,lint]' --config-settings editable_mode=strict
	touch $(INSTALLED)

# The same, once: rebuilt only when pyproject.toml changes (`make demo` twice reinstalls nothing).
$(INSTALLED): pyproject.toml | venv
	$(MAKE) install
	touch $@

test: install
	$(BIN)/pytest -m "not docker" $(PYTEST_ARGS)

# Builds docker/Dockerfile with podman and runs the stack (minutes on a cold cache).
test-docker: install
	$(BIN)/pytest -m docker $(PYTEST_ARGS)

# Escape battery, fail-closed, seccomp, kill -9 and load tests (as root), then a Markdown table of
# what they measured (and build/fuzz-report.json when `make fuzz` wrote one); non-zero on failure.
security-report: install
	$(BIN)/python tests/security/report.py $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Installs the Debian packages that are missing (needs root), nothing when all are there.
system-packages:
	@missing=$$(for p in $(DEMO_PACKAGES); do \
		dpkg-query -W -f='$${db:Status-Abbrev}' $$p 2>/dev/null | grep -q '^ii' || echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
		echo "installing:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

# Apache + mod_wsgi serving the demo app from an empty jail on 127.0.0.1:$(PORT), in the
# background; `make demo-stop` stops it.
demo: system-packages $(INSTALLED)
	$(BIN)/python apache/demo/run.py start --port $(PORT)

demo-stop:
	$(BIN)/python apache/demo/run.py stop

# Each fuzz target for FUZZ_SECONDS under atheris, then the corpus replayed against a real helper
# while a canary client keeps using it; summary in build/fuzz-report.json (see fuzz/run.py).
# atheris (a 35 MB wheel) is installed here only, not by `make install`.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?=
fuzz: install
	$(BIN)/pip install -q -e '.[test,lint,fuzz]' --config-settings editable_mode=strict
	$(BIN)/python -m fuzz.run --seconds $(FUZZ_SECONDS) $(FUZZ_TARGETS)

bench: install
	$(BIN)/python bench/jail_overhead.py
	$(BIN)/python bench/exec_latency.py
	$(BIN)/python bench/exec_cpu.py
	$(BIN)/python bench/dns_stub.py
	$(BIN)/python bench/dns_qps.py
	$(BIN)/python bench/mail_throughput.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
