"""How concentrated the SAM perturbation is: the share of ||eps||^2 in its largest coordinates.

eps = scale * P g, so the share of ||eps||^2 held by the top `fraction` of coordinates is that of
sum (P g)^2 over the counted shards. A share near 1 means the perturbation probes a handful of
coordinates (e.g. those where v is tiny and P large), not the model.

The share is exact over the whole model: the k-th largest (P g)^2 of all ranks is found by a
bisection over float32 bit patterns with one all-reduced count per step. A per-rank top-k would
give a number that changes with the parallel layout (tensor, pipeline or data sharding of the
optimizer state), so runs of one model in two layouts could not be compared.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megatron_fsam.kernels import torch_ops
from megatron_fsam.kernels.shards import Shards

__all__ = ["top_share", "grouped_top_share", "summed_over_groups"]

Part = tuple[Shards, "dist.ProcessGroup | None"]

# Bit patterns of non-negative float32s order as int32s do; +inf is the first above all finite.
_INF_BITS = 0x7F800000


@torch.no_grad()
def top_share(
    shards: Shards,
    fraction: float = 1e-3,
    group: dist.ProcessGroup | None = None,
    device: torch.device | str | None = None,
) -> float:
    """The fraction of sum (P g)^2 over the counted shards of all ranks of `group` held by its
    largest ceil(fraction * N) coordinates (N: the counted coordinates of all ranks); 0.0 when
    the sum is 0, NaN when it is not finite.

    A collective: every rank of `group` calls it, with or without shards (local only when
    torch.distributed is not initialized). `device` holds the collectives' tensors on a rank
    without shards (cpu by default; the shards' device otherwise). Costs one pass over the
    shards in batches, a buffer of the rank's top k values and at most 34 all-reduces of a
    scalar or two."""
    return grouped_top_share([(shards, group)], fraction, device)


@torch.no_grad()
def grouped_top_share(
    parts: list[Part], fraction: float = 1e-3, device: torch.device | str | None = None
) -> float:
    """`top_share` of the union of several parts, each summed over its own process group
    (experts and dense params of one model): every collective runs once per part."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"top_share: fraction must be in (0, 1], got {fraction}")
    groups = [group for _, group in parts]
    nonempty = [shards for shards, _ in parts if len(shards)]
    device = nonempty[0].grads[0].device if nonempty else torch.device(device or "cpu")
    n_locals = [
        sum(shards.grads[i].numel() for i in range(len(shards)) if shards.counted[i])
        for shards, _ in parts
    ]
    n_global = int(summed_over_groups([torch.tensor(n, device=device) for n in n_locals], groups))
    if n_global == 0:
        return 0.0
    k = math.ceil(fraction * n_global)
    local = [
        _local_top(shards, min(k, n), device)
        for (shards, _), n in zip(parts, n_locals, strict=True)
    ]
    tops, local_totals = [top for top, _ in local], [total for _, total in local]
    total = float(summed_over_groups(local_totals, groups))
    if total == 0.0:
        return 0.0
    if not math.isfinite(total):
        return math.nan
    threshold = _kth_largest(tops, k, groups)
    sums = []
    for top in tops:
        above = top[top > threshold].double()
        sums.append(torch.stack((above.sum(), above.new_tensor(above.numel()))))
    above_sum, above_count = summed_over_groups(sums, groups).tolist()
    # Values tied with the k-th largest fill the top k up to k.
    return (above_sum + (k - above_count) * threshold) / total


def _local_top(shards: Shards, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest local (P g)^2 (unordered) and the local sum of all of them (float64)."""
    top = torch.empty(0, dtype=torch.float32, device=device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for direction in torch_ops.counted_directions(shards):
        squares = direction.square_()
        total += squares.sum(dtype=torch.float64)
        merged = torch.cat((top, squares))
        top = merged.topk(min(k, merged.numel()), sorted=False).values
    return top, total


def _kth_largest(tops: list[torch.Tensor], k: int, groups: list) -> float:
    """The k-th largest value of all ranks' `tops` (each rank's top values hold the global top
    k that lie on it): the largest bit pattern b with at least k values >= b across ranks."""
    bits = [top.view(torch.int32) for top in tops]
    low, high = 0, _INF_BITS  # at least k values >= low; fewer than k >= high (all finite)
    while high - low > 1:
        middle = (low + high) // 2
        count = summed_over_groups([(b >= middle).sum() for b in bits], groups)
        low, high = (middle, high) if int(count) >= k else (low, middle)
    return torch.tensor(low, dtype=torch.int32).view(torch.float32).item()


def summed_over_groups(tensors: list[torch.Tensor], groups: list) -> torch.Tensor:
    """Each tensor summed over the ranks of its group (in place), then added; local when not
    distributed. Every rank calls it with the groups in the same order."""
    distributed = dist.is_available() and dist.is_initialized()
    total = None
    for tensor, group in zip(tensors, groups, strict=True):
        if distributed:
            dist.all_reduce(tensor, group=group)
        total = tensor if total is None else total + tensor
    return total
