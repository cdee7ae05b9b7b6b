# The two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed-stamp
PORT ?= 8080

.PHONY: run run-distributed test lint bench bench-consent bench-front-end bench-sinks bench-distributed bench-alerts venv clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "idgate needs Python >= 3.11")'
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	@touch $(STAMP)

venv: $(STAMP)

## Run the gateway on 127.0.0.1:$(PORT) with the example config (embedded: SQLite + files under ./var),
## in dev mode (IDGATE_ENV=dev: its demo keys and tokens work; without it idgate runs as production).
run: $(STAMP)
	IDGATE_ENV=dev $(VENV)/bin/idgate serve --config idgate.example.toml --port $(PORT)

## Two replicas on the local PostgreSQL and Redis (distributed mode, no Docker), ports 8081 and 8082;
## Ctrl-C stops both. Options: make run-distributed ARGS="--replicas 3 --reset" (deploy/README.md).
run-distributed: $(STAMP)
	$(VENV)/bin/python deploy/run_distributed.py $(ARGS)

## Run the whole test suite (uses PostgreSQL, Redis, NATS and Node.js on localhost where a feature
## needs them; a missing one fails its tests). Select groups by marker, e.g.
## make test PYTEST_ARGS='-m "not slow"'   (markers: redis postgres nats node browser slow)
PYTEST_ARGS ?=
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

## ruff (lint and format), mypy --strict over the four packages, and the import layers.
lint: $(STAMP)
	$(VENV)/bin/ruff check gateway identity consent export tests bench deploy
	$(VENV)/bin/ruff format --check gateway identity consent export tests bench deploy
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

## Benchmarks print figures; see README "Benchmarks". `make bench` is issue 17's table: 30 s
## phases (the end-to-end target is a sustained rate), every target MET or NOT MET.
BENCH_ARGS ?= --duration 30
bench: $(STAMP)
	$(VENV)/bin/python bench/ingest.py $(BENCH_ARGS)

## Consent writes: POST /v1/consent grants/s on the embedded ledger (wrk); ARGS="--backend sqlite,postgres
## --baseline DIR" adds PostgreSQL + Redis and another checkout side by side.
bench-consent: $(STAMP)
	$(VENV)/bin/python bench/consent_writes.py $(ARGS)

## Records/s of every sink kind (needs Redis and NATS on localhost).
bench-front-end: $(STAMP)
	$(VENV)/bin/python bench/front_end.py

bench-sinks: $(STAMP)
	$(VENV)/bin/python bench/sinks.py

## The distributed mode's scaling curve (1, 2 and 4 replicas on PostgreSQL + Redis, each on fresh
## state) and how fast a withdrawal through one replica takes effect on another under load (needs
## wrk; about 10 minutes on 2 cores). Options: make bench-distributed ARGS="--duration 10 --probes 50 --json".
bench-distributed: $(STAMP)
	$(VENV)/bin/python bench/distributed.py --replicas 1,2,4 $(ARGS)

## Alert latency (issue 15): how long after the minute in which a payment-success drop happened
## the page reaches a webhook, for the old (15 s) and the current (2 s) evaluation interval side
## by side, with each gateway's CPU (about 3 minutes per drop). Options:
## make bench-alerts ARGS="--intervals 15000,5000,2000 --offsets 5,50,55 --redis redis://127.0.0.1:6379/9 --json".
bench-alerts: $(STAMP)
	$(VENV)/bin/python bench/alert_latency.py $(ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache
