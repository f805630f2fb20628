"""Megatron-core parallel set-up: process groups, DDP wrapping, optimizer.

Two of megatron-core's defaults give silently wrong training when a bare
megatron-core loop (no Megatron-LM ``train()``) drives the schedules, so
``wrap_model`` sets them on the TransformerConfig:

- ``finalize_model_grads_func``: the schedules reduce gradients across data-parallel
  ranks, the tied embedding across pipeline stages and sequence-parallel norms across
  tensor-parallel ranks only through it;
- ``batch_p2p_comm``: on gloo, batched isend/irecv pairs messages by posting order, which
  mixes up activations and gradients when the previous and next stage are one rank.
"""

import gc
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer import (
    AdamOptimizerConfig,
    MegatronOptimizer,
    OptimizerConfig,
    SGDOptimizerConfig,
    get_megatron_optimizer,
)
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import Float16Module

from megatron_fsam.trainer.ports import reporting_taken_port


@dataclass
class ParallelConfig:
    """How the model is split; data parallelism takes the remaining ranks.

    Context parallelism splits every sequence over `context_parallel` ranks (Megatron's 2 x CP
    chunks, see `megatron_fsam.compat.cp_attention`); megatron-core averages the gradients, and
    the distributed optimizer shards, over the data x context parallel ranks.

    Experts of a mixture-of-experts model are split over `expert_parallel` ranks (taken out
    of the data-parallel ranks) and each expert over `expert_tensor_parallel` ranks (None:
    tensor_parallel).
    """

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline: int | None = None
    sequence_parallel: bool = False
    context_parallel: int = 1
    distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    expert_parallel: int = 1
    expert_tensor_parallel: int | None = None

    def __post_init__(self) -> None:
        if min(self.tensor_parallel, self.pipeline_parallel, self.context_parallel) < 1:
            raise ValueError("tensor_parallel, pipeline_parallel and context_parallel must be >= 1")
        if self.virtual_pipeline is not None and self.pipeline_parallel < 2:
            raise ValueError("virtual_pipeline needs pipeline_parallel >= 2")
        if self.sequence_parallel and self.tensor_parallel < 2:
            raise ValueError("sequence_parallel needs tensor_parallel >= 2")
        if self.expert_parallel < 1 or (self.expert_tensor_parallel or 1) < 1:
            raise ValueError("expert_parallel and expert_tensor_parallel must be >= 1")
        if self.overlap_param_gather and not self.distributed_optimizer:
            raise ValueError("overlap_param_gather needs the distributed optimizer")


def initialize_distributed(parallel: ParallelConfig, seed: int = 1234) -> None:
    """Join the job (env:// from RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), build the groups.

    A MASTER_PORT that another process holds raises `PortInUseError` (one line to report).

    As in Megatron-LM, each pipeline stage seeds with ``seed + 100 * stage`` so dropout
    masks are not repeated across stages; the tensor-parallel RNG state is derived from it.
    """
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        with reporting_taken_port():
            dist.init_process_group(backend=backend, init_method="env://")
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
        context_parallel_size=parallel.context_parallel,
        expert_model_parallel_size=parallel.expert_parallel,
        expert_tensor_parallel_size=parallel.expert_tensor_parallel,
    )
    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    torch.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)


def destroy_distributed() -> None:
    """Tear down the process groups once the run is over, with no collective's work left for
    a gloo thread to free while the interpreter finalises.

    A gloo worker frees a collective's work after the caller has seen it complete (a barrier
    holds the works before it: `all_gather_object`'s tensors, say), and freeing tensors that
    Python created takes the GIL. A thread that takes the GIL while the interpreter finalises
    is ended inside that C++ destructor: std::terminate, "terminate called without an active
    exception" (seen one launcher run in ten: the worker still waited for the GIL when the
    main thread reached Py_FinalizeEx). A last barrier settles it: enqueueing it waits, with
    the GIL released, until the workers have freed what they held, and it holds no Python
    tensor itself. Call this after the run's own objects are gone (an entry point: once
    main() has returned); garbage they left is collected here, from Python.
    """
    if dist.is_initialized():
        dist.barrier()
    gc.collect()  # groups held only by cyclic garbage (an engine and its optimizer)
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


def wrap_model(
    chunks: list[GPTModel],
    config: TransformerConfig,
    parallel: ParallelConfig,
    *,
    grad_reduce_in_fp32: bool = True,
) -> list[DistributedDataParallel]:
    """Wrap each chunk in Megatron's DDP (and Float16Module for bf16) and wire the schedules.

    Mirrors Megatron-LM's ``get_model`` and ``train``: only the first chunk uses buckets,
    and the config gets the gradient finalisation and the sync hooks the schedules call.
    """
    if config.fp16:
        raise ValueError("fp16 needs loss scaling, which is not set up here: use bf16")
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=grad_reduce_in_fp32,
        overlap_grad_reduce=parallel.overlap_grad_reduce,
        overlap_param_gather=parallel.overlap_param_gather,
        align_param_gather=parallel.overlap_param_gather,
        use_distributed_optimizer=parallel.distributed_optimizer,
    )
    ddp_chunks = []
    for i, chunk in enumerate(chunks):
        module = Float16Module(config, chunk) if config.bf16 else chunk
        ddp_chunks.append(
            DistributedDataParallel(config, ddp_config, module, disable_bucketing=(i > 0))
        )

    def per_chunk(hooks: list[Callable]) -> Callable | list[Callable]:
        # The non-interleaved schedules call the hook directly; the interleaved one indexes it.
        return hooks if len(hooks) > 1 else hooks[0]

    config.no_sync_func = per_chunk([c.no_sync for c in ddp_chunks])
    if parallel.overlap_grad_reduce:
        config.grad_sync_func = per_chunk([c.start_grad_sync for c in ddp_chunks])
    if parallel.overlap_param_gather:
        config.param_sync_func = per_chunk([c.start_param_sync for c in ddp_chunks])
    config.finalize_model_grads_func = finalize_model_grads
    if dist.get_backend() == "gloo":
        config.batch_p2p_comm = False
    return ddp_chunks


def build_optimizer(
    ddp_chunks: list[DistributedDataParallel],
    *,
    name: str = "adam",
    lr: float,
    min_lr: float | None = None,
    weight_decay: float = 0.0,
    adam_beta1: float = 0.9,
    adam_beta2: float = 0.999,
    adam_eps: float = 1e-8,
    sgd_momentum: float = 0.0,
    clip_grad: float = 0.0,
    bf16: bool = False,
    distributed_optimizer: bool = False,
) -> MegatronOptimizer:
    """Megatron's optimizer over the wrapped chunks (torch AdamW/SGD without apex or TE).

    Megatron leaves per-group weight-decay multipliers (0 for norms, biases and other
    1-D params) to its LR scheduler; they are applied here so the optimizer is right
    without one. A scheduler that rewrites ``weight_decay`` keeps the same rule.
    """
    model_config = ddp_chunks[0].config
    if bf16 != model_config.bf16:
        raise ValueError(f"optimizer bf16={bf16} but the model config has bf16={model_config.bf16}")
    if distributed_optimizer != ddp_chunks[0].ddp_config.use_distributed_optimizer:
        raise ValueError(
            f"distributed_optimizer={distributed_optimizer} does not match how wrap_model "
            "built the gradient buffers (ParallelConfig.distributed_optimizer)"
        )
    if distributed_optimizer and name != "adam":
        raise ValueError("megatron-core's distributed optimizer supports only adam")
    common = dict(
        lr=lr,
        min_lr=lr if min_lr is None else min_lr,
        weight_decay=weight_decay,
        clip_grad=clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=distributed_optimizer,
        overlap_param_gather=ddp_chunks[0].ddp_config.overlap_param_gather,
    )
    # The optimizer is named explicitly: from megatron-core 0.18 on, AdamOptimizerConfig and
    # SGDOptimizerConfig are both aliases of OptimizerConfig, whose default is 'adam'.
    config: OptimizerConfig
    if name == "adam":
        config = AdamOptimizerConfig(
            optimizer="adam",
            adam_beta1=adam_beta1,
            adam_beta2=adam_beta2,
            adam_eps=adam_eps,
            **common,
        )
    elif name == "sgd":
        config = SGDOptimizerConfig(optimizer="sgd", sgd_momentum=sgd_momentum, **common)
    else:
        raise ValueError(f"unknown optimizer {name!r}; expected 'adam' or 'sgd'")
    optimizer = get_megatron_optimizer(config, ddp_chunks)
    for group in optimizer.param_groups:
        group["weight_decay"] = weight_decay * group.get("wd_mult", 1.0)
    model_config.grad_scale_func = optimizer.scale_loss
    return optimizer


def forward_backward_func() -> Callable:
    """The schedule for the current pipeline layout (no pipelining, 1F1B or interleaved)."""
    return get_forward_backward_func()
