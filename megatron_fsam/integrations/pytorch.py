"""SAM / Func-SAM in a plain PyTorch loop: one process, DDP, or FSDP2 (`fully_shard`).

    model = DistributedDataParallel(model)          # or fully_shard(...), or nothing
    optimizer = torch.optim.AdamW(model.parameters(), lr=...)
    sam = megatron_fsam.pytorch.FuncSAM(SAMConfig(mode="fsam", precond=True), model, optimizer,
                                        clip_grad_norm=1.0)
    for batches in loader:                          # this rank's micro-batches of one step
        loss = sam.train_step(batches, forward)     # forward(model, batch) -> mean loss
        scheduler.step()                            # the LR scheduler stays the caller's
        sam.metrics                                 # rho, eps_norm, loss_perturbed, skipped, ...

One `train_step` back-propagates each micro-batch's loss / len(batches), twice (three times
for the exact ANGLE-SAM form), with DDP's or FSDP2's gradient reduction only on each pass's
last micro-batch, so the gradient is that of the mean loss over the step's micro-batches and
all data-parallel ranks; then it clips the SAM gradient to `clip_grad_norm` (if given) and
calls `optimizer.step()` once. The logit gate sits on the module named `lm_head` or
`output_layer` (or `SAMConfig.logits_module`). fp16 with a GradScaler is refused.

A loop that steps the optimizer itself (a Trainer: its clipping, optimizer and scheduler)
passes `step_optimizer=False`: after `train_step` the params are theta and `param.grad` holds
the SAM gradient (None everywhere on a skipped step, so that its optimizer step changes
nothing), and `backward=` back-propagates each micro-batch's loss as that loop does (e.g.
`accelerator.backward` of a loss its forward has scaled already).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from megatron_fsam.backends.pytorch import TorchBackend
from megatron_fsam.config import SAMConfig
from megatron_fsam.integrations.microbatches import Forward, MicrobatchSAM

LOGITS_MODULES = ("lm_head", "output_layer")


class FuncSAM(MicrobatchSAM):
    """The SAM step around a model and its `torch.optim` optimizer."""

    def __init__(
        self,
        config: SAMConfig,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        clip_grad_norm: float | None = None,
        step_optimizer: bool = True,
        backward: Callable[[torch.Tensor], None] | None = None,
    ) -> None:
        config.validate()
        self.model = model  # what forward is called with (a torch.compile wrapper, if any)
        self.optimizer = optimizer
        self._backward_loss = backward
        wrapped = getattr(model, "_orig_mod", model)  # torch.compile'd: the module inside
        backend = TorchBackend(wrapped, optimizer, clip_grad_norm, step_optimizer)
        if config.precond and config.sam_enabled:
            backend.check_second_moments()
        super().__init__(config, backend, [wrapped], last_stage=True, logits_names=LOGITS_MODULES)
        self.metrics: dict[str, float | None] = {}

    def train_step(self, batches, forward: Forward, *, log_step: bool = False) -> float | None:
        loss = super().train_step(batches, forward, log_step=log_step)
        if not self.backend.step_optimizer and self.metrics["skipped"]:
            self.backend.zero_grads()  # every param.grad None: the caller's step changes nothing
        return loss

    def _backward(self, forward: Forward, batch, index: int, count: int) -> torch.Tensor:
        with self.backend.gradient_sync(index == count - 1):
            loss = forward(self.model, batch)
            self._back_propagate(loss, count)
        return loss

    def _forward_only(self, forward: Forward, batch, index: int, count: int) -> torch.Tensor:
        # No gradient sync: no parameter receives a gradient in this pass.
        with self.backend.gradient_sync(False):
            with torch.no_grad():  # the logit gate switches grad on for the loss
                loss = forward(self.model, batch)
            if loss.requires_grad:
                self._back_propagate(loss, count)
        return loss

    def _back_propagate(self, loss: torch.Tensor, count: int) -> None:
        if self._backward_loss is None:
            (loss / count).backward()
        else:
            self._backward_loss(loss)
