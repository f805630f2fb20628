"""Pretrain a GPT on a DeepSpeed engine with Func-SAM: the Nanodo GPT (plain PyTorch) or a
Hugging Face causal LM (Llama, GPT-2, or any transformers config JSON).

    deepspeed --num_gpus 8 launch/pretrain_deepspeed.py --config configs/demo_cpu.yaml \\
        --deepspeed_config configs/deepspeed_zero2.json [section.key=value ...]
    bash launch/deepspeed.sh --num_gpus 2 --script launch/pretrain_deepspeed.py -- \
        --config configs/demo_cpu.yaml --deepspeed_config configs/deepspeed_zero3.json \
        model.family=llama

The run file gives the model, the data, the batch sizes, the steps, the checkpoints and the
`sam` section, as for launch/pretrain.py; the DeepSpeed JSON gives the engine: ZeRO stage,
bf16, gradient clipping, optimizer and LR scheduler. The script fills in the JSON's batch sizes
from the run file (train_micro_batch_size_per_gpu, gradient_accumulation_steps,
train_batch_size) and a scheduler's total_num_steps, and refuses a JSON that says otherwise.
Logs go to the console and to TensorBoard (`logging.tensorboard_dir`) like the Megatron entry
point's.

`model.family` picks the model: "nanodo" (TorchGPT), "llama" or "gpt2" (built by
megatron_fsam/trainer/models/hf.py from the model section), or `model.hf_config` a
transformers config JSON. At ZeRO stage 3 the model is built under `deepspeed.zero.Init`
(each parameter partitioned as it is made), with the same weights as without it.

Checkpoints (`checkpoint.save_dir`, `save_interval`, `keep_last`) are DeepSpeed's,
`save_dir/iter_XXXXXXX`, written at the end of a step (theta, never theta + eps) with the SAM
state, the step, the samples consumed and every rank's RNG state; `checkpoint.load_dir` (a
save_dir, whose `latest` is loaded, or one iter_XXXXXXX in it) resumes where it stopped: the
same losses and weights, bit for bit, as a run that never stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import shutil
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).* not installed")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import deepspeed
import torch

from launch.pretrain import add_launcher_arguments, is_logging_rank, parse_launched
from megatron_fsam.backends.shards import mean_over_ranks
from megatron_fsam.compat.cpu import share_cpu_cores
from megatron_fsam.compat.deepspeed_cpu import skip_shm_allreduce
from megatron_fsam.deepspeed import FuncSAM, load_rank_state, save_rank_state
from megatron_fsam.trainer.data import build_datasets, microbatch_iterator
from megatron_fsam.trainer.data.gpt_data import GPTData
from megatron_fsam.trainer.models.torch_gpt import TorchGPT, micro_batch_loss
from megatron_fsam.trainer.monitor import Monitor
from megatron_fsam.trainer.parallel import destroy_distributed
from megatron_fsam.trainer.ports import PortInUseError, reporting_taken_port
from megatron_fsam.trainer.run_config import (
    CheckpointSettings,
    RunConfig,
    is_hugging_face,
    load_run_config,
    resolve_vocab_size,
)

CONSOLE = (
    "loss_clean", "loss_perturbed", "lr", "rho", "grad_norm", "eps_norm", "eps_top_share",
    "sam_step", "skipped", "tokens_per_second",
)  # fmt: skip
TAG = re.compile(r"^iter_(\d{7,})$")
META = "megatron_fsam.json"  # next to DeepSpeed's files in each checkpoint: what was saved


class CheckpointRefused(ValueError):
    """A checkpoint that cannot resume this run; the message is one line."""


@dataclass
class Run:
    cfg: RunConfig
    config: dict  # the DeepSpeed JSON, filled in
    engine: object
    sam: FuncSAM
    data: GPTData
    loss: object  # loss(engine, batch) -> the micro-batch's mean token loss
    monitor: Monitor
    model: dict  # what a checkpoint must have been saved from
    dp_rank: int
    dp_size: int
    step: int = 0
    consumed_samples: int = 0

    @property
    def zero_stage(self) -> int:
        return self.config.get("zero_optimization", {}).get("stage", 0)


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
        return _refuse(error)
    try:
        with reporting_taken_port():
            if torch.cuda.is_available():
                deepspeed.init_distributed(dist_backend="nccl")
            else:
                share_cpu_cores()
                skip_shm_allreduce()  # a 4-minute build and /dev/shm files training never uses
                deepspeed.init_distributed(dist_backend="gloo")
    except PortInUseError as error:
        return _refuse(error)
    try:  # the model section against the data, transformers, FuncSAM's refusals, a checkpoint
        run = setup(cfg, config)
    except (ValueError, ImportError, OSError) as error:
        return _refuse(error)
    train(run)
    return 0


def _refuse(error: BaseException) -> int:
    if is_logging_rank():
        message = " ".join(str(error).split())
        print(f"error: {message}", file=sys.stderr, flush=True)
    return 1


def setup(cfg: RunConfig, config: dict) -> Run:
    """Data, the model (under zero.Init at ZeRO-3), engine, SAM, and a resumed checkpoint."""
    dp_rank, dp_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    t = cfg.train
    if cfg.checkpoint.save_dir:
        _check_save_dir(Path(cfg.checkpoint.save_dir))
    data = build_datasets(cfg.data, train_samples=cfg.total_steps * t.global_batch_size)
    model, loss = build_model(cfg, config, data)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=None, config=config)
    sam = FuncSAM(replace(cfg.sam, seed=t.seed if cfg.sam.seed is None else cfg.sam.seed), engine)
    monitor = Monitor(cfg.logging.tensorboard_dir, cfg.total_steps, is_logger=is_logging_rank())
    run = Run(
        cfg=cfg, config=config, engine=engine, sam=sam, data=data, loss=loss, monitor=monitor,
        model=_identity(cfg, model), dp_rank=dp_rank, dp_size=dp_size,
    )  # fmt: skip
    accumulation = config["gradient_accumulation_steps"]
    monitor.message(
        f"model: {run.model['class']} ({run.model['family']}), "
        f"{run.model['parameters']:,} parameters"
    )
    monitor.message(
        f"training {cfg.total_steps} steps on a DeepSpeed engine (ZeRO stage {run.zero_stage}, "
        f"{type(engine.optimizer).__name__}) x DP {dp_size}, {accumulation} micro-batches of "
        f"{t.micro_batch_size} per step; SAM {sam.config.describe()}"
    )
    if cfg.checkpoint.load_dir:
        resume(run, cfg.checkpoint.load_dir)
    return run


def build_model(cfg: RunConfig, config: dict, data: GPTData):
    """The run file's model and its loss function; at ZeRO stage 3 built under zero.Init."""
    zero3 = config.get("zero_optimization", {}).get("stage", 0) == 3
    tokenizer, padded = data.tokenizer.vocab_size, data.padded_vocab_size
    if not is_hugging_face(cfg.model):
        resolve_vocab_size(cfg, tokenizer, padded)
        with deepspeed.zero.Init(config_dict_or_path=config) if zero3 else nullcontext():
            return TorchGPT(cfg.model, seed=cfg.train.seed), micro_batch_loss
    from megatron_fsam.trainer.models import hf

    hf_config = hf.model_config(
        cfg.model,
        tokenizer_vocab_size=tokenizer,
        padded_vocab_size=padded,
        seq_length=cfg.data.seq_length,
    )
    model = hf.build_model(hf_config, seed=cfg.train.seed, zero_init=config if zero3 else None)
    return model, hf.causal_lm_loss


def _identity(cfg: RunConfig, model: torch.nn.Module) -> dict:
    """The model as a checkpoint records it: class, family, and its parameters' names and
    shapes (ZeRO-3: the full shapes of the partitioned params)."""
    shapes = [
        f"{name}:{tuple(getattr(p, 'ds_shape', p.shape))}" for name, p in model.named_parameters()
    ]
    unique = {id(p): p for p in model.parameters()}.values()
    return {
        "class": type(model).__name__,
        "family": (
            f"{model.config.model_type} from model.hf_config"
            if cfg.model.hf_config
            else cfg.model.family
        ),
        "parameters": sum(getattr(p, "ds_numel", p.numel()) for p in unique),
        "signature": hashlib.sha256("\n".join(shapes).encode()).hexdigest()[:16],
    }


def train(run: Run) -> None:
    """The loop from where the run stands: SAM steps, logging, evaluation, checkpoints."""
    cfg, engine, sam, monitor = run.cfg, run.engine, run.sam, run.monitor
    t, steps = cfg.train, cfg.total_steps
    accumulation = run.config["gradient_accumulation_steps"]
    source = microbatch_iterator(
        run.data.train, t.micro_batch_size, dp_rank=run.dp_rank, dp_size=run.dp_size,
        start_sample=run.consumed_samples,
    )  # fmt: skip
    tokens_per_step = t.global_batch_size * cfg.data.seq_length
    if run.step >= steps:
        monitor.message(f"the run stands at step {run.step} of {steps}: nothing left to train")
    monitor.begin(run.step)
    while run.step < steps:
        step = run.step + 1
        lr = engine.get_lr()[0]
        start = time.perf_counter()
        log = step % t.log_interval == 0 or step == steps
        batches = list(itertools.islice(source, accumulation))
        sam.train_step(batches, run.loss, log_step=log)
        step_time = time.perf_counter() - start
        run.step, run.consumed_samples = step, run.consumed_samples + t.global_batch_size
        if log:
            scalars = mean_over_ranks({**sam.metrics, **sam.phase_times()})
            scalars.update(
                lr=lr, step_time=step_time, tokens_per_second=tokens_per_step / step_time
            )
            monitor.scalars(step, scalars)
            monitor.console(step, {k: scalars[k] for k in CONSOLE if k in scalars})
        if step % t.eval_interval == 0 or step == steps:
            loss = evaluate(run)
            monitor.scalars(step, {"loss": loss}, prefix="eval")
            monitor.message(f"step {step:>6} | eval loss {loss:.4f}")
        if _should_save(cfg.checkpoint, step, steps):
            save(run)
    monitor.close()


# ----- checkpoints ---------------------------------------------------------------------------


def _should_save(checkpoint: CheckpointSettings, step: int, last: int) -> bool:
    if not checkpoint.save_dir:
        return False
    return step == last or bool(checkpoint.save_interval and step % checkpoint.save_interval == 0)


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save(run: Run) -> None:
    """DeepSpeed's checkpoint of the engine (model, ZeRO partitions of the fp32 masters and
    Adam state, LR scheduler) at the end of a step, with the SAM state, the step, the data
    position and every rank's RNG state; `latest` names it once it is complete."""
    root, tag = run.cfg.checkpoint.save_dir, f"iter_{run.step:07d}"
    rng = [None] * run.dp_size
    torch.distributed.all_gather_object(rng, _rng_state())
    meta = {
        "step": run.step,
        "consumed_samples": run.consumed_samples,
        "zero_stage": run.zero_stage,
        "world_size": run.dp_size,
        "model": run.model,
    }
    client = {"megatron_fsam": {**meta, "sam": run.sam.state_dict(), "rng": rng}}
    run.engine.save_checkpoint(root, tag=tag, client_state=client, save_latest=False)
    save_rank_state(run.sam.rank_state_dict(), Path(root) / tag)
    torch.distributed.barrier()  # every rank's files are written before `latest` names them
    if torch.distributed.get_rank() == 0:
        (Path(root) / tag / META).write_text(json.dumps(meta, indent=1) + "\n")
        (Path(root) / "latest").write_text(tag)
        _prune(Path(root), run.cfg.checkpoint.keep_last, run.step)
    torch.distributed.barrier()
    where = Path(root) / tag
    _note(run, f"saved checkpoint {where} (step {run.step}, ZeRO stage {run.zero_stage})")


def _check_save_dir(root: Path) -> None:
    """Refuse a save_dir whose `latest` names no checkpoint of this script (launch/pretrain.py
    writes megatron-core checkpoints under the same iter_XXXXXXX names)."""
    latest = root / "latest"
    if latest.is_file() and not (root / latest.read_text().strip() / META).is_file():
        raise CheckpointRefused(
            f"checkpoint.save_dir {root} holds checkpoints of another kind (its 'latest' names "
            f"{latest.read_text().strip()!r}, not a launch/pretrain_deepspeed.py checkpoint): "
            "choose another checkpoint.save_dir"
        )


def _prune(root: Path, keep_last: int, newest: int) -> None:
    """Remove all but the newest `keep_last` checkpoints of this script (never the one just
    saved)."""
    saved = sorted(
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := TAG.match(p.name)) and (p / META).is_file()
    )
    for step, path in saved[:-keep_last]:
        if step != newest:
            shutil.rmtree(path, ignore_errors=True)


def _note(run: Run, text: str) -> None:
    """A checkpoint message on the console and, as text, in TensorBoard."""
    run.monitor.message(text)
    if run.monitor.writer is not None:
        run.monitor.writer.add_text("checkpoint", text, run.step)
        run.monitor.writer.flush()


def resume(run: Run, load_dir: str) -> None:
    """Load `load_dir` (a save_dir: its `latest`; or one iter_XXXXXXX) into the engine, SAM,
    the step, the data position and the RNG; refuse, in one line, a checkpoint of another
    ZeRO stage, model or world size. A save_dir without checkpoints starts the run afresh."""
    given = Path(load_dir)
    if TAG.match(given.name) and given.is_dir():
        root, tag = given.parent, given.name
    elif (given / "latest").is_file():
        root, tag = given, (given / "latest").read_text().strip()
    elif not given.exists() or (
        given.is_dir() and not any(TAG.match(p.name) for p in given.iterdir())
    ):
        _note(run, f"no checkpoint in {given} yet: starting at step 0")
        return
    else:
        raise CheckpointRefused(
            f"checkpoint.load_dir {given} is neither a save_dir with a 'latest' file nor an "
            "iter_XXXXXXX checkpoint"
        )
    path = root / tag
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, json.JSONDecodeError):
        raise CheckpointRefused(
            f"{path} has no readable {META}: it was not saved by launch/pretrain_deepspeed.py "
            "(or its save did not finish)"
        ) from None
    if meta["zero_stage"] != run.zero_stage:
        raise CheckpointRefused(
            f"{path} was saved at ZeRO stage {meta['zero_stage']}; this run is at stage "
            f"{run.zero_stage} (DeepSpeed's checkpoint files differ by stage): resume at "
            f"stage {meta['zero_stage']}"
        )
    if meta["model"] != run.model:
        saved, now = meta["model"], run.model
        raise CheckpointRefused(
            f"{path} holds a {saved['class']} ({saved['family']}, {saved['parameters']:,} "
            f"parameters), not this run's {now['class']} ({now['family']}, "
            f"{now['parameters']:,} parameters)"
        )
    if meta["world_size"] != run.dp_size:
        raise CheckpointRefused(
            f"{path} was saved by {meta['world_size']} ranks, this run has {run.dp_size}: "
            "the ZeRO partitions load into the same number of ranks"
        )
    loaded, client = run.engine.load_checkpoint(str(root), tag=tag)
    if loaded is None:
        raise CheckpointRefused(f"DeepSpeed could not load {path}")
    state = client["megatron_fsam"]
    run.sam.load_state_dict(state["sam"])
    run.sam.load_rank_state_dict(load_rank_state(path))
    rng = state["rng"][run.dp_rank]
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    run.step, run.consumed_samples = state["step"], state["consumed_samples"]
    _note(
        run,
        f"resumed from {path} at step {run.step} ({run.consumed_samples} samples consumed, "
        f"ZeRO stage {run.zero_stage})",
    )


# ----- the engine's config and evaluation ------------------------------------------------------


def engine_config(config: dict, cfg: RunConfig) -> dict:
    """The DeepSpeed JSON with the run file's batch sizes (and scheduler length) filled in,
    for the data-parallel ranks of this launch (WORLD_SIZE)."""
    p, t, world = cfg.parallel, cfg.train, int(os.environ.get("WORLD_SIZE", "1"))
    if p.tensor_parallel != 1 or p.pipeline_parallel != 1 or p.context_parallel != 1:
        raise ValueError(
            "launch/pretrain_deepspeed.py trains with data parallelism only (ZeRO); set "
            "parallel.tensor_parallel, pipeline_parallel and context_parallel to 1"
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


def evaluate(run: Run) -> float:
    """Mean loss over eval_iters steps' worth of held-out micro-batches, over all ranks."""
    t, engine = run.cfg.train, run.engine
    count = t.eval_iters * t.global_batch_size // (t.micro_batch_size * run.dp_size)
    source = microbatch_iterator(
        run.data.valid, t.micro_batch_size, dp_rank=run.dp_rank, dp_size=run.dp_size
    )
    engine.eval()
    with torch.no_grad():
        losses = [run.loss(engine, batch).item() for batch in itertools.islice(source, count)]
    engine.train()
    return mean_over_ranks({"loss": sum(losses) / len(losses) if losses else None})["loss"]


if __name__ == "__main__":
    code = main()
    destroy_distributed()  # the run is gone with main(); a rank that raised does not wait here
    sys.exit(code)
