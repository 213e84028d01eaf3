# The kernelbox service image.
#
# Two ways to build it:
#   docker build .                         a host with a registry: compiles from source (stage `release`)
#   docker build --target prebuilt \       a host without one (no Rust image to pull): packages a binary
#     --build-arg KERNELBOX_BINARY=target/release/kernelbox \
#     --build-arg BASE_IMAGE=kernelbox/debian-rootfs:bookworm .      built on the host by `cargo build --release`
# Stages are ordered so that `--target prebuilt` never touches the Rust builder image (the classic builder
# builds every stage before its target).

ARG BASE_IMAGE=debian:bookworm-slim
ARG RUST_IMAGE=rust:1-bookworm

FROM ${BASE_IMAGE} AS runtime
# debootstrap and tar let `serve` make a Debian base for the kernel images where none can be pulled.
RUN set -eu; export DEBIAN_FRONTEND=noninteractive; apt-get update; \
    apt-get install -y --no-install-recommends ca-certificates tar debootstrap; \
    apt-get clean; rm -rf /var/lib/apt/lists/*
ENV KERNELBOX_LISTEN=0.0.0.0:8080 \
    KERNELBOX_STATE_DIR=/var/lib/kernelbox \
    KERNELBOX_LOG_FORMAT=json
EXPOSE 8080
# Root on purpose: the service drives the Docker engine through its socket, which is root-equivalent
# already; a non-root user with the socket's group gains nothing and breaks on hosts whose docker gid
# differs. Untrusted code never runs here: it runs in the sealed, non-root session containers.
HEALTHCHECK --interval=10s --timeout=6s --start-period=30s --retries=3 CMD ["kernelbox", "health"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["kernelbox"]
CMD ["serve"]

FROM runtime AS prebuilt
ARG KERNELBOX_BINARY=target/release/kernelbox
COPY ${KERNELBOX_BINARY} /usr/local/bin/kernelbox

FROM ${RUST_IMAGE} AS builder
WORKDIR /src
COPY . .
RUN cargo build --release --locked && cp target/release/kernelbox /kernelbox

FROM runtime AS release
COPY --from=builder /kernelbox /usr/local/bin/kernelbox
