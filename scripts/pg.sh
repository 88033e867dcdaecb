#!/usr/bin/env bash
# pg.sh — throwaway PostgreSQL clusters for tests, demos and benchmarks.
#
# As a library (source it from bash):
#   . scripts/pg.sh
#   pg_with CMD ARGS...     run CMD with DATABASE_URL pointing at a throwaway cluster
#   pg_start / pg_stop      start / stop+remove a throwaway cluster (sets PG_* vars, exports DATABASE_URL)
#   pg_bindir               print the PostgreSQL server bin directory (installs PostgreSQL if missing)
#
# As a CLI:
#   scripts/pg.sh run CMD ARGS...   same as scripts/with-postgres.sh CMD ARGS...
#   scripts/pg.sh bindir            print the server bin directory
#
# Behaviour of pg_with / run:
#   * DATABASE_URL already set (non-empty): CMD runs with it, untouched.
#   * otherwise: initdb a cluster in a fresh `mktemp -d` dir under /tmp, start it on a free
#     127.0.0.1 port, export DATABASE_URL=postgres://postgres@127.0.0.1:PORT/postgres, run
#     CMD, then stop the cluster and delete the dir (also on INT/TERM). CMD's exit status is
#     preserved (130/143 if interrupted). CMD runs in the foreground (keeps the tty, stdin and
#     Ctrl-C); a signal sent to the wrapper's pid alone takes effect once CMD has exited, so
#     signal the process group (as terminals, `timeout` and CI runners do). The server runs in
#     its own session (pg_ctl), so Ctrl-C does not hit it before CMD has finished with it.
#   * PG_FAST=1 disables durability (fsync, synchronous_commit, full_page_writes) — for tests
#     only, never for benchmarks.
#   * PostgreSQL refuses to run as root, so as root the cluster is owned by and run as the
#     `postgres` OS user (via runuser); otherwise it runs as the current user.
#
# Environment knobs: PG_BINDIR (server bin dir), PG_FAST=1, PG_EXTRA_OPTS, PG_MAX_CONNECTIONS (default 400),
# PG_START_TIMEOUT (seconds, default 120), PG_KEEP=1 (keep the temp dir for debugging).

# Guard against double sourcing.
if [[ -n "${_OUTBOXD_PG_SH_LOADED:-}" ]]; then
    # shellcheck disable=SC2317  # `exit` is reached only when executed, not sourced
    return 0 2>/dev/null || exit 0
fi
_OUTBOXD_PG_SH_LOADED=1

PG_TMPDIR=""
PG_DATADIR=""
PG_LOGFILE=""
PG_PORT=""

_pg_log() { printf 'pg: %s\n' "$*" >&2; }
_pg_die() { printf 'pg: error: %s\n' "$*" >&2; exit 1; }

_pg_is_root() { [[ "$(id -u)" -eq 0 ]]; }

# Is DIR a usable server bin directory?
_pg_usable_bindir() {
    [[ -n "$1" && -x "$1/initdb" && -x "$1/pg_ctl" && -x "$1/postgres" ]]
}

_pg_find_bindir() {
    local d
    if [[ -n "${PG_BINDIR:-}" ]]; then
        _pg_usable_bindir "$PG_BINDIR" && { printf '%s\n' "$PG_BINDIR"; return 0; }
        _pg_log "PG_BINDIR=$PG_BINDIR does not contain initdb/pg_ctl/postgres; searching elsewhere"
    fi
    # Newest Debian-style versioned install first.
    while IFS= read -r d; do
        if _pg_usable_bindir "$d"; then printf '%s\n' "$d"; return 0; fi
    done < <(compgen -G '/usr/lib/postgresql/*/bin' | sort -rV)
    if command -v pg_config >/dev/null 2>&1; then
        d="$(pg_config --bindir 2>/dev/null || true)"
        if _pg_usable_bindir "$d"; then printf '%s\n' "$d"; return 0; fi
    fi
    if command -v initdb >/dev/null 2>&1; then
        d="$(dirname "$(command -v initdb)")"
        if _pg_usable_bindir "$d"; then printf '%s\n' "$d"; return 0; fi
    fi
    return 1
}

_pg_install() {
    _pg_is_root || _pg_die "PostgreSQL server binaries not found and not root; install the 'postgresql' package or set PG_BINDIR"
    command -v apt-get >/dev/null 2>&1 || _pg_die "PostgreSQL server binaries not found and apt-get is unavailable; install PostgreSQL or set PG_BINDIR"
    _pg_log "PostgreSQL server not found; installing the 'postgresql' package via apt-get (this takes a minute)"
    export DEBIAN_FRONTEND=noninteractive
    {
        apt-get update -q &&
            apt-get install -y -q --no-install-recommends postgresql
    } </dev/null >&2 || _pg_die "apt-get install postgresql failed"
}

# Print the server bin dir, installing PostgreSQL if necessary.
pg_bindir() {
    local d
    if d="$(_pg_find_bindir)"; then printf '%s\n' "$d"; return 0; fi
    _pg_install
    d="$(_pg_find_bindir)" || _pg_die "PostgreSQL installed but initdb/pg_ctl/postgres still not found"
    printf '%s\n' "$d"
}

# Run a command as the cluster owner, with cwd = the cluster dir (the postgres user may not be
# able to access the caller's cwd, e.g. /root).
_pg_as_owner() {
    if _pg_is_root; then
        (cd "$PG_TMPDIR" && runuser -u postgres -- "$@")
    else
        (cd "$PG_TMPDIR" && "$@")
    fi
}

_pg_ensure_postgres_user() {
    _pg_is_root || return 0
    command -v runuser >/dev/null 2>&1 || _pg_die "runuser not found (needed to run PostgreSQL as the postgres user when root)"
    if ! id -u postgres >/dev/null 2>&1; then
        _pg_log "creating system user 'postgres'"
        useradd --system --user-group --no-create-home --home-dir /var/lib/postgresql \
            --shell /bin/bash postgres || _pg_die "could not create the postgres OS user"
    fi
}

# Is something listening on 127.0.0.1:PORT?
_pg_port_in_use() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Print a free TCP port on 127.0.0.1.
_pg_free_port() {
    local p
    if command -v python3 >/dev/null 2>&1 &&
        p="$(python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()' 2>/dev/null)" && [[ "$p" =~ ^[0-9]+$ ]]; then
        printf '%s\n' "$p"
        return 0
    fi
    # Fallback: probe upward from a random-ish offset above 54320 (so parallel runs rarely collide).
    p=$((54320 + RANDOM % 1000))
    while ((p < 65535)); do
        if ! _pg_port_in_use "$p"; then printf '%s\n' "$p"; return 0; fi
        p=$((p + 1))
    done
    _pg_die "no free TCP port found on 127.0.0.1"
}

# Start a throwaway cluster. Sets PG_TMPDIR, PG_DATADIR, PG_LOGFILE, PG_PORT, PG_BINDIR and
# exports DATABASE_URL. Call pg_stop (e.g. from an EXIT trap) to tear it down.
pg_start() {
    local bindir version attempt opts
    bindir="$(pg_bindir)" || exit 1
    PG_BINDIR="$bindir"
    _pg_ensure_postgres_user

    PG_TMPDIR="$(mktemp -d /tmp/outboxd-pg.XXXXXX)" || _pg_die "mktemp failed"
    PG_DATADIR="$PG_TMPDIR/data"
    PG_LOGFILE="$PG_TMPDIR/postgres.log"
    if _pg_is_root; then chown postgres: "$PG_TMPDIR"; fi

    if ! _pg_as_owner "$bindir/initdb" -D "$PG_DATADIR" -A trust -U postgres --no-sync \
        -E UTF8 --locale=C >"$PG_TMPDIR/initdb.log" 2>&1; then
        cat "$PG_TMPDIR/initdb.log" >&2
        _pg_die "initdb failed"
    fi

    for attempt in 1 2 3 4 5; do
        PG_PORT="$(_pg_free_port)"
        opts="-c listen_addresses=127.0.0.1 -p $PG_PORT -c unix_socket_directories=$PG_TMPDIR"
        opts+=" -c max_connections=${PG_MAX_CONNECTIONS:-400}"
        if [[ "${PG_FAST:-}" == 1 ]]; then
            opts+=" -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        fi
        # Extra server options for diagnosis, e.g. "-c shared_preload_libraries=pg_stat_statements".
        opts+="${PG_EXTRA_OPTS:+ $PG_EXTRA_OPTS}"
        if _pg_as_owner "$bindir/pg_ctl" -D "$PG_DATADIR" -w -t "${PG_START_TIMEOUT:-120}" \
            -l "$PG_LOGFILE" start -o "$opts" >"$PG_TMPDIR/pg_ctl.log" 2>&1; then
            break
        fi
        # Lost a race for the port? Try another one; anything else is fatal.
        if ((attempt < 5)) && grep -qiE 'could not (bind|create listen)|address already in use' "$PG_LOGFILE" 2>/dev/null; then
            _pg_log "port $PG_PORT was taken, retrying with another port"
            _pg_as_owner "$bindir/pg_ctl" -D "$PG_DATADIR" -m immediate -w stop >/dev/null 2>&1 || true
            continue
        fi
        {
            echo "---- pg_ctl output ----"
            cat "$PG_TMPDIR/pg_ctl.log" 2>/dev/null
            echo "---- postgres log ($PG_LOGFILE) ----"
            cat "$PG_LOGFILE" 2>/dev/null
            echo "-----------------------"
        } >&2
        _pg_die "could not start PostgreSQL (bin dir $bindir)"
    done

    export DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/postgres"
    version="$("$bindir/postgres" --version 2>/dev/null | awk '{print $3}')"
    _pg_log "using throwaway PostgreSQL ${version:-?} at 127.0.0.1:$PG_PORT (dir $PG_TMPDIR$([[ "${PG_FAST:-}" == 1 ]] && echo ', PG_FAST: fsync off'))"
}

# Stop the cluster started by pg_start and delete its directory. Idempotent; never fails.
pg_stop() {
    [[ -n "$PG_TMPDIR" ]] || return 0
    if [[ -f "$PG_DATADIR/postmaster.pid" ]]; then
        _pg_as_owner "$PG_BINDIR/pg_ctl" -D "$PG_DATADIR" -m fast -w -t 60 stop >/dev/null 2>&1 ||
            _pg_as_owner "$PG_BINDIR/pg_ctl" -D "$PG_DATADIR" -m immediate -w -t 30 stop >/dev/null 2>&1 ||
            _pg_log "warning: could not stop PostgreSQL in $PG_DATADIR"
    fi
    if [[ "${PG_KEEP:-}" == 1 ]]; then
        _pg_log "PG_KEEP=1: leaving $PG_TMPDIR"
    else
        rm -rf -- "$PG_TMPDIR"
    fi
    PG_TMPDIR=""
    return 0
}

# Redact the password of a postgres:// URL for display.
_pg_redact_url() {
    sed -E 's#^([a-z]+://[^:/@]*):[^@/]*@#\1:***@#' <<<"$1"
}

# Run CMD ARGS... with DATABASE_URL set (see header). Exits the shell with CMD's status.
pg_with() {
    (($# > 0)) || _pg_die "usage: with-postgres.sh CMD [ARGS...]"
    if [[ -n "${DATABASE_URL:-}" ]]; then
        _pg_log "using existing DATABASE_URL=$(_pg_redact_url "$DATABASE_URL")"
        exec "$@"
    fi
    trap 'pg_stop' EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    pg_start
    local status=0
    "$@" || status=$?
    exit "$status"
}

_pg_main() {
    set -euo pipefail
    local cmd="${1:-help}"
    shift || true
    case "$cmd" in
    run | with) pg_with "$@" ;;
    bindir) pg_bindir ;;
    -h | --help | help)
        sed -n '2,/^$/{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
        ;;
    *) _pg_die "unknown command '$cmd' (try: run CMD ARGS..., bindir, help)" ;;
    esac
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    _pg_main "$@"
fi
