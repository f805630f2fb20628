"""SAM / Func-SAM in the Hugging Face `Trainer` (`megatron_fsam.hf.FuncSAMTrainer`).

    trainer = FuncSAMTrainer(sam=SAMConfig(mode="fsam", precond=True, rho=0.05),
                             model=model, args=TrainingArguments(...), train_dataset=...)
    trainer.train()                      # or train(resume_from_checkpoint=...)

A `transformers.Trainer` whose optimizer step is the two-pass SAM step: every other argument
is the Trainer's. `training_step` keeps the step's gradient-accumulation micro-batches until
the last one, then runs the SAM step over all of them: pass 1 on every micro-batch, the
ascent, pass 2 on every micro-batch. Each micro-batch's forward is the Trainer's own
`compute_loss`, scaled for gradient accumulation as the Trainer scales it (by the step's
`num_items_in_batch` or by the number of micro-batches), and back-propagated as the Trainer
does; DDP reduces the gradients on each pass's last micro-batch only. With rho = 0 every float
operation is a plain Trainer's.

Two front ends carry the step:

- PyTorch-native (one process or DDP): the SAM step leaves the SAM gradient in `param.grad`
  with the params at theta and steps nothing; the Trainer then clips (`max_grad_norm`), calls
  `optimizer.step()` and its LR scheduler, once. A skipped step (a non-finite gradient) leaves
  every `param.grad` None, so the optimizer changes nothing, and reports the step as skipped
  (accelerate's `optimizer_step_was_skipped`), so the LR schedule waits, as after a
  GradScaler overflow.
- DeepSpeed (`TrainingArguments(deepspeed=...)`, the DeepSpeed front end, which reads the
  engine's ZeRO partitions at any stage, 0 to 3; tested here at ZeRO-2 and ZeRO-3):
  micro-batches go through `engine.backward` with the accumulation boundary set by the SAM
  step (never `accelerator.backward`, which would step the engine inside pass 1), and the SAM
  step calls `engine.step()` once: DeepSpeed's clipping, optimizer and scheduler act on the
  SAM gradient; the Trainer's `optimizer.step()` and `lr_scheduler.step()` are accelerate's
  no-ops (or, for a scheduler the Trainer made itself, its one step). At ZeRO-3 build the
  model as transformers documents, after the `TrainingArguments` (then `from_config` /
  `from_pretrained` partition it under `zero.Init` as it is made) and, on the CPU, after
  `deepspeed.init_distributed(dist_backend="gloo")` (accelerate starts DeepSpeed's comm on
  GPUs): `zero.Init` takes the world size from DeepSpeed's comm, 1 while it is not up.

The SAM step count is the Trainer's `state.global_step` (the rho warm-up, `sam_interval` and
`sam_probability` follow it across a resume); `SAMConfig.seed=None` takes `args.seed`.
Checkpoints are the Trainer's (theta, never theta + eps) plus `sam_state.json` (the fallback
count). On each logging step the SAM scalars, averaged over the steps since the last log
(losses over ranks too), join the Trainer's logs as `sam/rho`, `sam/eps_norm`,
`sam/grad_norm` (pass 1's ||g||), `sam/loss_clean`, `sam/loss_perturbed` (summed over the
step's micro-batches as the Trainer's `loss` is), `sam/sam_step`, `sam/skipped`,
`sam/fallback_steps`, `sam/held_bytes`, `sam/eps_top_share` and the last step's
`sam/time_*`; TensorBoard (`report_to="tensorboard"`) shows them under exactly those tags
(transformers' own callback would file them under `train/sam/...`).

Refused, one clear error each: FSDP through accelerate, fp16 (a GradScaler), nn.DataParallel
(several GPUs in one process), LOMO / AdaLOMO optimizers, Liger kernels (their
fused lm_head + loss never hands the logits to the gate), context / sequence / tensor
parallelism, models sharded at load time, and auto_find_batch_size. `torch_compile` works:
the Trainer compiles the DDP-wrapped model, whose DDP module the backend takes apart.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import replace
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.integrations import TensorBoardCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from transformers.training_args import OptimizerNames

from megatron_fsam.config import SAMConfig
from megatron_fsam.directions import load_rank_state, save_rank_state
from megatron_fsam.integrations.microbatches import MicrobatchSAM
from megatron_fsam.integrations.pytorch import FuncSAM

logger = logging.getLogger("megatron_fsam")
PREFIX = "sam/"  # the tags of the SAM scalars in the logs and in TensorBoard
STATE_FILE = "sam_state.json"  # next to the Trainer's files in each checkpoint
# Scalars that differ between ranks (averaged over them when logged); the others are global.
RANK_LOCAL = ("loss_clean", "loss_perturbed", "loss_pass2_clean", "held_bytes")
NOT_LOGGED = ("num_zeros_in_grad", "applied_grad_norm")  # the Trainer logs grad_norm itself


class FuncSAMTrainer(Trainer):
    """`transformers.Trainer` whose optimizer steps are SAM / Func-SAM steps (`sam`)."""

    def __init__(self, *args: Any, sam: SAMConfig, **kwargs: Any) -> None:
        sam.validate()
        super().__init__(*args, **kwargs)
        self.sam_config = replace(sam, seed=self.args.seed if sam.seed is None else sam.seed)
        _refuse_unsupported(self)
        self.sam: MicrobatchSAM | None = None  # built at the first step, over the prepared model
        self._sam_for: tuple[int, int] | None = None  # (model, optimizer) it was built for
        self._pending: list[Any] = []  # this optimizer step's micro-batches so far
        self._sam_history: list[dict[str, float]] = []  # each step's scalars since the last log
        # The SAM state (same on every rank, and this rank's own) of a checkpoint or of an
        # earlier front end, until the front end exists.
        self._carried: tuple[dict[str, Any], dict[str, Any] | None] = ({}, None)
        _use_sam_tensorboard(self)
        self.add_callback(_SAMStateSaver(self))

    def create_accelerator_and_postprocess(self) -> None:
        """The Trainer's accelerator; under DeepSpeed, told the micro-batches of a step.

        The Trainer counts them itself and gives accelerate 1, while the engine config counts
        them too (its "auto" filled from these arguments): preparing the engine, accelerate
        warns of the mismatch and takes the config's count. Given that count from the start,
        it ends the same, without the warning.
        """
        super().create_accelerator_and_postprocess()
        if self.is_deepspeed_enabled:
            self.accelerator.gradient_accumulation_steps = self.args.gradient_accumulation_steps

    # ----- the step -------------------------------------------------------------------

    def training_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """Keep the micro-batch; on the step's last one, run the SAM step over all of them.

        Returns what the Trainer adds to its logged loss: 0 for the kept micro-batches, and
        for the last one its scaled pass-1 loss, the earlier ones' having been added to the
        Trainer's running loss in their order (the sums a plain Trainer forms, bit for bit).
        """
        self._pending.append(inputs)
        if not self.accelerator.sync_gradients:
            return torch.zeros((), device=self.args.device)
        batches, self._pending = self._pending, []
        if len(batches) != self.current_gradient_accumulation_steps:
            raise RuntimeError(
                f"megatron_fsam: the optimizer step has {len(batches)} micro-batches, the Trainer "
                f"counts {self.current_gradient_accumulation_steps}"
            )
        sam = self._front_end(model)
        sam.iteration = self.state.global_step
        losses: list[torch.Tensor] = []  # every pass's scaled losses, in order

        def forward(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
            loss = self._micro_batch_loss(model, batch, num_items_in_batch)
            losses.append(loss.detach())
            return loss

        sam.train_step(batches, forward, log_step=self._is_log_step())
        self._mark_skipped(bool(sam.metrics["skipped"]))
        self._record(sam, losses, len(batches))
        for loss in losses[: len(batches) - 1]:
            self._add_to_logged_loss(loss)
        return losses[len(batches) - 1]

    def _micro_batch_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: torch.Tensor | int | None,
    ) -> torch.Tensor:
        """One micro-batch's loss as `Trainer.training_step` back-propagates it: `compute_loss`,
        divided by the micro-batches of the step unless it is scaled for them already."""
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)  # a new mapping: compute_loss may pop from it
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        if self.loss_is_scaled_for_ga is not None:
            scaled = self.loss_is_scaled_for_ga
        else:
            scaled = (
                self.model_accepts_loss_kwargs and num_items_in_batch is not None
            ) or self.compute_loss_func is not None
        return loss if scaled else loss / self.current_gradient_accumulation_steps

    def _front_end(self, model: torch.nn.Module) -> MicrobatchSAM:
        """The SAM front end over the prepared model and optimizer (rebuilt if they change)."""
        key = (id(model), id(self.optimizer))
        if self.sam is not None and self._sam_for == key:
            return self.sam
        if self.sam is not None:
            self._carried = (self.sam.state_dict(), self.sam.rank_state_dict())
            if self.sam.gate is not None:
                self.sam.gate.remove()
        if self.is_deepspeed_enabled:  # the Trainer scaled the loss; the engine steps
            from megatron_fsam.integrations.deepspeed import FuncSAM as DeepSpeedSAM

            self.sam = DeepSpeedSAM(self.sam_config, model, scale_wrt_gas=False)
        else:  # the Trainer clips and steps its optimizer and scheduler
            inner = getattr(self.optimizer, "optimizer", self.optimizer)
            self.sam = FuncSAM(
                self.sam_config,
                model,
                inner,
                step_optimizer=False,
                backward=self.accelerator.backward,
            )
        self._load_carried()
        self._sam_for = key
        logger.info("megatron_fsam: SAM %s", self.sam_config.describe())
        return self.sam

    def _mark_skipped(self, skipped: bool) -> None:
        """Tell accelerate whether the optimizer step was skipped (the LR scheduler waits)."""
        optimizer = self.optimizer
        if not isinstance(optimizer, _SkipAware):
            optimizer.__class__ = type(
                f"SAM{type(optimizer).__name__}", (_SkipAware, type(optimizer)), {}
            )
        optimizer.sam_skipped = skipped

    def _add_to_logged_loss(self, loss: torch.Tensor) -> None:
        """What the Trainer's loop does with a micro-batch's returned loss."""
        if self.args.logging_nan_inf_filter and not torch.isfinite(loss):
            steps = 1 + self.state.global_step - self._globalstep_last_logged
            self._tr_loss += self._tr_loss / steps
        else:
            self._tr_loss += loss

    def _is_log_step(self) -> bool:
        """Whether the step now running will be logged (it then measures eps_top_share)."""
        step, every = self.state.global_step + 1, self.state.logging_steps
        if step == 1 and self.args.logging_first_step:
            return True
        return self.args.logging_strategy == "steps" and bool(every) and step % every == 0

    # ----- logging --------------------------------------------------------------------

    def _record(self, sam: MicrobatchSAM, losses: list[torch.Tensor], count: int) -> None:
        """Keep this step's scalars; the losses are the sums over the step's micro-batches of
        the scaled losses, pass by pass (the Trainer's `loss` is pass 1's)."""
        scalars = {k: float(v) for k, v in sam.metrics.items() if v is not None}
        for key in NOT_LOGGED:
            scalars.pop(key, None)
        passes = [losses[i : i + count] for i in range(0, len(losses), count)]
        clean = "loss_clean" in scalars  # sam with a known direction: one pass, at theta + eps
        if clean:
            scalars["loss_clean"] = _total(passes[0])
        for key in ("loss_perturbed", "loss_pass2_clean"):
            if key in scalars:
                scalars[key] = _total(passes[1 if clean else 0])
        self._sam_history.append(scalars)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The Trainer's training logs, with the SAM scalars of the steps since the last."""
        if "loss" in logs and self._sam_history and self.sam is not None:
            logs = {**logs, **self._sam_scalars()}
        super().log(logs, start_time)

    def _sam_scalars(self) -> dict[str, float]:
        """Each scalar's mean over the logged steps (fallback_steps: the last count), the
        last step's phase times, and the rank-local ones averaged over the ranks."""
        history, self._sam_history = self._sam_history, []
        keys = sorted({key for scalars in history for key in scalars})
        out = {}
        for key in keys:
            values = [scalars[key] for scalars in history if key in scalars]
            out[key] = values[-1] if key == "fallback_steps" else math.fsum(values) / len(values)
        out.update(self.sam.phase_times())
        local = [key for key in out if key in RANK_LOCAL or key.startswith("time_")]
        if local and torch.distributed.is_available() and torch.distributed.is_initialized():
            values = torch.tensor([out[k] for k in local], dtype=torch.float64)
            values = values.to(self.args.device)
            torch.distributed.all_reduce(values)
            world = torch.distributed.get_world_size()
            out.update(zip(local, (values / world).tolist(), strict=True))
        return {PREFIX + key: value for key, value in out.items()}

    # ----- checkpoints ----------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """`Trainer.train`; a resumed run also takes the checkpoint's SAM state (the step
        count itself is the Trainer's global_step)."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(
                    f"No valid checkpoint found in output directory ({self.args.output_dir})"
                )
        if resume_from_checkpoint:
            path = os.path.join(resume_from_checkpoint, STATE_FILE)
            if os.path.isfile(path):
                with open(path) as file:
                    state = json.load(file)
                self._carried = (state, load_rank_state(resume_from_checkpoint))
                if self.sam is not None:
                    self._load_carried()
        self._pending = []
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _load_carried(self) -> None:
        state, rank = self._carried
        if state:
            self.sam.load_state_dict(state)
            self.sam.load_rank_state_dict(rank)


class _SAMStateSaver(TrainerCallback):
    """Writes the SAM state into each checkpoint the Trainer saves: `sam_state.json`, and with
    `ascent="previous"` each rank's shard of the kept direction in a file of its own."""

    def __init__(self, trainer: FuncSAMTrainer) -> None:
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(folder):  # (a trial's run directory, or another node's disk)
            return
        sam = self.trainer.sam
        common, rank = (
            (sam.state_dict(), sam.rank_state_dict()) if sam is not None else self.trainer._carried
        )
        save_rank_state(rank, folder)
        if args.should_save:
            with open(os.path.join(folder, STATE_FILE), "w") as file:
                json.dump({**common, "iteration": state.global_step}, file)


class _SkipAware:
    """Mixed into the Trainer's (accelerate-wrapped) optimizer: a skipped SAM step is a
    skipped optimizer step, as a GradScaler's overflow is."""

    sam_skipped = False

    @property
    def step_was_skipped(self) -> bool:
        return self.sam_skipped or super().step_was_skipped


def _total(losses: list[torch.Tensor]) -> float:
    return float(torch.stack([loss.float() for loss in losses]).sum())


class SAMTensorBoardCallback(TensorBoardCallback):
    """transformers' TensorBoard callback with the SAM scalars under their own `sam/...` tags
    (the parent files every training log key under `train/`)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        own = {k: v for k, v in logs.items() if k.startswith(PREFIX)}
        rest = {k: v for k, v in logs.items() if k not in own}
        super().on_log(args, state, control, logs=rest, **kwargs)
        if own and state.is_world_process_zero and self.tb_writer is not None:
            for key, value in own.items():
                self.tb_writer.add_scalar(key, value, state.global_step)
            self.tb_writer.flush()


def _use_sam_tensorboard(trainer: Trainer) -> None:
    """Swap the Trainer's own TensorBoardCallback (from report_to) for SAMTensorBoardCallback,
    keeping its writer and directory."""
    callbacks = trainer.callback_handler.callbacks
    for index, callback in enumerate(callbacks):
        if type(callback) is TensorBoardCallback:
            swapped = SAMTensorBoardCallback.__new__(SAMTensorBoardCallback)
            swapped.__dict__.update(callback.__dict__)
            callbacks[index] = swapped


def _refuse_unsupported(trainer: Trainer) -> None:
    """Refuse, before any work, the Trainer settings the SAM step cannot run under."""
    args = trainer.args
    parallelism = getattr(trainer.accelerator, "parallelism_config", None)
    split = parallelism is not None and any(
        getattr(parallelism, f"{kind}_size", 1) > 1 for kind in ("cp", "sp", "tp")
    )
    reasons = [
        (
            trainer.is_fsdp_enabled or bool(args.fsdp),
            "FSDP through accelerate (fsdp / fsdp_config); use DDP or DeepSpeed ZeRO 1-3 "
            "(TrainingArguments(deepspeed=...))",
        ),
        (
            args.fp16 or getattr(trainer.accelerator, "scaler", None) is not None,
            "fp16 (a GradScaler, whose loss scale the two passes would have to share); use "
            "bf16 or fp32",
        ),
        (
            args.n_gpu > 1,
            "nn.DataParallel (several GPUs in one process); launch one process per GPU "
            "(torchrun or the deepspeed launcher)",
        ),
        (
            args.optim in (OptimizerNames.LOMO, OptimizerNames.ADALOMO),
            f"the {getattr(args.optim, 'value', args.optim)} optimizer (it updates the weights "
            "inside the backward)",
        ),
        (
            args.use_liger_kernel,
            "use_liger_kernel (the fused lm_head + cross-entropy never forms the logits "
            "whose cotangent Func-SAM replays)",
        ),
        (
            split or getattr(trainer, "is_distributed_loading_by_transformers", False),
            "context / sequence / tensor parallelism or a model sharded at load time; the SAM "
            "step runs over data parallelism (DDP or DeepSpeed ZeRO)",
        ),
        (
            args.auto_find_batch_size,
            "auto_find_batch_size (a retry after running out of memory would start inside a "
            "SAM step)",
        ),
    ]
    for failed, reason in reasons:
        if failed:
            raise ValueError(f"megatron_fsam: FuncSAMTrainer does not support {reason}")
