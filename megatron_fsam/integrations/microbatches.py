"""The SAM step for loops that hand it a step's micro-batches and a `forward(model, batch)`.

The DeepSpeed and PyTorch-native front ends differ only in how one micro-batch's loss is
back-propagated (`_backward`): through `engine.backward` with DeepSpeed's accumulation
boundary, or through `loss.backward()` with DDP/FSDP2's gradient sync on the last micro-batch;
and in how a forward-only clean pass back-propagates it to the logits (`_forward_only`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from megatron_fsam.gate import post_head_logit_transform
from megatron_fsam.step import LossCapture, SAMStep

Forward = Callable[[Any, Any], torch.Tensor]


class MicrobatchSAM(SAMStep):
    """`train_step(batches, forward)`: one optimizer step over this rank's micro-batches."""

    model: Any  # what `forward` is called with (a DeepSpeed engine, a module)

    def train_step(
        self, batches: Sequence[Any], forward: Forward, *, log_step: bool = False
    ) -> float | None:
        """One optimizer step over `batches` (this rank's gradient-accumulation micro-batches);
        returns the mean clean (pass-1) loss. `forward(model, batch)` returns a micro-batch's
        mean loss; the gradient is that of the mean over the step's micro-batches and ranks.
        The step's metrics are in `self.metrics` (`log_step` adds eps_top_share)."""
        batches = list(batches)
        self._check_batches(batches)

        def run_pass(losses: LossCapture, source: str) -> None:
            one_micro_batch = self._forward_only if source == "forward" else self._backward
            for index, batch in enumerate(batches):
                losses.add(one_micro_batch(forward, batch, index, len(batches)))

        _, grad_norm, _, metrics = self._run(run_pass, log_step=log_step)
        self.metrics = {**metrics, "applied_grad_norm": grad_norm}
        return metrics["loss_clean"]

    def _attach_gate(self, modules: list[torch.nn.Module], last_stage: bool, logits_names):
        """Refuse a model whose forward transforms the logits after the gated module
        (Hugging Face soft-capped logits) before building the gate."""
        for module in modules:
            reason = post_head_logit_transform(getattr(module, "module", module))
            if reason:
                raise ValueError(
                    f"megatron_fsam: mode={self.config.mode!r} needs the logits' cotangent: "
                    f"{reason}; use mode='sam', which needs no logit gate"
                )
        return super()._attach_gate(modules, last_stage, logits_names)

    def _check_batches(self, batches: list[Any]) -> None:
        if not batches:
            raise ValueError("megatron_fsam: train_step got no micro-batches")

    def _backward(self, forward: Forward, batch: Any, index: int, count: int) -> torch.Tensor:
        """Forward and backward of micro-batch `index` of `count`; returns its loss."""
        raise NotImplementedError

    def _forward_only(self, forward: Forward, batch: Any, index: int, count: int) -> torch.Tensor:
        """Forward of micro-batch `index` of `count` at theta without a graph through the
        network; its loss, scaled as `_backward` scales it, back-propagated to the logits
        (where the logit gate records c(theta)); returns the loss."""
        raise NotImplementedError
