"""Rho schedules: rho_t as a function of the number of SAM steps already taken."""

from __future__ import annotations

import math

from megatron_fsam.config import SAMConfig


def rho_at(cfg: SAMConfig, step: int) -> float:
    """Radius for the step that follows `step` completed steps.

    Warm-ups start at 0 (the first step is a plain step: there is no Adam state to
    precondition with yet) and reach cfg.rho after rho_warmup_steps steps.
    """
    if cfg.rho_schedule == "constant":
        return float(cfg.rho)
    progress = min(1.0, step / cfg.rho_warmup_steps)
    if cfg.rho_schedule == "linear_warmup":
        return cfg.rho * progress
    if cfg.rho_schedule == "cosine_warmup":
        return cfg.rho * 0.5 * (1.0 - math.cos(math.pi * progress))
    raise ValueError(f"unknown rho_schedule {cfg.rho_schedule!r}")
