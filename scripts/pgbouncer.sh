#!/usr/bin/env bash
# pgbouncer.sh — find pgbouncer for the tests, installing it when missing.
#
#   scripts/pgbouncer.sh bin    print the path of the pgbouncer binary, installing the
#                               Debian package `pgbouncer` via apt-get when it is missing
#                               (as root; the way scripts/pg.sh installs PostgreSQL)
#
# The integration tests (tests/it/pooler.rs) call it once per run and start their own
# pgbouncer processes, in transaction pooling mode, in front of the test cluster. As root
# they run it as the `postgres` OS user, since pgbouncer refuses to run as root.
# Environment: PGBOUNCER (a binary to use instead).
set -euo pipefail

_log() { printf 'pgbouncer: %s\n' "$*" >&2; }
_die() { printf 'pgbouncer: error: %s\n' "$*" >&2; exit 1; }

_find() {
    if [[ -n "${PGBOUNCER:-}" && -x "$PGBOUNCER" ]]; then printf '%s\n' "$PGBOUNCER"; return 0; fi
    if command -v pgbouncer >/dev/null 2>&1; then command -v pgbouncer; return 0; fi
    if [[ -x /usr/sbin/pgbouncer ]]; then printf '%s\n' /usr/sbin/pgbouncer; return 0; fi
    return 1
}

_install() {
    [[ "$(id -u)" -eq 0 ]] || _die "pgbouncer not found and not root; install the 'pgbouncer' package or set PGBOUNCER"
    command -v apt-get >/dev/null 2>&1 || _die "pgbouncer not found and apt-get is unavailable; install pgbouncer or set PGBOUNCER"
    _log "pgbouncer not found; installing the 'pgbouncer' package via apt-get"
    export DEBIAN_FRONTEND=noninteractive
    {
        # The package list may be missing on a fresh machine; refresh it only if needed.
        apt-get install -y -q --no-install-recommends pgbouncer ||
            { apt-get update -q && apt-get install -y -q --no-install-recommends pgbouncer; }
    } </dev/null >&2 || _die "apt-get install pgbouncer failed"
    # The package starts a system service where it can; the tests start their own.
}

case "${1:-help}" in
bin)
    _find || { _install; _find; } || _die "pgbouncer installed but not found"
    ;;
*)
    sed -n '2,/^$/{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
    ;;
esac
