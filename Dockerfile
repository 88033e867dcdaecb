# syntax=docker/dockerfile:1
#
# docker build -t outboxd:local .      (needs BuildKit, the default since Docker 23)
# Image runs `outboxd run` by default; also contains `demo-receiver`.

############################ builder ############################
FROM rust:1.95-bookworm AS builder
WORKDIR /src

# Dependencies are cached across builds with BuildKit cache mounts (cargo registry + target
# dir) rather than a stub-source layer, so this keeps working whatever targets Cargo.toml
# declares. Binaries are copied out of the cache mount into /out.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin outboxd --bin demo-receiver \
    && mkdir -p /out \
    && cp target/release/outboxd target/release/demo-receiver /out/

############################ runtime ############################
FROM debian:bookworm-slim AS runtime

RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 outboxd \
    && useradd --system --uid 10001 --gid outboxd --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin outboxd

COPY --from=builder /out/outboxd /out/demo-receiver /usr/local/bin/

USER 10001:10001
ENV RUST_LOG=info
# demo-receiver's default port (DEMO_RECEIVER_ADDR=0.0.0.0:8787).
EXPOSE 8787

# outboxd drains in-flight deliveries on SIGTERM; give it time (docker stop -t 40).
STOPSIGNAL SIGTERM
ENTRYPOINT ["outboxd"]
CMD ["run"]
