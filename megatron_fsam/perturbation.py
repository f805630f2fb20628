"""The ascent step eps = rho * P g / N from the three globally reduced sums.

N depends on `precond_norm` (see SAMConfig); with P = 1 all three agree and
eps = rho * g / ||g||, plain SAM's perturbation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class NormSums:
    """sum g^2, sum (P g)^2 and sum g (P g) over the whole model, counted once."""

    grad_sq: float
    precond_grad_sq: float
    grad_dot_precond_grad: float

    @classmethod
    def from_tensor(cls, sums: torch.Tensor) -> NormSums:
        grad_sq, precond_grad_sq, cross = sums.tolist()
        return cls(grad_sq, precond_grad_sq, cross)

    @property
    def finite(self) -> bool:
        return all(
            math.isfinite(v)
            for v in (self.grad_sq, self.precond_grad_sq, self.grad_dot_precond_grad)
        )


@dataclass(frozen=True)
class Ascent:
    """The scale s with eps = s * P g, and what it implies for logging."""

    scale: float
    grad_norm: float
    eps_norm: float


def ascent(sums: NormSums, rho: float, precond_norm: str) -> Ascent:
    """eps = rho * P g / N, N = ||g|| ("grad"), ||P g|| ("perturbation") or sqrt(g.P g) ("dual")."""
    denominators = {
        "grad": sums.grad_sq,
        "perturbation": sums.precond_grad_sq,
        "dual": sums.grad_dot_precond_grad,
    }
    denominator = math.sqrt(max(denominators[precond_norm], 0.0))
    scale = rho / denominator if denominator > 0.0 else 0.0
    return Ascent(
        scale=scale,
        grad_norm=math.sqrt(sums.grad_sq),
        eps_norm=scale * math.sqrt(sums.precond_grad_sq),
    )
