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

import logging
import math
from collections.abc import Iterator
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
from megatron.core.utils import get_model_config

from megatron_fsam.kernels import Kernels, Shards
from megatron_fsam.perturbation import NormSums

logger = logging.getLogger("megatron_fsam")


@dataclass(frozen=True)
class ParamSpan:
    """The model parameter a shard belongs to and its flat range [start, stop) in it."""

    param: torch.nn.Parameter
    start: int
    stop: int


@dataclass
class _Entry:
    """One shard: the optimizer's main param, its gradient, and what the model reads.

    `main` is the optimizer's own tensor object (the key of its state, the holder
    of Megatron's `shared` / `tensor_model_parallel` attributes); the others are 1-D.
    """

    main: torch.Tensor
    grad: torch.Tensor
    target: torch.Tensor
    inner: torch.optim.Optimizer
    span: ParamSpan

    @property
    def counted(self) -> bool:
        """Enters global norms: not a TP duplicate, not the second copy of a tied weight."""
        return param_is_not_shared(self.main) and param_is_not_tensor_parallel_duplicate(self.main)

    @property
    def aliased(self) -> bool:
        """True when the model reads the optimizer's param itself (fp32 params)."""
        return (
            self.main.data_ptr() == self.target.data_ptr() and self.main.dtype == self.target.dtype
        )


@dataclass
class RankShards:
    """All of this rank's shards, and the subset whose theta lives in a copy."""

    all: Shards
    aliased: Shards
    spans: list[ParamSpan]


class MegatronBackend:
    """SAM's view of a Megatron model and optimizer on this rank."""

    def __init__(self, model_chunks: list[torch.nn.Module], optimizer: MegatronOptimizer) -> None:
        self.model_chunks = model_chunks
        self.model_config = get_model_config(model_chunks[0])
        _check_model(model_chunks, self.model_config)
        self.optimizers = _leaf_optimizers(optimizer)
        for opt in self.optimizers:
            _check_supported(opt)
        self.distributed = any(isinstance(o, DistributedOptimizer) for o in self.optimizers)
        self.overlap_param_gather = self.distributed and any(
            chunk.ddp_config.overlap_param_gather for chunk in model_chunks
        )
        # Where this rank's collectives run, also when it holds no shard at all.
        self.device = next(model_chunks[0].parameters()).device
        self._cached: tuple[tuple, RankShards, list[_Entry]] | None = None
        groups = {id(o.get_grad_stats_parallel_group()) for o in self.optimizers}
        if len(groups) > 1:
            raise ValueError(
                "megatron_fsam: sub-optimizers reduce gradient statistics over different "
                "process groups (e.g. expert parallelism), which SAM does not support yet"
            )
        self.stats_group = self.optimizers[0].get_grad_stats_parallel_group()

    # ----- checks that must hold before any work -------------------------------------

    def check_grad_reduction(self) -> None:
        """Refuse a config whose schedule would silently skip the gradient reduction."""
        if self.model_config.finalize_model_grads_func is not None:
            return
        reasons = []
        if parallel_state.get_data_parallel_world_size() > 1:
            reasons.append("data parallel size > 1")
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

    # ----- shards ---------------------------------------------------------------------

    def shards(self, precondition: bool, relative_floor: float = 0.0) -> RankShards:
        """This rank's shards after pass 1; theta is copied where the model aliases it.

        The shard lists are views into Megatron's buffers, built once and rebuilt only
        when those buffers change; the copies of aliased theta are refreshed at each call.
        With `relative_floor` > 0, sqrt(v_hat) is bounded below by relative_floor times its
        root-mean-square over the whole model (one more small all-reduce).
        """
        rank_shards, entries = self._layout()
        for theta, entry in zip(rank_shards.aliased.thetas, _aliased(entries), strict=True):
            theta.copy_(entry.main.view(-1))
        shards = rank_shards.all
        if precondition:
            real = self._attach_second_moments(shards, entries)
            shards.precond_floor = (
                relative_floor * self._rms_sqrt_v(shards, real) if relative_floor else 0.0
            )
        else:
            shards.second_moments = shards.v_scales = shards.adam_eps = None
        return rank_shards

    def _layout(self) -> tuple[RankShards, list[_Entry]]:
        key = self._layout_key()
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, *self._build_shards())
        return self._cached[1], self._cached[2]

    def _build_shards(self) -> tuple[RankShards, list[_Entry]]:
        entries = list(self._entries())
        copies = {id(e): e.main.detach().view(-1).clone() for e in _aliased(entries)}
        thetas = [copies.get(id(e), e.main.detach().view(-1)) for e in entries]
        shards = Shards(
            thetas=thetas,
            grads=[e.grad for e in entries],
            targets=[e.target for e in entries],
            counted=[e.counted for e in entries],
        )
        aliased = Shards(
            thetas=[copies[id(e)] for e in _aliased(entries)],
            grads=[e.grad for e in _aliased(entries)],
            targets=[e.target for e in _aliased(entries)],
            counted=[e.counted for e in _aliased(entries)],
        )
        spans = [e.span for e in entries]
        return RankShards(all=shards, aliased=aliased, spans=spans), entries

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

    def main_params(self) -> tuple[list[torch.Tensor], list[bool]]:
        """This rank's fp32 theta shards (1-D views) and whether each enters global norms."""
        _, entries = self._layout()
        return [e.main.detach().view(-1) for e in entries], [e.counted for e in entries]

    def sync_params(self) -> None:
        """Every rank's model reads the values just written into its shards (blocking)."""
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

    def reduced_norm_sums(self, kernels: Kernels, shards: Shards) -> NormSums:
        """[||g||^2, ||P g||^2, g.P g] over the whole model: one all-reduce."""
        if len(shards):
            local = kernels.norm_sums(shards).to(self.device)
        else:
            local = torch.zeros(3, dtype=torch.float32, device=self.device)
        return NormSums.from_tensor(self.all_reduce_sums(local))

    def all_reduce_sums(self, sums: torch.Tensor) -> torch.Tensor:
        """Sum the norm partials over the ranks that hold distinct shards."""
        torch.distributed.all_reduce(sums, group=self.stats_group)
        return sums

    def all_finite(self, grads: list[torch.Tensor]) -> bool:
        """Whether every rank's gradient shards are finite: one fused max-norm, one MAX
        all-reduce, one host sync."""
        found = torch.zeros(1, dtype=torch.float32, device=self.device)
        if grads:
            largest = torch.stack(torch._foreach_norm(grads, float("inf"))).max()
            found = (~torch.isfinite(largest)).float().view(1).to(self.device)
        torch.distributed.all_reduce(
            found, op=torch.distributed.ReduceOp.MAX, group=self.stats_group
        )
        return found.item() == 0.0

    @contextmanager
    def validation_paused(self) -> Iterator[None]:
        """Megatron's result validation off (pass 2 at theta + eps).

        Megatron-LM's NaN/Inf checks of the loss and DDP's `check_for_nan_in_grad` go through
        the rerun state machine's `validate_result`: it aborts, or asks for a rerun, on the
        ranks that see the bad value only, and the others then hang in their collectives.
        A non-finite pass 2 is a SAM skip, decided on every rank by `all_finite`.
        """
        machine = get_rerun_state_machine()
        machine.validate_result = _accept_result
        try:
            yield
        finally:
            del machine.validate_result

    # ----- internals ------------------------------------------------------------------

    def _entries(self) -> Iterator[_Entry]:
        for opt in self.optimizers:
            if isinstance(opt, DistributedOptimizer):
                yield from _distributed_entries(opt)
            elif isinstance(opt, Float16OptimizerWithFloat16Params):
                yield from _float16_entries(opt)
            else:
                yield from _fp32_entries(opt)

    def _rms_sqrt_v(self, shards: Shards, real: list[int]) -> float:
        """sqrt(mean v_hat) over the counted coordinates of the whole model that have Adam
        state (the root-mean-square of sqrt(v_hat)): one all-reduce."""
        counted = [i for i in real if shards.counted[i] and shards.second_moments[i].numel()]
        local = torch.zeros(2, dtype=torch.float64, device=self.device)
        if counted:
            sums = torch._foreach_norm([shards.second_moments[i] for i in counted], 1)  # v >= 0
            scales = [shards.v_scales[i] for i in counted]
            scaled = torch.stack(sums).double()
            scaled *= torch.tensor(scales, dtype=torch.float64, device=scaled.device)
            local[0] = scaled.sum()
            local[1] = sum(shards.second_moments[i].numel() for i in counted)
        total, count = self.all_reduce_sums(local).tolist()
        return math.sqrt(total / count) if count else 0.0

    def _attach_second_moments(self, shards: Shards, entries: list[_Entry]) -> list[int]:
        """Adam's exp_avg_sq per shard (P = 1 where there is none yet); returns the indices
        of the shards that have one."""
        moments, v_scales, eps, real = [], [], [], []
        missing = 0
        group_of = {
            id(p): g for o in self.optimizers for g in o.optimizer.param_groups for p in g["params"]
        }
        for entry in entries:
            group = group_of[id(entry.main)]
            state = entry.inner.state.get(entry.main, {})
            step = _adam_step(state, group)
            if step == 0 or "exp_avg_sq" not in state:
                missing += 1  # P = 1 / (sqrt(1 * 1) + 0) = 1
                moments.append(torch.ones_like(entry.grad, dtype=torch.float32))
                v_scales.append(1.0)
                eps.append(0.0)
                continue
            real.append(len(moments))
            moments.append(_second_moment(entry.inner, entry.main, state).view(-1))
            v_scales.append(1.0 / (1.0 - group["betas"][1] ** step))
            eps.append(float(group["eps"]))
        if missing:
            _log_once(
                "precond: no Adam second moments yet (before the first optimizer step); "
                "using P = 1 for the shards without them"
            )
        shards.second_moments, shards.v_scales, shards.adam_eps = moments, v_scales, eps
        return real


def _distributed_entries(opt: DistributedOptimizer) -> Iterator[_Entry]:
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
                yield _Entry(
                    main=main,
                    grad=model_param.main_grad.view(-1)[local.start : local.end],
                    target=param_buffer.view(-1)[world.start : world.end],
                    inner=opt.optimizer,
                    span=ParamSpan(model_param, local.start, local.end),
                )


def _float16_entries(opt: Float16OptimizerWithFloat16Params) -> Iterator[_Entry]:
    pairs = (
        (opt.float16_groups, opt.fp32_from_float16_groups),
        (opt.fp32_from_fp32_groups, opt.fp32_from_fp32_groups),
    )
    for model_groups, main_groups in pairs:
        for model_group, main_group in zip(model_groups, main_groups, strict=True):
            for model_param, main in zip(model_group, main_group, strict=True):
                yield _Entry(
                    main,
                    _model_grad(model_param),
                    model_param.data.view(-1),
                    opt.optimizer,
                    ParamSpan(model_param, 0, model_param.numel()),
                )


def _fp32_entries(opt: FP32Optimizer) -> Iterator[_Entry]:
    for group in opt.optimizer.param_groups:
        for param in group["params"]:
            yield _Entry(
                param,
                _model_grad(param),
                param.data.view(-1),
                opt.optimizer,
                ParamSpan(param, 0, param.numel()),
            )


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


def _aliased(entries: list[_Entry]) -> list[_Entry]:
    return [e for e in entries if e.aliased]


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
            cuda_graph != "none"
            or getattr(config, "enable_cuda_graph", False)
            or getattr(config, "external_cuda_graph", False),
            f"CUDA graphs (cuda_graph_impl={cuda_graph!r}): a captured graph cannot run "
            "the two passes",
        ),
        (
            getattr(config, "moe_router_enable_expert_bias", False),
            "moe_router_enable_expert_bias: finalize_model_grads would move the expert bias "
            "in both passes",
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


def _adam_step(state: dict, group: dict) -> int:
    """Adam steps taken: torch keeps them per param, apex/TE FusedAdam per group."""
    step = state.get("step", group.get("step", 0))
    return int(step.item()) if torch.is_tensor(step) else int(step)


def _second_moment(inner: torch.optim.Optimizer, main: torch.Tensor, state: dict) -> torch.Tensor:
    """exp_avg_sq in fp32; TE's FusedAdam may store it scaled in low precision."""
    if hasattr(inner, "get_unscaled_state"):
        return inner.get_unscaled_state(main, "exp_avg_sq")
    return state["exp_avg_sq"]


_logged: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.warning("megatron_fsam: %s", message)
