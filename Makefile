# outboxd — developer entry points. `make help` lists the targets.
#
# Tests and the demo need PostgreSQL: scripts/with-postgres.sh uses $DATABASE_URL when it is set,
# otherwise it starts a throwaway local cluster (installing PostgreSQL via apt-get if missing).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
CARGO ?= cargo

.DEFAULT_GOAL := help
.PHONY: help run test lint fmt build clean bench coverage chaos

help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  make %-8s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo
	@echo "  Env: DATABASE_URL (use an existing database), TEST_THREADS (default 6), DEMO_PORT (default 8787)"
	@echo "  Bench: BENCH_SCENARIOS=burst,backlog,fanout,idle,steady,producer,scaleout,ceiling,history,statements,retention,noisy BENCH_QUICK=1"
	@echo "         BENCH_DATABASE_URL (bench an existing server instead of a throwaway one)"
	@echo "  Chaos: CHAOS_SECONDS (default 60) CHAOS_SEED (repeat a run's faults) CHAOS_RATE CHAOS_BIN"

run: ## Local demo: throwaway Postgres + outboxd + demo-receiver (Ctrl-C to stop)
	scripts/with-postgres.sh scripts/demo.sh

test: ## Run all tests (lib, bins, integration) against a throwaway Postgres with fsync off
	PG_FAST=1 scripts/with-postgres.sh $(CARGO) test --lib --bins --tests --locked -- --test-threads=$${TEST_THREADS:-6}

coverage: ## Line coverage of src/ (binaries included) by the whole suite; table + target/coverage/
	scripts/coverage.sh

# The chaos suite is no test target (`test = false`): --all-targets skips it, so it is
# linted by name.
lint: ## cargo fmt --check and clippy with warnings denied
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets --locked -- -D warnings
	$(CARGO) clippy --test chaos --locked -- -D warnings

fmt: ## Format the code
	$(CARGO) fmt --all

build: ## Release build of outboxd and demo-receiver
	$(CARGO) build --release --locked --bins

bench: ## Benchmark against a throwaway PostgreSQL with durability on; table + target/bench/latest.json
	$(CARGO) build --release --locked --bin outboxd
	$(CARGO) bench --locked --bench dispatch --no-run
	env -u DATABASE_URL $${BENCH_DATABASE_URL:+DATABASE_URL="$$BENCH_DATABASE_URL"} RUST_LOG=$${RUST_LOG:-warn} \
		scripts/with-postgres.sh $(CARGO) bench --locked --bench dispatch

chaos: ## Fault-injection suite: kill -9, backends terminated, PostgreSQL restarts, a failing receiver
	CARGO=$(CARGO) scripts/chaos.sh

clean: ## Remove build artifacts
	$(CARGO) clean
