#!/usr/bin/env bash
# Reproduce checkpoints/florence-vl-tiny-shapes from nothing (both stages, CPU), then evaluate it.
# One thread per process: at this model size extra threads only add synchronisation.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
time python train/sft.py --config train/recipes/tiny_shapes_pretrain.yaml
time python train/sft.py --config train/recipes/tiny_shapes_finetune.yaml
florence-vl eval-shapes --model checkpoints/florence-vl-tiny-shapes --n 500 --seed 12345
