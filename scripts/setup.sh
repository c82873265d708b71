#!/usr/bin/env bash
# One-command set-up (the README's): CPU torch first (so nothing pulls a multi-GB CUDA build),
# then lorakit with its dev extras (peers for the equivalence tests: diffusers, peft, lycoris-lora).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install torch==2.13.0
python -m pip install -e '.[dev]'
