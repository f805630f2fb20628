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

__all__ = ["top_share"]

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
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"top_share: fraction must be in (0, 1], got {fraction}")
    device = shards.grads[0].device if len(shards) else torch.device(device or "cpu")
    n_local = sum(shards.grads[i].numel() for i in range(len(shards)) if shards.counted[i])
    n_global = int(_all_reduce(torch.tensor(n_local, device=device), group))
    if n_global == 0:
        return 0.0
    k = math.ceil(fraction * n_global)
    top, local_total = _local_top(shards, min(k, n_local), device)
    total = float(_all_reduce(local_total, group))
    if total == 0.0:
        return 0.0
    if not math.isfinite(total):
        return math.nan
    threshold = _kth_largest(top, k, group)
    above = top[top > threshold].double()
    sums = torch.stack((above.sum(), above.new_tensor(above.numel())))
    above_sum, above_count = _all_reduce(sums, group).tolist()
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


def _kth_largest(top: torch.Tensor, k: int, group: dist.ProcessGroup | None) -> float:
    """The k-th largest value of all ranks' `top` (each rank's top values hold the global top k
    that lie on it): the largest bit pattern b with at least k values >= b across ranks."""
    bits = top.view(torch.int32)
    low, high = 0, _INF_BITS  # at least k values >= low; fewer than k >= high (all finite)
    while high - low > 1:
        middle = (low + high) // 2
        count = _all_reduce((bits >= middle).sum(), group)
        low, high = (middle, high) if int(count) >= k else (low, middle)
    return torch.tensor(low, dtype=torch.int32).view(torch.float32).item()


def _all_reduce(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum over the ranks of group; the tensor itself when not distributed."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, group=group)
    return tensor
