"""ZeRO stage 3: where theta, g and Adam's state live when the parameters are partitioned too.

Every use of DeepSpeed's stage-3 internals is in this file, and `check_internals` verifies them
when the backend is built (refusing, with the DeepSpeed version, an optimizer whose internals
differ) and again against DeepSpeed's public `safe_get_local_*` helpers whenever the layout is
built. Tested with deepspeed 0.19.8.

What `DeepSpeedZeroOptimizer_Stage3` keeps on each data-parallel rank, per sub-group i:

- `fp32_partitioned_groups_flat[i]`: the fp32 masters of this rank's partition of every param
  in `fp16_groups[i]` (a separate tensor also in fp32), each param at
  `grad_position[param id] = (i, offset, partition_numel)`; Adam's state is keyed by it.
- `fp16_partitioned_groups_flat[i]`: the working copy (the model's dtype) at the same offsets;
  each `param.ds_tensor` is a view into it, and every forward all-gathers from them.
- one gradient partition per param (`__param_id_to_grad_partition`, views of
  `grad_partitions_flat_buffer`, allocated at init), reduce-scattered into on every
  backward: copied on the first micro-batch after `zero_grad()`, added on the next ones.

A param's partition on rank r covers [r * partition_numel, (r + 1) * partition_numel) of the
flat param, padded past its end. Params below `stage3_param_persistence_threshold` are
"persistent": every rank keeps a full copy besides its partition, refreshed only by an
all-gather (the optimizer does it after each step; `publish` does it after each write).
"""

from __future__ import annotations

from collections.abc import Iterator
from importlib.metadata import version

import torch
from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
from deepspeed.utils import safe_get_local_fp32_param

from megatron_fsam.backends.shards import ParamSpan, ShardEntry

GRAD_PARTITIONS = "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition"
INTERNALS = (
    "fp16_groups",
    "fp32_partitioned_groups_flat",
    "fp16_partitioned_groups_flat",
    "grad_position",
    "get_param_id",
    "sub_group_to_group_id",
    "persistent_parameters",
    "micro_step_id",
    "_partition_all_parameters",
    "grad_partitions_flat_buffer",
    GRAD_PARTITIONS,
)


def check_internals(optimizer) -> None:
    """Refuse a stage-3 optimizer that lacks what this file reads (another DeepSpeed)."""
    missing = [name for name in INTERNALS if not hasattr(optimizer, name)]
    if missing:
        raise RuntimeError(
            f"megatron_fsam: deepspeed {version('deepspeed')}'s ZeRO-3 optimizer has no "
            f"{', '.join(missing)}; the SAM step reads these to find this rank's partitions "
            "(tested with deepspeed 0.19.8)"
        )


class Zero3Partitions:
    """This rank's partitions under ZeRO-3, as the SAM step's shard entries."""

    def __init__(
        self, optimizer: DeepSpeedZeroOptimizer_Stage3, inner: torch.optim.Optimizer
    ) -> None:
        check_internals(optimizer)
        self.optimizer = optimizer
        self.inner = inner

    def layout_key(self) -> tuple:
        """The buffers the entries view (allocated once; rebuilt only if DeepSpeed moves them)."""
        opt = self.optimizer
        return (
            tuple(t.data_ptr() for t in opt.fp32_partitioned_groups_flat),
            tuple(t.data_ptr() for t in opt.fp16_partitioned_groups_flat),
            opt.grad_partitions_flat_buffer.data_ptr(),
        )

    def entries(self) -> Iterator[ShardEntry]:
        opt = self.optimizer
        grads = getattr(opt, GRAD_PARTITIONS)
        for i, params in enumerate(opt.fp16_groups):
            main = opt.fp32_partitioned_groups_flat[i]
            working = opt.fp16_partitioned_groups_flat[i]
            param_group = self.inner.param_groups[opt.sub_group_to_group_id[i]]
            for param in params:
                _, offset, numel = opt.grad_position[opt.get_param_id(param)]
                rank = torch.distributed.get_rank(group=param.ds_process_group)
                start = rank * numel
                real = min(numel, max(0, param.ds_numel - start))  # the rest is padding
                if not param.requires_grad or real == 0:
                    continue
                _check_views(param, main, working, offset)
                yield ShardEntry(
                    main=main,
                    grad=grads[param.ds_id][:real],
                    target=working[offset : offset + real],
                    inner=self.inner,
                    span=ParamSpan(param, start, start + real),
                    state_range=(offset, offset + real),
                    param_group=param_group,
                )

    def zero_grads(self) -> None:
        """The next backward copies into the gradient partitions instead of adding."""
        self.optimizer.zero_grad(set_to_none=True)  # micro_step_id = 0
        self.optimizer.grad_partitions_flat_buffer.zero_()  # params a pass leaves unused: 0

    def publish(self) -> None:
        """The next forward reads what was written into the working partitions: release every
        gathered full param, persistent ones included (a persistent param is gathered only
        when released, so its stale full copy would otherwise stay), then re-gather the
        persistent ones, as the optimizer's own step does after writing theta."""
        opt = self.optimizer
        opt._partition_all_parameters()
        if opt.persistent_parameters:
            opt.persistent_parameters[0].all_gather(opt.persistent_parameters)


def _check_views(param, main: torch.Tensor, working: torch.Tensor, offset: int) -> None:
    """The offsets read from the internals agree with DeepSpeed's public helper and with the
    param's own partition (`ds_tensor`): otherwise SAM would perturb the wrong coordinates."""
    fp32 = safe_get_local_fp32_param(param)
    if (
        fp32.data_ptr() != main[offset:].data_ptr()
        or param.ds_tensor.data_ptr() != working[offset:].data_ptr()
    ):
        raise RuntimeError(
            f"megatron_fsam: deepspeed {version('deepspeed')}: a ZeRO-3 parameter's partition is "
            "not where the optimizer's internals place it (tested with deepspeed 0.19.8)"
        )
