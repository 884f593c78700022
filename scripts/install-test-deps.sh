#!/bin/sh
# Installs what the test suite needs to start real servers: OpenSSH server and client
# (the ssh transport and fleet tests), rsync (file transfer), tmux (the agent), git, and
# busybox (the agent is also tested under a minimal POSIX sh), and moto_server (S3).
# Idempotent: only packages that are missing are installed. Works as root, or through
# sudo otherwise. Debian/Ubuntu (apt-get) only.
set -eu

# The local S3-compatible server (moto_server in its own venv) for the S3 tests.
"$(dirname "$0")/install-s3-server.sh"

# package:command-that-proves-it-is-installed
wanted="openssh-server:/usr/sbin/sshd openssh-client:ssh rsync:rsync tmux:tmux git:git busybox:busybox"

missing=""
for pair in $wanted; do
    pkg=${pair%%:*}
    probe=${pair#*:}
    if dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        continue
    fi
    # A tool installed some other way (e.g. git built from source) is good enough.
    case "$probe" in
        /*) [ -x "$probe" ] && continue ;;
        *) command -v "$probe" >/dev/null 2>&1 && continue ;;
    esac
    missing="$missing $pkg"
done

# The Python venv of tests/hf_finetune.rs (cached: instant once installed).
"$(dirname "$0")/install-hf-venv.sh"

if [ -z "$missing" ]; then
    echo "install-test-deps: nothing to install"
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    as_root=""
elif command -v sudo >/dev/null 2>&1; then
    as_root="sudo"
else
    echo "install-test-deps: need root or sudo to install:$missing" >&2
    exit 1
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-test-deps: apt-get not found; install by hand:$missing" >&2
    exit 1
fi

echo "install-test-deps: installing$missing"
export DEBIAN_FRONTEND=noninteractive
# shellcheck disable=SC2086 # word splitting of the package list is intended
$as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
# shellcheck disable=SC2086
$as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
# The package's own sshd service is not what the tests use (they start their own on a
# free port); nothing here enables or starts it.
