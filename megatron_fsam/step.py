"""The SAM / Func-SAM / ANGLE-SAM step (`SAMStep`), over any backend (optimizer layout).

The front ends that run it inside a training loop are in `integrations/`: Megatron-core's
forward_backward_func (`megatron_fsam.FuncSAM`), Megatron-LM, DeepSpeed engines, plain
PyTorch (one process, DDP, FSDP2) and the Hugging Face Trainer.

One step, as in the paper (Singh et al. 2025, Eq. 2, Eq. 11 and App. D):

    pass 1   g = J(theta)^T c(theta)          record micro-batches, RNG (expert bias), c(theta)
    ascent   eps = rho * P d / N              d = g; three sums, one all-reduce
    perturb  model <- theta + eps             written from fp32 theta, all-gathered
    pass 2   sam:   J(theta+eps)^T c(theta+eps)
             fsam:  J(theta+eps)^T c(theta)   the recorded cotangent replayed
             angle: J(theta+eps)^T [sin c(theta+eps) + (cos - sin) c(theta)] + (1 - cos) g
    [pass 3  angle, exact: J(theta)^T c(theta+eps) at theta, mixed per Eq. 19]
    update   optimizer step on theta          writing theta to the model restores it

`modes.py` holds what each mode back-propagates and mixes; the logit gate (`gate.py`, or
`recompute.py` under cotangent_memory="recompute") keeps c(theta) or what recomputes it.
`directions.py` holds d: with a direction known before the step (the previous step's applied
gradient, Adam's momentum) pass 1 is a forward at theta that only records c(theta), or is not
run at all (sam); `cost.py` counts what each step cost.
A non-finite g skips the step; a non-finite SAM gradient skips it too, or
(on_nonfinite="fallback") applies g as a plain step.
The model is left at theta either way. `sam_interval` / `sam_probability` make some steps
plain optimizer steps on g.
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch

from megatron_fsam.backends.shards import RankShards, Restorable, ShardBackend
from megatron_fsam.config import SAMConfig
from megatron_fsam.cost import PLAIN, flops, passes, sam_passes
from megatron_fsam.directions import direction_for
from megatron_fsam.gate import LogitGate, find_logits_module
from megatron_fsam.kernels import get_kernels, resolve_kernels
from megatron_fsam.kernels.concentration import grouped_top_share
from megatron_fsam.modes import recipe_for
from megatron_fsam.perturbation import Ascent, ascent
from megatron_fsam.recompute import RecomputeGate, recompute_unsupported
from megatron_fsam.replay import RNGState
from megatron_fsam.schedules import is_sam_step, rho_at

logger = logging.getLogger("megatron_fsam")

StepResult = tuple[bool, float | None, Any, dict[str, float | None]]
RunPass = Callable[["LossCapture", str], Any]
TOP_FRACTION = 1e-3  # eps_top_share: the share of ||eps||^2 in the largest 0.1% of coordinates


class SAMStep:
    """The SAM / Func-SAM / ANGLE-SAM step over any backend (optimizer layout).

    A training-loop adapter gives `_run` a `run_pass(losses, source)` that runs one
    forward-backward pass over the step's micro-batches: `source` is "direct" (the step's only
    pass), "record" (pass 1: keep the micro-batches for later passes), "forward" (pass 1 as a
    forward only: keep the micro-batches; the logit gate back-propagates the loss to the
    logits itself) or "replay" (the same micro-batches again). The backend zeroes, reads and
    applies the gradients.
    """

    def __init__(
        self,
        config: SAMConfig,
        backend: ShardBackend,
        modules: list[torch.nn.Module],
        *,
        last_stage: bool,
        logits_names: tuple[str, ...],
    ) -> None:
        config.validate()
        self.config = config
        self.recipe = recipe_for(config) if config.sam_enabled else None
        self.backend = backend
        self.kernels = get_kernels(config.kernels)
        resolve_kernels(config.kernels, backend.device)  # Triton's self-check: now, once
        needs_gate = self.recipe is not None and self.recipe.needs_gate
        self.gate = self._attach_gate(modules, last_stage, logits_names) if needs_gate else None
        self.direction = direction_for(config)
        self.recomputed_forwards = backend.recomputed_forwards()
        self.iteration = 0
        self.fallback_steps = 0
        self._clock: _PhaseClock | None = None

    # ----- the step -------------------------------------------------------------------

    def _run(self, run_pass: RunPass, *, log_step: bool) -> StepResult:
        """One optimizer step (see the module docstring); what `train_step` returns."""
        rho = rho_at(self.config, self.iteration)
        clock = self._clock = _PhaseClock()
        pass1_losses, pass2_losses = LossCapture(), LossCapture()

        def passing(losses: LossCapture, source: str) -> Any:
            self.backend.zero_grads()
            return run_pass(losses, source)

        sam_step = rho != 0.0 and is_sam_step(self.config, self.iteration)
        no_direction = sam_step and not self.direction.ready()  # d known before: none yet
        if not sam_step or no_direction:
            losses_reduced = passing(pass1_losses, "direct")
            clock.lap("pass1")
            self.direction.applied(self.backend.current_gradients)
            ok, grad_norm, num_zeros = self._optimizer_step()
            clock.lap("optimizer")
            return self._finish(
                ok, grad_norm, losses_reduced, rho, None, pass1_losses, num_zeros,
                no_direction=float(no_direction),
            )  # fmt: skip

        # Pass 1 at theta: g, and the clean logit cotangent c(theta) where the mode needs it.
        # With d known before the step, only c(theta) (a forward), or nothing (sam).
        recipe, passes_of_step = self.recipe, sam_passes(self.config)
        replay = _StateReplay([RNGState.capture, *self.backend.replayed_state()])
        pass1 = _pass1_source(passes_of_step, self.direction.known_before_the_step)
        losses_reduced = None
        if pass1:
            forward_only = pass1 == "forward"
            with self.gate.recording(forward_only) if self.gate else nullcontext():
                losses_reduced = passing(pass1_losses, pass1)
            if not forward_only:  # a forward moves no bias or history: pass 2 records them
                replay.recorded()
        clock.lap("pass1")

        # Ascent direction d (g, or written where g would be) from the reduced sums; a
        # non-finite d skips the step. The sums leave P d where d was (fp32 gradients): g is
        # copied first where the mode needs it.
        shards = self.backend.shards(self.config.precond, self.config.precond_floor)
        self.direction.load(shards, self.backend)
        g = _copies(shards.all.grads) if self._keeps_gradient() else None  # this rank's shard
        sums = self.backend.reduced_norm_sums(self.kernels, shards)
        if not sums.finite:
            ran = passes_of_step[:1] if pass1 else ()
            return self._skip(rho, None, pass1_losses, losses_reduced, "ascent direction", ran)
        step = ascent(sums, rho, self.config.precond_norm)
        measured = {"eps_top_share": self._eps_top_share(shards)} if log_step else {}
        self.kernels.perturb(shards.all, step.scale)
        self.backend.publish_params()
        clock.lap("perturb")

        held = self._held_bytes()
        # Pass 2 at theta + eps on the same micro-batches and dropout masks. Its non-finite
        # values are SAM's to handle (a skip or fallback), not the framework's result checks'.
        cotangent = (
            self.gate.mixing(recipe.perturbed, recipe.clean, keep_perturbed=recipe.pass3 != 0)
            if self.gate
            else nullcontext()
        )
        replayed = replay.replayed() if pass1 else nullcontext()
        with cotangent, replayed, self.backend.replaying(recipe.side_loss_weight):
            pass2_reduced = passing(pass2_losses, "replay" if pass1 else "direct")
        if not pass1:
            losses_reduced = pass2_reduced
        grads = self.backend.gradients(shards)
        clock.lap("pass2")
        if recipe.pass3:
            # Pass 3 at theta: J(theta)^T c(theta+eps), the logit term of Eq. 19 taken exactly.
            held = self._held_bytes()  # pass 2 kept the perturbed side too: the peak
            earlier = _mixed(recipe.pass2, grads, recipe.grad, g)
            self.kernels.restore(shards.all)
            self.backend.publish_params()
            perturbed_cotangent = self.gate.replaying_perturbed() if self.gate else nullcontext()
            with perturbed_cotangent, replay.replayed(), self.backend.replaying():
                passing(LossCapture(), "replay")
            grads = self.backend.gradients(shards)
            _scale_add_(grads, recipe.pass3, earlier)
            clock.lap("pass3")
        elif recipe.grad:
            torch._foreach_add_(grads, g, alpha=recipe.grad)
        if self.gate:
            self.gate.clear()
        self.kernels.restore(shards.aliased)  # theta back where the optimizer reads it

        fallback = False
        if not self.backend.all_finite(grads, shards):
            if self.config.on_nonfinite == "skip":
                self._restore(shards)
                return self._skip(
                    rho, step, pass1_losses, losses_reduced, "SAM gradient", passes_of_step
                )
            torch._foreach_copy_(grads, g)  # a plain step on g instead
            fallback = True
            self.fallback_steps += 1
            logger.warning(
                "megatron_fsam: step %d: SAM gradient is not finite, applying the pass-1 "
                "gradient as a plain step (fallback %d)",
                self.iteration,
                self.fallback_steps,
            )

        # The optimizer updates theta (never theta + eps) and writes it back to the model.
        self.direction.applied(lambda: grads)
        ok, grad_norm, num_zeros = self._optimizer_step()
        if not ok:
            self._restore(shards)
        clock.lap("optimizer")
        metrics_of_step = dict(measured, fallback=float(fallback), held_bytes=held)
        return self._finish(
            ok, grad_norm, losses_reduced, rho, step, pass1_losses, num_zeros,
            perturbed=None if fallback else pass2_losses, passes_of_step=passes_of_step,
            **metrics_of_step,
        )  # fmt: skip

    def phase_times(self) -> dict[str, float]:
        """Seconds of each phase of the last step (`time_pass1`, `time_perturb`, ...).

        On a GPU the phases are timed with CUDA events and read only here, once per log
        interval, so that timing never stalls a step.
        """
        return self._clock.seconds() if self._clock else {}

    # ----- checkpointing --------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The SAM state every rank holds alike (`rank_state_dict`: this rank's own part)."""
        state: dict[str, Any] = {"iteration": self.iteration, "fallback_steps": self.fallback_steps}
        if self.direction.known_before_the_step:
            state["direction"] = self.direction.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iteration = int(state["iteration"])
        self.fallback_steps = int(state.get("fallback_steps", 0))
        self.direction.load_state_dict(state.get("direction", {}))

    def rank_state_dict(self) -> dict[str, Any]:
        """This rank's part of the SAM state: its shard of the kept direction
        (`ascent="previous"`), to be saved per rank."""
        return self.direction.rank_state_dict()

    def load_rank_state_dict(self, state: dict[str, Any] | None) -> None:
        """This rank's part as saved; None where the checkpoint holds none for this rank (it
        was saved in another layout): a kept direction is then dropped, and the next step is
        a plain one."""
        self.direction.load_rank_state_dict(state)

    # ----- internals ------------------------------------------------------------------

    def _attach_gate(
        self, modules: list[torch.nn.Module], last_stage: bool, logits_names: tuple[str, ...]
    ) -> LogitGate | RecomputeGate | None:
        """The logit gate on the last stage; refuses on every rank if it cannot be built."""
        names = (self.config.logits_module,) if self.config.logits_module else logits_names
        module = find_logits_module(modules, names)
        problem = None
        if module is not None:
            memory, problem = self._cotangent_memory(module)
        elif last_stage:
            problem = (
                f"mode={self.config.mode!r} needs the module producing the logits, but no "
                f"module named {' or '.join(map(repr, names))} was found on the last "
                "pipeline stage; set SAMConfig.logits_module"
            )
        _raise_on_every_rank(problem, self.backend.device)
        if module is None:
            return None
        if memory == "recompute":
            return RecomputeGate(module)
        return LogitGate(module, offload=memory == "offload")

    def _cotangent_memory(self, module: torch.nn.Module) -> tuple[str, str | None]:
        """Where c(theta) waits ("auto" resolved: recompute where the module and the mode
        allow it), or why the cotangent_memory asked for cannot be used."""
        memory = self.config.cotangent_memory
        if memory not in ("recompute", "auto"):
            return memory, None
        if self.config.mixes_cotangents:
            reason = "the first-order angle form back-propagates a mix of two cotangents"
        else:
            reason = recompute_unsupported(module)
        if reason is None:
            return "recompute", None
        if memory == "recompute":
            return memory, (
                f"cotangent_memory='recompute' cannot be used: {reason}; set "
                "cotangent_memory to 'device' or 'offload'"
            )
        logger.warning(
            "megatron_fsam: cotangent_memory='auto' keeps the logit cotangents on the device: %s",
            reason,
        )
        return "device", None

    def _held_bytes(self) -> float | None:
        """What the gate keeps between the passes (None on ranks without one)."""
        return float(self.gate.held_bytes()) if self.gate else None

    def _keeps_gradient(self) -> bool:
        """Whether this rank's shard of g is kept past pass 1 (mixed in, or the fallback)."""
        return self.recipe.grad != 0.0 or self.config.on_nonfinite == "fallback"

    def _eps_top_share(self, shards: RankShards) -> float:
        return grouped_top_share(
            self.backend.parts(shards), TOP_FRACTION, device=self.backend.device
        )

    def _optimizer_step(self) -> tuple[bool, float | None, int | None]:
        """The optimizer's step; one that applied nothing leaves no direction behind."""
        ok, grad_norm, num_zeros = self.backend.optimizer_step()
        if not ok:
            self.direction.skipped()
        return ok, grad_norm, num_zeros

    def _restore(self, shards: RankShards) -> None:
        self.kernels.restore(shards.all)
        self.backend.sync_params()

    def _skip(
        self,
        rho: float,
        step: Ascent | None,
        losses: LossCapture,
        losses_reduced: list[Any],
        what: str,
        ran: tuple[bool, ...],
    ) -> StepResult:
        if self.gate:
            self.gate.clear()
        self.direction.skipped()
        logger.warning("megatron_fsam: skipping step %d: %s is not finite", self.iteration, what)
        return self._finish(
            False, None, losses_reduced, rho, step, losses, None, passes_of_step=ran
        )

    def _finish(
        self,
        ok: bool,
        grad_norm: float | None,
        losses_reduced: list[Any],
        rho: float,
        step: Ascent | None,
        clean: LossCapture,
        num_zeros_in_grad: int | None,
        perturbed: LossCapture | None = None,
        passes_of_step: tuple[bool, ...] = PLAIN,
        **measured: float,
    ) -> StepResult:
        """Count the step and say what it was; `passes_of_step` are the passes it ran."""
        self.iteration += 1
        pass2_loss = perturbed.mean() if perturbed else None
        pass2_is_clean = self.gate is not None and self.gate.pass2_loss_is_clean
        metrics = {
            "rho": rho,
            "grad_norm": step.grad_norm if step else None,
            "eps_norm": step.eps_norm if step else 0.0,
            "loss_clean": clean.mean(),
            "loss_perturbed": None if pass2_is_clean else pass2_loss,
            "loss_pass2_clean": pass2_loss if pass2_is_clean else None,
            "skipped": float(not ok),
            "sam_step": float(step is not None),
            "passes": passes(passes_of_step, self.recomputed_forwards),
            "flops": flops(passes_of_step, self.recomputed_forwards),  # forward-equivalents
            "no_direction": 0.0,
            "fallback": 0.0,
            "fallback_steps": float(self.fallback_steps),
            "num_zeros_in_grad": num_zeros_in_grad,
            **measured,
        }
        return ok, grad_norm, losses_reduced, metrics


class _StateReplay:
    """The state around pass 1 (RNG, and what the backend names: MoE routers' expert bias,
    Transformer Engine's fp8 scaling history): every later pass starts from what pass 1 started
    from, so it draws the same dropout masks, routes with the same bias and starts from the same
    fp8 scales, and the step ends with what its first forward-backward left behind (pass 1's, or
    pass 2's after a forward-only pass 1: the step's one update of the bias and the history)."""

    def __init__(self, captures: list[Callable[[], Restorable]]) -> None:
        self.captures = captures
        self.before = [capture() for capture in captures]
        self.after: list[Restorable] | None = None

    def recorded(self) -> None:
        self.after = [capture() for capture in self.captures]

    @contextmanager
    def replayed(self) -> Iterator[None]:
        for state in self.before:
            state.restore()
        try:
            yield
        finally:
            if self.after is None:
                self.recorded()
            for state in self.after:
                state.restore()


def _pass1_source(passes_of_step: tuple[bool, ...], known_before_the_step: bool) -> str | None:
    """What pass 1 is: the paper's forward-backward ("record"), a forward that records the
    micro-batches and c(theta) where the step replays them ("forward"), or none (sam with d
    known before the step: its one pass is pass 2)."""
    if not known_before_the_step:
        return "record"
    return "forward" if not passes_of_step[0] else None


def _copies(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.clone() for t in tensors]


def _mixed(
    a: float, xs: list[torch.Tensor], b: float, ys: list[torch.Tensor] | None
) -> list[torch.Tensor]:
    """a * xs + b * ys as new tensors (ys may be None when b is 0)."""
    out = torch._foreach_mul(xs, a)
    if b:
        torch._foreach_add_(out, ys, alpha=b)
    return out


def _scale_add_(xs: list[torch.Tensor], a: float, ys: list[torch.Tensor]) -> None:
    """xs <- a * xs + ys, in place."""
    torch._foreach_mul_(xs, a)
    torch._foreach_add_(xs, ys)


class LossCapture:
    """Keeps each micro-batch's loss (before a schedule rescales it) for logging."""

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.num_tokens: list[torch.Tensor] = []

    def wrap(self, forward_step_func: Callable) -> Callable:
        @functools.wraps(forward_step_func)
        def forward_step(data_iterator, model, *args):
            output, loss_func = forward_step_func(data_iterator, model, *args)
            return output, functools.partial(self._loss, loss_func)

        return forward_step

    def add(self, loss: torch.Tensor, num_tokens: Any = None) -> None:
        """Keep one micro-batch's loss (a copy: schedules rescale theirs in place)."""
        self.losses.append(loss.detach().float().clone())
        if num_tokens is not None:
            self.num_tokens.append(torch.as_tensor(num_tokens).detach().float().clone())

    def _loss(self, loss_func: Callable, output_tensor: torch.Tensor, **kwargs):
        outputs = loss_func(output_tensor, **kwargs)
        if not kwargs:  # non_loss_data calls carry no loss
            self.add(outputs[0], outputs[1] if len(outputs) == 3 else None)
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


def _raise_on_every_rank(problem: str | None, device: torch.device) -> None:
    """Raise `problem` (found on some ranks) on all of them, so that none waits in a collective."""
    flag = torch.tensor([float(problem is not None)], device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    if flag.item() > 0:
        raise ValueError(
            f"megatron_fsam: {problem or 'the last pipeline stage cannot set up the logit gate'}"
        )
