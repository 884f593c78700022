#!/bin/sh
# The one command that runs every test on a fresh machine: installs what the tests need
# (OpenSSH server and client, rsync, tmux, git, busybox), then runs the whole suite.
set -eu
cd "$(dirname "$0")/.."
./scripts/install-test-deps.sh
cargo test --locked --all-targets "$@"
