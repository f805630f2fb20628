"""cotangent_memory="recompute": keep the logits module's input, not the logit cotangent.

Func-SAM's pass 2 back-propagates the clean cotangent c(theta) through J(theta + eps).
Stored, c(theta) costs sequence x micro-batch x vocab/TP values per micro-batch; the hidden
state that enters the logits module costs sequence x micro-batch x hidden, 16 to 32 times
less at today's vocabularies. So pass 1 keeps, per micro-batch, that input h(theta) and,
once per step, this rank's shard of the module's weight W(theta) (the perturbation moves
it; with tied embeddings it is the embedding). In pass 2 the module's forward is followed
by a second one on (h(theta), W(theta)) without autograd, and its result z(theta) is written
into the logits tensor itself:

    value z(theta), graph z(theta + eps)'s:
        z(theta + eps) - stopgrad(z(theta + eps)) + stopgrad(z(theta))

without a second logits-sized tensor (the linear layer saved its input and weight, never its
output). The user's own loss (vocab-parallel cross entropy, per-token losses, masks) then
produces exactly c(theta) and back-propagates it through J(theta + eps): nothing about the
loss needs to be known. The price is one logits-module forward per micro-batch, and pass 2's
loss is the clean one.

The exact ANGLE-SAM form does the same in the other direction: pass 2 also keeps
(h(theta + eps), W(theta + eps)), and pass 3 at theta substitutes z(theta + eps), so that its
backward starts from c(theta + eps). The first-order form back-propagates a mix of both
cotangents in one pass, which needs the loss at both logits: it cannot recompute.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

import torch

from megatron_fsam.gate import LogitHook


def recompute_unsupported(module: torch.nn.Module) -> str | None:
    """Why `module`'s clean logits cannot be recomputed from its input and weight (or None)."""
    column_parallel = _column_parallel_linear()
    if column_parallel is None or not isinstance(module, column_parallel):
        return (
            f"the logits module is a {type(module).__name__}, not a Megatron ColumnParallelLinear"
        )
    if module.bias is not None and not module.skip_bias_add:
        return "the logits module adds a bias, which the perturbation moves and is not kept"
    if module.config.defer_embedding_wgrad_compute:
        return "defer_embedding_wgrad_compute buffers the logits module's inputs in its forward"
    return None


class InputStore:
    """Per micro-batch, the input of the logits module; once per step, its weight shard.

    The input is kept as the tensor the layer received (the linear layer saves it for its
    backward anyway, so keeping it costs nothing until pass 1's backward would free it);
    the weight is copied, since the perturbation is written into it.
    """

    def __init__(self) -> None:
        self.inputs: dict[int, torch.Tensor] = {}
        self.weight: torch.Tensor | None = None
        self._weight_source: torch.Tensor | None = None

    def keep(self, module: torch.nn.Module, index: int, args: tuple, kwargs: dict) -> None:
        self.inputs[index] = (args[0] if args else kwargs["input_"]).detach()
        weight = _weight(module, kwargs)
        if self.weight is None:
            self.weight, self._weight_source = weight.detach().clone(), weight
        elif weight is not self._weight_source:
            raise RuntimeError(
                "megatron_fsam: the logits module was called with two different weights in one "
                "pass; cotangent_memory='recompute' keeps one (use 'device')"
            )

    @torch.no_grad()
    def logits(self, module: torch.nn.Module, index: int, kwargs: dict) -> torch.Tensor:
        """The module's output on the kept input and weight (gathers as its forward does)."""
        if index not in self.inputs:
            raise RuntimeError(
                f"no kept logits input for micro-batch {index}: this pass saw more "
                "micro-batches than the one that kept them"
            )
        others = {k: v for k, v in kwargs.items() if k not in ("input_", "weight")}
        output = module.forward(self.inputs[index], weight=self.weight, **others)
        return output[0] if isinstance(output, tuple) else output

    def held_bytes(self) -> int:
        weight = self.weight.nbytes if self.weight is not None else 0
        return weight + sum(h.nbytes for h in self.inputs.values())

    def clear(self) -> None:
        self.inputs, self.weight, self._weight_source = {}, None, None


class RecomputeGate(LogitHook):
    """The logit gate of cotangent_memory="recompute": same passes as `LogitGate`, but it
    substitutes logits values in the forward instead of cotangents in the backward."""

    pass2_loss_is_clean = True  # pass 2's loss is computed on the substituted z(theta)

    def __init__(self, module: torch.nn.Module) -> None:
        reason = recompute_unsupported(module)
        if reason:
            raise ValueError(f"megatron_fsam: cotangent_memory='recompute': {reason}")
        super().__init__(module)
        self.clean = InputStore()
        self.perturbed = InputStore()

    @contextmanager
    def recording(self, forward_only: bool = False) -> Iterator[None]:
        """Keep each micro-batch's h(theta) and W(theta) (pass 1, a forward-only one too)."""
        self.clear()
        with self._pass(on_logits=self._keeper(self.clean), forward_only=forward_only):
            yield

    def mixing(
        self, perturbed: float, clean: float, keep_perturbed: bool = False
    ) -> AbstractContextManager[None]:
        """Pass 2 at theta + eps back-propagating c(theta) (the only mix that recomputes: (0, 1),
        or SAM's untouched (1, 0)); with keep_perturbed, also keep h and W at theta + eps."""
        if (perturbed, clean) == (1.0, 0.0) and not keep_perturbed:
            return self._pass()
        if (perturbed, clean) != (0.0, 1.0):
            raise ValueError(
                "megatron_fsam: cotangent_memory='recompute' back-propagates one cotangent per "
                f"pass; a mix of {perturbed:g} c(theta+eps) + {clean:g} c(theta) (the first-order "
                "angle form) needs them stored: use angle_impl='exact' or cotangent_memory='device'"
            )
        keep = self._keeper(self.perturbed) if keep_perturbed else None

        def substitute_clean(index: int, args: tuple, kwargs: dict, logits: torch.Tensor) -> None:
            if keep is not None:
                keep(index, args, kwargs, logits)
            _substitute(logits, self.clean.logits(self.module, index, kwargs))

        return self._pass(on_logits=substitute_clean)

    def replaying_perturbed(self) -> AbstractContextManager[None]:
        """Pass 3 at theta back-propagating c(theta + eps) (the exact angle form)."""

        def substitute_perturbed(index: int, args: tuple, kwargs: dict, logits) -> None:
            _substitute(logits, self.perturbed.logits(self.module, index, kwargs))

        return self._pass(on_logits=substitute_perturbed)

    def held_bytes(self) -> int:
        """Bytes of the kept inputs and weight copies."""
        return self.clean.held_bytes() + self.perturbed.held_bytes()

    def clear(self) -> None:
        self.clean.clear()
        self.perturbed.clear()

    def _keeper(self, store: InputStore):
        return lambda index, args, kwargs, logits: store.keep(self.module, index, args, kwargs)


def _column_parallel_linear() -> type | None:
    """Megatron's ColumnParallelLinear, or None where megatron-core is not loaded: a model
    built from it has imported it, and the front ends without Megatron must not import it."""
    layers = sys.modules.get("megatron.core.tensor_parallel.layers")
    return None if layers is None else layers.ColumnParallelLinear


def _weight(module: torch.nn.Module, kwargs: dict) -> torch.Tensor:
    """The weight of this call: passed in (tied embeddings) or the module's own."""
    weight = kwargs.get("weight")
    return module.weight if weight is None else weight


def _substitute(logits: torch.Tensor, value: torch.Tensor) -> None:
    """Give `logits` the value `value` and keep its autograd graph (see the module docstring)."""
    logits.detach().copy_(value)
