"""FuncSAM: the two-pass SAM / Func-SAM step around Megatron's forward_backward_func.

One step, as in the paper (Singh et al. 2025, Eq. 2 and Eq. 11):

    pass 1   g = J(theta)^T c(theta)          record micro-batches, RNG, c(theta)
    ascent   eps = rho * P g / N              three sums, one all-reduce
    perturb  model <- theta + eps             written from fp32 theta, all-gathered
    pass 2   sam:  J(theta+eps)^T c(theta+eps)
             fsam: J(theta+eps)^T c(theta)    the recorded cotangent replayed
    update   optimizer.step() on theta        copying main -> model restores theta

A non-finite gradient in either pass skips the step and leaves the model at theta.
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_fsam.backends.megatron import MegatronBackend, RankShards
from megatron_fsam.config import SAMConfig
from megatron_fsam.gate import LogitGate, find_logits_module
from megatron_fsam.kernels import get_kernels, resolve_kernels
from megatron_fsam.perturbation import Ascent, ascent
from megatron_fsam.replay import MicrobatchReplay, RNGState
from megatron_fsam.schedules import rho_at

logger = logging.getLogger("megatron_fsam")

StepResult = tuple[bool, float | None, list[Any], dict[str, float | None]]


class FuncSAM:
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
        self.config = config
        self.model = list(model)
        self.optimizer = optimizer
        self.backend = MegatronBackend(self.model, optimizer)
        self.backend.check_grad_reduction()
        if config.precond and config.two_pass:
            self.backend.check_second_moments()
        self.kernels = get_kernels(config.kernels)
        resolve_kernels(config.kernels, self.backend.device)  # Triton's self-check: now, once
        self.gate = self._attach_gate() if config.mode == "fsam" else None
        self.forward_backward_func = forward_backward_func or get_forward_backward_func()
        self.iteration = 0
        self._clock: _PhaseClock | None = None

    # ----- the step -------------------------------------------------------------------

    def train_step(
        self,
        forward_step_func: Callable,
        data_iterator: Any,
        *,
        num_microbatches: int,
        seq_length: int,
        micro_batch_size: int,
        decoder_seq_length: int | None = None,
        **schedule_kwargs: Any,
    ) -> StepResult:
        """One optimizer step; returns (update_successful, grad_norm, losses_reduced, metrics).

        `losses_reduced` are pass 1's (the clean loss), also on a skipped step.
        `schedule_kwargs` go to every `forward_backward_func` call unchanged.
        """
        rho = rho_at(self.config, self.iteration)
        clock = self._clock = _PhaseClock()
        pass1_losses, pass2_losses = _LossCapture(), _LossCapture()

        def run_pass(losses: _LossCapture, batches: Any) -> list[Any]:
            return self.forward_backward_func(
                forward_step_func=losses.wrap(forward_step_func),
                data_iterator=batches,
                model=self.model,
                num_microbatches=num_microbatches,
                seq_length=seq_length,
                micro_batch_size=micro_batch_size,
                decoder_seq_length=decoder_seq_length,
                forward_only=False,
                **schedule_kwargs,
            )

        self._zero_grads()
        if not self.config.two_pass or rho == 0.0:
            losses_reduced = run_pass(pass1_losses, data_iterator)
            clock.lap("pass1")
            ok, grad_norm, num_zeros = self.optimizer.step()
            clock.lap("optimizer")
            self.iteration += 1
            metrics = self._metrics(rho, None, pass1_losses, None, ok, num_zeros)
            return ok, grad_norm, losses_reduced, metrics

        # Pass 1 at theta: g, and (fsam) the clean logit cotangent c(theta).
        replay = MicrobatchReplay(data_iterator)
        rng_before = RNGState.capture()
        with self.gate.recording() if self.gate else nullcontext():
            losses_reduced = run_pass(pass1_losses, replay.recording())
        rng_after = RNGState.capture()
        clock.lap("pass1")

        # Ascent direction from the reduced sums; a non-finite g skips the step.
        shards = self.backend.shards(precondition=self.config.precond)
        sums = self.backend.reduced_norm_sums(self.kernels, shards.all)
        if not sums.finite:
            return self._skip(
                rho, None, pass1_losses, losses_reduced, "pass-1 gradient is not finite"
            )
        step = ascent(sums, rho, self.config.precond_norm)
        self.kernels.perturb(shards.all, step.scale)
        self.backend.publish_perturbation()
        clock.lap("perturb")

        # Pass 2 at theta + eps on the same micro-batches and dropout masks. Its non-finite
        # values are SAM's to handle (a skip), not Megatron's result validation's.
        self._zero_grads()
        rng_before.restore()
        replay_cotangents = self.gate.replaying() if self.gate else nullcontext()
        with replay_cotangents, self.backend.validation_paused():
            run_pass(pass2_losses, replay.replaying())
        rng_after.restore()
        if self.gate:
            self.gate.clear()
        self.kernels.restore(shards.aliased)  # theta back where the optimizer reads it
        clock.lap("pass2")
        if not self.backend.all_finite(shards.all.grads):
            self._restore(shards)
            return self._skip(
                rho, step, pass1_losses, losses_reduced, "pass-2 gradient is not finite"
            )

        # The optimizer updates theta (never theta + eps) and copies it back to the model.
        ok, grad_norm, num_zeros = self.optimizer.step()
        if not ok:
            self._restore(shards)
        clock.lap("optimizer")
        self.iteration += 1
        metrics = self._metrics(rho, step, pass1_losses, pass2_losses, ok, num_zeros)
        return ok, grad_norm, losses_reduced, metrics

    def phase_times(self) -> dict[str, float]:
        """Seconds of each phase of the last step (`time_pass1`, `time_perturb`, ...).

        On a GPU the phases are timed with CUDA events and read only here, once per log
        interval, so that timing never stalls a step.
        """
        return self._clock.seconds() if self._clock else {}

    # ----- checkpointing --------------------------------------------------------------

    def state_dict(self) -> dict[str, int]:
        return {"iteration": self.iteration}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.iteration = int(state["iteration"])

    # ----- internals ------------------------------------------------------------------

    def _attach_gate(self) -> LogitGate | None:
        """The logit gate on the last stage; refuses on every rank if it is missing."""
        module = find_logits_module(self.model, self.config.logits_module)
        missing = module is None and parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        flag = torch.tensor([float(missing)], device=_device(self.model))
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() > 0:
            name = self.config.logits_module or "output_layer"
            raise ValueError(
                f"megatron_fsam: mode='fsam' needs the module producing the logits, but no "
                f"module named {name!r} was found on the last pipeline stage; set "
                "SAMConfig.logits_module"
            )
        if module is None:
            return None
        return LogitGate(module, offload=self.config.cotangent_offload)

    def _zero_grads(self) -> None:
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()

    def _restore(self, shards: RankShards) -> None:
        self.kernels.restore(shards.all)
        self.backend.sync_params()

    def _skip(
        self,
        rho: float,
        step: Ascent | None,
        losses: _LossCapture,
        losses_reduced: list[Any],
        reason: str,
    ) -> StepResult:
        if self.gate:
            self.gate.clear()
        logger.warning("megatron_fsam: skipping step %d: %s", self.iteration, reason)
        self.iteration += 1
        return False, None, losses_reduced, self._metrics(rho, step, losses, None, False)

    def _metrics(
        self,
        rho: float,
        step: Ascent | None,
        clean: _LossCapture,
        perturbed: _LossCapture | None,
        ok: bool,
        num_zeros_in_grad: int | None = None,
    ) -> dict[str, float | None]:
        return {
            "rho": rho,
            "grad_norm": step.grad_norm if step else None,
            "eps_norm": step.eps_norm if step else 0.0,
            "loss_clean": clean.mean(),
            "loss_perturbed": perturbed.mean() if perturbed else None,
            "skipped": float(not ok),
            "passes": 2.0 if step else 1.0,
            "num_zeros_in_grad": num_zeros_in_grad,
        }


class _LossCapture:
    """Keeps each micro-batch's loss (before the schedule rescales it) for logging."""

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.num_tokens: list[torch.Tensor] = []

    def wrap(self, forward_step_func: Callable) -> Callable:
        @functools.wraps(forward_step_func)
        def forward_step(data_iterator, model, *args):
            output, loss_func = forward_step_func(data_iterator, model, *args)
            return output, functools.partial(self._loss, loss_func)

        return forward_step

    def _loss(self, loss_func: Callable, output_tensor: torch.Tensor, **kwargs):
        outputs = loss_func(output_tensor, **kwargs)
        if not kwargs:  # non_loss_data calls carry no loss
            self.losses.append(outputs[0].detach().float().clone())
            if len(outputs) == 3:
                self.num_tokens.append(torch.as_tensor(outputs[1]).detach().float().clone())
        return outputs

    def mean(self) -> float | None:
        """Mean loss of this rank's micro-batches (None off the last pipeline stage)."""
        if not self.losses:
            return None
        total = torch.stack([loss.sum() for loss in self.losses]).sum()
        if self.num_tokens:
            return (total / torch.stack(self.num_tokens).sum().clamp(min=1)).item()
        return (total / len(self.losses)).item()


class _PhaseClock:
    """Time of each phase of a step: host timestamps on the CPU, CUDA events on a GPU.

    Events are recorded on the stream without waiting for it; `seconds()` waits for the
    last one, so only the caller who reads the times pays for a synchronisation.
    """

    def __init__(self) -> None:
        self._events = torch.cuda.is_available()
        self._marks: list[tuple[str, Any]] = [("start", self._now())]

    def lap(self, phase: str) -> None:
        self._marks.append((phase, self._now()))

    def seconds(self) -> dict[str, float]:
        if self._events:
            self._marks[-1][1].synchronize()
        return {
            f"time_{phase}": self._elapsed(start, end)
            for (_, start), (phase, end) in itertools.pairwise(self._marks)
        }

    def _now(self) -> Any:
        if not self._events:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _elapsed(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end) / 1e3 if self._events else end - start


def _device(model: list[torch.nn.Module]) -> torch.device:
    return next(model[0].parameters()).device
