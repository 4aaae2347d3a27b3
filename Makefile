# Two commands do all the set-up on a fresh Debian 12 machine (as root): `make test` and `make demo`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# What the tests and the sandbox need from Debian: an engine for the test hosts, the SSH client, the
# image recipe's tools (debootstrap, zstd, busybox-static), git, and systemd-analyze for the unit tests.
# age decrypts the secrets files of a desired-state repository (deployerd.secrets). prometheus gives promtool (the
# monitoring/ checks) and the server the monitoring end-to-end test starts on loopback. chromium is the real browser
# the status page's tests drive (headless, through Playwright: its own browser download is never used).
APT_PACKAGES := docker.io openssh-client debootstrap zstd busybox-static git iproute2 ca-certificates systemd python3-venv age prometheus chromium

.PHONY: deps apt venv wheelhouse image test test-unit fuzz demo demo-down sandbox-up sandbox-down bench soak clean

deps: apt venv

# deployerd and its dependencies as wheels: the test that installs deployerd on a test host (which has no
# network) installs from here. Rebuilt when the code or the dependencies change.
WHEELHOUSE := .wheelhouse
wheelhouse: $(WHEELHOUSE)/.built

$(WHEELHOUSE)/.built: $(VENV)/.installed $(shell find deployerd -name '*.py' -o -name '*.service' -o -name '*.sh' -o -name '*.json' -o -name '*.conf' -o -name '*.html' -o -name '*.css' -o -name '*.js' 2>/dev/null)
	rm -rf $(WHEELHOUSE)
	$(PY) -m pip wheel -q --wheel-dir $(WHEELHOUSE) .
	touch $@

apt:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing apt packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@command -v python3 >/dev/null || { echo "python3 (>= 3.11) is required"; exit 1; }
	@python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "python3 >= 3.11 is required"; exit 1; }
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# Checked types (mypy --strict on deployerd/) and lint (ruff on deployerd/ and tests/); configured in pyproject.toml.
lint: venv
	$(VENV)/bin/ruff check deployerd tests
	$(VENV)/bin/mypy

# The test-host image, built (minutes, the first time on a machine) or loaded before pytest starts, so that no
# test's timeout counts the build: bringing one host up and down again is the sandbox's own tested path to it.
IMAGE_SANDBOX := .sandbox-image
image: deps
	$(PY) -m deployerd.sandbox up --hosts 1 --state-dir $(IMAGE_SANDBOX) >/dev/null
	$(PY) -m deployerd.sandbox down --state-dir $(IMAGE_SANDBOX)

# Lint and types first (seconds), then every test. Property tests run the same examples every time here
# (Hypothesis profile `ci`: derandomized), so a run passes or fails on the code alone; `make fuzz` explores.
test: deps lint wheelhouse image
	DEPLOYERD_HYPOTHESIS_PROFILE=ci DEPLOYERD_WHEELHOUSE=$(abspath $(WHEELHOUSE)) $(VENV)/bin/pytest -q -rs

test-unit: venv
	DEPLOYERD_HYPOTHESIS_PROFILE=ci $(VENV)/bin/pytest -q tests/unit

# The property tests with random seeds and FUZZ_FACTOR times their examples; a failure prints the blob that
# reproduces it (add the case as an @example).
FUZZ_FACTOR ?= 10
fuzz: venv
	DEPLOYERD_HYPOTHESIS_PROFILE=fuzz DEPLOYERD_FUZZ_FACTOR=$(FUZZ_FACTOR) \
	  $(VENV)/bin/pytest -q -p no:cacheprovider $$(grep -rl --include='test_*.py' '@given' tests)

demo: deps
	$(PY) -m deployerd demo

demo-down: venv
	$(PY) -m deployerd demo --down

sandbox-up: deps
	$(PY) -m deployerd sandbox up --hosts 1

sandbox-down: venv
	$(PY) -m deployerd sandbox down

# The peers (ansible, which bundles community.docker; pyinfra; py-spy for profiles) live in their own venv so
# .venv stays clean. rsync is the plain-script peer's transfer. One sandbox of 3 hosts serves every bench and
# is taken down at the end (BENCH_SANDBOX_DIR, default /tmp/bench-sbx).
BENCH_VENV ?= .bench-venv
BENCH_SANDBOX_DIR ?= /tmp/bench-sbx
$(BENCH_VENV)/.installed:
	test -x $(BENCH_VENV)/bin/python || python3 -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q ansible pyinfra py-spy
	touch $@

bench: deps $(BENCH_VENV)/.installed
	@command -v rsync >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rsync; }
	$(PY) -m deployerd.sandbox up --hosts 3 --state-dir $(BENCH_SANDBOX_DIR)
	status=0; \
	DEPLOYERD_BENCH_SANDBOX=$(BENCH_SANDBOX_DIR) BENCH_PEERS_VENV=$(abspath $(BENCH_VENV)) $(PY) bench/peers.py || status=1; \
	DEPLOYERD_BENCH_SANDBOX=$(BENCH_SANDBOX_DIR) $(PY) bench/reconcile_bench.py || status=1; \
	$(PY) -m deployerd.sandbox down --state-dir $(BENCH_SANDBOX_DIR); exit $$status

# The soak: 300 seeded random commits to 20 services on 3 hosts of its own sandbox (up and down in the run),
# then the end state checked against the last commit, leaks, stuck jobs and the daemon's memory growth (< 10%).
# SOAK_COMMITS, SOAK_SERVICES, SOAK_HOSTS, SOAK_SEED, SOAK_INTERVAL_S, SOAK_MAX_OUTSTANDING, SOAK_JSON change it
# (SOAK_KEEP=1 leaves the deployments up to look at; SOAK_COUNT_OBJECTS=1 reports the daemon's object growth);
# DEPLOYERD_SOAK_SANDBOX=<state dir> reuses a sandbox that is up.
soak: deps
	$(PY) bench/soak.py

clean: sandbox-down
	rm -rf $(VENV) .pytest_cache $(WHEELHOUSE)
