#!/usr/bin/env bash
# launch/pretrain.py (or --script PATH, e.g. launch/pretrain_deepspeed.py) under the
# deepspeed launcher.
#
#   bash launch/deepspeed.sh [LAUNCHER ARGS] [--script PATH] -- --config configs/NAME.yaml [key=value ...]
#
# One node:   bash launch/deepspeed.sh --num_gpus 8 -- --config configs/nanodo_h20.yaml
# Many nodes: bash launch/deepspeed.sh --hostfile hosts.txt --master_addr node0 \
#                 --master_port 6000 -- --config ...
# (hosts.txt lines: "node0 slots=8"). Without a hostfile on a CPU-only machine, each of
# --num_gpus ranks is a local gloo process and no ssh is used. Without a hostfile the ranks
# meet on a free port unless --master_port gives one, which must be free.
set -euo pipefail
cd "$(dirname "$0")/.."
launcher_args=()
script=launch/pretrain.py
while [[ $# -gt 0 && "$1" != "--" ]]; do
    if [[ "$1" == "--script" ]]; then script=$2; shift 2; continue; fi
    launcher_args+=("$1"); shift
done
[[ $# -gt 0 ]] && shift
source launch/launcher_options.sh
has_gpu() { python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; }
if [[ -z "$(option_value --hostfile)" ]]; then  # every rank on this machine
    port=$(option_value --master_port)
    if [[ -z "$port" ]]; then
        launcher_args+=(--master_port "$(python -m megatron_fsam.trainer.ports free)")
    else
        python -m megatron_fsam.trainer.ports check "$port"
    fi
    if ! has_gpu; then
        launcher_args+=(--no_ssh --node_rank 0 --master_addr 127.0.0.1)
    fi
fi
exec deepspeed "${launcher_args[@]}" "$script" "$@"
