#!/bin/sh
# Installs the local S3-compatible server the S3 tests start (`moto_server`, from PyPI's
# `moto[server]`) into its own virtualenv, so nothing of the system Python changes.
# Idempotent: a venv whose moto_server answers --help is left as it is.
#
#   ASIMOV_S3_VENV  where the venv lives (default ~/.cache/asimov/s3-venv); the tests
#                   look for bin/moto_server there (tests/support/s3_server.rs)
set -eu

venv=${ASIMOV_S3_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/asimov/s3-venv}
# The version the tests were written against; a newer moto may change its replies.
moto_version=5.2.5

if "$venv/bin/moto_server" --help >/dev/null 2>&1 &&
	"$venv/bin/python" -c "import moto, sys; sys.exit(moto.__version__ != '$moto_version')" 2>/dev/null; then
	echo "install-s3-server: moto_server $moto_version already in $venv"
	exit 0
fi

python=$(command -v python3 || true)
if [ -z "$python" ]; then
	echo "install-s3-server: python3 not found; install python3 and python3-venv" >&2
	exit 1
fi
if ! "$python" -c "import venv, ensurepip" 2>/dev/null; then
	# Debian splits venv/ensurepip out of python3.
	if command -v apt-get >/dev/null 2>&1; then
		as_root=""
		[ "$(id -u)" -eq 0 ] || as_root=sudo
		$as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
		$as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-venv
	else
		echo "install-s3-server: python3 has no venv module; install python3-venv" >&2
		exit 1
	fi
fi

echo "install-s3-server: installing moto[server]==$moto_version into $venv"
mkdir -p "$(dirname "$venv")"
rm -rf "$venv"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check "moto[server]==$moto_version"
"$venv/bin/moto_server" --help >/dev/null
echo "install-s3-server: moto_server ready at $venv/bin/moto_server"
