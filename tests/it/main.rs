//! outboxd integration tests: one binary, real PostgreSQL, real HTTP on 127.0.0.1.
//!
//! Run with `make test` (or `PG_FAST=1 scripts/with-postgres.sh cargo test --test it`):
//! the harness needs `DATABASE_URL` pointing at a PostgreSQL superuser, and creates a
//! database per test.

mod cluster;
mod harness;

mod admin;
mod admin_contract;
mod admin_tokens;
mod circuit;
mod cli;
mod cli_ops;
mod cli_text;
mod concurrency;
mod connections;
mod delivery;
mod demo_receiver;
mod endpoint_health;
mod endpoint_limits;
mod endpoint_requests;
mod endpoints;
mod failover;
mod fanout;
mod lease;
mod many_endpoints;
mod migrations;
mod noisy_neighbour;
mod observability;
mod operational_events;
mod ordering;
mod ordering_basics;
mod ordering_ops;
mod outage;
mod payloads;
mod plans;
mod pooler;
mod producer;
mod readme;
mod receiver_failures;
mod retention;
mod retries;
mod roles;
mod sessions;
mod settling;
mod shutdown;
mod signing;
mod ssrf;
mod startup;
mod tls;
mod unbuildable;
mod wakeups;
