"""Pretrain a Nanodo-style GPT on Megatron-core with Func-SAM.

    python launch/pretrain.py --config configs/demo_cpu.yaml [section.key=value ...]

Runs under the deepspeed launcher (which passes --local_rank), torchrun, or as a
single process. On a machine without a GPU, megatron-core's CUDA calls are
emulated on the CPU and ranks talk over gloo.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
import warnings
from dataclasses import dataclass, replace

# megatron-core announces at import that apex / Transformer Engine are absent; on machines
# without them (any CPU run) that is expected, and it would bury the run's own output.
warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).* not installed")
# Two more that no run can act on, on any device. megatron-core's distributed optimizer reads,
# in zero_grad, the .grad of its fp32 shard views, which are not leaves (its source marks the
# line "throws grad-access warning"; under enable_cpu_emulation Python files the warning under
# megatron_fsam/compat/cpu.py, whose torch-function mode forwards every tensor attribute read).
# And megatron-core's grad buffers and DeepSpeed's ZeRO gather and reduce-scatter with the
# collectives torch 2.13 deprecates.
warnings.filterwarnings(
    "ignore", message=r"The \.grad attribute of a Tensor that is not a leaf", category=UserWarning
)
warnings.filterwarnings(
    "ignore",
    message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
    category=FutureWarning,
    module=r"torch\.distributed\.c10d_logger",
)

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_fsam import FuncSAM, enable_cpu_emulation
from megatron_fsam.backends.shards import mean_over_ranks
from megatron_fsam.compat.cpu import share_cpu_cores
from megatron_fsam.diagnostics import sharpness_composition
from megatron_fsam.trainer.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from megatron_fsam.trainer.data import GPTData, build_datasets, microbatch_iterator
from megatron_fsam.trainer.models.gpt import build_model_chunks, forward_step, transformer_config
from megatron_fsam.trainer.monitor import Monitor, SideLosses, UpdateNorm
from megatron_fsam.trainer.parallel import (
    build_optimizer,
    destroy_distributed,
    forward_backward_func,
    initialize_distributed,
    wrap_model,
)
from megatron_fsam.trainer.ports import PortInUseError
from megatron_fsam.trainer.run_config import (
    CheckpointSettings,
    RunConfig,
    embedding_params,
    load_run_config,
    non_embedding_params,
    resolve_vocab_size,
    validate_layout,
)


@dataclass
class Run:
    """Everything a training run holds between steps."""

    cfg: RunConfig
    model: list[DistributedDataParallel]
    optimizer: MegatronOptimizer
    scheduler: OptimizerParamScheduler
    sam: FuncSAM
    data: GPTData
    monitor: Monitor
    dp_rank: int
    dp_size: int
    num_microbatches: int
    train_steps: int
    iteration: int = 0
    consumed_samples: int = 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML file in configs/")
    add_launcher_arguments(parser)
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parse_launched(parser, argv)
    run = setup_or_report(args.config, args.overrides)
    if run is None:
        return 2
    train(run)
    return 0


def setup_or_report(config_path: str, overrides: list[str]) -> Run | None:
    """setup(), or None after one error line when the config or the data is bad, or the
    rendezvous port is taken.

    Every rank meets the same bad input: rank 0 says what it is, every rank exits cleanly,
    and no rank prints a traceback.
    """
    try:
        return setup(config_path, overrides)
    except (ValueError, FileNotFoundError, CheckpointError, PortInUseError) as error:
        if is_logging_rank():
            print(f"error: {error}", file=sys.stderr, flush=True)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        return None


def setup(config_path: str, overrides: list[str]) -> Run:
    """Config, process groups, data, model, optimizer, SAM, and a resumed checkpoint."""

    cfg = load_run_config(config_path, overrides)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    dp_size = validate_layout(cfg, world_size)
    _start_processes(cfg)

    train = cfg.train
    steps = cfg.total_steps
    num_microbatches = train.global_batch_size // (train.micro_batch_size * dp_size)
    data = build_datasets(
        cfg.data,
        train_samples=steps * train.global_batch_size,
        vocab_multiple=128 * cfg.parallel.tensor_parallel,
    )
    resolve_vocab_size(cfg, data.tokenizer.vocab_size, data.padded_vocab_size)
    monitor = Monitor(cfg.logging.tensorboard_dir, steps, is_logger=is_logging_rank())
    _report_parameters(cfg, monitor)

    config = transformer_config(cfg.model, cfg.parallel, bf16=train.bf16)
    chunks = build_model_chunks(cfg.model, config, cfg.parallel, seed=train.seed)
    model = wrap_model(chunks, config, cfg.parallel)
    opt = cfg.optimizer
    optimizer = build_optimizer(
        model,
        name="adam",
        lr=opt.lr,
        min_lr=opt.min_lr,
        weight_decay=opt.weight_decay,
        adam_beta1=opt.adam_beta1,
        adam_beta2=opt.adam_beta2,
        adam_eps=opt.adam_eps,
        clip_grad=opt.clip_grad,
        bf16=train.bf16,
        distributed_optimizer=cfg.parallel.distributed_optimizer,
    )
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=opt.warmup_init_lr,
        max_lr=opt.lr,
        min_lr=opt.min_lr,
        lr_warmup_steps=opt.warmup_steps(steps),
        lr_decay_steps=steps,
        lr_decay_style=opt.lr_decay_style,
        start_wd=opt.weight_decay,
        end_wd=opt.weight_decay,
        wd_incr_steps=steps,
        wd_incr_style="constant",
    )
    sam_cfg = cfg.sam if cfg.sam.seed is not None else replace(cfg.sam, seed=train.seed)
    sam = FuncSAM(sam_cfg, model, optimizer)
    run = Run(
        cfg=cfg,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        sam=sam,
        data=data,
        monitor=monitor,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=dp_size,
        num_microbatches=num_microbatches,
        train_steps=steps,
    )
    if cfg.checkpoint.load_dir:
        extra = load_checkpoint(cfg.checkpoint.load_dir, model, optimizer)
        if extra is not None:
            sam.load_state_dict(extra["sam"])
            sam.load_rank_state_dict(extra["rank"] and extra["rank"].get("sam"))
            scheduler.load_state_dict(extra["scheduler"])
            run.iteration, run.consumed_samples = extra["iteration"], extra["consumed_samples"]
            monitor.message(f"resumed from {cfg.checkpoint.load_dir} at step {run.iteration}")
    return run


def train(run: Run) -> None:
    """The training loop: SAM steps, LR schedule, logging, evaluation, checkpoints."""

    cfg, train_cfg = run.cfg, run.cfg.train
    p, sam = cfg.parallel, cfg.sam
    experts = f" (experts: EP {p.expert_parallel})" if cfg.model.num_experts else ""
    run.monitor.message(
        f"training {run.train_steps} steps: TP {p.tensor_parallel} x PP {p.pipeline_parallel} "
        f"x CP {p.context_parallel} x DP {run.dp_size}{experts}, {run.num_microbatches} "
        f"micro-batches of {train_cfg.micro_batch_size} per step; SAM {sam.describe()}, "
        f"kernels {run.sam.kernels.name}"
    )
    batches = _train_iterators(run)
    update_norm = UpdateNorm(run.sam.backend)
    side_losses = _side_losses(run)
    tokens_per_step = train_cfg.global_batch_size * cfg.data.seq_length
    run.monitor.begin(run.iteration)
    while run.iteration < run.train_steps:
        step = run.iteration + 1
        logging_step = step % train_cfg.log_interval == 0 or step == run.train_steps
        if logging_step:
            update_norm.start()
        lr = run.optimizer.param_groups[0]["lr"]  # the rate this step uses
        start = time.perf_counter()
        if side_losses:
            side_losses.begin()
        ok, _, _, metrics = run.sam.train_step(
            forward_step,
            batches,
            num_microbatches=run.num_microbatches,
            seq_length=cfg.data.seq_length,
            micro_batch_size=train_cfg.micro_batch_size,
            log_step=logging_step,
        )
        step_time = time.perf_counter() - start
        if side_losses:
            side_losses.end()
        if ok:
            run.scheduler.step(increment=1)
        run.iteration, run.consumed_samples = (
            step,
            run.consumed_samples + train_cfg.global_batch_size,
        )

        if logging_step:
            scalars = mean_over_ranks(
                {**metrics, **run.sam.phase_times(), "skipped": None, "num_zeros_in_grad": None}
            )
            scalars.update(update_norm.finish())
            if side_losses:
                scalars.update(side_losses.scalars())
            scalars["lr"] = lr
            scalars["tokens_per_second"] = tokens_per_step / step_time
            scalars["step_time"] = step_time
            if torch.cuda.is_available():
                scalars["gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            scalars["skipped"] = float(not ok)
            run.monitor.scalars(step, scalars)
            run.monitor.console(step, _console_fields(scalars))
        interval = cfg.diagnostics.sharpness_interval
        if interval and step % interval == 0:
            taus = measure_sharpness(run)
            run.monitor.scalars(step, taus, prefix="sharpness")
            shown = (k for k in taus if k.startswith(("tau_", "angle_tau_")))
            run.monitor.message(
                f"step {step:>6} | " + " | ".join(f"{k} {taus[k]:.3f}" for k in shown)
            )
        if step % train_cfg.eval_interval == 0 or step == run.train_steps:
            eval_loss = evaluate(run)
            run.monitor.scalars(step, {"loss": eval_loss}, prefix="eval")
            run.monitor.message(f"step {step:>6} | eval loss {eval_loss:.4f}")
        if _should_save(cfg.checkpoint, step, run.train_steps):
            save(run)
    run.monitor.close()


def evaluate(run: Run) -> float:
    """Mean validation loss over eval_iters steps' worth of held-out micro-batches."""
    train_cfg = run.cfg.train
    per_step = train_cfg.micro_batch_size * run.dp_size * run.num_microbatches
    iters = min(train_cfg.eval_iters, len(run.data.valid) // per_step)
    if iters < 1:
        raise ValueError(
            f"the validation split ({len(run.data.valid)} samples) is smaller than one step "
            f"({per_step} samples)"
        )
    for chunk in run.model:
        chunk.eval()
    losses = []
    with torch.no_grad():
        batches = _valid_batches(run, iters * run.num_microbatches)
        for i in range(iters):
            chunk_batches = batches[i * run.num_microbatches : (i + 1) * run.num_microbatches]
            outputs = forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=_per_chunk(run.model, chunk_batches),
                model=run.model,
                num_microbatches=run.num_microbatches,
                seq_length=run.cfg.data.seq_length,
                micro_batch_size=train_cfg.micro_batch_size,
                forward_only=True,
            )
            losses += [out["lm loss"].item() for out in outputs]
    for chunk in run.model:
        chunk.train()
    mean = sum(losses) / len(losses) if losses else None
    return mean_over_ranks({"loss": mean})["loss"]


def measure_sharpness(run: Run) -> dict[str, float]:
    """The paper's Eq. 9 split of the sharpness gradient on fixed validation micro-batches."""
    diagnostics, train_cfg = run.cfg.diagnostics, run.cfg.train
    return sharpness_composition(
        run.model,
        run.optimizer,
        forward_step,
        _valid_batches(run, run.num_microbatches),
        num_microbatches=run.num_microbatches,
        seq_length=run.cfg.data.seq_length,
        micro_batch_size=train_cfg.micro_batch_size,
        h=diagnostics.sharpness_h,
        central=diagnostics.sharpness_central,
        logits_module=run.cfg.sam.logits_module,
        angle=run.cfg.sam.angle_degrees if run.cfg.sam.sam_enabled else None,
    )


def save(run: Run) -> None:

    checkpoint = run.cfg.checkpoint
    path = save_checkpoint(
        checkpoint.save_dir,
        run.iteration,
        run.model,
        run.optimizer,
        extra={
            "sam": run.sam.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "iteration": run.iteration,
            "consumed_samples": run.consumed_samples,
        },
        rank_extra={"sam": run.sam.rank_state_dict()},
        keep_last=checkpoint.keep_last,
        sharding_type=checkpoint.sharding_type,
    )
    run.monitor.message(f"saved checkpoint {path}")


def _side_losses(run: Run) -> SideLosses | None:
    """The MoE router losses and MTP losses of pass 1 (None for a dense model without MTP)."""
    model = run.cfg.model
    mtp = model.mtp_num_layers or 0
    if model.num_experts is None and not mtp:
        return None
    moe_layers = model.num_layers + mtp if model.num_experts else 0
    return SideLosses(run.num_microbatches, moe_layers, mtp)


def _train_iterators(run: Run):
    """This rank's training micro-batches from where the run stands (one per model chunk)."""

    def source():
        return microbatch_iterator(
            run.data.train,
            run.cfg.train.micro_batch_size,
            dp_rank=run.dp_rank,
            dp_size=run.dp_size,
            start_sample=run.consumed_samples,
        )

    return [source() for _ in run.model] if len(run.model) > 1 else source()


def _valid_batches(run: Run, count: int) -> list[dict]:
    """This DP rank's first `count` validation micro-batches (the same at every call)."""
    source = microbatch_iterator(
        run.data.valid, run.cfg.train.micro_batch_size, dp_rank=run.dp_rank, dp_size=run.dp_size
    )
    return list(itertools.islice(source, count))


def _per_chunk(model: list, batches: list[dict]):
    return [iter(batches) for _ in model] if len(model) > 1 else iter(batches)


def _console_fields(scalars: dict[str, float]) -> dict[str, float]:
    names = (
        "loss_clean",
        "loss_perturbed",
        "loss_pass2_clean",
        "moe_load_balancing_loss",
        "mtp_1_loss",
        "lr",
        "rho",
        "grad_norm",
        "eps_norm",
        "eps_top_share",
        "sam_step",
        "fallback_steps",
        "update_norm",
        "tokens_per_second",
    )
    return {name: scalars[name] for name in names if name in scalars}


def _should_save(checkpoint: CheckpointSettings, step: int, last: int) -> bool:
    if not checkpoint.save_dir:
        return False
    return step == last or bool(checkpoint.save_interval and step % checkpoint.save_interval == 0)


def _report_parameters(cfg: RunConfig, monitor: Monitor) -> None:
    m = cfg.model
    active = ""
    if m.num_experts:
        active = (
            f" ({non_embedding_params(m, active=True) / 1e6:.2f}M active per token: "
            f"top-{m.moe_router_topk} of {m.num_experts} experts)"
        )
    mtp = f", {m.mtp_num_layers} multi-token-prediction layer(s)" if m.mtp_num_layers else ""
    monitor.message(
        f"model: {non_embedding_params(m) / 1e6:.2f}M non-embedding parameters{active}, "
        f"{embedding_params(m) / 1e6:.2f}M embedding parameters{mtp}"
    )


def _start_processes(cfg: RunConfig) -> None:

    if not torch.cuda.is_available():
        enable_cpu_emulation()
        share_cpu_cores()
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if os.environ["WORLD_SIZE"] == "1":  # one process meets only itself: on any free port
        os.environ.setdefault("MASTER_PORT", "0")
    initialize_distributed(cfg.parallel, seed=cfg.train.seed)


def is_logging_rank() -> bool:
    """Global rank 0, known from the launcher's environment before any process group exists."""
    return int(os.environ.get("RANK", "0")) == 0


def add_launcher_arguments(parser: argparse.ArgumentParser) -> None:
    """--local_rank, which the deepspeed launcher passes to every rank."""
    parser.add_argument(
        "--local_rank",
        "--local-rank",
        type=int,
        default=None,
        help="set by the deepspeed launcher; LOCAL_RANK is used otherwise",
    )


def parse_launched(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, and export the deepspeed launcher's --local_rank as torchrun's LOCAL_RANK."""
    args = parser.parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    return args


if __name__ == "__main__":
    code = main()
    destroy_distributed()  # the run is gone with main(); a rank that raised does not wait here
    sys.exit(code)
