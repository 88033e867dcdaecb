# Sourced by the prototype scripts: DATABASE_URL from scripts/with-postgres.sh, or the
# first argument.
set -euo pipefail
DB="${1:-${DATABASE_URL:?run under scripts/with-postgres.sh}}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
psqlq() { psql "$DB" -X -q -v ON_ERROR_STOP=1 "$@"; }
