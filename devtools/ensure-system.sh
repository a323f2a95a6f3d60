#!/bin/sh
# Install the Debian packages a target needs when they are missing and we may (root);
# otherwise name exactly what to install. Usage: ensure-system.sh build|broker|bench|postgres|package [ARCH]
#   build:  a C compiler, the Python headers and venv, to build the Cython kernel; libfuse3's
#           headers and pkg-config, to build pyfuse3 (a dev extra: the power-loss test's FUSE
#           filesystem), and fuse3 for fusermount3
#   broker: mosquitto and openssl (tests and make run start their own broker on a free loopback port;
#           policy-rc.d keeps apt from starting the system one on 1883 here)
#   bench:  the broker's, and valgrind (make bench counts instructions with its cachegrind tool)
#   postgres: PostgreSQL's server (tests start their own cluster with initdb: devtools/postgres.py)
set -eu
PYTHON=${PYTHON:-python3}
missing=""
case "${1:-}" in
    build)
        command -v cc >/dev/null 2>&1 || missing="$missing gcc"
        "$PYTHON" -c 'import os, sysconfig, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
            || missing="$missing python3-dev"
        "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null || missing="$missing python3-venv"
        command -v pkg-config >/dev/null 2>&1 || missing="$missing pkg-config"
        pkg-config --exists fuse3 2>/dev/null || missing="$missing libfuse3-dev"
        command -v fusermount3 >/dev/null 2>&1 || missing="$missing fuse3"
        ;;
    package)
        # make deb and the package tests: Debian roots (debootstrap), and for a foreign ARCH
        # binaries run through qemu; systemd-analyze checks the unit files.
        command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || missing="$missing debootstrap"
        command -v systemd-analyze >/dev/null 2>&1 || missing="$missing systemd"
        if [ -n "${2:-}" ] && [ "$2" != "$(dpkg --print-architecture)" ]; then
            command -v qemu-aarch64-static >/dev/null 2>&1 || missing="$missing qemu-user-static"
            command -v update-binfmts >/dev/null 2>&1 || missing="$missing binfmt-support"
        fi
        ;;
    postgres)
        ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 \
            || missing="$missing postgresql"
        ;;
    broker|bench)
        if [ "$1" = bench ]; then
            command -v valgrind >/dev/null 2>&1 || missing="$missing valgrind"
        fi
        command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing="$missing mosquitto"
        command -v openssl >/dev/null 2>&1 || missing="$missing openssl"  # the TLS tests make certificates
        ;;
    *)
        echo "usage: $0 build|broker|bench|postgres|package [ARCH]" >&2
        exit 2
        ;;
esac
[ -z "$missing" ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "error: missing Debian packages:$missing; install them with: sudo apt-get install$missing" >&2
    exit 1
fi
echo "installing with apt-get:$missing" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >&2
policy=/usr/sbin/policy-rc.d
created=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && created=1
fi
status=0
# shellcheck disable=SC2086 # word splitting of the package list is intended
apt-get install -y -q --no-install-recommends $missing >&2 || status=$?
if [ "$created" -eq 1 ]; then rm -f "$policy"; fi
exit "$status"
