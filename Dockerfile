# syntax=docker/dockerfile:1
#
# pgleader container image: a glibc build on Debian 12 (bookworm), copied into distroless's
# Debian 12 "cc" base (glibc, libgcc, CA certificates; no shell, no package manager), run as an
# unprivileged uid. The configuration is not baked in: mount it at /etc/pgleader (a volume), or
# point --config / PGLEADER_CONFIG elsewhere (the Nomad job passes /local/pgleader.toml).
#
#   docker build -t pgleader:0.1.0 .
#   docker run --rm --network host -v /etc/pgleader:/etc/pgleader:ro pgleader:0.1.0
#   docker run --rm -v /etc/pgleader:/etc/pgleader:ro pgleader:0.1.0 check-config
#
# Not built where it was written (no Docker engine there). tests/deploy_files.rs checks its shape:
# two stages, every path the build needs is copied and not excluded by .dockerignore, a non-root
# USER whose uid matches the Nomad job's secret file owner, the config volume, the entrypoint.

# At least the newest rust-version among the locked dependencies (tests/deploy_files.rs checks).
ARG RUST_VERSION=1.88

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
# Everything Cargo needs to resolve the manifest: the lockfile (--locked) and every declared
# target, benches included, even though only the binary is built.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY examples ./examples
RUN cargo build --release --locked --bin pgleader \
 && install -D -m 0755 target/release/pgleader /out/pgleader

FROM gcr.io/distroless/cc-debian12
COPY --from=build /out/pgleader /usr/local/bin/pgleader
# No account name is needed: the process only reads its config and password file.
USER 10001:10001
ENV PGLEADER_CONFIG=/etc/pgleader/pgleader.toml
VOLUME ["/etc/pgleader"]
# 5433: PostgreSQL clients. 9543: admin HTTP (/metrics, /healthz, /readyz, /status).
EXPOSE 5433 9543
# SIGTERM drains (sessions get proxy.shutdown_grace); give `docker stop -t` at least that + 5s.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/pgleader"]
