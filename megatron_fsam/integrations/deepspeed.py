"""SAM / Func-SAM on a DeepSpeed engine (ZeRO stages 0 to 3).

    engine, *_ = deepspeed.initialize(model=model, model_parameters=..., config=ds_config)
    sam = megatron_fsam.deepspeed.FuncSAM(SAMConfig(mode="fsam", precond=True), engine)
    for batches in loader:                 # gradient_accumulation_steps micro-batches
        loss = sam.train_step(batches, forward)   # forward(engine, batch) -> loss tensor
        sam.metrics                        # rho, eps_norm, loss_perturbed, skipped, ...

One `train_step` runs the engine's gradient-accumulation micro-batches through
`engine.backward` twice (three times for the exact ANGLE-SAM form), with the accumulation
boundary on the last micro-batch of each pass so that the engine reduces (ZeRO: reduce-
scatters) the gradients once per pass, and calls `engine.step()` once: DeepSpeed's gradient
clipping, optimizer and LR scheduler act on the SAM gradient. The logit gate sits on the
module named `lm_head` or `output_layer` (or `SAMConfig.logits_module`).

Checkpoints: after `train_step` the engine holds theta (never theta + eps) at every stage, so
`engine.save_checkpoint(dir, client_state={"sam": sam.state_dict()})` saves a resumable state;
after `engine.load_checkpoint(dir)`, `sam.load_state_dict(client_state["sam"])`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from megatron_fsam.backends.deepspeed import DeepSpeedBackend
from megatron_fsam.config import SAMConfig
from megatron_fsam.step import LossCapture, SAMStep

LOGITS_MODULES = ("lm_head", "output_layer")
Forward = Callable[[Any, Any], torch.Tensor]


class FuncSAM(SAMStep):
    """The SAM step around a DeepSpeed engine built by `deepspeed.initialize`."""

    def __init__(self, config: SAMConfig, engine) -> None:
        config.validate()
        self.engine = engine
        backend = DeepSpeedBackend(engine)
        if config.precond and config.sam_enabled:
            backend.check_second_moments()
        super().__init__(
            config, backend, [engine.module], last_stage=True, logits_names=LOGITS_MODULES
        )
        self.metrics: dict[str, float | None] = {}

    def train_step(
        self, batches: Sequence[Any], forward: Forward, *, log_step: bool = False
    ) -> float | None:
        """One optimizer step over `batches` (this rank's gradient-accumulation micro-batches);
        returns the mean clean (pass-1) loss. `forward(engine, batch)` returns a micro-batch's
        loss. The step's metrics are in `self.metrics` (`log_step` adds eps_top_share)."""
        batches = list(batches)
        accumulation = self.engine.gradient_accumulation_steps()
        if len(batches) != accumulation:
            raise ValueError(
                f"megatron_fsam: train_step got {len(batches)} micro-batches, but the engine "
                f"accumulates {accumulation} (gradient_accumulation_steps)"
            )

        def run_pass(losses: LossCapture, source: str) -> None:
            last = len(batches) - 1
            for index, batch in enumerate(batches):
                self.engine.set_gradient_accumulation_boundary(index == last)
                loss = forward(self.engine, batch)
                self.engine.backward(loss)
                losses.add(loss)

        _, grad_norm, _, metrics = self._run(run_pass, log_step=log_step)
        self.metrics = {**metrics, "applied_grad_norm": grad_norm}
        return metrics["loss_clean"]
