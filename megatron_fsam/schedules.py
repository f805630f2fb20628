"""Per-step schedules: the radius rho_t and whether step t is a SAM step.

Both are functions of the configuration and the step number only, so every rank (and a
resumed run) decides the same without a collective.
"""

from __future__ import annotations

import hashlib
import math

from megatron_fsam.config import SAMConfig


def rho_at(cfg: SAMConfig, step: int) -> float:
    """Radius for the step that follows `step` completed steps.

    Warm-ups start at 0 at the SAM phase's first step (the run's first step by default: a
    plain step, with no Adam state to precondition with yet) and reach cfg.rho after
    rho_warmup_steps steps.
    """
    if cfg.rho_schedule == "constant":
        return float(cfg.rho)
    progress = min(1.0, max(0, step - cfg.sam_start_step) / cfg.rho_warmup_steps)
    if cfg.rho_schedule == "linear_warmup":
        return cfg.rho * progress
    if cfg.rho_schedule == "cosine_warmup":
        return cfg.rho * 0.5 * (1.0 - math.cos(math.pi * progress))
    raise ValueError(f"unknown rho_schedule {cfg.rho_schedule!r}")


def is_sam_step(cfg: SAMConfig, step: int) -> bool:
    """Whether step `step` takes the SAM gradient (else a plain optimizer step).

    Only steps of the phase [sam_start_step, sam_end_step) can; of those, sam_interval=k takes
    the phase's steps 0, k, 2k, ...; sam_probability=p a Bernoulli(p) draw from (seed, step),
    the same on every rank and after a resume.
    """
    in_phase = cfg.sam_start_step <= step and (cfg.sam_end_step is None or step < cfg.sam_end_step)
    if not cfg.sam_enabled or not in_phase or (step - cfg.sam_start_step) % cfg.sam_interval:
        return False
    return cfg.sam_probability >= 1.0 or uniform_draw(cfg.seed or 0, step) < cfg.sam_probability


def uniform_draw(seed: int, step: int) -> float:
    """A number in [0, 1) determined by (seed, step) alone: the top 53 bits of a hash, so no
    generator state is shared with (or disturbed by) anything else in the run."""
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") >> 11) / float(1 << 53)


def phase_step(value: int | float, total_steps: int) -> int:
    """A SAM phase bound given to an entry point as a step number (an int) or as a fraction
    of the run (a float in [0, 1]: 0.75 is the start of the last quarter)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"a SAM phase bound must be a step or a fraction, got {value!r}")
    if isinstance(value, int):
        return value
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"a SAM phase bound given as a fraction must be in [0, 1], got {value}")
    return round(value * total_steps)
