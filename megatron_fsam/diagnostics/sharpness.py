"""Which path carries the sharpness gradient: logits or function (paper Section 3, Eq. 9).

The Hessian splits as H = H_G + H_F: H_G = J^T H_out J (Gauss-Newton, the logit path)
and H_F = sum_i c_i d^2 F_i (the functional path). Along u = g / ||g||,

    delta_logit = H_G u ~ [J(theta)^T c(theta + h u) - g] / h
                        = J(theta)^T [c(theta + h u) - c(theta)] / h
    delta_func  = H_F u ~ [J(theta + h u)^T c(theta) - g] / h

and tau_logit = |delta_logit|^2 / |delta_logit + delta_func|^2, tau_func likewise,
tau_cross = 2 <delta_logit, delta_func> / |delta_logit + delta_func|^2 (they sum to 1).
The logit term back-propagates the cotangent difference in one pass at theta instead of
subtracting two gradients: the same quantity by linearity, without the cancellation.

Mixture-of-experts router losses (load balancing, z-loss) do not pass through the logits: their
curvature is in H u but not in H_G u, so it is counted in delta_func (the logit pass leaves them
out, see `GradientProbe`).

ANGLE-SAM at angle phi (App. D) follows sin(phi) H_G u + cos(phi) H_F u to first order; given
the run's angle, the same split of that vector is reported as angle_tau_* (fsam: all
functional, logit: all logit, sam at 45 degrees: the plain taus).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from megatron.core.optimizer import MegatronOptimizer
from torch.nn import Module

from megatron_fsam.diagnostics.probe import (
    Cotangents,
    GradientProbe,
    Vector,
    accumulate,
    combine,
    scaled,
)
from megatron_fsam.modes import sin_cos


@dataclass
class SharpnessDeltas:
    """The gradient g and the two parts of H u, u = g / ||g||, as this rank's shards."""

    grad: Vector
    grad_norm: float
    delta_logit: Vector  # H_G u
    delta_func: Vector  # H_F u


def sharpness_deltas(probe: GradientProbe, h: float, central: bool) -> SharpnessDeltas:
    """delta_logit and delta_func by finite differences along u (inside `with probe:`)."""
    if h <= 0:
        raise ValueError(f"h must be positive, got {h}")
    clean: Cotangents = {}
    g = probe.gradient(cotangent=accumulate(clean))
    (grad_sq,) = probe.dots([(g, g)])
    if not math.isfinite(grad_sq) or grad_sq == 0.0:
        raise ValueError(f"sharpness: ||g||^2 = {grad_sq}, no direction u = g / ||g||")
    grad_norm = math.sqrt(grad_sq)
    step = h / grad_norm  # theta + step * g = theta + h u

    if central:
        shift: Cotangents = {}  # c(theta + h u) - c(theta - h u)
        func_plus = probe.gradient(g, step, accumulate(shift, 1.0, replace=clean))
        func_minus = probe.gradient(g, -step, accumulate(shift, -1.0, replace=clean))
        delta_func = combine(0.5 / h, func_plus, -0.5 / h, func_minus)
        delta_logit = probe.gradient(cotangent=scaled(shift, 0.5 / h), side_losses=False)
    else:
        # clean becomes c(theta) - c(theta + h u) while pass 2 back-propagates c(theta).
        func_plus = probe.gradient(g, step, accumulate(clean, -1.0, replace=clean))
        delta_func = combine(1.0 / h, func_plus, -1.0 / h, g)
        delta_logit = probe.gradient(cotangent=scaled(clean, -1.0 / h), side_losses=False)
    return SharpnessDeltas(g, grad_norm, delta_logit, delta_func)


def sharpness_composition(
    model_chunks: list[Module],
    optimizer: MegatronOptimizer,
    forward_step_func: Callable,
    batches: list,
    *,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    h: float = 1e-3,
    central: bool = False,
    logits_module: str | None = None,
    angle: float | None = None,
) -> dict[str, float]:
    """tau_logit, tau_func, tau_cross at the current weights, on this rank's `batches`;
    with `angle` (degrees), also angle_tau_* of the sharpness gradient that angle follows.

    Costs 3 forward-backward passes (4 with central differences); h is the Euclidean
    length of the step along u. The model is restored bit for bit, the gradient buffers
    are left zeroed and the RNG state unchanged. Returns the same dict on every rank.
    """
    probe = GradientProbe(
        model_chunks,
        optimizer,
        forward_step_func,
        batches,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        logits_module=logits_module,
    )
    with probe:
        d = sharpness_deltas(probe, h, central)
        logit_sq, func_sq, cross, g_logit, g_func = probe.dots(
            [
                (d.delta_logit, d.delta_logit),
                (d.delta_func, d.delta_func),
                (d.delta_logit, d.delta_func),
                (d.grad, d.delta_logit),
                (d.grad, d.delta_func),
            ]
        )
    taus = composition(logit_sq, func_sq, cross)
    if angle is not None:
        taus |= composition(logit_sq, func_sq, cross, angle)
    return {
        **taus,
        "grad_norm": d.grad_norm,
        "delta_logit_norm": math.sqrt(logit_sq),
        "delta_func_norm": math.sqrt(func_sq),
        "curvature_logit": g_logit / d.grad_norm,  # u^T H_G u
        "curvature_func": g_func / d.grad_norm,  # u^T H_F u
    }


def composition(
    logit_sq: float, func_sq: float, cross: float, angle: float | None = None
) -> dict[str, float]:
    """tau_* from |delta_logit|^2, |delta_func|^2 and <delta_logit, delta_func> (they sum to
    1); with `angle` (degrees), angle_tau_*: the same for sin(phi) delta_logit + cos(phi)
    delta_func."""
    prefix = "tau"
    if angle is not None:
        sin, cos = sin_cos(angle)
        logit_sq, func_sq, cross, prefix = (
            sin * sin * logit_sq,
            cos * cos * func_sq,
            sin * cos * cross,
            "angle_tau",
        )
    total_sq = logit_sq + func_sq + 2.0 * cross
    return {
        f"{prefix}_logit": logit_sq / total_sq,
        f"{prefix}_func": func_sq / total_sq,
        f"{prefix}_cross": 2.0 * cross / total_sq,
    }
