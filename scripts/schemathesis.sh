#!/usr/bin/env bash
# Usage: scripts/schemathesis.sh ARGS...
#
# Runs schemathesis (`st ARGS...`), the OpenAPI contract tester, at the version pinned in
# scripts/schemathesis-requirements.txt. The first run creates a virtualenv under the cargo
# target directory ($CARGO_TARGET_DIR or target/) and installs the pinned packages from PyPI;
# later runs reuse it until the requirements file changes. Nothing is installed system-wide,
# except python3-venv through apt-get when Python cannot make a virtualenv and we are root
# (as scripts/pg.sh installs PostgreSQL).
#
# Exits 77 (the conventional "skipped") with a reason on stderr when no Python that can
# make a virtualenv can be had; any other status is schemathesis's own.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
requirements="$root/scripts/schemathesis-requirements.txt"
venv="${CARGO_TARGET_DIR:-$root/target}/schemathesis-venv"

log() { printf 'schemathesis.sh: %s\n' "$*" >&2; }

can_make_venv() {
    command -v python3 >/dev/null 2>&1 && python3 -c 'import venv, ensurepip' >/dev/null 2>&1
}

if ! can_make_venv && [[ "$(id -u)" -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    log "installing python3 and python3-venv with apt-get"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv; } >&2 || true
fi
if ! can_make_venv; then
    log "skipped: no python3 able to create a virtualenv (install python3 and python3-venv)"
    exit 77
fi

# One installer at a time; the stamp records what the virtualenv holds.
mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"
flock 9
if ! cmp -s "$requirements" "$venv/requirements.txt" 2>/dev/null; then
    log "installing the pinned schemathesis into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check --no-input -r "$requirements" >&2
    cp "$requirements" "$venv/requirements.txt"
fi
flock -u 9

exec "$venv/bin/st" "$@"
