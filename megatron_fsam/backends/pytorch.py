"""PyTorch-native adapter: any `torch.optim` optimizer over a model trained in one process,
under `DistributedDataParallel`, or sharded by FSDP2's `fully_shard`.

- One process: every param is this rank's shard; no collectives.
- DDP: every rank holds every param, and DDP all-reduces (averages) the gradients on the
  backward it syncs; each rank counts every world-th param, so that the sums over the
  data-parallel group see each coordinate once.
- FSDP2: each param is a DTensor sharded over a 1-D device mesh; this rank's shard is
  `param.to_local()` (so are the optimizer's state and the reduce-scattered gradient), and
  what is written into it is what the next forward all-gathers (cast to the mixed-precision
  policy's param dtype, if any).

The optimizer steps the params themselves: theta is copied before the perturbation, and
written back into them before the optimizer step. Gradients are new tensors after each pass,
so the shard lists are rebuilt at each use.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext

import torch
from torch.distributed.tensor import DTensor, Shard
from torch.nn.parallel import DistributedDataParallel

from megatron_fsam.backends.shards import ParamSpan, RankShards, ShardBackend, ShardEntry, local

ADAM_OPTIMIZERS = ("Adam", "AdamW")


class TorchBackend(ShardBackend):
    """SAM's view of a model and its `torch.optim` optimizer on this rank."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        clip_grad_norm: float | None = None,
        step_optimizer: bool = True,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.clip_grad_norm = clip_grad_norm
        self.step_optimizer = step_optimizer
        self.params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        _check(model, self.params)
        self.layout = _layout_of(model, self.params)
        group = None if self.layout == "one process" else _data_parallel_group(model, self.params)
        world = torch.distributed.get_world_size(group) if group is not None else 1
        rank = torch.distributed.get_rank(group) if group is not None else 0
        # DDP: every rank holds every param; each counts every world-th one.
        self._counted = [
            self.layout != "ddp" or index % world == rank for index in range(len(self.params))
        ]
        super().__init__(device=self.params[0].device, stats_groups=[group])

    def check_second_moments(self) -> None:
        """Preconditioning reads Adam's exp_avg_sq: refuse other optimizers."""
        name = type(self.optimizer).__name__
        if name not in ADAM_OPTIMIZERS:
            raise ValueError(
                "megatron_fsam: precond=True reads the optimizer's Adam second moment; the "
                f"optimizer is {name} (supported: torch.optim {', '.join(ADAM_OPTIMIZERS)})"
            )

    # ----- the layout -----------------------------------------------------------------

    def _layout_key(self) -> None:
        return None  # rebuilt at every use: each pass leaves new gradient tensors

    def _entries(self) -> Iterator[ShardEntry]:
        for param, counted in zip(self.params, self._counted, strict=True):
            theta = local(param).detach().view(-1)
            if not theta.numel():  # FSDP2: an uneven split leaves some ranks no rows
                continue
            grad = local(param.grad).view(-1) if param.grad is not None else None
            yield ShardEntry(
                main=param,
                grad=grad if grad is not None else torch.zeros_like(theta),
                target=theta,
                inner=self.optimizer,
                span=_span(param),
                counted=counted,
            )

    # ----- the step's side of the model and optimizer ----------------------------------

    def gradient_sync(self, enabled: bool) -> AbstractContextManager[None]:
        """Around a micro-batch's forward and backward: whether this backward reduces the
        gradients over the data-parallel ranks (only the last micro-batch of a pass does)."""
        if self.layout == "ddp":
            return nullcontext() if enabled else self.model.no_sync()
        if self.layout == "fsdp2":
            self.model.set_requires_gradient_sync(enabled)
        return nullcontext()

    def zero_grads(self) -> None:
        self.model.zero_grad(set_to_none=True)

    def gradients(self, shards: RankShards) -> list[torch.Tensor]:
        return [entry.grad for entry in self._entries()]

    def optimizer_step(self) -> tuple[bool, float | None, None]:
        """Clip the SAM gradient (if asked) and step the optimizer; the caller's LR scheduler
        steps after. With step_optimizer=False the caller steps: `param.grad` holds the SAM
        gradient and the params theta."""
        if not self.step_optimizer:
            return True, None, None
        grad_norm = None
        if self.clip_grad_norm:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad_norm, foreach=True)
            grad_norm = float(norm.full_tensor() if isinstance(norm, DTensor) else norm)
        self.optimizer.step()
        return True, grad_norm, None

    def sync_params(self) -> None:
        """Nothing to move: every rank wrote its own params (one process, DDP) or shards
        (FSDP2, whose next forward all-gathers them)."""


def _layout_of(model: torch.nn.Module, params: list[torch.nn.Parameter]) -> str:
    if isinstance(model, DistributedDataParallel):
        return "ddp"
    if any(isinstance(p, DTensor) for p in params):
        return "fsdp2"
    return "one process"


def _data_parallel_group(model: torch.nn.Module, params: list[torch.nn.Parameter]):
    if isinstance(model, DistributedDataParallel):
        return model.process_group
    return params[0].device_mesh.get_group()


def _span(param: torch.nn.Parameter) -> ParamSpan:
    """The flat range of the full param this rank's shard covers (FSDP2: Shard(0) rows)."""
    if not isinstance(param, DTensor):
        return ParamSpan(param, 0, param.numel())
    shard = param.to_local()
    row = param.numel() // param.shape[0] if param.shape[0] else 0
    rows_before = _rows_before(param)
    return ParamSpan(param, rows_before * row, rows_before * row + shard.numel())


def _rows_before(param: DTensor) -> int:
    """Rows of dim 0 held by lower ranks (torch.chunk's split, as FSDP2 shards)."""
    rank = param.device_mesh.get_local_rank()
    size = param.device_mesh.size()
    per_rank = -(-param.shape[0] // size)  # ceil
    return min(rank * per_rank, param.shape[0])


def _check(model: torch.nn.Module, params: list[torch.nn.Parameter]) -> None:
    """Refuse, before any work, what the step cannot do right."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    dtensors = [p for p in params if isinstance(p, DTensor)]
    reasons = [
        (not params, "an optimizer without trainable params"),
        (
            isinstance(model, FullyShardedDataParallel),
            "FSDP1 (FullyShardedDataParallel); shard the model with FSDP2's fully_shard",
        ),
        (
            any(p.dtype == torch.float16 for p in params),
            "fp16 params (fp16 training needs a GradScaler, whose loss scale the two passes "
            "would have to share); use bf16 or fp32",
        ),
        (
            0 < len(dtensors) < len(params),
            "a model with some params sharded (DTensor) and some not",
        ),
        (
            any(p.device_mesh.ndim != 1 or p.placements != (Shard(0),) for p in dtensors),
            "DTensor params other than FSDP2's Shard(0) on a 1-D mesh (HSDP, tensor "
            "parallelism or a custom shard_placement_fn)",
        ),
        (
            bool(dtensors) and isinstance(model, DistributedDataParallel),
            "DDP around a model with DTensor params",
        ),
    ]
    for failed, reason in reasons:
        if failed:
            raise ValueError(f"megatron_fsam: the PyTorch SAM step does not support {reason}")
