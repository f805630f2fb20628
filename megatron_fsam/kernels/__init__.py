"""SAM shard kernels: norm sums, perturb, restore.

`get_kernels(backend)` returns the implementation: "torch" (vectorised, any device), "triton"
(fused Triton kernels, CUDA tensors) or "auto", which picks per call: Triton when the shards are
on a CUDA device and Triton imports, torch otherwise. Triton is imported only when needed, so
this package works with torch alone.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from megatron_fsam.config import KERNEL_BACKENDS
from megatron_fsam.kernels import torch_ops
from megatron_fsam.kernels.shards import Shards

__all__ = ["Shards", "Kernels", "get_kernels", "KERNEL_BACKENDS"]


@dataclass(frozen=True)
class Kernels:
    name: str
    norm_sums: Callable[[Shards], torch.Tensor]
    perturb: Callable[[Shards, float], None]
    restore: Callable[[Shards], None]


TORCH_KERNELS = Kernels("torch", torch_ops.norm_sums, torch_ops.perturb, torch_ops.restore)


@functools.cache
def triton_kernels() -> Kernels | None:
    """The Triton kernels, or None when Triton is not installed."""
    try:
        from megatron_fsam.kernels import triton_ops
    except ImportError:
        return None
    return Kernels("triton", triton_ops.norm_sums, triton_ops.perturb, triton_ops.restore)


def _pick(shards: Shards) -> Kernels:
    on_cuda = len(shards) > 0 and shards.grads[0].is_cuda
    return (triton_kernels() if on_cuda else None) or TORCH_KERNELS


def _auto_norm_sums(shards: Shards) -> torch.Tensor:
    return _pick(shards).norm_sums(shards)


def _auto_perturb(shards: Shards, scale: float) -> None:
    _pick(shards).perturb(shards, scale)


def _auto_restore(shards: Shards) -> None:
    _pick(shards).restore(shards)


AUTO_KERNELS = Kernels("auto", _auto_norm_sums, _auto_perturb, _auto_restore)


def get_kernels(backend: str = "auto") -> Kernels:
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; expected one of {KERNEL_BACKENDS}")
    if backend == "torch":
        return TORCH_KERNELS
    if backend == "auto":
        return AUTO_KERNELS
    kernels = triton_kernels()
    if kernels is None:
        raise ImportError("kernels='triton' needs the triton package (pip install triton)")
    return kernels
