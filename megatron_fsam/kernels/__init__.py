"""SAM shard kernels: norm sums, perturb, restore.

`get_kernels(backend)` returns the implementation: "torch" (vectorised, any device), "triton"
(fused Triton kernels, CUDA tensors) or "auto", which picks per call: Triton when the shards are
on a CUDA device and the Triton kernels pass their self-check there, torch otherwise. Triton is
imported only when needed, so this package works with torch alone.

The self-check (`self_check.self_check`) compiles and runs the Triton kernels on tiny shards and
compares them with torch, once per process and device, before their first use on that device:
"auto" then falls back to torch with one warning saying why, "triton" raises that reason.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from megatron_fsam.config import KERNEL_BACKENDS
from megatron_fsam.kernels import torch_ops
from megatron_fsam.kernels.shards import Shards

__all__ = [
    "Shards",
    "Kernels",
    "get_kernels",
    "resolve_kernels",
    "triton_verdict",
    "KERNEL_BACKENDS",
    "KernelSelfCheckError",
]

logger = logging.getLogger("megatron_fsam")

# Device types on which "auto" uses the Triton kernels, and on which they are self-checked before
# their first use. (The tests add "cpu" to run the selection in Triton's interpreter.)
TRITON_DEVICE_TYPES: tuple[str, ...] = ("cuda",)


class KernelSelfCheckError(RuntimeError):
    """kernels="triton" was asked for, but the Triton kernels failed their self-check."""


@dataclass(frozen=True)
class Kernels:
    name: str
    norm_sums: Callable[[Shards], torch.Tensor]
    perturb: Callable[[Shards, float], None]
    restore: Callable[[Shards], None]


TORCH_KERNELS = Kernels("torch", torch_ops.norm_sums, torch_ops.perturb, torch_ops.restore)


@functools.cache
def triton_kernels() -> Kernels | None:
    """The Triton kernels, unchecked, or None when Triton is not installed."""
    try:
        from megatron_fsam.kernels import triton_ops
    except ImportError:
        return None
    return Kernels("triton", triton_ops.norm_sums, triton_ops.perturb, triton_ops.restore)


@functools.cache
def triton_verdict(device: torch.device) -> str | None:
    """The self-check of the Triton kernels on `device`, run once per process and device:
    None when they match the torch kernels, else why they must not be used."""
    from megatron_fsam.kernels.self_check import self_check

    return self_check(device)


@functools.cache
def _auto_choice(device: torch.device) -> Kernels:
    """What "auto" uses on a device of TRITON_DEVICE_TYPES; warns once when that is torch."""
    problem = triton_verdict(device)
    if problem is None:
        return triton_kernels()
    logger.warning(
        "SAM kernels: the Triton kernels failed their self-check on %s, using the torch "
        "kernels instead (same results, slower): %s",
        device,
        problem,
    )
    return TORCH_KERNELS


def resolve_kernels(backend: str, device: torch.device | str) -> Kernels:
    """The implementation `backend` ("auto", "torch" or "triton") uses for shards on `device`.

    Runs the Triton self-check on the first call for a device of TRITON_DEVICE_TYPES; raises
    KernelSelfCheckError for "triton" when it failed."""
    device = _canonical(torch.device(device))
    if backend == "torch":
        return TORCH_KERNELS
    if backend == "auto":
        if device.type not in TRITON_DEVICE_TYPES:
            return TORCH_KERNELS
        return _auto_choice(device)
    if backend != "triton":
        raise ValueError(f"unknown kernel backend {backend!r}; expected one of {KERNEL_BACKENDS}")
    kernels = triton_kernels()
    if kernels is None:
        raise ImportError("kernels='triton' needs the triton package (pip install triton)")
    if device.type in TRITON_DEVICE_TYPES and (problem := triton_verdict(device)) is not None:
        raise KernelSelfCheckError(
            f"kernels='triton': the Triton kernels failed their self-check on {device}: "
            f"{problem}. Use kernels='auto' (falls back to torch) or kernels='torch'."
        )
    return kernels


def _canonical(device: torch.device) -> torch.device:
    """cuda means the current CUDA device: one cache entry per physical device."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _shards_device(shards: Shards) -> torch.device | None:
    return shards.grads[0].device if len(shards) else None


def _dispatching(backend: str) -> Kernels:
    """Kernels that resolve `backend` for the device of the shards they are given; shards
    with no tensors go to the torch kernels (nothing to do but return zero sums)."""

    def pick(shards: Shards) -> Kernels:
        device = _shards_device(shards)
        return TORCH_KERNELS if device is None else resolve_kernels(backend, device)

    def norm_sums(shards: Shards) -> torch.Tensor:
        return pick(shards).norm_sums(shards)

    def perturb(shards: Shards, scale: float) -> None:
        pick(shards).perturb(shards, scale)

    def restore(shards: Shards) -> None:
        pick(shards).restore(shards)

    return Kernels(backend, norm_sums, perturb, restore)


AUTO_KERNELS = _dispatching("auto")
CHECKED_TRITON_KERNELS = _dispatching("triton")


def get_kernels(backend: str = "auto") -> Kernels:
    """The kernels for a `SAMConfig.kernels` value. "auto" and "triton" choose per call from the
    shards' device (see resolve_kernels); "triton" fails at once without the triton package."""
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; expected one of {KERNEL_BACKENDS}")
    if backend == "torch":
        return TORCH_KERNELS
    if backend == "auto":
        return AUTO_KERNELS
    if triton_kernels() is None:
        raise ImportError("kernels='triton' needs the triton package (pip install triton)")
    return CHECKED_TRITON_KERNELS


def reset_self_check() -> None:
    """Forget the self-check verdicts and "auto"'s choices (tests; a changed environment)."""
    triton_verdict.cache_clear()
    _auto_choice.cache_clear()
