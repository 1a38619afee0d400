#!/usr/bin/env bash
# Install what the tests need, then run every test:
#   1. the main suite in the active environment, with the newest transformers pip resolves today;
#   2. the main suite again in .venv-oldest (made from scratch), with the oldest supported transformers
#      (tests/constraints-oldest.txt), so both ends of `transformers>=5.24,<6` are tested on every run;
#   3. the vLLM suite in its own environment (.venv-vllm, made from scratch: vLLM pins transformers < 5.20).
# README's test command (and .ci/run) is: python3 -m venv .venv && . .venv/bin/activate && bash tests/run.sh
set -uo pipefail
cd "$(dirname "$0")/.."
EXTRAS="train,analysis,dev,quant,demo,deepspeed"   # DeepSpeed's CPU op compiles with g++
install() {  # into the environment of the `python` on PATH; extra pip arguments (constraints) follow
    python -m pip install -q --upgrade pip
    python -m pip install -q torch==2.13.0        # the CPU build, before the package: a plain `torch` pulls CUDA
    python -m pip install -q -e ".[$EXTRAS]" "$@"
    python -c "import transformers, trl, peft, torch; print('transformers', transformers.__version__, '| trl',
               trl.__version__, '| peft', peft.__version__, '| torch', torch.__version__)"
}
set -e
install
bash tests/install_browser.sh                     # chromium + chromium-driver from Debian (root or sudo)
export HF_HUB_OFFLINE=1
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}"   # DeepSpeed's op, compiled once per run
set +e
python -m pytest tests -q
newest=$?
(
    set -e
    python3 -m venv --clear .venv-oldest && . .venv-oldest/bin/activate
    install -c tests/constraints-oldest.txt
    python -m pytest tests -q
)
oldest=$?
bash tests_vllm/run.sh
vllm=$?
echo "main suite exit $newest (newest transformers), $oldest (oldest supported), vLLM suite exit $vllm"
[ "$newest" -eq 0 ] && [ "$oldest" -eq 0 ] && [ "$vllm" -eq 0 ]
