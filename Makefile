# cnnserve: `make up` starts the local stack, `make test` runs everything CI runs.
# Both do their own set-up first (virtualenv, Python packages, Debian packages, Redis);
# `make setup` is idempotent and takes about a second when everything is already there.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.cnnserve-pyproject.sha256
APT_PACKAGES := dataset-fashion-mnist redis-server chromium chromium-driver docker.io docker-compose debootstrap
REDIS_HOST := 127.0.0.1
REDIS_PORT := 6379
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
UP_ARGS ?=
PYTEST_ARGS ?=

.PHONY: help setup venv packages apt redis up test pytest pytest-s3 lint format typecheck

help:
	@echo "make up         set up, then start Redis with AOF (if none answers), a worker and the API on http://127.0.0.1:8000"
	@echo "make test       set up, then pytest (the Docker tests on a real engine), ruff check, ruff format --check and mypy (what .ci/run runs)"
	@echo "make setup      virtualenv, Python packages, Debian packages, Redis (idempotent)"
	@echo "make format     ruff format and ruff check --fix in place"

setup: venv packages apt redis

# Reuse .venv when its interpreter runs; create it otherwise.
venv:
	@if ! $(BIN)/python -c 'import sys' >/dev/null 2>&1; then \
		if ! $(PYTHON) -c 'import ensurepip, venv' >/dev/null 2>&1; then \
			echo "setup: $(PYTHON) lacks venv/ensurepip; installing python3-venv"; \
			$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -q; \
			$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv; \
		fi; \
		echo "setup: creating $(VENV) with $(PYTHON)"; \
		$(PYTHON) -m venv $(VENV); \
	fi

# Install (editable, with dev extras) only when pyproject.toml differs from the last install.
packages: venv
	@want=$$(sha256sum pyproject.toml | cut -d' ' -f1); \
	have=$$(cat $(STAMP) 2>/dev/null || true); \
	if [ "$$want" != "$$have" ]; then \
		echo "setup: pyproject.toml changed since the last install; pip install -e '.[dev]'"; \
		$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[dev]'; \
		echo "$$want" > $(STAMP); \
	fi

# Debian packages: apt-get update and install only when one is missing.
apt:
	@missing=""; \
	for p in $(APT_PACKAGES); do \
		dpkg -s "$$p" >/dev/null 2>&1 || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "setup: installing Debian packages:$$missing"; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -q; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

# Start a non-persistent Redis on 127.0.0.1:6379 unless one already answers.
redis: apt
	@if ! redis-cli -h $(REDIS_HOST) -p $(REDIS_PORT) ping >/dev/null 2>&1; then \
		echo "setup: starting redis-server on $(REDIS_HOST):$(REDIS_PORT)"; \
		$(SUDO) mkdir -p /var/lib/redis /var/log/redis; \
		$(SUDO) redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log; \
		for _ in $$(seq 50); do \
			redis-cli -h $(REDIS_HOST) -p $(REDIS_PORT) ping >/dev/null 2>&1 && break; \
			sleep 0.1; \
		done; \
		redis-cli -h $(REDIS_HOST) -p $(REDIS_PORT) ping >/dev/null || { echo "setup: redis did not start; see /var/log/redis/ci.log" >&2; exit 1; }; \
	fi

# No `redis` prerequisite: `cnnserve up` starts its own Redis with AOF when none answers.
up: venv packages apt
	$(BIN)/cnnserve up $(UP_ARGS)

# Run every check even when an earlier one fails, then fail if any did. The Docker tests need an
# engine: start one when none answers (tests/deploy/dockerd.sh), and stop only that one after.
test: setup
	@failed=""; \
	tests/deploy/dockerd.sh start || failed="$$failed dockerd"; \
	CNNSERVE_DOCKER_TESTS=require $(MAKE) --no-print-directory pytest || failed="$$failed pytest"; \
	tests/deploy/dockerd.sh stop || true; \
	$(MAKE) --no-print-directory pytest-s3 || failed="$$failed pytest-s3"; \
	$(MAKE) --no-print-directory lint || failed="$$failed lint"; \
	$(MAKE) --no-print-directory typecheck || failed="$$failed mypy"; \
	if [ -n "$$failed" ]; then echo "make test: FAILED:$$failed" >&2; exit 1; fi; \
	echo "make test: all checks passed"

pytest:
	$(BIN)/pytest -q --durations=15 $(PYTEST_ARGS)

# The checkpoint-store suites again, every store a bucket of moto's S3 server (tests/s3.py), as
# with CNNSERVE_CHECKPOINT_URL=s3://...; the several-hosts tests run on it in `pytest` anyway.
S3_TESTS := tests/workers/store tests/workers/training/test_engine.py \
	tests/workers/training/test_validation.py tests/service/api/test_checkpoints.py \
	tests/service/api/test_v2_api.py tests/service/inference/test_inference.py \
	tests/reliability/test_storage_faults.py

pytest-s3:
	CNNSERVE_TEST_CHECKPOINT_STORE=s3 $(BIN)/pytest -q $(S3_TESTS)

lint:
	@rc=0; \
	$(BIN)/ruff check . || rc=1; \
	$(BIN)/ruff format --check . || rc=1; \
	exit $$rc

typecheck:
	$(BIN)/mypy

format:
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .
