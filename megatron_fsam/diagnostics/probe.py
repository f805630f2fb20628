"""Gradients of the global loss at theta + s v, in any TP/PP/DP layout, by plain passes.

Every diagnostic here is a finite difference of gradients or of logit cotangents, so it
needs no double backward and runs through Megatron's own autograd functions and schedules,
exactly as the Func-SAM step does: write theta + s v into the shards the model reads,
all-gather, run `forward_backward_func` on fixed micro-batches with the same dropout masks,
read the reduced gradient from this rank's shards.

Vectors in parameter space are lists of fp32 1-D tensors aligned with this rank's shards
(the optimizer's view: whole parameters, or their distributed-optimizer ranges). Global
inner products sum the counted shards (each parameter once) and reduce in one all-reduce per
stats group (one in most layouts; two for a mixture-of-experts model without the distributed
optimizer, whose experts sum over the expert-parallel ranks).

Mixture-of-experts models: every pass routes with the expert bias the probe found (megatron-core
would move it at the end of each pass), and the bias is left as found. The routers' load-
balancing and z-losses enter backward with a constant cotangent, not through the logits: a
pass that back-propagates a chosen logit cotangent (`side_losses=False`) leaves them out, so
J^T c is exactly that; passes of the loss's own gradient keep them (their curvature then counts
in H u, and in the Eq. 9 split on the functional side). Top-k routing is piecewise constant:
a finite-difference step that flips a token's experts adds a jump, so keep h small.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_fsam.backends.megatron import MegatronBackend
from megatron_fsam.backends.megatron_weights import full_shape, global_param_names, tp_slice
from megatron_fsam.backends.shards import ParamSpan, Restorable
from megatron_fsam.gate import LogitGate, Rewrite, find_logits_module
from megatron_fsam.kernels import Shards, get_kernels
from megatron_fsam.replay import RNGState

Vector = list[torch.Tensor]
Cotangents = dict[int, torch.Tensor]


@dataclass(frozen=True)
class ShardSpan:
    """Which parameter a shard belongs to: its global name and flat range in the local tensor."""

    name: str
    param: torch.nn.Parameter
    start: int
    stop: int


class ModelShards:
    """This rank's shards of theta under their global names; writes and exact restores.

    Entering takes the shards and keeps what the model reads, so leaving restores it bit for
    bit (whatever the precision of the params) and all-gathers it again. Where the model
    reads the optimizer's own fp32 params, the backend's copy of theta serves as the saved
    value; elsewhere (bf16 params beside fp32 main params) the params are copied.
    """

    def __init__(self, model_chunks: list[torch.nn.Module], optimizer: MegatronOptimizer) -> None:
        self.model_chunks = model_chunks
        self.optimizer = optimizer
        self.backend = MegatronBackend(model_chunks, optimizer)
        self.kernels = get_kernels("auto")

    def __enter__(self) -> ModelShards:
        self.backend.sync_params()  # the forward-free reads below see what the optimizer holds
        rank_shards = self.backend.shards(precondition=False)
        self.shards = rank_shards.all
        self.spans = _name_spans(rank_shards.spans, self.model_chunks)
        self.group_of = rank_shards.group_of  # each shard's stats group
        copied = {id(t) for t in rank_shards.aliased.targets}  # theta is a copy already
        self._saved = [
            theta if id(target) in copied else target.detach().clone()
            for theta, target in zip(self.shards.thetas, self.shards.targets, strict=True)
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()
        del self.shards, self.spans, self.group_of, self._saved

    # ----- writing theta -------------------------------------------------------------------

    def perturb(self, direction: Vector, step: float) -> None:
        """The model reads theta + step * direction (theta: the optimizer's fp32 values)."""
        shards = self.shards
        moved = Shards(shards.thetas, direction, shards.targets, shards.counted)
        self.kernels.perturb(moved, step)
        self.backend.sync_params()

    @torch.no_grad()
    def write(self, values: Vector) -> None:
        """The model reads `values` (cast to the params' dtype)."""
        torch._foreach_copy_(self.shards.targets, values)
        self.backend.sync_params()

    @torch.no_grad()
    def restore(self) -> None:
        """The model reads exactly what it read on entry."""
        torch._foreach_copy_(self.shards.targets, self._saved)
        self.backend.sync_params()

    # ----- vectors -------------------------------------------------------------------------

    def thetas(self) -> Vector:
        return list(self.shards.thetas)

    def grads(self) -> Vector:
        """An fp32 copy of the reduced gradient this rank holds."""
        return [g.detach().float().clone() for g in self.shards.grads]

    def dots(self, pairs: Sequence[tuple[Vector, Vector]]) -> list[float]:
        """Global <a, b> for each pair, every parameter counted once: one all-reduce per
        stats group."""
        groups = len(self.backend.stats_groups)
        local = torch.zeros(groups, len(pairs), dtype=torch.float64, device=self.backend.device)
        for i, (a, b) in enumerate(pairs):
            for x, y, counted, group in zip(a, b, self.shards.counted, self.group_of, strict=True):
                if counted and x.numel():
                    local[group, i] += torch.mul(x, y).sum(dtype=torch.float64)
        return self.reduce(list(local)).tolist()

    def reduce(self, partials: list[torch.Tensor]) -> torch.Tensor:
        """Each stats group's partial sums (in the backend's group order), summed over that
        group's ranks, then added together."""
        return self.backend.sum_over_groups(partials)

    def random(self, seed: int, kind: str = "rademacher") -> Vector:
        """A random vector that is the same in every layout.

        Each parameter's full (single-process) tensor is drawn from a generator seeded by
        `seed` and the parameter's global name; each rank keeps its TP slice and shard range.
        Copies of one parameter (TP duplicates, the tied embedding) thus get equal values.
        """
        if kind not in ("rademacher", "gaussian"):
            raise ValueError(f"unknown random vector kind {kind!r}")
        out = []
        for span in self.spans:
            if span is None:
                out.append(torch.zeros(0, dtype=torch.float32))
                continue
            generator = torch.Generator(device=span.param.device)
            generator.manual_seed(seed * 1_000_003 + zlib.crc32(span.name.encode()))
            full = torch.empty(full_shape(span.param), device=span.param.device)
            if kind == "rademacher":
                full.bernoulli_(0.5, generator=generator).mul_(2).sub_(1)
            else:
                full.normal_(generator=generator)
            local = tp_slice(full, span.param).reshape(-1)
            out.append(local[span.start : span.stop].clone())
        return out

    def zero_grads(self) -> None:
        for chunk in self.model_chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()


class GradientProbe(ModelShards):
    """Gradients (and logit cotangents) of the loss on fixed micro-batches at theta + s v.

    Used as a context manager: on exit theta is back bit for bit, the gradient buffers are
    zeroed and the RNG is where it was, so a training loop continues as if nothing ran.
    """

    def __init__(
        self,
        model_chunks: list[torch.nn.Module],
        optimizer: MegatronOptimizer,
        forward_step_func: Callable,
        batches: list[Any],
        *,
        num_microbatches: int,
        seq_length: int,
        micro_batch_size: int,
        logits_module: str | None = None,
    ) -> None:
        super().__init__(model_chunks, optimizer)
        self.backend.check_grad_reduction()
        self.forward_step_func = forward_step_func
        self.batches = batches
        self.schedule = dict(
            num_microbatches=num_microbatches,
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
        )
        self.logits_module = logits_module
        self.gate: LogitGate | None = None
        self._states: list[Restorable] = []

    def __enter__(self) -> GradientProbe:
        super().__enter__()
        # The RNG, and what the backend names besides (MoE routers' expert bias and token
        # counts, the router-loss trackers): every pass starts from it, and exit puts it back.
        self._states = [RNGState.capture()] + [c() for c in self.backend.replayed_state()]
        module = find_logits_module(self.model_chunks, (self.logits_module or "output_layer",))
        self.gate = LogitGate(module) if module is not None else None
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            super().__exit__(*exc)
            self.zero_grads()
            self._restore_states()
        finally:
            if self.gate is not None:
                self.gate.remove()
            self.gate = None

    def gradient(
        self,
        direction: Vector | None = None,
        step: float = 0.0,
        cotangent: Rewrite | None = None,
        *,
        side_losses: bool = True,
    ) -> Vector:
        """J(theta + step d)^T c for c = cotangent(index, incoming) (default: the loss's own).

        `cotangent` runs at the logits of the last stage; it may record the incoming
        cotangent c(theta + step d) and return another one. Theta is restored afterwards.
        `side_losses=False` leaves out the loss terms that bypass the logits (MoE router
        losses), for a pass whose result must be J^T c alone.
        """
        if direction is not None and step != 0.0:
            self.perturb(direction, step)
        self.zero_grads()
        self._restore_states()
        rewrite = self.gate.rewriting(cotangent) if self.gate and cotangent else nullcontext()
        with rewrite, self._side_losses(side_losses):
            get_forward_backward_func()(
                forward_step_func=self.forward_step_func,
                data_iterator=self._iterators(),
                model=self.model_chunks,
                forward_only=False,
                **self.schedule,
            )
        if direction is not None and step != 0.0:
            self.restore()
        return self.grads()

    def _restore_states(self) -> None:
        for state in self._states:
            state.restore()

    def _side_losses(self, keep: bool) -> AbstractContextManager[None]:
        return nullcontext() if keep else self.backend.replaying(side_loss_weight=0.0)

    def _iterators(self) -> Iterator[Any] | list[Iterator[Any]]:
        if len(self.model_chunks) > 1:  # interleaved schedule: one iterator per chunk
            return [iter(self.batches) for _ in self.model_chunks]
        return iter(self.batches)


def accumulate(store: Cotangents, sign: float = 1.0, replace: Cotangents | None = None) -> Rewrite:
    """store[index] += sign * incoming (the first pass stores it); back-propagate `replace`'s.

    Differences of cotangents build up in place, so a finite difference keeps one fp32
    copy of the last stage's logits-sized cotangents per micro-batch, not one per pass.
    `store` may be `replace` itself: its entry is read before it is updated.
    """

    def rewrite(index: int, incoming: torch.Tensor) -> torch.Tensor:
        out = incoming if replace is None else replace[index].to(incoming.dtype, copy=True)
        if index in store:
            store[index].add_(incoming.float(), alpha=sign)
        else:
            store[index] = incoming.detach().float() * sign
        return out

    return rewrite


def scaled(store: Cotangents, scale: float) -> Rewrite:
    """Back-propagate store[index] * scale instead of the incoming cotangent."""

    def rewrite(index: int, incoming: torch.Tensor) -> torch.Tensor:
        return (store[index] * scale).to(incoming.dtype)

    return rewrite


def combine(a: float, x: Vector, b: float, y: Vector) -> Vector:
    """a x + b y."""
    return [a * xi + b * yi for xi, yi in zip(x, y, strict=True)]


def _name_spans(
    spans: list[ParamSpan], model_chunks: list[torch.nn.Module]
) -> list[ShardSpan | None]:
    """Name every shard by its parameter's single-process name; empty shards get None."""
    names = {id(param): name for name, param in global_param_names(model_chunks).items()}
    return [
        ShardSpan(names[id(s.param)], s.param, s.start, s.stop) if s.stop > s.start else None
        for s in spans
    ]
