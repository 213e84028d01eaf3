# Sourced by scripts/run and scripts/test: checks what the host needs beyond Docker and the Rust toolchain,
# and installs what it can (debootstrap, for a Debian base image where none can be pulled).
kb_die() { echo "kernelbox: $*" >&2; exit 1; }

kb_prereqs() {
  command -v docker >/dev/null || kb_die "the docker CLI is not installed (needed for the compose test; the service uses the Docker API)"
  docker info >/dev/null 2>&1 || kb_die "the Docker engine is unreachable: start it, or check DOCKER_HOST and this user's access to its socket"
  command -v cargo >/dev/null || kb_die "cargo is not installed: install the Rust toolchain (https://rustup.rs)"
  local base="${KERNELBOX_BASE_IMAGE:-debian:bookworm-slim}"
  if ! docker image inspect "$base" >/dev/null 2>&1 \
     && ! docker image inspect kernelbox/debian-rootfs:bookworm >/dev/null 2>&1 \
     && ! command -v debootstrap >/dev/null && [ ! -x /usr/sbin/debootstrap ]; then
    # Where the base image cannot be pulled either, kernelbox makes one with debootstrap.
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "kernelbox: installing debootstrap (to make a Debian base image if $base cannot be pulled)" >&2
      DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 && \
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >&2 || \
        kb_die "could not install debootstrap; install it, or make $base available (docker load)"
    else
      echo "kernelbox: note: $base is not here and debootstrap is not installed; if $base cannot be pulled," \
           "install debootstrap (as root: apt-get install debootstrap)" >&2
    fi
  fi
}
