"""Vectorised torch implementations of the SAM shard kernels (CPU and fallback).

Each shard is processed with a handful of whole-tensor ops; no per-element Python.
"""

from __future__ import annotations

import torch

from megatron_fsam.kernels.shards import Shards


def _precond(shards: Shards, i: int) -> torch.Tensor | None:
    """P = 1 / (sqrt(v_hat) + eps) for shard i, or None when unpreconditioned."""
    if shards.second_moments is None:
        return None
    v_hat = shards.second_moments[i].float() * shards.v_scales[i]
    return 1.0 / (v_hat.sqrt_() + shards.adam_eps[i])


def norm_sums(shards: Shards) -> torch.Tensor:
    """Local [||g||^2, ||P g||^2, g.(P g)] over the counted shards, fp32."""
    sums = torch.zeros(3, dtype=torch.float32, device=_device(shards))
    for i, (grad, counted) in enumerate(zip(shards.grads, shards.counted, strict=True)):
        if not counted or grad.numel() == 0:
            continue
        g = grad.float()
        p = _precond(shards, i)
        gg = torch.dot(g, g)
        if p is None:
            sums += torch.stack((gg, gg, gg))
        else:
            pg = p.mul_(g)
            sums += torch.stack((gg, torch.dot(pg, pg), torch.dot(g, pg)))
    return sums


@torch.no_grad()
def perturb(shards: Shards, scale: float) -> None:
    """targets <- cast(theta + scale * P g)."""
    for i, (theta, grad, target) in enumerate(
        zip(shards.thetas, shards.grads, shards.targets, strict=True)
    ):
        p = _precond(shards, i)
        direction = grad.float() if p is None else p.mul_(grad.float())
        target.copy_(theta.float() + scale * direction)


@torch.no_grad()
def restore(shards: Shards) -> None:
    """targets <- cast(theta)."""
    for theta, target in zip(shards.thetas, shards.targets, strict=True):
        target.copy_(theta)


def _device(shards: Shards) -> torch.device:
    return shards.grads[0].device if len(shards) else torch.device("cpu")
