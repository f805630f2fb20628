#!/usr/bin/env bash
# launch/pretrain.py under torchrun.
#
#   bash launch/torchrun.sh [TORCHRUN ARGS] -- --config configs/NAME.yaml [key=value ...]
#
# One node:   bash launch/torchrun.sh --nproc_per_node 8 -- --config configs/nanodo_h20.yaml
# Many nodes: bash launch/torchrun.sh --nnodes 4 --node_rank R --master_addr node0 \
#                 --nproc_per_node 8 -- --config ...
set -euo pipefail
cd "$(dirname "$0")/.."
launcher_args=()
while [[ $# -gt 0 && "$1" != "--" ]]; do launcher_args+=("$1"); shift; done
[[ $# -gt 0 ]] && shift
exec torchrun "${launcher_args[@]}" launch/pretrain.py "$@"
