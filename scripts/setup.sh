#!/usr/bin/env bash
# One-command set-up (the README's): Debian's chromium for the browser test of the web page, CPU torch
# first (so nothing pulls a multi-GB CUDA build), then lorakit with its dev extras (peers for the
# equivalence tests: diffusers, peft, lycoris-lora; the server, Ray Serve and playwright). The peers are held
# to constraints/peers.txt: tests that pin a peer's bug skip on other versions, the extras stay open ranges.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null
  else
    echo "note: no chromium and no apt-get: the browser test will be skipped" >&2
  fi
fi
python -m pip install torch==2.13.0
python -m pip install -e '.[dev]' -c constraints/peers.txt
