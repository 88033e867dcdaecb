#!/usr/bin/env bash
# Usage: scripts/chaos.sh [ARGS...]   (what `make chaos` runs)
#
# Runs the fault-injection suite (tests/chaos, `cargo test --test chaos`), which owns a
# PostgreSQL cluster of its own: it restarts and crashes it, so it never uses
# DATABASE_URL. This script only makes sure the suite can start one: it finds (or
# installs, via apt-get) the PostgreSQL server binaries and, as root, the `postgres` OS
# user to run them as, like scripts/pg.sh does for the tests. ARGS go to the suite's
# cargo invocation. Settings: CHAOS_SECONDS, CHAOS_SEED, ... (see tests/chaos/main.rs).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/pg.sh
. scripts/pg.sh
PG_BINDIR="$(pg_bindir)"
export PG_BINDIR
_pg_ensure_postgres_user
exec env -u DATABASE_URL "${CARGO:-cargo}" test --locked --test chaos "$@"
