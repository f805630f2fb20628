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
            "replay": replay.replaying,
        }

        def run_pass(losses: LossCapture, source: str) -> list[Any]:
            return self.forward_backward_func(
                forward_step_func=losses.wrap(forward_step_func),
                data_iterator=sources[source](),
                model=self.model,
                num_microbatches=num_microbatches,
                seq_length=seq_length,
                micro_batch_size=micro_batch_size,
                decoder_seq_length=decoder_seq_length,
                forward_only=False,
                **schedule_kwargs,
            )

        return self._run(run_pass, log_step=log_step)
