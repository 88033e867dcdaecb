#!/usr/bin/env bash
# demo.sh — end-to-end local demo (what `make run` does).
#
#   scripts/with-postgres.sh scripts/demo.sh
#
# Builds outboxd and demo-receiver, migrates the database, registers the demo receiver as an
# endpoint, enqueues a few sample events and runs the dispatcher in the foreground until Ctrl-C.
# Needs DATABASE_URL; without it the script re-runs itself under scripts/with-postgres.sh.
#
# Env: DEMO_PORT (receiver port, default 8787), RUST_LOG (default info), CARGO_TARGET_DIR.
set -euo pipefail

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "$script_dir/.." && pwd)"
cd "$repo_root"

if [[ -z "${DATABASE_URL:-}" ]]; then
    exec "$script_dir/with-postgres.sh" "$script_dir/demo.sh" "$@"
fi

DEMO_PORT="${DEMO_PORT:-8787}"
receiver_addr="127.0.0.1:$DEMO_PORT"
export RUST_LOG="${RUST_LOG:-info}"

if [[ -t 2 ]]; then bold=$'\033[1m' reset=$'\033[0m'; else bold="" reset=""; fi
say() { printf '\n%s==> %s%s\n' "$bold" "$*" "$reset" >&2; }
die() { printf 'demo: error: %s\n' "$*" >&2; exit 1; }

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

receiver_pid=""
# shellcheck disable=SC2317  # invoked via trap
cleanup() {
    if [[ -n "$receiver_pid" ]] && kill -0 "$receiver_pid" 2>/dev/null; then
        kill "$receiver_pid" 2>/dev/null || true
        wait "$receiver_pid" 2>/dev/null || true
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if port_in_use "$DEMO_PORT"; then
    die "something is already listening on $receiver_addr; pick another port with DEMO_PORT=..."
fi

say "Building (cargo build --release --bins)"
cargo build --release --bins
bin_dir="${CARGO_TARGET_DIR:-$repo_root/target}/release"
outboxd="$bin_dir/outboxd"
receiver="$bin_dir/demo-receiver"
[[ -x "$outboxd" ]] || die "$outboxd was not built"
[[ -x "$receiver" ]] || die "$receiver was not built"

say "Migrating the database"
"$outboxd" migrate

say "Registering the demo receiver as an endpoint"
endpoint_out="$("$outboxd" endpoint add --url "http://$receiver_addr/webhook" --description demo)"
printf '%s\n' "$endpoint_out"
secret="$(awk '$1 == "secret:" { print $2; exit }' <<<"$endpoint_out")"
[[ "$secret" == whsec_* ]] || die "could not parse the endpoint secret from 'outboxd endpoint add' output"

say "Starting demo-receiver on $receiver_addr (verifies signatures, prints each delivery)"
# Own session (setsid): the terminal's Ctrl-C must not stop the receiver while outboxd is still
# draining in-flight deliveries; cleanup() stops it once outboxd has exited.
setsid_cmd=()
if command -v setsid >/dev/null 2>&1; then setsid_cmd=(setsid); fi
DEMO_RECEIVER_ADDR="$receiver_addr" DEMO_RECEIVER_SECRET="$secret" "${setsid_cmd[@]}" "$receiver" &
receiver_pid=$!
for _ in $(seq 1 100); do
    kill -0 "$receiver_pid" 2>/dev/null || die "demo-receiver exited during startup"
    port_in_use "$DEMO_PORT" && break
    sleep 0.1
done
port_in_use "$DEMO_PORT" || die "demo-receiver did not start listening on $receiver_addr"

say "Enqueueing sample events"
enqueue() {
    printf '$ outboxd enqueue %s\n' "$*" >&2
    "$outboxd" enqueue "$@"
}
enqueue --event-type order.created --payload '{"order_id": 1, "total_cents": 4999}'
enqueue --event-type order.created --payload '{"order_id": 2, "total_cents": 1250}'
enqueue --event-type customer.updated --payload '{"customer_id": 42, "email": "ada@example.com"}'
echo "(the same idempotency key twice: the second enqueue is deduplicated)" >&2
enqueue --event-type order.created --idempotency-key demo-1 --payload '{"order_id": 3, "total_cents": 700}'
enqueue --event-type order.created --idempotency-key demo-1 --payload '{"order_id": 3, "total_cents": 700}'

cat >&2 <<EOF

================================================================================
 outboxd demo
   PostgreSQL : $DATABASE_URL
   receiver   : http://$receiver_addr/webhook  (demo-receiver, pid $receiver_pid)

 The dispatcher now starts and delivers the queued events, signed with the
 Standard Webhooks scheme; demo-receiver verifies each signature and prints it.

 Enqueue more events from another terminal:
   DATABASE_URL='$DATABASE_URL' \\
     $outboxd enqueue --event-type order.created --payload '{"order_id": 99}'

 Press Ctrl-C to stop: outboxd drains in-flight deliveries, then the receiver
 and the throwaway database are shut down.
================================================================================

EOF

say "Running outboxd (WEBHOOK_ALLOW_PRIVATE_TARGETS=true: the receiver is on loopback)"
status=0
WEBHOOK_ALLOW_PRIVATE_TARGETS=true "$outboxd" run || status=$?
exit "$status"
