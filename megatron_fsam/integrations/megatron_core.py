"""`megatron_fsam.FuncSAM`: the SAM step around Megatron-core's forward_backward_func.

    model = [DDP-wrapped chunks]; optimizer = get_megatron_optimizer(...)
    sam = megatron_fsam.FuncSAM(SAMConfig(mode="fsam", precond=True), model, optimizer)
    update_successful, grad_norm, losses_reduced, metrics = sam.train_step(
        forward_step_func, data_iterator, num_microbatches=..., seq_length=...,
        micro_batch_size=...)

Every pipeline schedule, the distributed optimizer or not, any tensor / pipeline / expert
layout: the backend (`backends/megatron.py`) finds this rank's shards.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_fsam.backends.megatron import MegatronBackend
from megatron_fsam.config import SAMConfig
from megatron_fsam.replay import MicrobatchReplay
from megatron_fsam.step import LossCapture, SAMStep, StepResult


class FuncSAM(SAMStep):
    """Drop-in replacement for a Megatron training step that adds SAM / Func-SAM.

    `model` is the list of DDP-wrapped model chunks and `optimizer` what
    `get_megatron_optimizer` returns; `train_step` takes what
    `get_forward_backward_func()` takes.
    """

    def __init__(
        self,
        config: SAMConfig,
        model: list[torch.nn.Module],
        optimizer: MegatronOptimizer,
        forward_backward_func: Callable | None = None,
    ) -> None:
        config.validate()
        self.model = list(model)
        self.optimizer = optimizer
        backend = MegatronBackend(self.model, optimizer)
        backend.check_grad_reduction()
        if config.stale_ascent and config.mode != "sam" and backend.model_config.mtp_num_layers:
            raise ValueError(
                f"megatron_fsam: ascent={config.ascent!r} with multi-token prediction: the "
                "forward-only clean pass records the main head's cotangent only; use "
                "ascent='gradient'"
            )
        if config.precond and config.sam_enabled:
            backend.check_second_moments()
        super().__init__(
            config,
            backend,
            self.model,
            last_stage=parallel_state.is_pipeline_last_stage(ignore_virtual=True),
            logits_names=("output_layer",),
        )
        self.forward_backward_func = forward_backward_func or get_forward_backward_func()

    def train_step(
        self,
        forward_step_func: Callable,
        data_iterator: Any,
        *,
        num_microbatches: int,
        seq_length: int,
        micro_batch_size: int,
        decoder_seq_length: int | None = None,
        log_step: bool = False,
        **schedule_kwargs: Any,
    ) -> StepResult:
        """One optimizer step; returns (update_successful, grad_norm, losses_reduced, metrics).

        `losses_reduced` are pass 1's (the clean loss), also on a skipped step. `log_step`
        adds the metrics that cost a little (`eps_top_share`: a few small all-reduces).
        `schedule_kwargs` go to every `forward_backward_func` call unchanged.
        """
        replay = MicrobatchReplay(data_iterator)
        sources = {
            "direct": lambda: data_iterator,
            "record": replay.recording,
            "forward": replay.recording,
            "replay": replay.replaying,
        }

        def run_pass(losses: LossCapture, source: str) -> list[Any]:
            step_func = losses.wrap(forward_step_func)
            to_logits = _LossesToLogits(self.backend.model_config) if source == "forward" else None
            with to_logits or contextlib.nullcontext():
                return self.forward_backward_func(
                    forward_step_func=to_logits.wrap(step_func) if to_logits else step_func,
                    data_iterator=sources[source](),
                    model=self.model,
                    num_microbatches=num_microbatches,
                    seq_length=seq_length,
                    micro_batch_size=micro_batch_size,
                    decoder_seq_length=decoder_seq_length,
                    forward_only=to_logits is not None,
                    **schedule_kwargs,
                )

        return self._run(run_pass, log_step=log_step)


class _LossesToLogits:
    """A forward-only pass's losses back-propagated to the logits, as the schedule would.

    `forward_backward_func(forward_only=True)` runs every pipeline stage's forwards and
    neither back-propagates nor keeps the losses. Here each micro-batch starts with grad off
    (no graph through the network; the logit gate turns it on for the loss), its output is
    kept after the schedule has scaled it in place (1 / tokens, 1 / micro-batches, the CP
    size) and back-propagated, times `grad_scale_func` as `backward_step` does, when the
    next micro-batch starts and after the last: the logits receive what a full backward
    would hand them, and nothing before them receives anything.
    """

    def __init__(self, model_config: Any) -> None:
        self.grad_scale_func = model_config.grad_scale_func
        self.pending: torch.Tensor | None = None
        self.grad_mode = torch.is_grad_enabled()

    def __enter__(self) -> _LossesToLogits:
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            if exc_info[0] is None:
                self.back_propagate()
        finally:
            self.pending = None
            torch.set_grad_enabled(self.grad_mode)

    def wrap(self, forward_step_func: Callable) -> Callable:
        @functools.wraps(forward_step_func)
        def forward_step(data_iterator, model, *args):
            self.back_propagate()
            torch.set_grad_enabled(False)
            output, loss_func = forward_step_func(data_iterator, model, *args)
            return output, functools.partial(self._keep, loss_func)

        return forward_step

    def _keep(self, loss_func: Callable, output_tensor: torch.Tensor, **kwargs):
        outputs = loss_func(output_tensor, **kwargs)
        if not kwargs and outputs[0].requires_grad:  # non_loss_data calls carry no loss
            self.pending = outputs[0]
        return outputs

    def back_propagate(self) -> None:
        if self.pending is None:
            return
        output, self.pending = self.pending, None
        if self.grad_scale_func is not None:
            output = self.grad_scale_func(output)
        torch.autograd.backward(output)
