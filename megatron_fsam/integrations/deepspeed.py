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
after `engine.load_checkpoint(dir)`, `sam.load_state_dict(client_state["sam"])`. With
`ascent="previous"` each rank also saves its shard of the kept direction (DeepSpeed writes
client_state from one rank) in a file of its own, as launch/pretrain_deepspeed.py does:
`save_rank_state(sam.rank_state_dict(), dir / tag)` after the engine's save, and
`sam.load_rank_state_dict(load_rank_state(dir / tag))` after its load (both in
`megatron_fsam.deepspeed`).
"""

from __future__ import annotations

import torch

from megatron_fsam.backends.deepspeed import DeepSpeedBackend
from megatron_fsam.config import SAMConfig
from megatron_fsam.integrations.microbatches import Forward, MicrobatchSAM

LOGITS_MODULES = ("lm_head", "output_layer")


class FuncSAM(MicrobatchSAM):
    """The SAM step around a DeepSpeed engine built by `deepspeed.initialize`."""

    def __init__(self, config: SAMConfig, engine, *, scale_wrt_gas: bool = True) -> None:
        """scale_wrt_gas=False: forward's loss is scaled already (a Trainer's), so the engine
        does not divide it by gradient_accumulation_steps, and a step may have fewer
        micro-batches (the end of an epoch)."""
        config.validate()
        if config.stale_ascent and engine.fp16_enabled():
            raise ValueError(
                f"megatron_fsam: ascent={config.ascent!r} on an fp16 engine: its clean pass "
                "back-propagates outside the engine's loss scaler; use bf16 or fp32"
            )
        self.engine = self.model = engine
        self.scale_wrt_gas = scale_wrt_gas
        backend = DeepSpeedBackend(engine)
        if config.precond and config.sam_enabled:
            backend.check_second_moments()
        super().__init__(
            config, backend, [engine.module], last_stage=True, logits_names=LOGITS_MODULES
        )
        self.metrics: dict[str, float | None] = {}

    def _check_batches(self, batches: list) -> None:
        super()._check_batches(batches)
        accumulation = self.engine.gradient_accumulation_steps()
        if self.scale_wrt_gas and len(batches) != accumulation:
            raise ValueError(
                f"megatron_fsam: train_step got {len(batches)} micro-batches, but the engine "
                f"accumulates {accumulation} (gradient_accumulation_steps)"
            )

    def _backward(self, forward: Forward, batch, index: int, count: int):
        """engine.backward with the accumulation boundary on the pass's last micro-batch (the
        engine scales the loss by 1 / gradient_accumulation_steps unless told otherwise)."""
        self.engine.set_gradient_accumulation_boundary(index == count - 1)
        loss = forward(self.engine, batch)
        self.engine.backward(loss, scale_wrt_gas=self.scale_wrt_gas)
        return loss

    def _forward_only(self, forward: Forward, batch, index: int, count: int):
        """The engine's module called directly (ZeRO-3 gathers its params through the module
        hooks; the engine's forward would hook the loss to run its gradient-reduction
        epilogue after any backward), under the engine's autocast, and the loss scaled as
        engine.backward scales it (1 / gradient_accumulation_steps) back-propagated to the
        logits only: no parameter gets a gradient."""
        from deepspeed.runtime.torch_autocast import autocast_if_enabled

        with torch.no_grad(), autocast_if_enabled(self.engine):  # the gate turns grad on
            loss = forward(self.engine.module, batch)
        if loss.requires_grad:
            scale = 1.0 / self.engine.gradient_accumulation_steps() if self.scale_wrt_gas else 1.0
            (loss * scale).backward()
        return loss
