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

# gVisor for the runsc tests (tests/api/runsc.rs): installs Debian's runsc and registers it with the engine
# as sessions need it (daemon.json "runtimes" entry, then SIGHUP: the engine reloads its runtimes without
# restarting a container). Only as root, only when the engine lacks it; says what it changed. Where it
# cannot, the runsc tests fail with the reason.
kb_gvisor() {
  local runtimes
  runtimes=$(docker info --format '{{json .Runtimes}}' 2>/dev/null || echo '{}')
  if printf '%s' "$runtimes" | grep -q '"runsc"'; then
    return 0
  fi
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || ! command -v python3 >/dev/null; then
    echo "kernelbox: note: gVisor (runsc) is not registered with the Docker engine and this is not a root shell" \
         "with apt-get: the runsc tests will fail; see the README's \"Sessions under gVisor\"" >&2
    return 0
  fi
  if ! command -v runsc >/dev/null; then
    echo "kernelbox: installing gVisor (Debian's runsc package) for the runsc tests" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq runsc >&2 || \
      { DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 && \
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq runsc >&2; } || \
      { echo "kernelbox: could not install runsc: the runsc tests will fail" >&2; return 0; }
  fi
  local config=/etc/docker/daemon.json pid
  pid=$(pidof dockerd 2>/dev/null | awk '{print $1}')
  if [ -z "$pid" ]; then
    echo "kernelbox: note: no dockerd process here to reload (a remote engine?): register runsc with it by hand;" \
         "the runsc tests will fail until then" >&2
    return 0
  fi
  python3 - "$config" "$(command -v runsc)" <<'PY' || { echo "kernelbox: could not update $config" >&2; return 0; }
import json, os, sys
path, runsc = sys.argv[1], sys.argv[2]
try:
    with open(path) as f:
        config = json.load(f)
except FileNotFoundError:
    config = {}
if not os.path.exists(path + ".kernelbox-backup") and os.path.exists(path):
    with open(path) as f, open(path + ".kernelbox-backup", "w") as b:
        b.write(f.read())
config.setdefault("runtimes", {})["runsc"] = {
    "path": runsc,
    "runtimeArgs": ["--platform=ptrace", "--network=none", "--fsgofer-host-uds"],
}
os.makedirs(os.path.dirname(path), exist_ok=True)
with open(path + ".kernelbox-tmp", "w") as f:
    json.dump(config, f, indent=2)
os.replace(path + ".kernelbox-tmp", path)
PY
  kill -HUP "$pid"
  local i
  for i in $(seq 1 20); do
    if docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q '"runsc"'; then
      echo "kernelbox: registered gVisor with the Docker engine for the runsc tests: added runtimes.runsc" \
           "(--platform=ptrace --network=none --fsgofer-host-uds) to $config and reloaded dockerd (SIGHUP;" \
           "no container restarted); the file as it was is in $config.kernelbox-backup" >&2
      return 0
    fi
    sleep 0.5
  done
  echo "kernelbox: dockerd did not pick up runsc from $config: the runsc tests will fail" >&2
}
