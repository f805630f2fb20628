#!/usr/bin/env bash
# The main job on a CPU-only machine: installs what is missing, then a short Func-SAM
# pretraining run of configs/demo_cpu.yaml on 2 gloo ranks through the deepspeed launcher.
# Extra arguments are config overrides, e.g. `bash launch/demo_cpu.sh train.train_steps=20`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh
exec bash launch/deepspeed.sh --num_gpus 2 -- --config configs/demo_cpu.yaml "$@"
