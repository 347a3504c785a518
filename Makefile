# safeshift — the two commands of the quick start, plus lint and benchmarks.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck postgres browser prometheus nginx bench bench-quick examples clean

# pip's own lines say what it fetches and installs (about 2 minutes on a fresh machine); once
# installed, the stamp skips this step until pyproject.toml changes
$(STAMP): pyproject.toml
	@echo "setting up $(VENV): safeshift and its dependencies (about 2 minutes the first time) ..."
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -e '.[dev]' | { grep --line-buffered -E '^(Collecting|Installing|Successfully)' || true; }
	@touch $(STAMP)

demo: $(STAMP)  ## set up and run the embedded demo
	$(VENV)/bin/safeshift demo

test: $(STAMP) lint postgres browser prometheus nginx  ## set up, lint, type-check and run every test
	$(PY) -m pytest

# The store tests start a throwaway PostgreSQL of their own from the server binaries; as root
# (CI) they are installed when missing, otherwise the fix is named.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing the PostgreSQL server for the store tests (apt-get install postgresql)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	  else \
	    echo "the store tests need the PostgreSQL server: sudo apt-get install -y postgresql" >&2; \
	    exit 2; \
	  fi; }

# The dashboard tests drive Debian's Chromium headless through Playwright (never `playwright install`,
# which downloads a browser of its own); as root (CI) it is installed when missing, otherwise the fix
# is named.
browser:
	@test -x /usr/bin/chromium || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Chromium for the dashboard's browser tests (apt-get install chromium)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	  else \
	    echo "the dashboard tests need Debian's Chromium: sudo apt-get install -y chromium" >&2; \
	    exit 2; \
	  fi; }

# The Prometheus guardrail tests run a real Prometheus server scraping a real gateway; as root
# (CI) it is installed when missing, otherwise the fix is named.
prometheus:
	@test -x /usr/bin/prometheus || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Prometheus for the Prometheus guardrail tests (apt-get install prometheus)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	  else \
	    echo "the Prometheus guardrail tests need Prometheus: sudo apt-get install -y prometheus" >&2; \
	    exit 2; \
	  fi; }

# The replica test and `safeshift bench replicas` run Debian's nginx as a process of their own (with
# their own configuration, never the system's service); as root (CI) it is installed when missing
# (RUNLEVEL=1: the package's scripts do not start the system's service), otherwise the fix is named.
nginx:
	@command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing nginx for the replica test (apt-get install nginx)"; \
	    apt-get update -qq && RUNLEVEL=1 DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx >/dev/null; \
	  else \
	    echo "the replica test needs nginx: sudo apt-get install -y nginx" >&2; \
	    exit 2; \
	  fi; }

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/mypy

bench: $(STAMP) postgres nginx  ## every benchmark at full size
	$(VENV)/bin/safeshift bench assign
	$(VENV)/bin/safeshift bench decisions
	$(VENV)/bin/safeshift bench gateway
	$(VENV)/bin/safeshift bench tick
	$(VENV)/bin/safeshift bench dashboard
	$(VENV)/bin/safeshift bench replicas

bench-quick: $(STAMP) postgres nginx
	$(VENV)/bin/safeshift bench assign --quick
	$(VENV)/bin/safeshift bench decisions --quick
	$(VENV)/bin/safeshift bench gateway --quick
	$(VENV)/bin/safeshift bench tick --quick
	$(VENV)/bin/safeshift bench dashboard --quick
	$(VENV)/bin/safeshift bench replicas --quick

examples: $(STAMP)  ## re-train the example models shipped in examples/
	$(PY) -m safeshift.demo --write-examples examples

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
