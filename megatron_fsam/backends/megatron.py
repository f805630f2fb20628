"""Megatron-core adapter: finds this rank's shards of theta, g and Adam state.

Megatron keeps theta in one of three layouts, and SAM must read theta and write
theta + eps without disturbing any of them:

- DistributedOptimizer: fp32 main-param shards (bf16 params) or views of the
  model param buffer (fp32 params); the model reads the param buffer, which is
  all-gathered after a write.
- Float16OptimizerWithFloat16Params: whole fp32 main copies of bf16 params.
- FP32Optimizer: the optimizer's params are the model params.

Where the optimizer's params alias what the model reads (fp32 params), theta is
copied before perturbing so that the restore is exact.

megatron-core versions: everything read here exists with the same meaning from 0.16.1 to
0.19.x (measured on 0.16.1 and 0.19.2). Settings that only newer versions have are read with
a default, so one check covers both: 0.19's `optimizer_cuda_graph` and GTP weight
rematerialization (`gtp_weight_remat_size`) are refused like the other CUDA-graph and
sharding settings SAM cannot run under.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.optimizer import ChainedOptimizer, MegatronOptimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.optimizer.optimizer import (
    Float16OptimizerWithFloat16Params,
    FP32Optimizer,
)
from megatron.core.rerun_state_machine import get_rerun_state_machine
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from megatron.core.transformer.module import param_is_not_shared
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper
from megatron.core.utils import get_model_config

from megatron_fsam.backends.shards import (
    ParamSpan,
    RankShards,
    Restorable,
    ShardBackend,
    ShardEntry,
)


class MegatronBackend(ShardBackend):
    """SAM's view of a Megatron model and optimizer on this rank."""

    def __init__(self, model_chunks: list[torch.nn.Module], optimizer: MegatronOptimizer) -> None:
        self.model_chunks = model_chunks
        self.optimizer = optimizer
        self.model_config = get_model_config(model_chunks[0])
        _check_model(model_chunks, self.model_config)
        self.optimizers = _leaf_optimizers(optimizer)
        for opt in self.optimizers:
            _check_supported(opt)
        self.distributed = any(isinstance(o, DistributedOptimizer) for o in self.optimizers)
        self.overlap_param_gather = self.distributed and any(
            chunk.ddp_config.overlap_param_gather for chunk in model_chunks
        )
        # Each sub-optimizer's shards sum over its own group (experts without the
        # distributed optimizer: expert-model-parallel ranks; dense: model-parallel ranks).
        groups = [o.get_grad_stats_parallel_group() for o in self.optimizers]
        distinct = [g for i, g in enumerate(groups) if all(g is not h for h in groups[:i])]
        self._group_index = [next(j for j, d in enumerate(distinct) if d is g) for g in groups]
        self.routers = [
            module
            for chunk in model_chunks
            for module in chunk.modules()
            if getattr(module, "expert_bias", None) is not None
        ]
        self.te_modules = transformer_engine_modules(model_chunks)
        super().__init__(device=next(model_chunks[0].parameters()).device, stats_groups=distinct)

    # ----- checks that must hold before any work -------------------------------------

    def check_grad_reduction(self) -> None:
        """Refuse a config whose schedule would silently skip the gradient reduction."""
        if self.model_config.finalize_model_grads_func is not None:
            return
        reasons = []
        if parallel_state.get_data_parallel_world_size() > 1:
            reasons.append("data parallel size > 1")
        if parallel_state.get_context_parallel_world_size() > 1:  # DDP averages over DP x CP
            reasons.append("context parallel size > 1")
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            reasons.append("pipeline parallel size > 1")
        if self.model_config.sequence_parallel:
            reasons.append("sequence parallelism")
        if reasons:
            raise ValueError(
                "megatron_fsam: the model config's finalize_model_grads_func is unset with "
                + ", ".join(reasons)
                + ", so forward_backward_func would not reduce gradients; set "
                "config.finalize_model_grads_func = megatron.core.distributed.finalize_model_grads"
            )

    def check_second_moments(self) -> None:
        """Preconditioning needs Adam's second moment in every sub-optimizer."""
        for opt in self.optimizers:
            inner = opt.optimizer
            is_adam = "adam" in type(inner).__name__.lower()
            if not is_adam or not all("betas" in g for g in inner.param_groups):
                raise ValueError(
                    "megatron_fsam: precond=True needs an Adam-type optimizer with second "
                    f"moments (exp_avg_sq); got {type(inner).__name__}"
                )

    # ----- the layout -----------------------------------------------------------------

    def _layout_key(self) -> tuple:
        """What the shard views depend on: Megatron's buffers and the optimizers' params."""
        buffers = tuple(
            (_address(buffer.grad_data), _address(buffer.param_data))
            for chunk in self.model_chunks
            for buffer in (*chunk.buffers, *chunk.expert_parallel_buffers)
        )
        params = tuple(
            id(p) for o in self.optimizers for g in o.optimizer.param_groups for p in g["params"]
        )
        return buffers, params

    def zero_grads(self) -> None:
        for chunk in self.model_chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()

    def gradients(self, shards: RankShards) -> list[torch.Tensor]:
        return shards.all.grads  # views into the grad buffers that every pass fills

    def optimizer_step(self) -> tuple[bool, float | None, int | None]:
        return self.optimizer.step()

    def sync_params(self) -> None:
        if self.distributed:
            gather_params(self.model_chunks)

    def publish_params(self) -> None:
        """Every rank's next pass reads the values just written into the shards (theta + eps
        for pass 2, theta for the exact ANGLE-SAM's pass 3).

        Under `overlap_param_gather` the forward pre-hooks of that pass (or the interleaved
        schedule's `param_sync_func`) gather them, overlapped with compute; this only makes
        sure they will. Otherwise, one blocking gather.
        """
        if self.overlap_param_gather and all(_pre_hooks_on(c) for c in self.model_chunks):
            for group in _bucket_groups(self.model_chunks):
                _wait_for_gather(group)
                group.param_gather_dispatched = False
        else:  # no overlap, or Megatron-LM's first iteration, which runs without the hooks
            self.sync_params()

    @contextmanager
    def replaying(self, side_loss_weight: float = 1.0) -> Iterator[None]:
        """Megatron's result validation off, router losses weighted (a pass after the first).

        Megatron-LM's NaN/Inf checks of the loss and DDP's `check_for_nan_in_grad` go through
        the rerun state machine's `validate_result`: it aborts, or asks for a rerun, on the
        ranks that see the bad value only, and the others then hang in their collectives.
        A non-finite pass 2 is a SAM skip, decided on every rank by `all_finite`.

        The router's load-balancing and z-losses enter backward through
        `MoEAuxLossAutoScaler`, whose scale the schedule sets for every micro-batch: it is
        multiplied by `side_loss_weight` for this pass.
        """
        machine = get_rerun_state_machine()
        machine.validate_result = _accept_result
        set_scale = MoEAuxLossAutoScaler.set_loss_scale
        if side_loss_weight != 1.0:
            MoEAuxLossAutoScaler.set_loss_scale = staticmethod(
                lambda scale: set_scale(scale * side_loss_weight)
            )
        try:
            yield
        finally:
            del machine.validate_result
            MoEAuxLossAutoScaler.set_loss_scale = staticmethod(set_scale)

    def recomputed_forwards(self) -> float:
        """Full activation recomputation runs the recomputed layers' forward again in the
        backward: all of them ("uniform"), or recompute_num_layers of the stage's ("block")."""
        config = self.model_config
        if config.recompute_granularity != "full":
            return 0.0
        if config.recompute_method != "block":
            return 1.0
        stage_layers = config.num_layers / config.pipeline_model_parallel_size
        return min(1.0, config.recompute_num_layers / stage_layers)

    def replayed_state(self) -> list[Callable[[], Restorable]]:
        """The routers' expert bias (every pass of a step routes with the bias it started
        with, and the step keeps the one update of its first forward-backward:
        `ExpertBiasState`), Transformer Engine's fp8 delayed-scaling state (every pass starts
        from the scales the step started with, and the step keeps the amax history of its first
        forward-backward: `DelayedScalingState`) and the router and MTP losses megatron-core
        accumulates for logging (the step logs pass 1's)."""
        captures: list[Callable[[], Restorable]] = [LoggedLosses.capture]
        if self.routers:
            captures.append(functools.partial(ExpertBiasState.capture, self.routers))
        if self.te_modules:
            captures.append(functools.partial(DelayedScalingState.capture, self.te_modules))
        return captures

    def _entries(self) -> Iterator[ShardEntry]:
        for opt, group in zip(self.optimizers, self._group_index, strict=True):
            if isinstance(opt, DistributedOptimizer):
                entries = _distributed_entries(opt)
            elif isinstance(opt, Float16OptimizerWithFloat16Params):
                entries = _float16_entries(opt)
            else:
                entries = _fp32_entries(opt)
            for entry in entries:
                entry.stats_group = group
                yield entry


@dataclass
class SavedValues:
    """Tensors and copies of their values; `restore` writes the copies back in place, so every
    other holder of those tensors (a global buffer, a quantizer) sees the restored values."""

    saved: list[tuple[torch.Tensor, torch.Tensor]]

    @staticmethod
    def copies(tensors: Iterable[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(t, t.detach().clone()) for t in tensors]

    @torch.no_grad()
    def restore(self) -> None:
        for tensor, value in self.saved:
            tensor.copy_(value)


class LoggedLosses(SavedValues):
    """The values megatron-core accumulates over a step's forwards for logging: each router
    loss per layer, and (multi-token prediction) each MTP head's loss. A replayed pass would
    add its own; restored after it, the logs show pass 1's, like the step's returned losses.
    """

    @classmethod
    def capture(cls) -> LoggedLosses:
        return cls(cls.copies(_logging_tensors()))


def _logging_tensors() -> list[torch.Tensor]:
    """Every tensor of megatron-core's router-loss and MTP-loss trackers."""
    moe = [values for name, (values, *_) in loss_trackers().items() if name != "mtp"]
    return moe + [t for t in MTPLossLoggingHelper.tracker.values() if torch.is_tensor(t)]


def loss_trackers() -> dict[str, tuple]:
    """megatron-core's process-wide trackers of the losses it logs beside the language-model
    loss: name -> (per-layer values, reduce group, average group, whether to average over
    data-parallel ranks); "mtp" for the multi-token-prediction losses."""
    out: dict[str, tuple] = {}
    if hasattr(moe_utils, "get_moe_metrics_tracker"):  # megatron-core >= 0.17
        for name, e in moe_utils.get_moe_metrics_tracker().metrics.items():
            out[name] = (e.values, e.reduce_group, e.avg_group, e.needs_dp_avg)
    else:
        for name, e in moe_utils.get_moe_layer_wise_logging_tracker().items():
            dp_average = not e.get("reduce_group_has_dp", False)
            out[name] = (e["values"], e.get("reduce_group"), e.get("avg_group"), dp_average)
    mtp = MTPLossLoggingHelper.tracker
    values = mtp.get("loss_values", mtp.get("values"))  # megatron-core 0.19 / 0.16
    if values is not None:
        out["mtp"] = (values, mtp.get("reduce_group"), mtp.get("avg_group"), False)
    return out


def reset_loss_trackers() -> None:
    """Forget megatron-core's loss trackers: they are sized by the first model's depth, so a
    process that builds a second model of another depth (or more MTP layers) starts afresh."""
    if hasattr(moe_utils, "get_moe_metrics_tracker"):  # megatron-core >= 0.17
        moe_utils.get_moe_metrics_tracker().metrics.clear()
    else:
        moe_utils.get_moe_layer_wise_logging_tracker().clear()
    MTPLossLoggingHelper.tracker.clear()


@dataclass
class ExpertBiasState:
    """The aux-loss-free expert bias of every router on this rank, and its token counts.

    megatron-core counts each router's tokens per expert in the forward and moves the bias
    in `finalize_model_grads`, at the end of every forward-backward pass. A SAM step replays
    its micro-batches: captured before pass 1 and restored before every later pass, the bias
    routes all passes as a plain step routes all its micro-batches; captured after pass 1 and
    restored after them, it ends the step with pass 1's update alone (counts of theta's
    routing, one update), whether the SAM update is then applied, skipped or falls back.
    """

    routers: list[torch.nn.Module]
    biases: list[torch.Tensor]
    counts: list[torch.Tensor]

    @classmethod
    def capture(cls, routers: list[torch.nn.Module]) -> ExpertBiasState:
        return cls(
            routers,
            [r.expert_bias.detach().clone() for r in routers],
            [r.local_tokens_per_expert.detach().clone() for r in routers],
        )

    @torch.no_grad()
    def restore(self) -> None:
        for router, bias, count in zip(self.routers, self.biases, self.counts, strict=True):
            router.expert_bias.copy_(bias)
            router.local_tokens_per_expert.copy_(count)


class DelayedScalingState(SavedValues):
    """Transformer Engine's fp8 delayed-scaling state of every TE module on this rank: the
    amax history and scale of its forward casts and of its gradient casts.

    Each cast records its tensor's amax in row 0, and TE rolls the history and recomputes the
    scales from it when the fp8 autocast region exits with grad enabled (forward) and at the
    end of each micro-batch's backward (`FP8GlobalStateManager.reduce_and_update_fp8_tensors`):
    once per micro-batch and pass, so a SAM step's pass 2 would move it again, from theta +
    eps. Captured before pass 1 and restored before every later pass, each pass starts from
    the scales the step started with and moves them micro-batch by micro-batch as pass 1 did;
    captured after pass 1 and restored after them, the step ends with a plain step's history.
    Restored in place: TE's reduction buffers hold these very tensors. A module's state
    appears at its first fp8 forward (a run's first SAM step, if it is the run's first step,
    starts pass 2 from pass 1's scales), and recipes that scale each tensor from itself
    (current, block and MXFP8 scaling, NVFP4) keep none.
    """

    @classmethod
    def capture(cls, te_modules: list[torch.nn.Module]) -> DelayedScalingState:
        return cls(cls.copies(_delayed_scaling_tensors(te_modules)))


def transformer_engine_modules(model_chunks: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """Transformer Engine's modules in the chunks (those that keep a dict `fp8_meta`), found
    without importing TE."""
    return [
        module
        for chunk in model_chunks
        for module in chunk.modules()
        if isinstance(getattr(module, "fp8_meta", None), dict)
    ]


def _delayed_scaling_tensors(te_modules: list[torch.nn.Module]) -> Iterator[torch.Tensor]:
    """The amax histories and scales in the modules' `fp8_meta["scaling_fwd" / "scaling_bwd"]`
    (TE's `DelayedScalingRecipeState`; TE 1.x also keeps `scale_inv` there)."""
    for module in te_modules:
        for key in ("scaling_fwd", "scaling_bwd"):
            state = module.fp8_meta.get(key)
            if not torch.is_tensor(getattr(state, "amax_history", None)):
                continue  # not yet cast, or a recipe without history
            for name in ("amax_history", "scale", "scale_inv"):
                tensor = getattr(state, name, None)
                if torch.is_tensor(tensor):
                    yield tensor


def _distributed_entries(opt: DistributedOptimizer) -> Iterator[ShardEntry]:
    for model_groups, main_groups in (
        (opt.model_float16_groups, opt.shard_fp32_from_float16_groups),
        (opt.model_fp32_groups, opt.shard_fp32_groups),
    ):
        for model_group, main_group in zip(model_groups, main_groups, strict=True):
            for model_param, main in zip(model_group, main_group, strict=True):
                ranges = opt._get_model_param_range_map(model_param)
                local, world = ranges["param"], ranges["gbuf_world_in_bucket"]
                gbuf_index, _, bucket_index = opt.model_param_gbuf_map[model_param]
                param_buffer = opt.buffers[gbuf_index].buckets[bucket_index].param_data
                yield ShardEntry(
                    main=main,
                    grad=model_param.main_grad.view(-1)[local.start : local.end],
                    target=param_buffer.view(-1)[world.start : world.end],
                    inner=opt.optimizer,
                    span=ParamSpan(model_param, local.start, local.end),
                    counted=_counted(main),
                )


def _float16_entries(opt: Float16OptimizerWithFloat16Params) -> Iterator[ShardEntry]:
    pairs = (
        (opt.float16_groups, opt.fp32_from_float16_groups),
        (opt.fp32_from_fp32_groups, opt.fp32_from_fp32_groups),
    )
    for model_groups, main_groups in pairs:
        for model_group, main_group in zip(model_groups, main_groups, strict=True):
            for model_param, main in zip(model_group, main_group, strict=True):
                yield ShardEntry(
                    main,
                    _model_grad(model_param),
                    model_param.data.view(-1),
                    opt.optimizer,
                    ParamSpan(model_param, 0, model_param.numel()),
                    counted=_counted(main),
                )


def _fp32_entries(opt: FP32Optimizer) -> Iterator[ShardEntry]:
    for group in opt.optimizer.param_groups:
        for param in group["params"]:
            yield ShardEntry(
                param,
                _model_grad(param),
                param.data.view(-1),
                opt.optimizer,
                ParamSpan(param, 0, param.numel()),
                counted=_counted(param),
            )


def _counted(main: torch.Tensor) -> bool:
    """Enters global norms: not a TP duplicate, not the second copy of a tied weight."""
    return param_is_not_shared(main) and param_is_not_tensor_parallel_duplicate(main)


def _model_grad(param: torch.nn.Parameter) -> torch.Tensor:
    """The reduced gradient Megatron's DDP accumulates into `main_grad`."""
    grad = getattr(param, "main_grad", None)
    if grad is None:
        raise ValueError(
            "megatron_fsam: model parameters have no main_grad; wrap the model chunks in "
            "megatron.core.distributed.DistributedDataParallel"
        )
    return grad.view(-1)


def gather_params(model_chunks: list[torch.nn.Module]) -> None:
    """Blocking all-gather of the distributed optimizer's param buffers.

    For every read that bypasses the forward pre-hooks (a checkpoint save, diagnostics,
    a restore): under `overlap_param_gather` the other ranks' slices still hold what the
    last gather brought (theta + eps right after a SAM step). An outstanding asynchronous
    gather is waited for first: `start_param_sync(force_sync=True)` alone would then
    return without gathering the current values.
    """
    for group in _bucket_groups(model_chunks):
        _wait_for_gather(group)
    for chunk in model_chunks:
        if chunk.ddp_config.use_distributed_optimizer:
            chunk.start_param_sync(force_sync=True)


def _bucket_groups(model_chunks: list[torch.nn.Module]) -> Iterator:
    for chunk in model_chunks:
        yield from (*chunk.bucket_groups, *chunk.expert_parallel_bucket_groups)


def _pre_hooks_on(chunk: torch.nn.Module) -> bool:
    return bool(getattr(chunk, "remove_forward_pre_hook_handles", None))


def _wait_for_gather(group) -> None:
    if group.param_gather_handle is not None:
        group.param_gather_handle.wait()
        group.param_gather_handle = None


def _address(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.data_ptr()


def _check_model(model_chunks: list[torch.nn.Module], config) -> None:
    """Refuse, before any work and alike on every rank, what the step cannot do right."""
    ddp = getattr(model_chunks[0], "ddp_config", None)
    if ddp is None:
        raise ValueError(
            "megatron_fsam: wrap the model chunks in "
            "megatron.core.distributed.DistributedDataParallel"
        )
    cuda_graph = getattr(config, "cuda_graph_impl", "none")
    reasons = [
        (
            getattr(config, "fp8_param", False)
            or getattr(config, "fp4_param", False)
            or ddp.reuse_grad_buf_for_mxfp8_param_ag,
            "fp8 / fp4 / MXFP8 parameters (the perturbed weights are written as bf16/fp32 values)",
        ),
        (
            (config.fp8 and config.fp8_recipe == "custom")
            or (config.fp4 and config.fp4_recipe == "custom"),
            "custom fp8 / fp4 recipes (a quantizer factory's state is out of the step's sight, "
            "so its perturbed pass would move it too); use delayed scaling (its amax history "
            "is replayed) or a recipe that scales each tensor from itself",
        ),
        (
            # megatron-core >= 0.19: weights sharded beyond TP, re-gathered at every use.
            getattr(config, "gtp_weight_remat_size", 1) > 1,
            "GTP weight rematerialization (tensor_parallel_num_weight_shards > "
            "tensor_model_parallel_size): its weight shards and their norm reduction are "
            "untested with SAM",
        ),
        (
            getattr(ddp, "use_megatron_fsdp", False)
            or "FullyShardedDataParallel" in type(model_chunks[0]).__name__,
            "Megatron-FSDP / torch FSDP (SAM reads the distributed optimizer's shards)",
        ),
        (
            # megatron-core >= 0.19: a per-expert bias moved after every pass, like the expert
            # bias, but not held back by the step (untested): refused.
            "quantile_balancing" in str(getattr(config, "moe_router_load_balancing_type", "")),
            "moe_router_load_balancing_type='quantile_balancing': its per-expert bias "
            "(qb_beta) moves after every forward-backward pass, so twice per SAM step",
        ),
        (
            cuda_graph != "none"
            or getattr(config, "enable_cuda_graph", False)
            or getattr(config, "external_cuda_graph", False),
            f"CUDA graphs (cuda_graph_impl={cuda_graph!r}): a captured graph cannot run "
            "the two passes",
        ),
    ]
    for failed, reason in reasons:
        if failed:
            raise ValueError(f"megatron_fsam: the SAM step does not support {reason}")


def _accept_result(*args, **kwargs) -> None:
    """Stands in for `RerunStateMachine.validate_result`: every result is accepted."""


def _leaf_optimizers(optimizer: MegatronOptimizer) -> list[MegatronOptimizer]:
    if type(optimizer).__name__ == "LayerWiseDistributedOptimizer":
        raise ValueError(
            "megatron_fsam: unsupported Megatron optimizer LayerWiseDistributedOptimizer "
            "(whole parameters per rank); use the distributed optimizer"
        )
    if isinstance(optimizer, ChainedOptimizer):
        return [
            o for o in optimizer.chained_optimizers if not getattr(o, "is_stub_optimizer", False)
        ]
    return [optimizer]


def _check_supported(opt: MegatronOptimizer) -> None:
    if not isinstance(
        opt, (DistributedOptimizer, Float16OptimizerWithFloat16Params, FP32Optimizer)
    ):
        raise ValueError(f"megatron_fsam: unsupported Megatron optimizer {type(opt).__name__}")
    if opt.config.fp16:
        raise ValueError(
            "megatron_fsam: fp16 with dynamic loss scaling is not supported; use bf16 or fp32"
        )
    if getattr(opt.config, "optimizer_cpu_offload", False):
        raise ValueError(
            "megatron_fsam: optimizer_cpu_offload keeps main params and Adam state on the "
            "host, where the SAM kernels do not run; disable it"
        )
    if getattr(opt.config, "optimizer_cuda_graph", False):  # megatron-core >= 0.19
        raise ValueError(
            "megatron_fsam: optimizer_cuda_graph replays a captured optimizer step, which "
            "cannot report or undo a SAM step; disable it"
        )
    if opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
        raise ValueError(
            "megatron_fsam: the precision-aware optimizer keeps main params inside "
            "Transformer Engine's FusedAdam, where SAM cannot read theta; disable "
            "use_precision_aware_optimizer"
        )
