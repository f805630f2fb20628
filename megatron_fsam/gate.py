"""The logit gate: identity forward, programmable backward at the logits.

Func-SAM needs the backward pass at theta+eps to start from the clean logit
cotangent c(theta) instead of its own. A forward hook on the module producing the
logits routes them through `_Gate`, whose backward either records the incoming
cotangent or replaces it. Cotangents are keyed by micro-batch index (the order of
the logits module's forward calls), which stays correct under 1F1B and
interleaved schedules where backward order differs from forward order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

Rewrite = Callable[[int, torch.Tensor], torch.Tensor]


class _Gate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, gate: LogitGate, index: int) -> torch.Tensor:
        ctx.gate, ctx.index = gate, index
        # A new tensor, not a view: Megatron's vocab-parallel cross entropy edits it in place.
        return logits.clone()

    @staticmethod
    def backward(ctx, cotangent: torch.Tensor):
        return ctx.gate._on_backward(ctx.index, cotangent), None, None


class LogitGate:
    """Records or rewrites dL/dlogits per micro-batch; idle outside a pass."""

    def __init__(self, module: torch.nn.Module, offload: bool = False) -> None:
        self.module = module
        self.offload = offload
        self.cotangents: dict[int, torch.Tensor] = {}
        self._rewrite: Rewrite | None = None
        self._active = False
        self._forward_count = 0
        self._handle = module.register_forward_hook(self._on_forward)

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Store each micro-batch's incoming cotangent (pass 1)."""
        self.cotangents = {}
        with self._pass(self._record):
            yield

    @contextmanager
    def rewriting(self, rewrite: Rewrite) -> Iterator[None]:
        """Back-propagate rewrite(index, incoming) instead of the incoming cotangent."""
        with self._pass(rewrite):
            yield

    def replay_recorded(self, index: int, incoming: torch.Tensor) -> torch.Tensor:
        """Rewrite that substitutes the cotangent recorded for this micro-batch."""
        try:
            recorded = self.cotangents[index]
        except KeyError:
            raise RuntimeError(
                f"no recorded logit cotangent for micro-batch {index}: pass 2 saw more "
                "micro-batches than pass 1"
            ) from None
        return recorded.to(device=incoming.device, dtype=incoming.dtype, non_blocking=True)

    def clear(self) -> None:
        self.cotangents = {}

    def remove(self) -> None:
        self._handle.remove()

    @contextmanager
    def _pass(self, rewrite: Rewrite) -> Iterator[None]:
        self._rewrite, self._active, self._forward_count = rewrite, True, 0
        try:
            yield
        finally:
            self._rewrite, self._active = None, False

    def _record(self, index: int, incoming: torch.Tensor) -> torch.Tensor:
        if self.offload and incoming.is_cuda:
            # Stream-ordered: the replay's host-to-device copy runs after this one.
            stored = torch.empty(incoming.shape, dtype=incoming.dtype, pin_memory=True)
            stored.copy_(incoming.detach(), non_blocking=True)
        else:
            stored = incoming.detach().clone()
        self.cotangents[index] = stored
        return incoming

    def _on_backward(self, index: int, incoming: torch.Tensor) -> torch.Tensor:
        if self._rewrite is None:
            return incoming
        return self._rewrite(index, incoming)

    def _on_forward(self, module: torch.nn.Module, args: tuple, output):
        if not self._active or not torch.is_grad_enabled():
            return None
        index = self._forward_count
        self._forward_count += 1
        if isinstance(output, tuple):  # Megatron linear layers return (output, bias)
            return (_Gate.apply(output[0], self, index), *output[1:])
        return _Gate.apply(output, self, index)


def find_logits_module(
    model_chunks: list[torch.nn.Module], name: str | None
) -> torch.nn.Module | None:
    """The module producing logits: `name` (exact or dotted suffix) or Megatron's output_layer."""
    target = name or "output_layer"
    for chunk in model_chunks:
        for module_name, module in chunk.named_modules():
            if module_name == target or module_name.endswith("." + target):
                return module
    return None
