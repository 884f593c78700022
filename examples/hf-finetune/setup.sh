#!/bin/sh
# Setup of the hf-finetune template: the job's Python is `.venv`, a link to one shared
# virtualenv per machine ($ASIMOV_HF_VENV, else ~/.cache/asimov/hf-venv), so that a
# second fine-tune on the same machine (`local`, a fleet host) installs nothing. The venv
# reuses the image's torch (`--system-site-packages`: a CUDA image does not download it
# again), then installs the template's requirements; only a venv that imports them all
# is marked ready, so an interrupted install is redone, not trusted.
set -eu
venv=${ASIMOV_HF_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/asimov/hf-venv}
ready() {
	[ -x "$venv/bin/python" ] &&
		"$venv/bin/python" -c 'import torch, transformers, datasets, peft' 2>/dev/null
}
mkdir -p "$(dirname "$venv")"
# Two fine-tunes set up at once on one machine install once, one after the other.
if command -v flock >/dev/null 2>&1; then
	exec 9>"$venv.lock"
	flock 9
fi
if ! ready; then
	echo "setup: installing torch, transformers, datasets, peft into $venv (several GB once)"
	[ -x "$venv/bin/python" ] || python3 -m venv --system-site-packages "$venv"
	"$venv/bin/python" -m pip install --disable-pip-version-check -q -r requirements.txt
	ready
fi
ln -sfn "$venv" .venv
echo "setup: python $("$venv/bin/python" -c 'import sys; print(sys.version.split()[0])') in $venv"
