"""One-shot global magnitude pruning (paper Figure 5), without gathering the model.

For sparsity s, the floor(s N) smallest-magnitude weights among the N prunable ones are
zeroed, with ONE threshold for the whole model. Prunable: every parameter with two or more
dimensions (the linear weights and the word and position embeddings); the 1-D LayerNorm
weights (and biases, if a model has them) are kept, as is usual.

The threshold is found by bisection on the bit pattern of |theta|: for non-negative fp32
values the int32 view orders like the values, so 31 halvings of [0, +inf] pin the k-th
smallest magnitude exactly. Each halving all-reduces one count per sparsity, so all
sparsities share the same 31 all-reduces (one per stats group: two for experts without the
distributed optimizer) and no rank ever holds more than its own shards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from torch.nn import Module

from megatron_fsam.backends.shards import mean_over_ranks
from megatron_fsam.diagnostics.probe import ModelShards, Vector

_INF_BITS = 0x7F800000  # the int32 pattern of +inf


@dataclass(frozen=True)
class Threshold:
    """The magnitude at and below which weights are pruned, and how many that removes."""

    sparsity: float
    value: float  # -1 when nothing is pruned
    pruned: int
    prunable: int


@dataclass(frozen=True)
class PruningPoint:
    sparsity: float
    threshold: float
    pruned_fraction: float
    loss: float


def prunable_mask(shards: ModelShards) -> list[bool]:
    """Which shards belong to parameters of two or more dimensions."""
    return [span is not None and span.param.dim() >= 2 for span in shards.spans]


def magnitude_thresholds(shards: ModelShards, sparsities: Sequence[float]) -> list[Threshold]:
    """The global threshold for each sparsity, found by distributed bisection."""
    for s in sparsities:
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"sparsity must lie in [0, 1], got {s}")
    keep = [p and c for p, c in zip(prunable_mask(shards), shards.shards.counted, strict=True)]
    device = shards.backend.device
    bits = []  # per stats group: the sorted int32 patterns of this rank's prunable magnitudes
    for group in range(len(shards.backend.stats_groups)):
        local = [
            t.detach().float().abs()
            for t, k, g in zip(shards.thetas(), keep, shards.group_of, strict=True)
            if k and g == group
        ]
        bits.append(
            torch.cat(local).view(torch.int32).sort().values.to(device)
            if local
            else torch.zeros(0, dtype=torch.int32, device=device)
        )

    def global_counts(at: torch.Tensor) -> torch.Tensor:
        """How many prunable magnitudes have bits <= at (per entry), over the whole model."""
        return shards.reduce(
            [torch.searchsorted(b, at.to(torch.int32), right=True).to(torch.float64) for b in bits]
        )

    total = int(global_counts(torch.tensor([_INF_BITS], device=device)).item())
    wanted = torch.tensor([int(s * total) for s in sparsities], dtype=torch.float64, device=device)
    low = torch.full_like(wanted, -1, dtype=torch.int64)  # count(<= low) < k
    high = torch.full_like(wanted, _INF_BITS, dtype=torch.int64)  # count(<= high) >= k
    high[wanted == 0] = -1  # nothing to prune: below every magnitude
    low[wanted == 0] = -2
    while bool((high - low > 1).any()):
        middle = (low + high) // 2
        reached = global_counts(middle) >= wanted
        high = torch.where(reached, middle, high)
        low = torch.where(reached, low, middle)
    pruned = global_counts(high.clamp(min=-1))
    values = high.clamp(min=0).to(torch.int32).view(torch.float32)
    rows = zip(sparsities, wanted.tolist(), values.tolist(), pruned.tolist(), strict=True)
    return [Threshold(s, float(v) if k > 0 else -1.0, int(n), total) for s, k, v, n in rows]


def pruned_values(shards: ModelShards, threshold: float) -> Vector:
    """theta with every prunable weight of magnitude <= threshold set to zero."""
    out = []
    for theta, prunable in zip(shards.thetas(), prunable_mask(shards), strict=True):
        if prunable:
            theta = torch.where(theta.abs() <= threshold, torch.zeros_like(theta), theta)
        out.append(theta)
    return out


def evaluate_loss(
    model_chunks: list[Module],
    forward_step_func: Callable,
    batches: list,
    *,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    loss_key: str = "lm loss",
) -> float:
    """Mean loss over this rank's `batches` (whole steps of num_microbatches), all ranks."""
    steps = len(batches) // num_microbatches
    if steps < 1:
        raise ValueError(f"{len(batches)} micro-batches is less than one step")
    losses = []
    with _evaluating(model_chunks):
        for i in range(steps):
            chunk = batches[i * num_microbatches : (i + 1) * num_microbatches]
            outputs = get_forward_backward_func()(
                forward_step_func=forward_step_func,
                data_iterator=[iter(chunk) for _ in model_chunks]
                if len(model_chunks) > 1
                else iter(chunk),
                model=model_chunks,
                num_microbatches=num_microbatches,
                seq_length=seq_length,
                micro_batch_size=micro_batch_size,
                forward_only=True,
            )
            losses += [float(out[loss_key]) for out in outputs]
    mean = sum(losses) / len(losses) if losses else None  # None off the last stage
    return mean_over_ranks({"loss": mean})["loss"]


def pruning_curve(
    model_chunks: list[Module],
    optimizer: MegatronOptimizer,
    forward_step_func: Callable,
    batches: list,
    sparsities: Sequence[float],
    *,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    loss_key: str = "lm loss",
) -> list[PruningPoint]:
    """Validation loss after one-shot global magnitude pruning at each sparsity.

    The weights are restored bit for bit afterwards.
    """
    schedule = dict(
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        loss_key=loss_key,
    )
    points = []
    with ModelShards(model_chunks, optimizer) as shards:
        for threshold in magnitude_thresholds(shards, sparsities):
            if threshold.pruned:
                shards.write(pruned_values(shards, threshold.value))
            loss = evaluate_loss(model_chunks, forward_step_func, batches, **schedule)
            shards.restore()
            points.append(
                PruningPoint(
                    threshold.sparsity,
                    threshold.value,
                    threshold.pruned / max(threshold.prunable, 1),
                    loss,
                )
            )
    return points


@contextmanager
def _evaluating(model_chunks: list[Module]) -> Iterator[None]:
    """Eval mode (no dropout) without an autograd graph; the previous modes afterwards."""
    modes = [chunk.training for chunk in model_chunks]
    for chunk in model_chunks:
        chunk.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for chunk, mode in zip(model_chunks, modes, strict=True):
            chunk.train(mode)
