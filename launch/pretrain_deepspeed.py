"""Pretrain the Nanodo GPT (plain PyTorch) on a DeepSpeed engine with Func-SAM.

    deepspeed --num_gpus 8 launch/pretrain_deepspeed.py --config configs/demo_cpu.yaml \\
        --deepspeed_config configs/deepspeed_zero2.json [section.key=value ...]
    bash launch/deepspeed.sh --num_gpus 2 --script launch/pretrain_deepspeed.py -- \
        --config configs/demo_cpu.yaml --deepspeed_config configs/deepspeed_zero2.json

The run file gives the model, the data, the batch sizes, the steps and the `sam` section, as
for launch/pretrain.py; the DeepSpeed JSON gives the engine: ZeRO stage, bf16, gradient
clipping, optimizer and LR scheduler. The script fills in the JSON's batch sizes from the run
file (train_micro_batch_size_per_gpu, gradient_accumulation_steps, train_batch_size) and a
scheduler's total_num_steps, and refuses a JSON that says otherwise. Logs go to the console
and to TensorBoard (`logging.tensorboard_dir`) like the Megatron entry point's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).* not installed")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import deepspeed
import torch

from launch.pretrain import add_launcher_arguments, is_logging_rank, parse_launched
from megatron_fsam.compat.cpu import share_cpu_cores
from megatron_fsam.data import build_datasets, microbatch_iterator
from megatron_fsam.deepspeed import FuncSAM
from megatron_fsam.models.torch_gpt import TorchGPT, micro_batch_loss
from megatron_fsam.monitor import Monitor, mean_over_ranks
from megatron_fsam.run_config import RunConfig, load_run_config, resolve_vocab_size

CONSOLE = (
    "loss_clean", "loss_perturbed", "lr", "rho", "grad_norm", "eps_norm", "eps_top_share",
    "sam_step", "skipped", "tokens_per_second",
)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="run file (YAML)")
    parser.add_argument("--deepspeed_config", required=True, help="DeepSpeed config (JSON)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    add_launcher_arguments(parser)
    args = parse_launched(parser, argv)
    try:  # every rank meets a bad input alike: rank 0 says what it is, in one line
        cfg = load_run_config(args.config, args.overrides)
        config = engine_config(json.loads(Path(args.deepspeed_config).read_text()), cfg)
    except (ValueError, OSError) as error:
        if is_logging_rank():
            print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    if not torch.cuda.is_available():
        share_cpu_cores()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    train(cfg, config)
    return 0


def train(cfg: RunConfig, config: dict) -> None:
    """Data, engine, SAM; then the loop: SAM steps, logging, evaluation."""
    dp_rank, dp_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    t, steps = cfg.train, cfg.total_steps
    accumulation = config["gradient_accumulation_steps"]
    data = build_datasets(cfg.data, train_samples=steps * t.global_batch_size)
    resolve_vocab_size(cfg, data.tokenizer.vocab_size, data.padded_vocab_size)
    engine, *_ = deepspeed.initialize(
        model=TorchGPT(cfg.model, seed=t.seed), model_parameters=None, config=config
    )
    sam = FuncSAM(replace(cfg.sam, seed=t.seed if cfg.sam.seed is None else cfg.sam.seed), engine)
    monitor = Monitor(cfg.logging.tensorboard_dir, steps, is_logger=is_logging_rank())
    zero = config.get("zero_optimization", {}).get("stage", 0)
    monitor.message(
        f"training {steps} steps on a DeepSpeed engine (ZeRO stage {zero}, "
        f"{type(engine.optimizer).__name__}) x DP {dp_size}, {accumulation} micro-batches of "
        f"{t.micro_batch_size} per step; SAM {sam.config.describe()}"
    )
    source = microbatch_iterator(data.train, t.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size)
    tokens_per_step = t.global_batch_size * cfg.data.seq_length
    monitor.begin(0)
    for step in range(1, steps + 1):
        lr = engine.get_lr()[0]
        start = time.perf_counter()
        log = step % t.log_interval == 0 or step == steps
        sam.train_step(list(itertools.islice(source, accumulation)), micro_batch_loss, log_step=log)
        step_time = time.perf_counter() - start
        if log:
            scalars = mean_over_ranks({**sam.metrics, **sam.phase_times()})
            scalars.update(
                lr=lr, step_time=step_time, tokens_per_second=tokens_per_step / step_time
            )
            monitor.scalars(step, scalars)
            monitor.console(step, {k: scalars[k] for k in CONSOLE if k in scalars})
        if step % t.eval_interval == 0 or step == steps:
            loss = evaluate(engine, cfg, data.valid, dp_rank, dp_size)
            monitor.scalars(step, {"loss": loss}, prefix="eval")
            monitor.message(f"step {step:>6} | eval loss {loss:.4f}")
    monitor.close()


def engine_config(config: dict, cfg: RunConfig) -> dict:
    """The DeepSpeed JSON with the run file's batch sizes (and scheduler length) filled in,
    for the data-parallel ranks of this launch (WORLD_SIZE)."""
    p, t, world = cfg.parallel, cfg.train, int(os.environ.get("WORLD_SIZE", "1"))
    if p.tensor_parallel != 1 or p.pipeline_parallel != 1:
        raise ValueError(
            "launch/pretrain_deepspeed.py trains with data parallelism only (ZeRO); set "
            "parallel.tensor_parallel=1 and parallel.pipeline_parallel=1"
        )
    if t.global_batch_size % (t.micro_batch_size * world):
        raise ValueError(
            f"train.global_batch_size {t.global_batch_size} is not a multiple of "
            f"train.micro_batch_size x ranks = {t.micro_batch_size} x {world}"
        )
    accumulation = t.global_batch_size // (t.micro_batch_size * world)
    wanted = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": t.global_batch_size,
    }
    for key, value in wanted.items():
        if config.setdefault(key, value) != value:
            raise ValueError(
                f"the DeepSpeed config sets {key}={config[key]}, but the run file gives {value} "
                "(train.micro_batch_size / train.global_batch_size); drop it from the JSON"
            )
    if config.get("scheduler", {}).get("type") in ("WarmupDecayLR", "WarmupCosineLR"):
        config["scheduler"].setdefault("params", {}).setdefault("total_num_steps", cfg.total_steps)
    config.setdefault("bf16", {"enabled": t.bf16})
    config.setdefault("steps_per_print", 10**9)  # the script logs itself
    return config


def evaluate(engine, cfg: RunConfig, dataset, dp_rank: int, dp_size: int) -> float:
    """Mean loss over eval_iters steps' worth of held-out micro-batches, over all ranks."""
    t = cfg.train
    count = t.eval_iters * t.global_batch_size // (t.micro_batch_size * dp_size)
    source = microbatch_iterator(dataset, t.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size)
    engine.eval()
    with torch.no_grad():
        losses = [
            micro_batch_loss(engine, batch).item() for batch in itertools.islice(source, count)
        ]
    engine.train()
    return mean_over_ranks({"loss": sum(losses) / len(losses) if losses else None})["loss"]


if __name__ == "__main__":
    sys.exit(main())
