#!/usr/bin/env bash
# Install what the tests need into the active Python environment, then run every test:
#   1. the main suite (transformers >= 5.24, TRL, PEFT, bitsandbytes, DeepSpeed, Gradio + Debian's Chromium for
#      the demo; the DeepSpeed tests need g++);
#   2. the vLLM suite in its own environment (.venv-vllm, made from scratch: vLLM pins transformers < 5.20).
# README's test command (and .ci/run) is: python3 -m venv .venv && . .venv/bin/activate && bash tests/run.sh
set -uo pipefail
cd "$(dirname "$0")/.."
set -e
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0            # the CPU build, before the package: a plain `torch` pulls CUDA
python -m pip install -q -e ".[train,analysis,dev,quant,demo,deepspeed]"
bash tests/install_browser.sh                     # chromium + chromium-driver from Debian (root or sudo)
set +e
export HF_HUB_OFFLINE=1
python -m pytest tests -q
main=$?
bash tests_vllm/run.sh
vllm=$?
echo "main suite exit $main, vLLM suite exit $vllm"
[ "$main" -eq 0 ] && [ "$vllm" -eq 0 ]
