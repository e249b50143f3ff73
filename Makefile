# The two commands (see README.md):
#   make demo   install what is needed, start the local stack, run the pipeline on a
#               generated batch and serve the RA app
#   make test   install what is needed and run the whole suite against real services
# For iteration: make test-unit (no services), make lint, make stack-up / stack-down.

SHELL := /bin/bash
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export STACK_DIR ?= $(CURDIR)/.stack
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# Debian packages the stack, the tests and the demo use.
APT_PACKAGES := python3-venv git make ca-certificates \
	redis-server postgresql ffmpeg espeak-ng sox \
	openssh-server openssh-client rsync \
	chromium chromium-driver \
	systemd-container debootstrap iproute2 tinyproxy wrk
PYTHON_EXTRAS := asr,classifier,ra,stack,dev

.PHONY: help deps test test-unit test-fast lint format demo bench bench-smoke stack-up stack-down stack-env fleet-up fleet-down clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

deps: .make/apt .make/venv .make/bin/promtool  ## install Debian packages and the virtualenv (idempotent)

.make/apt: Makefile
	@missing=$$(for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
	  echo "installing: $$missing"; \
	  $(SUDO) apt-get update -q && \
	  $(SUDO) apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends $$missing; \
	fi
	@mkdir -p .make && touch $@

# devtools/ is a second, developer-only distribution (its own pyproject.toml): it
# brings the `devstack` command, and the fleet, which installs only the root one,
# never gets it.
.make/venv: pyproject.toml devtools/pyproject.toml .make/apt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check --upgrade pip==25.3
	$(BIN)/pip install -q --disable-pip-version-check -e '.[$(PYTHON_EXTRAS)]' -e ./devtools
	@mkdir -p .make && touch $@

# promtool checks and unit-tests the monitoring role's alert rules. It is unpacked
# from Debian's prometheus package, not installed: installing would also start a
# Prometheus server on this machine.
.make/bin/promtool:
	rm -rf .make/prometheus-deb && mkdir -p .make/prometheus-deb .make/bin
	cd .make/prometheus-deb && { apt-get download prometheus 2>/dev/null || \
	  { $(SUDO) apt-get update -q && apt-get download prometheus; }; }
	dpkg-deb -x .make/prometheus-deb/prometheus_*.deb .make/prometheus-deb/root
	cp .make/prometheus-deb/root/usr/bin/promtool $@
	rm -rf .make/prometheus-deb

test: deps lint  ## the whole suite: lint, unit, integration, end to end (starts and stops the stack)
	$(BIN)/python -m devtools.suite

test-unit: .make/venv  ## fast subset: unit tests only, no services
	$(BIN)/pytest tests/unit -q

test-fast: deps  ## everything but the slow end-to-end, browser and fleet tests
	$(BIN)/pytest -m 'not slow and not fleet and not browser' -q

lint: .make/venv  ## ruff (lint + format check)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: .make/venv  ## apply ruff's formatting and safe fixes
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

BENCHES := bench_asr bench_pipeline bench_unpack bench_queue bench_ra

bench: deps  ## all benchmarks at full size (minutes; run on a quiet machine): tables + .bench/*.json
	$(BIN)/devstack up > /dev/null
	@for b in $(BENCHES); do $(BIN)/python -m bench.$$b || exit 1; done
	$(BIN)/python -m bench.bench_asr --corpus short

bench-smoke: deps  ## all benchmarks at their tiny CI size
	$(BIN)/devstack up > /dev/null
	@for b in $(BENCHES); do $(BIN)/python -m bench.$$b --smoke || exit 1; done

stack-up: deps  ## start Redis, PostgreSQL, SeaweedFS and sshd on loopback
	$(BIN)/devstack up

stack-down:  ## stop the local stack
	@if [ -x $(BIN)/devstack ]; then $(BIN)/devstack down; fi

stack-env:  ## print the exports for the local stack: eval "$$(make -s stack-env)"
	@$(BIN)/devstack env

DEMO_FILES ?= 12
demo: deps  ## run the pipeline end to end on a generated batch, then serve the RA app
	$(BIN)/python -m devtools.demo --files $(DEMO_FILES)

fleet-up: deps  ## a staging fleet on this machine (root): nspawn machines on a private bridge, site.yml, a demo batch; prints .stack/fleet/fleet.env
	$(BIN)/python -m tests.fleet.lab up

fleet-down:  ## remove the fleet-up fleet: machines, bridge, loop devices, its files
	@if [ -x $(BIN)/python ]; then $(BIN)/python -m tests.fleet.lab down; fi

clean: fleet-down stack-down  ## stop the stack and delete its data and the virtualenv
	rm -rf $(STACK_DIR) $(VENV) .make .pytest_cache .ruff_cache
