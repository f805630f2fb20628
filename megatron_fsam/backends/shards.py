"""What every optimizer layout gives the SAM step: this rank's shards, and collectives on them.

A backend (Megatron-core's optimizers, DeepSpeed's engine) lists this rank's shards as
`ShardEntry`s: the optimizer's fp32 theta, its reduced gradient, what the model reads, and
where Adam keeps the second moment. `ShardBackend` turns them into the kernels' `Shards`
(copying theta where the model reads the optimizer's own tensor), attaches the second
moments and the precond floor, and owns the few collectives the step needs: the norm sums,
the finiteness vote and the floor's RMS.

Each shard's sums are reduced over its `stats_group`: the ranks that together hold each
coordinate of its sub-optimizer once. Most layouts have one such group; a mixture-of-experts
model without the distributed optimizer has two (dense params over the model-parallel ranks,
experts over the expert-model-parallel ranks, as Megatron reduces their grad norms). Every
collective then runs once per distinct group, in the same order on every rank, and the
per-group totals are added: each coordinate of the model counts exactly once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Protocol

import torch
from torch.distributed.tensor import DTensor

from megatron_fsam.kernels import Kernels, Shards
from megatron_fsam.kernels.concentration import summed_over_groups
from megatron_fsam.kernels.torch_ops import nonnegative_sums
from megatron_fsam.perturbation import NormSums

logger = logging.getLogger("megatron_fsam")


class Restorable(Protocol):
    """A snapshot of some state that can be put back."""

    def restore(self) -> None: ...


@dataclass(frozen=True)
class ParamSpan:
    """The model parameter a shard belongs to and its flat range [start, stop) in it."""

    param: torch.nn.Parameter
    start: int
    stop: int


@dataclass
class ShardEntry:
    """One shard of theta on this rank.

    `main` is the optimizer's own tensor (the key of its state); the shard is its flat range
    `state_range` (all of it when None), where Adam's state is read too. `grad` and `target`
    are 1-D views of the reduced gradient and of what the model reads. `counted`: whether the
    shard enters global sums (each coordinate of the model exactly once over `stats_group`).
    """

    main: torch.Tensor
    grad: torch.Tensor
    target: torch.Tensor
    inner: torch.optim.Optimizer
    span: ParamSpan
    counted: bool = True
    state_range: tuple[int, int] | None = None
    stats_group: int = 0  # index into the backend's stats_groups
    param_group: dict | None = None  # inner's param group (None: the one that lists `main`)

    @property
    def theta(self) -> torch.Tensor:
        flat = local(self.main).detach().view(-1)
        return flat if self.state_range is None else flat[slice(*self.state_range)]

    @property
    def aliased(self) -> bool:
        """True when the model reads the optimizer's param itself (fp32 params)."""
        return self.theta.data_ptr() == self.target.data_ptr() and self.main.dtype == (
            self.target.dtype
        )


@dataclass
class RankShards:
    """All of this rank's shards, the subset whose theta lives in a copy, and which shards
    sum over which of the backend's stats groups."""

    all: Shards
    aliased: Shards
    spans: list[ParamSpan]
    group_of: list[int]  # each shard's stats group
    members: list[list[int]]  # the shards of each stats group


class ShardBackend:
    """The layout-independent half of a backend; subclasses list the entries and move params.

    Subclasses provide `_entries()`, `_layout_key()` (what the entry views depend on: the
    layout is rebuilt when it changes, and at every use when it is None), how params reach
    the model (`sync_params()`, `publish_params()`) and the optimizer's side of a step
    (`zero_grads()`, `gradients()`, `optimizer_step()`).
    """

    def __init__(self, device: torch.device, stats_groups: list) -> None:
        self.device = device  # where this rank's collectives run, also when it holds no shard
        self.stats_groups = stats_groups  # distinct, in the same order on every rank
        self._cached: tuple[tuple, RankShards, list[ShardEntry]] | None = None

    # ----- what a layout provides -----------------------------------------------------

    def _entries(self) -> Iterator[ShardEntry]:
        raise NotImplementedError

    def _layout_key(self) -> tuple | None:
        raise NotImplementedError

    def sync_params(self) -> None:
        """Every rank's model reads the values just written into its shards (blocking)."""
        raise NotImplementedError

    def publish_params(self) -> None:
        """Every rank's next pass reads the values just written into the shards."""
        self.sync_params()

    def zero_grads(self) -> None:
        """Forget the gradients of the last pass (a pass then starts from zero)."""
        raise NotImplementedError

    def gradients(self, shards: RankShards) -> list[torch.Tensor]:
        """This rank's gradient shards as the optimizer will read them now (after a pass),
        aligned with `shards.all`; writing into them changes what the optimizer applies."""
        raise NotImplementedError

    def current_gradients(self) -> list[torch.Tensor]:
        """`gradients` of the shards as they are now (a plain step's, before its update)."""
        return self.gradients(self._layout()[0])

    def optimizer_step(self) -> tuple[bool, float | None, int | None]:
        """The optimizer's step on theta with the gradients in place: (ok, grad_norm,
        num_zeros_in_grad); it writes the new theta into what the model reads."""
        raise NotImplementedError

    def recomputed_forwards(self) -> float:
        """Forwards that activation recomputation adds to each backward (the step's FLOPs)."""
        return 0.0

    def replayed_state(self) -> list[Callable[[], Restorable]]:
        """Captures of model state besides the RNG that every pass of a step must start from
        as pass 1 did, and that the step must end with as pass 1 left it (none by default)."""
        return []

    def replaying(self, side_loss_weight: float = 1.0) -> AbstractContextManager[None]:
        """A pass after the first: the framework's own checks of non-finite results off (pass 2
        is at theta + eps), and loss terms that bypass the logits (mixture-of-experts router
        losses, whose cotangent is a constant) back-propagated with `side_loss_weight`."""
        return nullcontext()

    # ----- shards ---------------------------------------------------------------------

    def shards(self, precondition: bool, relative_floor: float = 0.0) -> RankShards:
        """This rank's shards after pass 1; theta is copied where the model aliases it.

        The shard lists are views into the optimizer's buffers, rebuilt when `_layout_key()`
        changes (or is None); the copies of aliased theta are filled at each call.
        With `relative_floor` > 0, sqrt(v_hat) is bounded below by relative_floor times its
        root-mean-square over the whole model (one more small all-reduce).
        """
        rank_shards, entries = self._layout()
        for theta, entry in zip(rank_shards.aliased.thetas, _aliased(entries), strict=True):
            theta.copy_(entry.theta)
        shards = rank_shards.all
        shards.directions.clear()  # the gradients are this step's: none holds P g yet
        if precondition:
            real = self._attach_second_moments(shards, entries)
            shards.precond_floor = (
                relative_floor * self._rms_sqrt_v(shards, real, rank_shards.members)
                if relative_floor
                else 0.0
            )
        else:
            shards.second_moments = shards.v_scales = shards.adam_eps = None
        return rank_shards

    def first_moments(self) -> list[torch.Tensor]:
        """Adam's exp_avg of each of this rank's shards (views, aligned with `shards().all`;
        zeros for a shard the optimizer has not stepped yet): `ascent="momentum"`'s d."""
        _, entries = self._layout()
        moments = []
        for entry in entries:
            state = entry.inner.state.get(entry.main, {})
            if "exp_avg" not in state:
                moments.append(torch.zeros_like(entry.grad, dtype=torch.float32))
                continue
            moments.append(_shard_state(entry, state, "exp_avg"))
        return moments

    def main_params(self) -> tuple[list[torch.Tensor], list[bool]]:
        """This rank's fp32 theta shards (1-D views) and whether each enters global norms."""
        _, entries = self._layout()
        return [e.theta for e in entries], [e.counted for e in entries]

    def _layout(self) -> tuple[RankShards, list[ShardEntry]]:
        key = self._layout_key()
        if key is None:
            return self._build_shards()
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, *self._build_shards())
        return self._cached[1], self._cached[2]

    def _build_shards(self) -> tuple[RankShards, list[ShardEntry]]:
        entries = list(self._entries())
        copies = {id(e): torch.empty_like(e.theta) for e in _aliased(entries)}  # see shards()
        shards = Shards(
            thetas=[copies.get(id(e), e.theta) for e in entries],
            grads=[e.grad for e in entries],
            targets=[e.target for e in entries],
            counted=[e.counted for e in entries],
        )
        aliased = Shards(
            thetas=[copies[id(e)] for e in _aliased(entries)],
            grads=[e.grad for e in _aliased(entries)],
            targets=[e.target for e in _aliased(entries)],
            counted=[e.counted for e in _aliased(entries)],
        )
        spans = [e.span for e in entries]
        group_of = [e.stats_group for e in entries]
        members = [
            [i for i, group in enumerate(group_of) if group == g]
            for g in range(len(self.stats_groups))
        ]
        rank_shards = RankShards(shards, aliased, spans, group_of, members)
        return rank_shards, entries

    # ----- collectives ----------------------------------------------------------------

    @property
    def stats_group(self):
        """The one group over which every shard's sums are reduced (most layouts)."""
        if len(self.stats_groups) != 1:
            raise ValueError(
                "megatron_fsam: this optimizer reduces gradient statistics over "
                f"{len(self.stats_groups)} process groups (experts without the distributed "
                "optimizer); this needs the distributed optimizer"
            )
        return self.stats_groups[0]

    def parts(self, rank_shards: RankShards) -> list[tuple]:
        """(the shards of one stats group, that group) for each group, in order."""
        if len(self.stats_groups) == 1:  # all of them: no subset to build at every step
            return [(rank_shards.all, self.stats_groups[0])]
        return [
            (rank_shards.all.subset(indices), group)
            for indices, group in zip(rank_shards.members, self.stats_groups, strict=True)
        ]

    def reduced_norm_sums(self, kernels: Kernels, rank_shards: RankShards) -> NormSums:
        """[||g||^2, ||P g||^2, g.P g] over the whole model: one all-reduce per stats group."""
        partials = [
            kernels.norm_sums(part).to(self.device)
            if len(part)
            else torch.zeros(3, dtype=torch.float32, device=self.device)
            for part, _ in self.parts(rank_shards)
        ]
        return NormSums.from_tensor(self.sum_over_groups(partials))

    def sum_over_groups(self, partials: list[torch.Tensor]) -> torch.Tensor:
        """Each stats group's partial sums, summed over its ranks, then added together."""
        return summed_over_groups(partials, self.stats_groups)

    def all_finite(self, grads: list[torch.Tensor], rank_shards: RankShards) -> bool:
        """Whether every rank's gradient shards are finite: one fused L2 norm (NaN and inf
        propagate; a norm beyond fp32's range counts as non-finite, as in the pass-1 sums and
        Megatron's own check; on the CPU a tenth of the max-norm's time) and one MAX all-reduce
        per stats group, one host sync."""
        found = []
        for indices in rank_shards.members:
            flag = torch.zeros(1, dtype=torch.float32, device=self.device)
            if indices:
                norms = torch.stack(torch._foreach_norm([grads[i] for i in indices]))
                flag = (~torch.isfinite(norms.max())).float().view(1).to(self.device)
            found.append(flag)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for flag, group in zip(found, self.stats_groups, strict=True):
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=group)
        return torch.cat(found).max().item() == 0.0

    # ----- second moments -------------------------------------------------------------

    def _rms_sqrt_v(self, shards: Shards, real: list[int], members: list[list[int]]) -> float:
        """sqrt(mean v_hat) over the counted coordinates of the whole model that have Adam
        state (the root-mean-square of sqrt(v_hat)): one all-reduce."""
        real_set = set(real)
        partials = []
        for indices in members:
            counted = [
                i
                for i in indices
                if i in real_set and shards.counted[i] and shards.second_moments[i].numel()
            ]
            local = torch.zeros(2, dtype=torch.float64, device=self.device)
            if counted:
                scales = [shards.v_scales[i] for i in counted]
                scaled = nonnegative_sums([shards.second_moments[i] for i in counted]).double()
                scaled *= torch.tensor(scales, dtype=torch.float64, device=scaled.device)
                local[0] = scaled.sum()
                local[1] = sum(shards.second_moments[i].numel() for i in counted)
            partials.append(local)
        total, count = self.sum_over_groups(partials).tolist()
        return math.sqrt(total / count) if count else 0.0

    def _attach_second_moments(self, shards: Shards, entries: list[ShardEntry]) -> list[int]:
        """Adam's exp_avg_sq per shard (P = 1 where there is none yet); returns the indices
        of the shards that have one."""
        moments, v_scales, eps, real = [], [], [], []
        missing = 0
        group_of = {
            id(p): g
            for inner in {id(e.inner): e.inner for e in entries}.values()
            for g in inner.param_groups
            for p in g["params"]
        }
        for entry in entries:
            group = entry.param_group or group_of[id(entry.main)]
            state = entry.inner.state.get(entry.main, {})
            step = _adam_step(state, group)
            if step == 0 or "exp_avg_sq" not in state:
                missing += 1  # P = 1 / (sqrt(1 * 1) + 0) = 1
                moments.append(torch.ones_like(entry.grad, dtype=torch.float32))
                v_scales.append(1.0)
                eps.append(0.0)
                continue
            real.append(len(moments))
            moments.append(_shard_state(entry, state, "exp_avg_sq"))
            v_scales.append(1.0 / (1.0 - group["betas"][1] ** step))
            eps.append(float(group["eps"]))
        if missing:
            log_once(
                "precond: no Adam second moments yet (before the first optimizer step); "
                "using P = 1 for the shards without them"
            )
        shards.second_moments, shards.v_scales, shards.adam_eps = moments, v_scales, eps
        return real


def _aliased(entries: list[ShardEntry]) -> list[ShardEntry]:
    return [e for e in entries if e.aliased]


def _shard_state(entry: ShardEntry, state: dict, name: str) -> torch.Tensor:
    """Adam's `name` tensor (exp_avg, exp_avg_sq) of the entry's shard: flat, and sliced to
    the shard where the optimizer's state covers more than this rank's part."""
    tensor = _adam_state(entry.inner, entry.main, state, name).view(-1)
    return tensor if entry.state_range is None else tensor[slice(*entry.state_range)]


def _adam_step(state: dict, group: dict) -> int:
    """Adam steps taken: torch keeps them per param, apex/TE FusedAdam per group."""
    step = state.get("step", group.get("step", 0))
    return int(step.item()) if torch.is_tensor(step) else int(step)


def _adam_state(
    inner: torch.optim.Optimizer, main: torch.Tensor, state: dict, name: str
) -> torch.Tensor:
    """exp_avg or exp_avg_sq in fp32; TE's FusedAdam may store them scaled in low precision."""
    if hasattr(inner, "get_unscaled_state"):
        return inner.get_unscaled_state(main, name)
    return local(state[name])


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2's params, gradients and optimizer state)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


_logged: set[str] = set()


def log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.warning("megatron_fsam: %s", message)


def mean_over_ranks(values: dict[str, float | None]) -> dict[str, float]:
    """Average each value over the ranks that have it (losses live on the last stage only).

    One all-reduce of [sums..., counts...]; every rank gets the result.
    """
    keys = sorted(values)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    packed = torch.zeros(2 * len(keys), dtype=torch.float64, device=device)
    for i, key in enumerate(keys):
        if values[key] is not None:
            packed[i], packed[len(keys) + i] = values[key], 1.0
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(packed)
    sums, counts = packed[: len(keys)].tolist(), packed[len(keys) :].tolist()
    return {k: s / c for k, s, c in zip(keys, sums, counts, strict=True) if c > 0}
