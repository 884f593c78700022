#!/bin/sh
# Run of the hf-finetune template: the training script in the setup's virtualenv.
set -eu
exec .venv/bin/python -u train.py
