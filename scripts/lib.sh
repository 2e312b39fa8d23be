# Shared helpers for the salt-kvm scripts. Sourced, never run.
# Every path and name the scripts agree on is defined here once.

SALT_KVM_HOME="${SALT_KVM_HOME:-/opt/salt-kvm}"          # venvs, wheels
SALT_KVM_CACHE="${SALT_KVM_CACHE:-/var/cache/salt-kvm}"   # guest images
# An isolated Salt laid out as the onedir packages lay out /opt/saltstack/salt.
SALT_KVM_ONEDIR="${SALT_KVM_ONEDIR:-$SALT_KVM_HOME/onedir/salt}"
SALT_KVM_POOL="${SALT_KVM_POOL:-default}"
SALT_KVM_POOL_DIR="${SALT_KVM_POOL_DIR:-/var/lib/libvirt/images}"
# The isolated network the tests own: guests reach the host (salt-master) and
# nothing else.
SALT_KVM_TEST_NET="${SALT_KVM_TEST_NET:-salt-kvm-test}"
SALT_KVM_TEST_NET_PREFIX="${SALT_KVM_TEST_NET_PREFIX:-192.168.213}"
SALT_KVM_BASE_DOMAIN="${SALT_KVM_BASE_DOMAIN:-salt-kvm-base-debian12}"
SALT_VERSION="${SALT_VERSION:-3008.3}"
SALT_3007_VERSION="${SALT_3007_VERSION:-3007.8}"
# The libvirt and QEMU the hypervisor runs: "backports" (the main test bed:
# Debian 12's bookworm-backports, libvirt 11.3 / QEMU 10.0 as Debian 13 ships
# them) or "stable" (Debian 12's own libvirt 9.0 / QEMU 7.2, the oldest
# supported). setup-host switches between them, either way.
SALT_KVM_LIBVIRT="${SALT_KVM_LIBVIRT:-backports}"
VIRSH="virsh -q -c qemu:///system"

log() { printf '[salt-kvm %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
need_root() { [ "$(id -u)" = 0 ] || die "run as root"; }
# Start a daemon without the caller's open files above stderr. A daemon keeps
# what it inherits: started under `flock LOCK scripts/setup-host` it would hold
# that lock for as long as it runs, and every later `flock LOCK` would wait.
daemon() {
  (
    for fd in /proc/$BASHPID/fd/*; do
      fd=${fd##*/}
      [ "$fd" -gt 2 ] && eval "exec $fd>&-"
    done
    exec "$@"
  )
}

# pip, minus this kind of machine's noise about absent local index folders.
pip_quiet() { "$@" 2> >(grep -v "^WARNING: Location 'file:" >&2); }

# Salt 3007's wheel as built from its sdist carries no requirements: install
# them from the sdist's own requirements files.
salt3007_requirements() {
  local dir="$SALT_KVM_CACHE/sdist/salt-$SALT_3007_VERSION"
  if [ ! -d "$dir/requirements" ]; then
    local tmp; tmp=$(mktemp -d)
    pip_quiet python3 -m pip download -q --no-deps --no-binary :all: "salt==$SALT_3007_VERSION" -d "$tmp"
    mkdir -p "$dir"; tar xzf "$tmp"/salt-*.tar.gz -C "$dir" --strip-components=1; rm -rf "$tmp"
  fi
  echo "$dir/requirements/zeromq.txt"
}

# Salt $SALT_VERSION and its dependencies as wheels (salt itself is an sdist on
# PyPI: built once), cached. (build-test-image keeps its own copy of this
# function: that file's content is its image's cache key.)
salt_wheels() {
  local dir="$SALT_KVM_CACHE/wheels/salt-$SALT_VERSION"
  if [ ! -f "$dir/.complete" ]; then
    log "downloading salt $SALT_VERSION wheels"
    rm -rf "$dir"; mkdir -p "$dir"
    pip_quiet python3 -m pip download -q "salt==$SALT_VERSION" -d "$dir"
    if ls "$dir"/*.tar.gz >/dev/null 2>&1; then
      pip_quiet python3 -m pip wheel -q --no-deps -w "$dir" "$dir"/*.tar.gz
      rm -f "$dir"/*.tar.gz
    fi
    touch "$dir/.complete"
  fi
  echo "$dir"
}
