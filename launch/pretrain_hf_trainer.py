"""Pretrain a Hugging Face causal LM with Func-SAM in the Hugging Face Trainer
(`megatron_fsam.hf.FuncSAMTrainer`).

    python launch/pretrain_hf_trainer.py --config configs/tiny_test.yaml [section.key=value ...]
    torchrun --nproc_per_node 2 launch/pretrain_hf_trainer.py --config configs/tiny_test.yaml
    deepspeed --num_gpus 2 launch/pretrain_hf_trainer.py --config configs/tiny_test.yaml \\
        --deepspeed configs/hf_trainer_zero2.json      # or configs/hf_trainer_zero3.json

The run file gives the model (`model.family` llama or gpt2, or `model.hf_config`; a Nanodo
model section is built as a Llama of the same shape), the data (the built-in corpus unless
it names others), the batch sizes, the steps, the optimizer and its schedule, the checkpoints
and the `sam` section; the script turns them into `TrainingArguments` (one process, DDP over
the launched ranks, or DeepSpeed with `--deepspeed`, a Trainer-style JSON whose "auto" values
the Trainer fills in). The optimizer is the Trainer's AdamW; the schedule warms up linearly
from `warmup_init_ratio * lr` and decays by a cosine to `min_lr_ratio * lr` (linear: to 0;
constant: stays). `checkpoint.save_dir` is the Trainer's output_dir (checkpoint-N every
`save_interval` steps, `keep_last` kept), `checkpoint.load_dir` a checkpoint-N to resume from
(or a save_dir: its newest); TensorBoard events go to `logging.tensorboard_dir`, with the SAM
scalars under `sam/...`. The eval loss on held-out data is printed before and after training.

The model is built after the TrainingArguments, as transformers documents for ZeRO-3: their
DeepSpeed config is then known, and under ZeRO-3 (`configs/hf_trainer_zero3.json`)
`from_config` partitions the model over the ranks as it is made (`zero.Init`).

Each sample is the data's `tokens` as `input_ids` and its next-token `labels` as both `labels`
and `shift_labels`: the model's loss then reads the labels as they are (no second shift), the
masked mean token cross-entropy of launch/pretrain_deepspeed.py's `causal_lm_loss`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).* not installed")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from launch.pretrain import add_launcher_arguments, is_logging_rank, parse_launched  # noqa: E402
from megatron_fsam.compat.cpu import share_cpu_cores  # noqa: E402
from megatron_fsam.compat.deepspeed_cpu import skip_shm_allreduce  # noqa: E402
from megatron_fsam.trainer.data import build_datasets  # noqa: E402
from megatron_fsam.trainer.ports import reporting_taken_port  # noqa: E402
from megatron_fsam.trainer.run_config import RunConfig, is_hugging_face, load_run_config  # noqa: E402

SCHEDULES = {"cosine": "cosine_warmup_with_min_lr", "linear": "linear", "constant": "constant"}
BATCH_KEYS = {"train_batch_size", "train_micro_batch_size_per_gpu"}  # of a DeepSpeed JSON


class Samples(torch.utils.data.Dataset):
    """The first `count` samples of a GPT dataset as the Trainer's causal-LM examples."""

    def __init__(self, dataset, count: int | None = None) -> None:
        self.dataset = dataset
        self.count = len(dataset) if count is None else min(count, len(dataset))

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = self.dataset[index]
        labels = torch.where(sample["loss_mask"] > 0, sample["labels"], -100)
        return {"input_ids": sample["tokens"], "labels": labels, "shift_labels": labels}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="run file (YAML)")
    parser.add_argument("--deepspeed", default=None, help="a Trainer-style DeepSpeed JSON")
    parser.add_argument(
        "--output_dir", default=None, help="the Trainer's output_dir (default: save_dir)"
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    add_launcher_arguments(parser)
    args = parse_launched(parser, argv)
    try:
        cfg = run_config(args.config, args.overrides)
    except (ValueError, OSError) as error:
        return _refuse(error)
    if not torch.cuda.is_available():
        share_cpu_cores()
        if args.deepspeed:  # before the Trainer's arguments, whose accelerate starts DeepSpeed
            skip_shm_allreduce()  # a 4-minute build and /dev/shm files training never uses
    from transformers import TrainingArguments

    from megatron_fsam.hf import FuncSAMTrainer
    from megatron_fsam.trainer.models import hf

    try:
        with reporting_taken_port():  # a taken port is an OSError: one line
            # With DeepSpeed, the arguments form the process group of a launched run; without,
            # their world_size does.
            training = training_arguments(cfg, args.deepspeed, args.output_dir, TrainingArguments)
            world = training.world_size
            if args.deepspeed and "WORLD_SIZE" in os.environ and not torch.cuda.is_available():
                # A launched run on the CPU: DeepSpeed's comm before the model (on GPUs
                # accelerate started it with the process group). Under ZeRO-3 from_config
                # builds the model under zero.Init, which reads the world size from DeepSpeed's
                # comm (1 while it is not up, against the Trainer's batch sizes for all ranks).
                import deepspeed

                deepspeed.init_distributed(dist_backend="gloo")
        t = cfg.train
        data = build_datasets(cfg.data, train_samples=cfg.total_steps * t.global_batch_size)
        hf_config = hf.model_config(
            cfg.model,
            tokenizer_vocab_size=data.tokenizer.vocab_size,
            padded_vocab_size=data.padded_vocab_size,
            seq_length=cfg.data.seq_length,
        )
        model = hf.build_model(hf_config, seed=t.seed)
        trainer = FuncSAMTrainer(
            sam=cfg.sam,
            model=model,
            args=training,
            train_dataset=Samples(data.train),
            eval_dataset=Samples(data.valid, t.eval_iters * t.global_batch_size),
        )
    except (ValueError, ImportError, OSError) as error:
        return _refuse(error)
    say = print if is_logging_rank() else (lambda *a, **k: None)
    unique = {id(p): p for p in model.parameters()}.values()
    parameters = sum(getattr(p, "ds_numel", p.numel()) for p in unique)  # ZeRO-3: partitioned
    say(
        f"model: {type(model).__name__}, {parameters:,} parameters; {cfg.total_steps} steps x "
        f"{world} ranks x {training.gradient_accumulation_steps} micro-batches of "
        f"{t.micro_batch_size}; {'DeepSpeed ' + args.deepspeed if args.deepspeed else 'DDP'}"
        f"; SAM {trainer.sam_config.describe()}",
        flush=True,
    )
    trainer.train(resume_from_checkpoint=_resume_from(cfg.checkpoint.load_dir))
    evals = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]
    after = trainer.evaluate()["eval_loss"]
    if evals:
        say(f"eval loss before training: {evals[0]:.4f}", flush=True)
    say(f"eval loss after training: {after:.4f}", flush=True)
    return 0


def run_config(path: str, overrides: list[str]) -> RunConfig:
    """The run file; a Nanodo model section becomes a Llama of the same shape."""
    cfg = load_run_config(path, overrides)
    if not is_hugging_face(cfg.model):
        cfg = load_run_config(path, ["model.family=llama", *overrides])
    p = cfg.parallel
    if p.tensor_parallel != 1 or p.pipeline_parallel != 1 or p.context_parallel != 1:
        raise ValueError(
            "launch/pretrain_hf_trainer.py trains with data parallelism only; set "
            "parallel.tensor_parallel, pipeline_parallel and context_parallel to 1"
        )
    return cfg


def training_arguments(cfg: RunConfig, deepspeed: str | None, output_dir: str | None, cls):
    """The run file as TrainingArguments for the ranks of this launch (WORLD_SIZE)."""
    t, o, world = cfg.train, cfg.optimizer, int(os.environ.get("WORLD_SIZE", "1"))
    if t.global_batch_size % (t.micro_batch_size * world):
        raise ValueError(
            f"train.global_batch_size {t.global_batch_size} is not a multiple of "
            f"train.micro_batch_size x ranks = {t.micro_batch_size} x {world}"
        )
    steps = cfg.total_steps
    warmup = o.lr_warmup_steps or round((o.lr_warmup_fraction or 0.0) * steps)
    schedule = SCHEDULES[o.lr_decay_style]
    kwargs = {"min_lr_rate": o.min_lr_ratio} if schedule == SCHEDULES["cosine"] else {}
    if warmup and schedule == SCHEDULES["cosine"]:
        kwargs["warmup_lr_rate"] = o.warmup_init_ratio
    elif warmup and schedule == "constant":
        schedule = "constant_with_warmup"
    ds_config = json.loads(Path(deepspeed).read_text()) if deepspeed else None
    if ds_config is not None and not (
        isinstance(ds_config, dict) and BATCH_KEYS & ds_config.keys()
    ):
        # DeepSpeed would fail later ("Either train_batch_size or ... needs to be provided"):
        # the Trainer fills in only the batch sizes a JSON names.
        raise ValueError(
            f"--deepspeed {deepspeed} names no batch size: give a Trainer-style JSON whose batch "
            'sizes are "auto" (configs/hf_trainer_zero2.json, configs/hf_trainer_zero3.json); '
            "an engine JSON like configs/deepspeed_zero3.json is for launch/pretrain_deepspeed.py"
        )
    save_dir = cfg.checkpoint.save_dir
    tensorboard = cfg.logging.tensorboard_dir
    if tensorboard:
        os.environ["TENSORBOARD_LOGGING_DIR"] = tensorboard  # transformers' TensorBoardCallback
    return cls(
        output_dir=output_dir or save_dir or os.path.join("runs", cfg.logging.run_name),
        per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.global_batch_size // (t.micro_batch_size * world),
        max_steps=steps,
        learning_rate=o.lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_epsilon=o.adam_eps,
        max_grad_norm=o.clip_grad,
        lr_scheduler_type=schedule,
        lr_scheduler_kwargs=kwargs,
        warmup_steps=warmup,
        seed=t.seed,
        bf16=t.bf16,
        logging_steps=t.log_interval,
        eval_strategy="steps",
        eval_steps=t.eval_interval,
        eval_on_start=True,  # the loss before training (also under DeepSpeed)
        save_strategy="steps" if save_dir else "no",
        save_steps=cfg.checkpoint.save_interval or steps,
        save_total_limit=cfg.checkpoint.keep_last,
        report_to=["tensorboard"] if tensorboard else "none",
        use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if world > 1 and not torch.cuda.is_available() else None,
        deepspeed=ds_config,
        dataloader_drop_last=True,
        disable_tqdm=True,
    )


def _resume_from(load_dir: str | None) -> str | None:
    """A checkpoint-N directory, or a save_dir's newest checkpoint (None: start afresh)."""
    if not load_dir:
        return None
    from transformers.trainer_utils import get_last_checkpoint

    if Path(load_dir, "trainer_state.json").is_file():
        return load_dir
    return get_last_checkpoint(load_dir) if Path(load_dir).is_dir() else None


def _refuse(error: BaseException) -> int:
    if is_logging_rank():
        message = " ".join(str(error).split())
        print(f"error: {message}", file=sys.stderr, flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())
