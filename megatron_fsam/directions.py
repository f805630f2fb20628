"""Where the ascent points (`SAMConfig.ascent`): d in eps = rho * P d / N.

"gradient" is the paper's d = g, this step's pass-1 gradient. The other two are known before
the step, so the step needs no backward at theta: "previous" is the gradient the optimizer
applied at the previous step (this rank's shard, kept between steps), "momentum" Adam's first
moment exp_avg (read from the optimizer, nothing kept). Each writes d into the gradient
shards, where the norm sums, the preconditioner and the perturbation read g.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from megatron_fsam.backends.shards import RankShards, ShardBackend
from megatron_fsam.config import SAMConfig

logger = logging.getLogger("megatron_fsam")


class Direction:
    """This step's gradient (the paper): it is in the gradient shards after pass 1."""

    known_before_the_step = False

    def ready(self) -> bool:
        """Whether a SAM step can take this direction now (else it is a plain step)."""
        return True

    def load(self, shards: RankShards, backend: ShardBackend) -> None:
        """Write d into `shards.all.grads`."""

    def applied(self, gradients: Callable[[], list[torch.Tensor]]) -> None:
        """The optimizer is about to apply `gradients()` (plain and SAM steps alike; read only
        where the direction keeps it)."""

    def skipped(self) -> None:
        """The step changed nothing."""

    def state_dict(self) -> dict[str, Any]:
        """What every rank holds alike."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def rank_state_dict(self) -> dict[str, Any]:
        """This rank's own part (its shard of a kept direction)."""
        return {}

    def load_rank_state_dict(self, state: dict[str, Any] | None) -> None:
        """`state` None: saved in another layout, whose shards are not this rank's."""


class PreviousGradient(Direction):
    """The gradient applied at the previous step; none after a skipped step."""

    known_before_the_step = True

    def __init__(self) -> None:
        self.kept: list[torch.Tensor] | None = None

    def ready(self) -> bool:
        return self.kept is not None

    def load(self, shards: RankShards, backend: ShardBackend) -> None:
        torch._foreach_copy_(shards.all.grads, self.kept)

    def applied(self, gradients: Callable[[], list[torch.Tensor]]) -> None:
        grads = gradients()
        if self.kept is None or [k.shape for k in self.kept] != [g.shape for g in grads]:
            self.kept = [torch.empty_like(g, dtype=torch.float32) for g in grads]
        torch._foreach_copy_(self.kept, grads)

    def skipped(self) -> None:
        self.kept = None

    def rank_state_dict(self) -> dict[str, Any]:
        return {"kept": self.kept}

    def load_rank_state_dict(self, state: dict[str, Any] | None) -> None:
        """None (another layout): no direction, so the next step is a plain one."""
        self.kept = None if state is None else state.get("kept")
        if self.kept is None:
            logger.warning(
                "megatron_fsam: the checkpoint holds no previous gradient for this rank (saved "
                "in another layout, or before any step): the next step is a plain one"
            )


class FirstMoment(Direction):
    """Adam's exp_avg, which exists once the optimizer has applied a step."""

    known_before_the_step = True

    def __init__(self) -> None:
        self.steps_applied = 0

    def ready(self) -> bool:
        return self.steps_applied > 0

    def load(self, shards: RankShards, backend: ShardBackend) -> None:
        torch._foreach_copy_(shards.all.grads, backend.first_moments())

    def applied(self, gradients: Callable[[], list[torch.Tensor]]) -> None:
        self.steps_applied += 1

    def state_dict(self) -> dict[str, Any]:
        return {"steps_applied": self.steps_applied}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps_applied = int(state.get("steps_applied", 0))


def direction_for(cfg: SAMConfig) -> Direction:
    return {"gradient": Direction, "previous": PreviousGradient, "momentum": FirstMoment}[
        cfg.ascent
    ]()


# ----- a rank's part of the state in checkpoint folders -----------------------------------


def rank_state_path(folder: str | os.PathLike) -> Path:
    """This rank's file of the SAM state in a checkpoint folder, for formats with no per-rank
    object of their own (DeepSpeed's, the HF Trainer's)."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    return Path(folder) / f"megatron_fsam_rank{rank:05d}.pt"


def save_rank_state(state: dict[str, Any], folder: str | os.PathLike) -> None:
    """Writes `sam.rank_state_dict()` into the folder (nothing when there is none)."""
    if state:
        torch.save(state, rank_state_path(folder))


def load_rank_state(folder: str | os.PathLike) -> dict[str, Any] | None:
    """What `save_rank_state` wrote for this rank, for `sam.load_rank_state_dict()`; None
    where the folder holds none for it."""
    path = rank_state_path(folder)
    return torch.load(path, weights_only=True) if path.is_file() else None
