#!/usr/bin/env bash
# launch/pretrain.py under torchrun.
#
#   bash launch/torchrun.sh [TORCHRUN ARGS] -- --config configs/NAME.yaml [key=value ...]
#
# One node:   bash launch/torchrun.sh --nproc_per_node 8 -- --config configs/nanodo_h20.yaml
# Many nodes: bash launch/torchrun.sh --nnodes 4 --node_rank R --master_addr node0 \
#                 --master_port 6000 --nproc_per_node 8 -- --config ...
# One node meets on a free port (--standalone) unless --master_port or a rendezvous endpoint
# is given; a given port must be free on the node that hosts it (node rank 0).
set -euo pipefail
cd "$(dirname "$0")/.."
launcher_args=()
while [[ $# -gt 0 && "$1" != "--" ]]; do launcher_args+=("$1"); shift; done
[[ $# -gt 0 ]] && shift
source launch/launcher_options.sh
port=$(option_value --master_port --master-port)
if [[ -n "$port" ]]; then
    node_rank=$(option_value --node_rank --node-rank)
    if [[ -z "$node_rank" || "$node_rank" == 0 ]]; then
        python -m megatron_fsam.trainer.ports check "$port"
    fi
elif [[ -z "$(option_value --rdzv_endpoint --rdzv-endpoint)" ]] \
    && [[ " ${launcher_args[*]} " != *" --standalone "* ]]; then
    case "$(option_value --nnodes)" in "" | 1 | 1:1) launcher_args+=(--standalone) ;; esac
fi
exec torchrun "${launcher_args[@]}" launch/pretrain.py "$@"
