# syntax=docker/dockerfile:1

# === build ===
FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
# Cache mounts keep the registry and target dir between builds; the binary is
# copied out because the cache mount is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin switchboard \
    && install -m 0755 target/release/switchboard /usr/local/bin/switchboard

# === runtime ===
FROM debian:bookworm-slim
# ca-certificates: rediss:// and proxy upstreams use the system roots.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 switchboard \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin switchboard
COPY --from=builder /usr/local/bin/switchboard /usr/local/bin/switchboard
USER 10001:10001
ENV HOST=0.0.0.0 \
    PORT=8080
EXPOSE 8080
# `switchboard healthcheck` GETs http://127.0.0.1:$PORT/healthz and exits 0 on
# 200, so the image needs no curl.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["switchboard", "healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/switchboard"]
