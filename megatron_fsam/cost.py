"""What a step costs, in forward-equivalents: a forward 1, a backward 2, so a plain step 3.

A SAM step of the paper is two forward-backward passes (6), the exact ANGLE-SAM form three
(9). With a direction known before the step (`SAMConfig.ascent` "previous" / "momentum"),
sam is one forward-backward at theta + eps (3) and fsam a forward at theta plus a
forward-backward at theta + eps (4). Full activation recomputation adds a forward to every
backward. `passes` in the step metrics is a step's cost over a plain step's.
"""

from __future__ import annotations

from megatron_fsam.config import SAMConfig
from megatron_fsam.modes import recipe_for
from megatron_fsam.schedules import is_sam_step, rho_at

FORWARD, BACKWARD = 1.0, 2.0
PLAIN = (True,)  # one pass, with a backward


def sam_passes(cfg: SAMConfig) -> tuple[bool, ...]:
    """The passes of a SAM step of `cfg`, each True where it back-propagates through the
    network: the paper's form runs the recipe's passes in full; with a known direction the
    clean pass is a forward (where c(theta) is needed at all) and pass 2 on stay in full."""
    recipe = recipe_for(cfg)
    if not cfg.stale_ascent:
        return (True,) * recipe.passes
    clean = (False,) if recipe.needs_gate else ()
    return clean + (True,) * (recipe.passes - 1)


def flops(passes: tuple[bool, ...], recomputed_forwards: float = 0.0) -> float:
    """Forward-equivalents of `passes`; `recomputed_forwards` per backward (1: full activation
    recomputation)."""
    return sum(FORWARD + (BACKWARD + recomputed_forwards if full else 0.0) for full in passes)


def passes(step_passes: tuple[bool, ...], recomputed_forwards: float = 0.0) -> float:
    """A step's FLOPs over a plain step's (1 plain, 2 the paper's SAM, 4/3 fsam with a known
    direction)."""
    return flops(step_passes, recomputed_forwards) / flops(PLAIN, recomputed_forwards)


def planned_passes(cfg: SAMConfig, step: int) -> tuple[bool, ...]:
    """The passes the step after `step` completed steps will run, as `SAMStep` decides them
    (no skipped steps): plain outside SAM steps, on rho 0, and where a known direction does
    not exist yet (the run's first step)."""
    if rho_at(cfg, step) == 0.0 or not is_sam_step(cfg, step) or (cfg.stale_ascent and step == 0):
        return PLAIN
    return sam_passes(cfg)
