#!/usr/bin/env bash
# Usage: scripts/with-postgres.sh CMD [ARGS...]
#
# Runs CMD with DATABASE_URL exported. If DATABASE_URL is already set it is used untouched;
# otherwise a throwaway PostgreSQL cluster is started on 127.0.0.1 for the duration of CMD and
# removed afterwards. PG_FAST=1 turns off durability (tests only). See scripts/pg.sh.
set -euo pipefail
# shellcheck source=scripts/pg.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/pg.sh"
pg_with "$@"
