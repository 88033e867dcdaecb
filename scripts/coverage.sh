#!/usr/bin/env bash
# Usage: scripts/coverage.sh
#
# Line coverage of src/ (the binaries included) by the whole test suite, as `make test`
# runs it: lib, bins and integration tests against a throwaway PostgreSQL (fsync off).
# The tests start the instrumented binaries (CARGO_BIN_EXE_*) and pass them
# LLVM_PROFILE_FILE (tests/it/harness.rs), so what `outboxd` runs as a process counts.
#
# Prints the per-file table and writes target/coverage/lcov.info and
# target/coverage/html/index.html. Installs cargo-llvm-cov and the llvm-tools component
# when they are missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! cargo llvm-cov --version >/dev/null 2>&1; then
    echo "coverage: installing cargo-llvm-cov" >&2
    cargo install cargo-llvm-cov --locked
fi
if ! rustup component list --installed 2>/dev/null | grep -q '^llvm-tools'; then
    echo "coverage: adding the llvm-tools rustup component" >&2
    rustup component add llvm-tools
fi

# Only src/ is measured: the tests and the bench are not the product.
ignore='(^|/)(tests|benches)/'
out=target/coverage
mkdir -p "$out"

# The instrumented build is a second full target directory: without debug info it stays
# under 1 GB (debug info is not needed for line coverage, which comes from the coverage
# mapping). CARGO_PROFILE_DEV_DEBUG set in the environment wins.
export CARGO_PROFILE_DEV_DEBUG="${CARGO_PROFILE_DEV_DEBUG:-0}"

cargo llvm-cov clean --workspace
# A failing test still leaves a report of what ran; the exit status is the tests'.
status=0
PG_FAST=1 scripts/with-postgres.sh cargo llvm-cov --no-report --locked \
    --lib --bins --tests -- --test-threads="${TEST_THREADS:-6}" || status=$?

cargo llvm-cov report --ignore-filename-regex "$ignore" --summary-only
cargo llvm-cov report --ignore-filename-regex "$ignore" --lcov --output-path "$out/lcov.info"
cargo llvm-cov report --ignore-filename-regex "$ignore" --html --output-dir "$out"
echo "coverage: $out/lcov.info, $out/html/index.html"
exit "$status"
