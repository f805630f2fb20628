"""SAM shard kernels: norm sums, perturb, restore.

`get_kernels(backend)` returns the implementation: "torch" (vectorised, any
device) or "auto" (the best available for the shards' device).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from megatron_fsam.kernels import torch_ops
from megatron_fsam.kernels.shards import Shards

__all__ = ["Shards", "Kernels", "get_kernels", "KERNEL_BACKENDS"]

KERNEL_BACKENDS = ("auto", "torch")


@dataclass(frozen=True)
class Kernels:
    name: str
    norm_sums: Callable[[Shards], torch.Tensor]
    perturb: Callable[[Shards, float], None]
    restore: Callable[[Shards], None]


TORCH_KERNELS = Kernels("torch", torch_ops.norm_sums, torch_ops.perturb, torch_ops.restore)


def get_kernels(backend: str = "auto") -> Kernels:
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; expected one of {KERNEL_BACKENDS}")
    return TORCH_KERNELS
