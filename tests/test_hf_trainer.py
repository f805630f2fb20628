"""FuncSAMTrainer (megatron_fsam.hf): the Hugging Face Trainer whose optimizer steps are SAM
steps, on 2 CPU gloo ranks under DDP and under DeepSpeed ZeRO-2 and ZeRO-3
(configs/hf_trainer_zero2.json and configs/hf_trainer_zero3.json, the Trainer's own AdamW and
LR scheduler), and launch/pretrain_hf_trainer.py in one process.

One 2-rank spawn per layout (run when a test first asks for that layout) runs every check of
that layout on a tiny LlamaForCausalLM (made from a LlamaConfig, 2 micro-batches of 2
sequences per rank and step). At ZeRO-3 the model is built as a user's script builds it: after
the TrainingArguments, with DeepSpeed's comm up, by `from_config`, which partitions it as it is
made (every param: the persistence threshold is 0); the first step's reference starts from the
weights the Trainer starts from.

- rho = 0: the logged losses, gradient norms and learning rates and the final weights are
  bit-identical to a plain `Trainer` run of the same arguments;
- fsam: the gradient the optimizer receives at step 1 (after the Trainer's / DeepSpeed's
  clipping to max_grad_norm, which is active) equals the torch.func reference of the step's 8
  micro-batches, clipped alike; the inner optimizer and the LR scheduler step once per step;
  under DeepSpeed the SAM step runs on the backend's layout of the stage (ZeRO-3: its own);
- TensorBoard holds sam/loss_perturbed, sam/eps_norm, sam/rho (and no train/sam/...);
- resuming from the step-2 checkpoint gives the straight run's logs and weights, bitwise;
- a NaN in pass 2 (rank 0) skips the step: weights and Adam state unchanged, the LR schedule
  waits, sam/skipped logged;
- (ZeRO-2) accelerate counts the step's micro-batches as the engine config does (no mismatch
  warning when the engine is prepared);
- (DDP) torch_compile (eager backend) gives the uncompiled run's logs and weights, bitwise, and
  the settings the step cannot run under are refused, one clear error each.

The loss: samples are input_ids with labels = input_ids, the Hugging Face convention (the model
shifts the labels: position t predicts token t + 1, the last position predicts nothing), and the
Trainer divides each micro-batch's summed token loss by the step's target count over all ranks
(num_items_in_batch). The reference (tests/reference.py) averages per-micro-batch masked means
over the micro-batches; its batches get the next tokens as labels and loss_mask 0 on the last
position, so that both are the mean token loss of the step (every micro-batch has the same
number of targets).
"""

from __future__ import annotations

import glob
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from tests.spawn import run_ranks, start_deepspeed_comm

# Not importorskip: importing transformers here would import deepspeed into this process (see
# tests/test_deepspeed.py); both are imported in the spawned ranks and the launched script only.
pytestmark = [
    pytest.mark.one_env,  # the Hugging Face Trainer: no megatron-core
    pytest.mark.skipif(
        any(
            importlib.util.find_spec(m) is None for m in ("transformers", "accelerate", "deepspeed")
        ),
        reason="needs transformers, accelerate and deepspeed",
    ),
]

ROOT = Path(__file__).resolve().parents[1]
ZERO2 = ROOT / "configs" / "hf_trainer_zero2.json"
ZERO3 = ROOT / "configs" / "hf_trainer_zero3.json"
# ZeRO-3 keeps params under stage3_param_persistence_threshold (every param of the tiny model,
# by default) whole on every rank; 0 partitions them all.
ZERO3_CONFIG = json.loads(ZERO3.read_text())
ZERO3_CONFIG["zero_optimization"]["stage3_param_persistence_threshold"] = 0
DEEPSPEED = {"ddp": None, "zero2": str(ZERO2), "zero3": ZERO3_CONFIG}
# The SAM backend's layout class for each DeepSpeed stage (megatron_fsam/backends/deepspeed.py).
LAYOUT_CLASSES = {"zero2": "_Zero12Partitions", "zero3": "Zero3Partitions"}
VOCAB, SEQ, SAMPLES = 96, 16, 64
MICRO, ACCUMULATION, STEPS = 2, 2, 4
RHO, LR, CLIP = 0.05, 1e-3, 0.25
TOLERANCE = 1e-5
SPAWN_TIMEOUT = 900
SAM_TAGS = ("sam/loss_perturbed", "sam/eps_norm", "sam/rho")
# A direction known before the step (SAMConfig.ascent) under DDP, every step of the run.
ASCENT_RUNS = tuple(
    f"{ascent}/{mode}" for ascent in ("previous", "momentum") for mode in ("sam", "fsam")
)


def _model(layout: str = "ddp"):
    """The tiny Llama, from seed 0. ZeRO-3: built as a user's script builds it, after the
    TrainingArguments (transformers then knows their DeepSpeed config) and with DeepSpeed's comm
    up (on the CPU the script's deepspeed.init_distributed; on GPUs accelerate starts it): then
    `from_config` partitions it under zero.Init as it is made."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=SEQ,
    )
    torch.manual_seed(0)
    if layout != "zero3":
        return LlamaForCausalLM(config)
    start_deepspeed_comm()
    return AutoModelForCausalLM.from_config(config)


class Tokens(torch.utils.data.Dataset):
    """SAMPLES random sequences of SEQ token ids, labels = input_ids."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, VOCAB, (SAMPLES, SEQ), generator=generator)

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def _arguments(layout: str, directory: str, **overrides):
    from transformers import TrainingArguments

    settings = dict(
        output_dir=directory,
        per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=ACCUMULATION,
        max_steps=STEPS,
        learning_rate=LR,
        max_grad_norm=CLIP,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        ddp_backend="gloo",
        deepspeed=DEEPSPEED[layout],
        disable_tqdm=True,
        seed=7,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def _train(cls, layout: str, directory: str, *, resume: str | None = None, callbacks=(), **kw):
    """Train STEPS steps; returns the trainer, its training logs and its final weights."""
    sam = {"sam": kw.pop("sam")} if "sam" in kw else {}
    args = _arguments(layout, directory, **kw)  # before the model, for ZeRO-3
    trainer = cls(
        model=_model(layout),
        args=args,
        train_dataset=Tokens(),
        callbacks=list(callbacks),
        **sam,
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, _logs_of(trainer), _weights(trainer)


def _logs_of(trainer) -> list[dict]:
    """The training logs: step, loss, grad_norm, learning_rate and the SAM scalars (not the
    phase times)."""
    return [
        {
            k: v
            for k, v in entry.items()
            if k in ("step", "loss", "grad_norm", "learning_rate")
            or (k.startswith("sam/") and "time" not in k)
        }
        for entry in trainer.state.log_history
        if "loss" in entry
    ]


def _weights(trainer) -> dict[str, torch.Tensor]:
    """The model's weights (ZeRO-3: gathered from the partitions)."""
    params = dict(trainer.model.named_parameters())
    if not any(hasattr(p, "ds_id") for p in params.values()):
        return {n: p.detach().clone() for n, p in params.items()}
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {n: p.detach().clone() for n, p in params.items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _inner_optimizer(trainer):
    """The torch optimizer that steps (DeepSpeed: the engine's basic optimizer)."""
    if trainer.is_deepspeed_enabled:
        return trainer.model_wrapped.basic_optimizer
    return trainer.optimizer.optimizer


def _masters(trainer) -> list[torch.Tensor]:
    """The tensors the inner optimizer steps. ZeRO-3 puts its flat fp32 partitions into the
    optimizer's param groups only while it steps them, one group at a time."""
    engine_optimizer = getattr(trainer.model_wrapped, "optimizer", None)
    partitions = getattr(engine_optimizer, "fp32_partitioned_groups_flat", None)
    if partitions is not None:
        return list(partitions)
    return [p for group in _inner_optimizer(trainer).param_groups for p in group["params"]]


@contextmanager
def _logged_warnings(name: str) -> Iterator[list[str]]:
    """The warnings logged under logger `name` (and its children) in the block."""
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def _reference_batches(first_step: list[torch.Tensor]) -> list[dict]:
    """The step's micro-batches as tests/reference.py takes them (labels: the next tokens)."""
    batches = []
    for ids in first_step:
        mask = torch.ones(ids.shape)
        mask[:, -1] = 0.0
        labels = torch.roll(ids, -1, dims=1)
        labels[:, -1] = 0
        positions = torch.arange(ids.shape[1]).expand_as(ids)
        batches.append(
            {"tokens": ids, "labels": labels, "loss_mask": mask, "position_ids": positions}
        )
    return batches


def _layout_checks(rank: int, world: int, layout: str, directory: str) -> dict:
    """Every check of one layout ("ddp", "zero2" or "zero3"), on each rank."""
    from transformers import Trainer, TrainerCallback

    from megatron_fsam import SAMConfig
    from megatron_fsam.compat.deepspeed_cpu import skip_shm_allreduce
    from megatron_fsam.hf import FuncSAMTrainer

    if DEEPSPEED[layout]:  # before accelerate starts DeepSpeed's comm, as the entry point does
        skip_shm_allreduce()
    report: dict = {}
    base = f"{directory}/{layout}"

    # rho = 0 against a plain Trainer.
    _, plain_logs, plain_weights = _train(Trainer, layout, f"{base}/plain")
    with _logged_warnings("accelerate") as accelerate_warnings:
        _, logs, weights = _train(FuncSAMTrainer, layout, f"{base}/rho0", sam=SAMConfig(rho=0.0))
    report["accelerate_warnings"] = accelerate_warnings
    report["rho0_logs"] = [{k: v for k, v in e.items() if "sam/" not in k} for e in logs]
    report["plain_logs"] = plain_logs
    report["rho0_weights_equal"] = _same(plain_weights, weights)

    # fsam: the step-1 gradient, step counts, TensorBoard, a checkpoint at step 2.
    class Recording(FuncSAMTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            if self.state.global_step == 0:
                first_step.append(inputs["input_ids"].detach().cpu().clone())
            return super().training_step(model, inputs, num_items_in_batch)

    class Counting(TrainerCallback):
        """Counts the inner optimizer's steps; keeps the gradient it received at step 1."""

        def on_train_begin(self, args, state, control, **kwargs):
            from tests.received import Received

            self.theta = _weights(self.trainer)  # where the reference starts
            self.steps: dict[int, int] = {}  # optimizer.step() calls per param group
            optimizer = _inner_optimizer(self.trainer)
            self.received = Received(optimizer)
            optimizer.register_step_pre_hook(self.count)

        def count(self, optimizer, args, kwargs):
            for group in optimizer.param_groups:  # ZeRO steps one group at a time
                if not group["params"]:  # (ZeRO-3 empties the others)
                    continue
                key = id(group["params"][0])
                self.steps[key] = self.steps.get(key, 0) + 1

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                self.first = dict(self.received.grads)

    first_step: list[torch.Tensor] = []
    counting = Counting()
    os.environ["TENSORBOARD_LOGGING_DIR"] = f"{base}/tensorboard"
    fsam = SAMConfig(mode="fsam", rho=RHO)
    args = _arguments(
        layout, f"{base}/fsam", save_strategy="steps", save_steps=2, report_to="tensorboard"
    )
    model = _model(layout)
    if layout == "zero3":
        report["partitioned_at_construction"] = all(
            p.ds_tensor.numel() < p.ds_numel and p.numel() == 0 for p in model.parameters()
        )
    trainer = Recording(
        sam=fsam,
        model=model,
        args=args,
        train_dataset=Tokens(),
        callbacks=[counting],
    )
    counting.trainer = trainer
    trainer.train()
    del os.environ["TENSORBOARD_LOGGING_DIR"]
    straight_logs, straight_weights = _logs_of(trainer), _weights(trainer)
    report["fsam_logs"] = straight_logs
    report["optimizer_steps"] = sorted(counting.steps.values())
    report["adam_steps"] = sorted(
        {int(s["step"]) for s in _inner_optimizer(trainer).state.values() if "step" in s}
    )
    report["scheduler"] = (type(trainer.lr_scheduler).__name__, trainer.lr_scheduler.last_epoch)
    if layout != "ddp":
        report["engine_steps"] = trainer.model_wrapped.global_steps
        report["backend_layout"] = type(trainer.sam.backend.layout).__name__
    report["fsam_error"] = _reference_error(trainer, counting.theta, counting.first, first_step)
    if rank == 0:
        report["tags"] = _tensorboard_tags(f"{base}/tensorboard")

    # Resume from checkpoint-2 against the straight run.
    resumed, _, resumed_weights = _train(
        FuncSAMTrainer, layout, f"{base}/fsam", resume=f"{base}/fsam/checkpoint-2", sam=fsam
    )
    report["resumed_logs"] = [e for e in _logs_of(resumed) if e["step"] > 2]
    report["straight_logs_after_2"] = [e for e in straight_logs if e["step"] > 2]
    report["resumed_weights_equal"] = _same(straight_weights, resumed_weights)
    report["sam_state_file"] = os.path.isfile(f"{base}/fsam/checkpoint-2/sam_state.json")

    report["skip"] = _skipped_step(layout, f"{base}/skip", rank)
    if layout == "ddp":
        compiled, compiled_logs, compiled_weights = _train(
            FuncSAMTrainer,
            layout,
            f"{base}/compiled",
            sam=fsam,
            torch_compile=True,
            torch_compile_backend="eager",
        )
        report["compiled_logs_equal"] = compiled_logs == straight_logs
        report["compiled_weights_equal"] = _same(compiled_weights, straight_weights)
        report["compiled_layout"] = compiled.sam.backend.layout
        report["refusals"] = _refusals(f"{base}/refused")
        report["ascent"] = {run: _known_direction(run, f"{base}/ascent") for run in ASCENT_RUNS}
    return report


def _known_direction(run: str, base: str) -> dict[str, list]:
    """sam or fsam with a direction known before the step ("previous/fsam", ...) for STEPS
    steps: each step's received gradient against the float64 reference fed the same
    micro-batches, the Trainer's linear LR decay and its clipping; and the backwards through
    the network per step."""
    from transformers import TrainerCallback

    from megatron_fsam import SAMConfig
    from megatron_fsam.hf import FuncSAMTrainer
    from tests import reference
    from tests.received import BackwardCounter, Received, relative_error

    ascent, mode = run.split("/")
    inputs: dict[int, list[torch.Tensor]] = {}

    class Recording(FuncSAMTrainer):
        def training_step(self, model, batch, num_items_in_batch=None):
            step = inputs.setdefault(self.state.global_step, [])
            step.append(batch["input_ids"].detach().cpu().clone())
            return super().training_step(model, batch, num_items_in_batch)

    class Stepwise(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.received, self.grads, self.backwards = Received(optimizer()), [], []

        def on_step_begin(self, args, state, control, **kwargs):
            counter.count = 0

        def on_step_end(self, args, state, control, **kwargs):
            self.grads.append(dict(self.received.grads))
            self.backwards.append(counter.count)

    model = _model()
    counter, stepwise = BackwardCounter(model.model.layers[0]), Stepwise()
    trainer = Recording(
        sam=SAMConfig(mode=mode, rho=RHO, ascent=ascent),
        model=model,
        args=_arguments("ddp", f"{base}/{ascent}-{mode}"),
        train_dataset=Tokens(),
        callbacks=[stepwise],
    )

    def optimizer():
        return _inner_optimizer(trainer)

    trainer.train()
    batches = []
    for step in range(STEPS):
        gathered: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, inputs[step])
        batches.append(_reference_batches([ids for rank in gathered for ids in rank]))
    start = _model()
    want = reference.known_direction_run(
        start, {n: p.detach().clone() for n, p in start.named_parameters()}, batches,
        mode=mode, ascent=ascent, rho=RHO, precond=False, lr=lambda t: LR * (STEPS - t) / STEPS,
        betas=(0.9, 0.999), adam_eps=1e-8, clip=CLIP,
    )  # fmt: skip

    class Snapshot:
        grads: dict

    errors = []
    for grads, wanted in zip(stepwise.grads, want, strict=True):
        Snapshot.grads = grads
        errors.append(relative_error(trainer.sam, Snapshot(), wanted))
    return {"errors": errors, "backwards": stepwise.backwards}


def _reference_error(
    trainer, theta: dict[str, torch.Tensor], received: dict, first_step: list[torch.Tensor]
) -> float:
    """||received - clip(reference)|| / ||clip(reference)|| over the shards each rank counts,
    the reference from `theta`, the weights the Trainer started from."""
    from tests import reference
    from tests.received import relative_error

    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, first_step)
    batches = _reference_batches([ids for rank in gathered for ids in rank])
    want = reference.sam_gradient(_model(), theta, batches, mode="fsam", rho=RHO)
    norm = torch.sqrt(sum(v.double().square().sum() for v in want.values()))
    scale = min(1.0, CLIP / (norm.item() + 1e-6))
    want = {n: v * scale for n, v in want.items()}

    class Snapshot:
        grads = received

    return relative_error(trainer.sam, Snapshot(), want)


def _tensorboard_tags(directory: str) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = glob.glob(f"{directory}/**/events.out.tfevents.*", recursive=True)
    events = EventAccumulator(os.path.dirname(files[0])).Reload()
    tags = events.Tags()["scalars"]
    return {tag: [e.value for e in events.Scalars(tag)] for tag in tags}


def _skipped_step(layout: str, directory: str, rank: int) -> dict:
    """NaN hidden states in step 2's pass 2 on rank 0: the step is skipped."""
    from transformers import TrainerCallback

    from megatron_fsam import SAMConfig
    from megatron_fsam.hf import FuncSAMTrainer

    class Snapshots(TrainerCallback):
        def __init__(self) -> None:
            self.after: dict[int, tuple] = {}

        def on_step_end(self, args, state, control, model=None, lr_scheduler=None, **kwargs):
            inner = _inner_optimizer(trainer)
            state_tensors = {
                f"{i}/{k}": v.clone()
                for i, s in enumerate(inner.state.values())
                for k, v in s.items()
                if torch.is_tensor(v)
            }
            masters = {str(i): p.detach().clone() for i, p in enumerate(_masters(trainer))}
            self.after[state.global_step] = (
                _weights(trainer),
                state_tensors,
                masters,
                trainer.lr_scheduler.last_epoch,
            )

    snapshots = Snapshots()
    args = _arguments(layout, directory, max_steps=2)
    trainer = FuncSAMTrainer(
        sam=SAMConfig(mode="fsam", rho=RHO),
        model=_model(layout),
        args=args,
        train_dataset=Tokens(),
        callbacks=[snapshots],
    )
    calls = [0]

    def poison(module, args, output):  # calls 0-3: step 1; 4, 5: step 2's pass 1; 6, 7: pass 2
        calls[0] += 1
        if rank == 0 and calls[0] - 1 == 6:
            return (
                (output[0] * float("nan"), *output[1:])
                if isinstance(output, tuple)
                else (output * float("nan"))
            )
        return None

    trainer.model.model.layers[0].register_forward_hook(poison)
    trainer.train()
    one, two = snapshots.after[1], snapshots.after[2]
    logs = _logs_of(trainer)
    return {
        "skipped_logged": [e["sam/skipped"] for e in logs] == [0.0, 1.0],
        "weights_unchanged": _same(one[0], two[0]),
        "adam_state_unchanged": _same(one[1], two[1]) and bool(one[1]),
        "optimizer_params_unchanged": _same(one[2], two[2]) and bool(one[2]),
        "scheduler_waited": one[3] == two[3] == 1,
        "forward_calls": calls[0],
    }


def _refusals(directory: str) -> dict[str, str]:
    """The error each unsupported setting raises (its first line)."""
    from megatron_fsam import SAMConfig
    from megatron_fsam.hf import FuncSAMTrainer

    cases = {
        "fp16": dict(fp16=True),
        "lomo": dict(optim="lomo"),
        "liger": dict(use_liger_kernel=True),
        "auto_find_batch_size": dict(auto_find_batch_size=True),
        "fsdp": dict(fsdp="full_shard"),
    }
    found = {}
    for name, overrides in cases.items():
        try:
            FuncSAMTrainer(
                sam=SAMConfig(),
                model=_model(),
                args=_arguments("ddp", directory, **overrides),
                train_dataset=Tokens(),
            )
            found[name] = "accepted"
        except ValueError as error:
            found[name] = str(error).splitlines()[0]
    return found


class Reports(dict):
    """Each layout's per-rank reports, from its 2-rank spawn on first use (a -k selection of
    one layout runs that layout's spawn only)."""

    def __init__(self, directory: str) -> None:
        super().__init__()
        self.directory = directory

    def __missing__(self, layout: str) -> list[dict]:
        self[layout] = run_ranks(_layout_checks, 2, layout, self.directory, timeout=SPAWN_TIMEOUT)
        return self[layout]


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> Reports:
    return Reports(str(tmp_path_factory.mktemp("hf_trainer")))


LAYOUTS = ("ddp", "zero2", "zero3")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rho_zero_is_bit_identical_to_a_plain_trainer(reports, layout):
    for report in reports[layout]:
        assert len(report["plain_logs"]) == STEPS
        assert report["rho0_logs"] == report["plain_logs"]
        assert report["rho0_weights_equal"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fsam_first_step_equals_the_reference(reports, layout):
    for report in reports[layout]:
        assert report["fsam_error"] <= TOLERANCE, report["fsam_error"]
        assert report["fsam_logs"][0]["grad_norm"] > CLIP  # the clipping acted


@pytest.mark.parametrize("layout", LAYOUTS)
def test_optimizer_and_scheduler_step_once_per_step(reports, layout):
    for report in reports[layout]:
        assert report["optimizer_steps"] == [STEPS, STEPS]  # each of AdamW's 2 param groups
        assert report["adam_steps"] == [STEPS]
        assert report["scheduler"] == ("LambdaLR", STEPS)
        if layout != "ddp":
            assert report["engine_steps"] == STEPS
            assert report["backend_layout"] == LAYOUT_CLASSES[layout]
        logs = report["fsam_logs"]
        assert [e["step"] for e in logs] == list(range(1, STEPS + 1))
        assert all(e["sam/sam_step"] == 1.0 and e["sam/rho"] == RHO for e in logs)


def test_zero3_partitions_the_model_as_it_is_made(reports):
    for report in reports["zero3"]:
        assert report["partitioned_at_construction"]


def test_accelerate_counts_the_micro_batches_deepspeed_does(reports):
    """Under DeepSpeed, accelerate is told the step's micro-batches from the start (the
    Trainer gives it 1, and preparing the engine it warned of a mismatch with the config)."""
    for report in reports["zero2"]:
        assert not [m for m in report["accelerate_warnings"] if "mismatch" in m]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tensorboard_has_the_sam_tags(reports, layout):
    tags = reports[layout][0]["tags"]
    for tag in SAM_TAGS:
        assert len(tags.get(tag, [])) == STEPS, sorted(tags)
    assert tags["sam/rho"] == pytest.approx([RHO] * STEPS)
    assert tags["sam/eps_norm"] == pytest.approx([RHO] * STEPS, rel=1e-5)
    assert "train/loss" in tags and not any(t.startswith("train/sam") for t in tags)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_checkpoint_resumes_bit_identically(reports, layout):
    for report in reports[layout]:
        assert report["sam_state_file"]
        assert len(report["straight_logs_after_2"]) == STEPS - 2
        assert report["resumed_logs"] == report["straight_logs_after_2"]
        assert report["resumed_weights_equal"]


@pytest.mark.parametrize("run", ASCENT_RUNS)
def test_a_known_direction_steps_as_the_reference_under_ddp(reports, run):
    for report in reports["ddp"]:
        result = report["ascent"][run]
        assert len(result["errors"]) == STEPS and max(result["errors"]) <= TOLERANCE, result
        assert result["backwards"] == [ACCUMULATION] * STEPS


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_nonfinite_pass_2_skips_the_step(reports, layout):
    for report in reports[layout]:
        skip = dict(report["skip"])  # a copy: the module-scoped fixture stays as it was
        assert skip.pop("forward_calls") == 8
        assert all(skip.values()), skip


def test_torch_compile_keeps_the_step(reports):
    for report in reports["ddp"]:
        assert report["compiled_layout"] == "ddp"  # the backend sees DDP inside the compiled model
        assert report["compiled_logs_equal"] and report["compiled_weights_equal"]


def test_refusals_are_one_clear_error_each(reports):
    refusals = reports["ddp"][0]["refusals"]
    expected = {
        "fp16": "does not support fp16",
        "lomo": "does not support the lomo optimizer",
        "liger": "does not support use_liger_kernel",
        "auto_find_batch_size": "does not support auto_find_batch_size",
        "fsdp": "does not support FSDP through accelerate",
    }
    for name, text in expected.items():
        assert refusals[name].startswith("megatron_fsam: FuncSAMTrainer"), refusals[name]
        assert text in refusals[name], refusals[name]


def _run_example(tmp_path, *arguments: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """launch/pretrain_hf_trainer.py on configs/tiny_test.yaml as one unlaunched process."""
    command = [
        sys.executable, str(ROOT / "launch" / "pretrain_hf_trainer.py"),
        "--config", str(ROOT / "configs" / "tiny_test.yaml"), *arguments,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=timeout,
        env={**env, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip


def test_the_example_trains_in_one_process(tmp_path):
    """launch/pretrain_hf_trainer.py on the built-in corpus: the eval loss falls."""
    result = _run_example(
        tmp_path, "--output_dir", str(tmp_path / "out"), f"data.cache_dir={tmp_path / 'cache'}",
        f"logging.tensorboard_dir={tmp_path / 'tb'}",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    before = float(re.search(r"eval loss before training: (\S+)", out).group(1))
    after = float(re.search(r"eval loss after training: (\S+)", out).group(1))
    assert after < before, out[-3000:]
    assert "sam/loss_perturbed" in out


def test_the_example_refuses_an_engine_json(tmp_path):
    """launch/pretrain_hf_trainer.py with configs/deepspeed_zero3.json (no batch size, made for
    launch/pretrain_deepspeed.py): one clear error before any work."""
    engine_json = str(ROOT / "configs" / "deepspeed_zero3.json")
    result = _run_example(tmp_path, "--deepspeed", engine_json, timeout=300)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "error: --deepspeed" in result.stderr and "names no batch size" in result.stderr
