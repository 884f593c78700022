#!/bin/sh
# Setup of the hf-finetune template: a virtualenv that reuses the image's torch (so a
# CUDA image does not download torch again), then the template's requirements.
set -eu
if [ ! -x .venv/bin/python ]; then
	python3 -m venv --system-site-packages .venv
fi
.venv/bin/python -m pip install --disable-pip-version-check -q -r requirements.txt
