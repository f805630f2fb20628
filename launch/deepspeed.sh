#!/usr/bin/env bash
# launch/pretrain.py under the deepspeed launcher.
#
#   bash launch/deepspeed.sh [LAUNCHER ARGS] -- --config configs/NAME.yaml [key=value ...]
#
# One node:   bash launch/deepspeed.sh --num_gpus 8 -- --config configs/nanodo_h20.yaml
# Many nodes: bash launch/deepspeed.sh --hostfile hosts.txt --master_addr node0 -- --config ...
# (hosts.txt lines: "node0 slots=8"). A CPU-only machine runs one gloo rank per
# --num_gpus without ssh.
set -euo pipefail
cd "$(dirname "$0")/.."
launcher_args=()
while [[ $# -gt 0 && "$1" != "--" ]]; do launcher_args+=("$1"); shift; done
[[ $# -gt 0 ]] && shift
if ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    launcher_args+=(--no_ssh --master_addr 127.0.0.1)
fi
exec deepspeed "${launcher_args[@]}" launch/pretrain.py "$@"
