"""Each mode as weights on what the passes produce (paper Eq. 2, Eq. 11, App. D Eq. 19).

With g = J(theta)^T c(theta) from pass 1, ANGLE-SAM's gradient at angle phi is

    g + sin(phi) [J(theta)^T c(theta+eps) - g] + cos(phi) [J(theta+eps)^T c(theta) - g]

phi = 0 is Func-SAM, phi = 90 degrees LOGIT-SAM, phi = 45 degrees SAM to first order
(radius rho / sqrt 2). A `Recipe` says what pass 2 (at theta + eps) back-propagates, whether
a pass 3 (at theta) back-propagates c(theta+eps) recorded in pass 2, and how the optimizer's
gradient is mixed from g, G2 and G3:

    sam                 pass 2: c(theta+eps)                       G2
    fsam                pass 2: c(theta)                           G2
    angle, first order  pass 2: sin c(theta+eps) + (cos - sin) c(theta)
                                                                   G2 + (1 - cos) g
    angle, exact        pass 2: c(theta), pass 3: c(theta+eps)     cos G2 + sin G3
                                                                   + (1 - sin - cos) g

The first-order form expands J(theta)^T c(theta+eps) = J(theta+eps)^T c(theta+eps) +
O(rho^2) and so costs two passes, like SAM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_fsam.config import SAMConfig


@dataclass(frozen=True)
class Recipe:
    """pass 2 back-propagates perturbed * c(theta+eps) + clean * c(theta); the optimizer
    receives pass2 * G2 + pass3 * G3 + grad * g (pass 3 runs when pass3 != 0)."""

    perturbed: float
    clean: float
    pass2: float = 1.0
    pass3: float = 0.0
    grad: float = 0.0

    @property
    def side_loss_weight(self) -> float:
        """What pass 2 back-propagates into a loss term whose cotangent is a constant (MoE
        router losses): the mix of that constant at theta + eps and at theta. Such a term
        then enters the optimizer's gradient as Eq. 19 gives it: cos A(theta + eps) +
        (1 - cos) A(theta) for ANGLE-SAM, A(theta + eps) for sam, fsam and the exact form."""
        return self.perturbed + self.clean

    @property
    def needs_gate(self) -> bool:
        """Whether a cotangent other than pass 2's own is back-propagated somewhere."""
        return self.clean != 0.0 or self.pass3 != 0.0

    @property
    def passes(self) -> int:
        return 3 if self.pass3 else 2


def recipe_for(cfg: SAMConfig) -> Recipe:
    """The recipe of cfg.mode ("sam", "fsam", "angle" or "logit")."""
    if cfg.mode == "sam":
        return Recipe(perturbed=1.0, clean=0.0)
    sin, cos = sin_cos(cfg.angle_degrees)
    if cfg.angle_impl == "exact":
        return Recipe(perturbed=0.0, clean=1.0, pass2=cos, pass3=sin, grad=1.0 - sin - cos)
    return Recipe(perturbed=sin, clean=cos - sin, grad=1.0 - cos)


def sin_cos(degrees: float) -> tuple[float, float]:
    """sin and cos of an angle in degrees, rounded to 12 digits: exactly 0 and 1 at 0 and 90
    degrees and equal at 45, so fsam and logit need no arithmetic on cotangents."""
    radians = math.radians(degrees)
    return round(math.sin(radians), 12) + 0.0, round(math.cos(radians), 12) + 0.0
