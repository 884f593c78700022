#!/bin/sh
# Installs the Python virtualenv that tests/hf_finetune.rs runs examples/hf-finetune/train.py
# in: torch, transformers, datasets, peft (the template's requirements.txt), at the versions
# pinned below so that a new release on PyPI cannot break CI.
#
# One venv for every test run, in a cache folder (not per test, not in target/): about
# 6 GB, because torch from PyPI brings its CUDA wheels even for CPU use; installing takes
# 80-100 s on an idle machine (300 s measured here under load). A second run finds its
# stamp matching and returns at once.
#
# Where: $ASIMOV_HF_VENV, else ${XDG_CACHE_HOME:-~/.cache}/asimov/hf-venv.
# ASIMOV_SKIP_HF_VENV=1 skips it (tests/hf_finetune.rs then says it was skipped).
set -eu
cd "$(dirname "$0")/.."

if [ "${ASIMOV_SKIP_HF_VENV:-}" = 1 ]; then
    echo "install-hf-venv: skipped (ASIMOV_SKIP_HF_VENV=1)"
    exit 0
fi

venv=${ASIMOV_HF_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/asimov/hf-venv}
requirements=examples/hf-finetune/requirements.txt

python=""
for candidate in python3.12 python3.11 python3.10 python3; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import venv, ensurepip' 2>/dev/null; then
        python=$candidate
        break
    fi
done
if [ -z "$python" ]; then
    echo "install-hf-venv: need python3 (3.10 or newer) with venv and ensurepip" >&2
    exit 1
fi

# The versions this venv was last checked with (torch's CPU use from the PyPI wheel).
constraints=$(cat <<'EOF'
torch==2.15.0
transformers==5.24.0
datasets==5.2.0
peft==0.21.2
huggingface_hub==2.4.0
tqdm==4.70.1
EOF
)

stamp_of() {
    { "$python" --version 2>&1; cat "$requirements"; printf '%s\n' "$constraints"; } | sha256sum | cut -d' ' -f1
}
want=$(stamp_of)
# The stamp is written only after the imports succeeded (checking them again would cost
# half a minute of imports under load).
if [ -f "$venv/.asimov-stamp" ] && [ "$(cat "$venv/.asimov-stamp")" = "$want" ] \
    && [ -x "$venv/bin/python" ]; then
    echo "install-hf-venv: $venv is up to date"
    exit 0
fi

echo "install-hf-venv: installing torch, transformers, datasets, peft into $venv (about 6 GB)"
started=$(date +%s)
rm -rf "$venv"
mkdir -p "$(dirname "$venv")"
"$python" -m venv "$venv"
printf '%s\n' "$constraints" >"$venv/constraints.txt"
# --no-cache-dir: the wheels are installed once here; a pip cache would double the disk.
"$venv/bin/python" -m pip install --disable-pip-version-check --no-cache-dir -q \
    -r "$requirements" -c "$venv/constraints.txt"
"$venv/bin/python" -c 'import torch, transformers, datasets, peft'
# The stamp comes last, so an interrupted install never looks done.
printf '%s\n' "$want" >"$venv/.asimov-stamp"
echo "install-hf-venv: done in $(($(date +%s) - started)) s ($(du -sh "$venv" | cut -f1))"
