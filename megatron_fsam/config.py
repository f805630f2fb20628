"""SAMConfig: every knob of the SAM step, validated before any work is done."""

from __future__ import annotations

import math
from dataclasses import dataclass

MODES = ("adamw", "sam", "fsam")
PRECOND_NORMS = ("grad", "perturbation", "dual")
RHO_SCHEDULES = ("constant", "linear_warmup", "cosine_warmup")
KERNEL_BACKENDS = ("auto", "torch", "triton")
CHOICES = {
    "mode": MODES,
    "precond_norm": PRECOND_NORMS,
    "rho_schedule": RHO_SCHEDULES,
    "kernels": KERNEL_BACKENDS,
}


@dataclass
class SAMConfig:
    """Settings of the SAM step (names follow the paper, Singh et al. 2025).

    mode: "adamw" (plain step, the baseline), "sam" (Eq. 2: gradient at theta+eps),
        "fsam" (Eq. 11: J(theta+eps)^T c(theta), the clean logit cotangent replayed).
    rho: perturbation radius after warm-up.
    precond: precondition the ascent direction with the optimizer's own Adam
        second moment, P = 1 / (sqrt(v_hat) + adam_eps).
    precond_norm: how eps = rho * P g / N is normalised: N = ||g|| ("grad", Eq. 12
        read literally), ||P g|| ("perturbation": ||eps|| = rho exactly), or
        sqrt(g.P g) ("dual": steepest ascent in the optimizer's norm).
    rho_schedule / rho_warmup_steps: rho ramps from 0 over the first steps.
    logits_module: name (or dotted suffix) of the module whose output is the logits;
        None finds Megatron's `output_layer`.
    kernels: "auto", "torch" or "triton" implementation of norm/perturb/restore.
    cotangent_offload: keep fsam's recorded logit cotangents (seq x micro-batch x vocab/TP
        per micro-batch, gigabytes at scale) in pinned host memory between the passes,
        copied asynchronously, instead of on the GPU.
    """

    mode: str = "fsam"
    rho: float = 0.05
    precond: bool = False
    precond_norm: str = "perturbation"
    rho_schedule: str = "constant"
    rho_warmup_steps: int = 0
    logits_module: str | None = None
    kernels: str = "auto"
    cotangent_offload: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name, allowed in CHOICES.items():
            _one_of(name, getattr(self, name), allowed)
        if not isinstance(self.rho, (int, float)) or not math.isfinite(self.rho) or self.rho < 0:
            raise ValueError(f"SAMConfig.rho must be a finite number >= 0, got {self.rho!r}")
        if self.rho_schedule != "constant" and (
            not isinstance(self.rho_warmup_steps, int) or self.rho_warmup_steps <= 0
        ):
            raise ValueError(
                f"SAMConfig.rho_warmup_steps must be a positive integer for "
                f"rho_schedule={self.rho_schedule!r}, got {self.rho_warmup_steps!r}"
            )

    @property
    def two_pass(self) -> bool:
        return self.mode != "adamw"


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"SAMConfig.{name} must be one of {allowed}, got {value!r}")
