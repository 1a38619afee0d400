#!/usr/bin/env bash
# Reproduce checkpoints/florence-vl-tiny-shapes from nothing (CPU), then evaluate it: stage 1, then stage 2 in two
# parts (short-answer questions, then the full mix). Extra arguments (e.g. --seed 1) go to every part.
# One thread per process: at this model size extra threads only add synchronisation.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
time python train/sft.py --config train/recipes/tiny_shapes_pretrain.yaml "$@"
time python train/sft.py --config train/recipes/tiny_shapes_questions.yaml "$@"
time python train/sft.py --config train/recipes/tiny_shapes_finetune.yaml "$@"
rm -f checkpoints/florence-vl-tiny-shapes/training_args.bin  # a pickle; the shipped folder holds safetensors only
florence-vl eval-shapes --model checkpoints/florence-vl-tiny-shapes --n 500 --seed 12345 --record
