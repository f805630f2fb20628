"""DeepSpeed adapter: this rank's shards of theta, g and Adam state under ZeRO stages 0 to 3.

What `deepspeed.initialize` builds, and where SAM finds theta in it (one layout class each):

- ZeRO-1/2 (`DeepSpeedZeroOptimizer`, `_Zero12Partitions`): each data-parallel rank owns a
  contiguous partition of the flat fp32 master weights of every param group.
  `param._hp_mapping` (DeepSpeed's own map, also used by its universal checkpoints) gives each
  model param's fragment in this rank's partition: fp32 theta, Adam's state, and the reduced
  gradient piece that the engine's backward left for `step()`. The model's params (bf16 or
  fp32) are views into one flat buffer per group; after a write, this rank's part of it is
  all-gathered.
- ZeRO-3 (`deepspeed_zero3.Zero3Partitions`): the model's params are partitioned too; the
  masters, the working partitions that every forward all-gathers, and the gradient partitions
  sit at one offset per param. See that module.
- ZeRO-0, fp32 (`_Replicated`): the torch optimizer's params are the model params (theta is
  copied before the perturbation); the engine all-reduces gradients into `param.grad`.
- ZeRO-0, bf16 (`FP16_Optimizer` / `FP16_UnfusedOptimizer` in bf16): fp32 masters (one flat
  tensor per group, or one per param), gradients all-reduced into the bf16 `param.grad`.

Under ZeRO-0 every rank holds everything; each counts every DP-th shard, so that the sums
over the data-parallel group see each coordinate once. Under ZeRO-0/1/2 gradients live in
buffers that the engine replaces at every accumulation boundary, so the shard lists are
rebuilt at each use; ZeRO-3 allocates its buffers once.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch
from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
from deepspeed.runtime.utils import all_gather_dp_groups
from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID, DeepSpeedZeroOptimizer

from megatron_fsam.backends.deepspeed_zero3 import Zero3Partitions
from megatron_fsam.backends.shards import ParamSpan, RankShards, ShardBackend, ShardEntry

ADAM_OPTIMIZERS = ("Adam", "AdamW", "FusedAdam", "DeepSpeedCPUAdam")


class DeepSpeedBackend(ShardBackend):
    """SAM's view of a DeepSpeed engine and its optimizer on this rank."""

    def __init__(self, engine) -> None:
        _check_engine(engine)
        self.engine = engine
        self.inner = engine.basic_optimizer
        group = engine.data_parallel_group
        self.layout = _layout_of(engine, self.inner, group)
        super().__init__(device=engine.device, stats_groups=[group])

    def check_second_moments(self) -> None:
        """Preconditioning reads Adam's exp_avg_sq: refuse other optimizers."""
        name = type(self.inner).__name__
        if name not in ADAM_OPTIMIZERS or not all("betas" in g for g in self.inner.param_groups):
            raise ValueError(
                "megatron_fsam: precond=True reads the optimizer's Adam second moment; the "
                f"engine's optimizer is {name} (supported: {', '.join(ADAM_OPTIMIZERS)})"
            )

    # ----- the layout -----------------------------------------------------------------

    def _layout_key(self) -> tuple | None:
        return self.layout.layout_key()

    def _entries(self) -> Iterator[ShardEntry]:
        return self.layout.entries()

    # ----- the step's side of the engine ------------------------------------------------

    def zero_grads(self) -> None:
        """Drop the gradients of the last pass, as the engine's own step would."""
        self.layout.zero_grads()

    def gradients(self, shards: RankShards) -> list[torch.Tensor]:
        return [entry.grad for entry in self._entries()]

    def optimizer_step(self) -> tuple[bool, float | None, int | None]:
        """engine.step() at the accumulation boundary: gradient clipping, the optimizer, the
        LR scheduler and the write of the new theta into the model, all DeepSpeed's own."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else None
        return self.engine.was_step_applied(), grad_norm, None

    def sync_params(self) -> None:
        """Every rank's model reads what was just written into the shards."""
        self.layout.publish()


def _layout_of(engine, inner: torch.optim.Optimizer, group):
    optimizer = engine.optimizer
    if isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3):
        return Zero3Partitions(optimizer, inner)
    if isinstance(optimizer, DeepSpeedZeroOptimizer):
        return _Zero12Partitions(optimizer, inner)
    return _Replicated(engine, inner, group)


class _Zero12Partitions:
    """ZeRO-1/2: each param's fragment of this rank's flat fp32 partition (`_hp_mapping`)."""

    def __init__(self, optimizer: DeepSpeedZeroOptimizer, inner: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.inner = inner

    def layout_key(self) -> None:
        return None  # rebuilt at every use: the engine allocates new gradient buffers each pass

    def entries(self) -> Iterator[ShardEntry]:
        opt = self.optimizer
        for i, group in enumerate(opt.bit16_groups):
            partition = opt.single_partition_of_fp32_groups[i]
            for param in group:
                fragment = getattr(param, "_hp_mapping", None)
                if fragment is None:  # no part of this param in this rank's partition
                    continue
                hp, lp = fragment.hp_fragment_address, fragment.lp_fragment_address
                if opt.averaged_gradients.get(i) is None:  # outside a pass: no gradients
                    grad = torch.zeros(hp.numel, dtype=param.dtype, device=param.device)
                else:
                    grad = fragment.get_lp_grad_fragment(param._index_in_param_group)
                yield ShardEntry(
                    main=partition,
                    grad=grad.view(-1),
                    target=fragment.lp_fragment,
                    inner=self.inner,
                    span=ParamSpan(param, lp.start, lp.start + lp.numel),
                    state_range=(hp.start, hp.start + hp.numel),
                )

    def zero_grads(self) -> None:
        opt = self.optimizer
        opt.zero_grad(set_to_none=True)
        opt._release_preflattened_grad_buffers()
        for group in list(opt.averaged_gradients):
            opt.averaged_gradients[group] = None
            opt.all_grad_tensors[group] = None
        opt.micro_step_id = INITIAL_MICRO_STEP_ID  # the next backward copies, not accumulates

    def publish(self) -> None:
        """All-gather this rank's partition of the model's flat params."""
        opt = self.optimizer
        all_gather_dp_groups(
            groups_flat=opt.bit16_groups_flat,
            partitioned_param_groups=opt.parallel_partitioned_bit16_groups,
            dp_process_group=opt.real_dp_process_group,
            start_alignment_factor=opt.nccl_start_alignment_factor,
            allgather_bucket_size=opt.allgather_bucket_size,
        )


class _Replicated:
    """ZeRO-0: every rank holds every param; each counts every DP-th one in global sums."""

    def __init__(self, engine, inner: torch.optim.Optimizer, group) -> None:
        self.engine = engine
        self.optimizer = engine.optimizer
        self.inner = inner
        self._dp_rank = torch.distributed.get_rank(group)
        self._dp_size = torch.distributed.get_world_size(group)

    def layout_key(self) -> None:
        return None  # rebuilt at every use: param.grad is a new tensor each pass

    def entries(self) -> Iterator[ShardEntry]:
        for index, (param, main, state_range) in enumerate(self._masters()):
            yield ShardEntry(
                main=main,
                grad=_grad(param),
                target=param.data.view(-1),
                inner=self.inner,
                span=ParamSpan(param, 0, param.numel()),
                counted=index % self._dp_size == self._dp_rank,
                state_range=state_range,
            )

    def _masters(self) -> Iterator[tuple[torch.nn.Parameter, torch.Tensor, tuple | None]]:
        """Each model param, the optimizer's tensor holding its theta, and its range there
        (None: all of it)."""
        opt = self.optimizer
        if isinstance(opt, FP16_Optimizer):  # one flat fp32 master per group
            for params, flat in zip(opt.fp16_groups, opt.fp32_groups_flat, strict=True):
                starts = itertools.accumulate((p.numel() for p in params), initial=0)
                for param, start in zip(params, starts, strict=False):
                    yield param, flat, (start, start + param.numel())
        elif isinstance(opt, FP16_UnfusedOptimizer):  # one fp32 master per param
            for params, masters in zip(opt.fp16_groups, opt.fp32_groups, strict=True):
                for param, master in zip(params, masters, strict=True):
                    yield param, master, None
        else:  # fp32: the optimizer steps the model's params themselves
            for group in self.inner.param_groups:
                for param in group["params"]:
                    yield param, param, None

    def zero_grads(self) -> None:
        self.engine.zero_grad()  # param.grad = None for every model param

    def publish(self) -> None:
        pass  # every rank wrote every shard


def _grad(param: torch.nn.Parameter) -> torch.Tensor:
    if param.grad is None:
        return torch.zeros(param.numel(), dtype=param.dtype, device=param.device)
    return param.grad.view(-1)


def _check_engine(engine) -> None:
    """Refuse, before any work and alike on every rank, what the step cannot do right."""
    stage = engine.zero_optimization_stage()
    optimizer = engine.optimizer
    model_parallel = getattr(engine.mpu, "get_model_parallel_world_size", lambda: 1)()
    reasons = [
        (
            _offloaded(engine.zero_offload_optimizer()) or getattr(optimizer, "cpu_offload", False),
            "an offloaded optimizer (zero_optimization.offload_optimizer): theta and Adam's "
            "state live on the host or NVMe, where the SAM kernels do not run",
        ),
        (
            _offloaded(engine.zero_offload_param()),
            "offloaded parameters (zero_optimization.offload_param): the partitions SAM "
            "perturbs live on the host or NVMe",
        ),
        (
            stage == 3
            and (
                engine.zero_hpz_partition_size() > 1
                or engine.zero_quantized_weights()
                or engine.zero_quantized_gradients()
            ),
            "ZeRO++ (zero_hpz_partition_size > 1, zero_quantized_weights or "
            "zero_quantized_gradients): pass 2 would gather secondary or quantized copies of "
            "the parameters, not theta + eps",
        ),
        (
            stage == 3 and type(optimizer).__name__ == "MiCS_Optimizer",
            "MiCS (mics_shard_size): partitions over a sub-group of the data-parallel ranks",
        ),
        (engine.fp16_enabled(), "fp16 with loss scaling; use bf16 or fp32"),
        (
            type(optimizer).__name__ == "BF16_Optimizer",
            "DeepSpeed's BF16_Optimizer (bf16 with fp32 gradient accumulation under ZeRO-1); "
            "use the default gradient accumulation dtype or ZeRO stage 2",
        ),
        (engine.has_moe_layers, "mixture-of-experts layers (expert-parallel groups)"),
        (model_parallel > 1, "model parallelism (an mpu with tensor or pipeline parallel > 1)"),
        (
            type(engine).__name__ == "PipelineEngine",
            "DeepSpeed's PipelineEngine (it runs its own schedule)",
        ),
        (
            not engine.managed_gradient_accumulation(),
            "managed_gradient_accumulation=false (SAM sets the accumulation boundary itself)",
        ),
        (
            not isinstance(
                optimizer,
                (
                    DeepSpeedZeroOptimizer,
                    DeepSpeedZeroOptimizer_Stage3,
                    FP16_Optimizer,
                    FP16_UnfusedOptimizer,
                    torch.optim.Optimizer,
                ),
            ),
            f"the engine's optimizer {type(optimizer).__name__}",
        ),
    ]
    for failed, reason in reasons:
        if failed:
            raise ValueError(f"megatron_fsam: the DeepSpeed SAM step does not support {reason}")


def _offloaded(offload) -> bool:
    """Whether a zero_optimization.offload_* section moves its tensors off the device."""
    return offload is not None and offload.device != "none"  # OffloadDeviceEnum is a str
