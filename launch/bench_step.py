"""Time a Func-SAM step against a plain AdamW step on the same Megatron model and data.

    python launch/bench_step.py [--layers 4 --hidden 256 --heads 4 --seq 256 --vocab 8192 ...]
    python launch/bench_step.py --config configs/moe_demo_cpu.yaml   # a run file's model

Runs as one process (on the CPU under the emulation when there is no GPU) and prints,
for every SAM mode, the median and the mean step time (ms) and three ratios to the AdamW step
measured in the same run: "paired", the median over rounds of the mode's step over AdamW's in
the same round (the steadiest: a shared machine's slow drifts touch both steps of a round
alike), the ratio of the medians and the ratio of the means; then the split of the SAM step
into pass 1 / perturb / pass 2 / (pass 3) / optimizer, and the step's FLOPs over AdamW's
(`flops`, megatron_fsam.cost: a forward 1, a backward 2). The ideal ratio is that FLOPs
ratio: about 2 for the paper's forms (two forward-backward passes), 4/3 for fsam with a
direction known before the step (`... previous`: sam.ascent="previous"; its pass 1 is a
forward), 1 for sam with one (one forward-backward at theta + eps); what exceeds it is SAM's
own cost. Modes that thin out SAM steps (`fsam every 4`: sam_interval=4) are judged by the
ratio of the means over many steps (--steps 40: ideally 1.25).
The last lines are the precondition's cost, fsam precond's step time over fsam's (the median
of each round's ratio, and the ratio of the medians; then what precond adds outside the passes,
which are the same work in both modes: the steadiest estimate, free of the passes' noise of a
few percent a step on a shared machine), and Func-SAM's own cost over SAM: the
median over rounds of fsam's step time minus sam's in the same round, in ms and as a fraction
of that round's AdamW step.

`--config` times the model of a run file (mixture of experts and multi-token prediction
included) with its sequence length and micro-batch size, in one process: every expert on
this rank (expert_parallel 1), `--microbatches` micro-batches; a vocabulary of 'auto' takes
`--vocab`.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import statistics
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).* not installed")
# Time this checkout's package, not whichever copy is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from megatron_fsam import FuncSAM, SAMConfig, enable_cpu_emulation
from megatron_fsam.backends.megatron import reset_loss_trackers
from megatron_fsam.trainer.models.gpt import (
    GPTConfig,
    build_model_chunks,
    forward_step,
    transformer_config,
)
from megatron_fsam.trainer.parallel import (
    ParallelConfig,
    build_optimizer,
    destroy_distributed,
    initialize_distributed,
    wrap_model,
)
from megatron_fsam.trainer.run_config import AUTO_VOCAB, load_run_config

PHASES = ("time_pass1", "time_perturb", "time_pass2", "time_pass3", "time_optimizer")
# Modes compared with each other (sam and fsam, fsam and fsam precond) sit next to each other:
# in most rounds they run back to back, so the machine's slow drifts touch both alike.
MODES = {
    "adamw": SAMConfig(mode="adamw"),
    "sam": SAMConfig(mode="sam"),
    "fsam": SAMConfig(mode="fsam"),
    "fsam precond": SAMConfig(mode="fsam", precond=True),
    "fsam recompute": SAMConfig(mode="fsam", cotangent_memory="recompute"),
    "angle 45": SAMConfig(mode="angle", angle=45.0),
    "angle 45 exact": SAMConfig(mode="angle", angle=45.0, angle_impl="exact"),
    "fsam every 4": SAMConfig(mode="fsam", sam_interval=4),
    "sam previous": SAMConfig(mode="sam", ascent="previous"),
    "fsam precond previous": SAMConfig(mode="fsam", precond=True, ascent="previous"),
}


def main() -> None:
    args = _parse_args()
    model_cfg = _model(args)
    parallel = single_process()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vocab = model_cfg.vocab_size
    batches = random_batches(args.microbatches, args.micro_batch, args.seq, vocab, device)
    modes = [(name, MODES[name]) for name in ["adamw", *(m for m in args.modes if m != "adamw")]]
    print(
        f"{device}, bf16={args.bf16}: {model_cfg.num_layers} layers x {model_cfg.hidden_size} "
        f"wide{_moe_shape(model_cfg)}, vocab {vocab}, {args.microbatches} micro-batches of "
        f"{args.micro_batch} x {args.seq}"
    )
    # Interleaved rounds, one step of every mode each, so drifting machine load hits all alike.
    sams = {name: build_sam(cfg, model_cfg, parallel, args.bf16) for name, cfg in modes}
    times = {name: [] for name in sams}
    phases = {name: {p: [] for p in PHASES} for name in sams}
    flops = {name: [] for name in sams}  # each step's FLOPs over a plain step's
    names = list(sams)
    for round_ in range(args.warmup + args.steps):
        # Each round starts one mode further on, so that no mode always follows the same one.
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            sam = sams[name]
            gc.collect()  # as timeit does: no collection of another mode's garbage in a step
            gc.disable()
            try:
                metrics = run_step(sam, batches)
            finally:
                gc.enable()
            seconds = sam.phase_times()
            if round_ >= args.warmup:
                flops[name].append(metrics["passes"])
                times[name].append(sum(seconds.get(p, 0.0) for p in PHASES))
                for p in PHASES:
                    if p in seconds:
                        phases[name][p].append(seconds[p])
    baseline = statistics.median(times["adamw"])
    baseline_mean = statistics.mean(times["adamw"])
    print(
        f"{'mode':>21}  {'median':>8}  {'mean':>8}   x adamw: {'paired':>6} {'medians':>7} "
        f"{'means':>6} {'flops':>6}   phases (median ms)"
    )
    for name in sams:
        median, mean = statistics.median(times[name]), statistics.mean(times[name])
        paired = statistics.median(_ratios(times[name], times["adamw"]))
        split = " ".join(
            f"{p.removeprefix('time_')} {statistics.median(v) * 1e3:.1f}"
            for p, v in phases[name].items()
            if v
        )
        print(
            f"{name:>21}  {median * 1e3:8.1f}  {mean * 1e3:8.1f}            {paired:6.2f} "
            f"{median / baseline:7.2f} {mean / baseline_mean:6.2f} "
            f"{statistics.mean(flops[name]):6.2f}   {split}"
        )
    if "fsam" in times and "fsam precond" in times:
        ratios = _ratios(times["fsam precond"], times["fsam"])
        of_medians = statistics.median(times["fsam precond"]) / statistics.median(times["fsam"])
        print(
            f"precond overhead: fsam precond / fsam x{statistics.median(ratios):.3f} (median of "
            f"{len(ratios)} rounds' ratios; range {min(ratios):.3f} .. {max(ratios):.3f}); "
            f"medians x{of_medians:.3f}"
        )
        # The passes are the same work in both modes; what precond adds is outside them.
        own = {
            p.removeprefix("time_"): statistics.median(phases["fsam precond"][p])
            - statistics.median(phases["fsam"][p])
            for p in ("time_perturb", "time_optimizer")
        }
        print(
            "    outside the passes: "
            + ", ".join(f"{p} {ms * 1e3:+.1f} ms" for p, ms in own.items())
            + f" (medians) = x{1 + sum(own.values()) / statistics.median(times['fsam']):.3f} "
            "of the fsam step"
        )
    if "fsam" in times and "sam" in times:
        gaps = [f - s for f, s in zip(times["fsam"], times["sam"], strict=True)]
        gap_ratios = _ratios(gaps, times["adamw"])
        print(
            f"   fsam - sam: {statistics.median(gaps) * 1e3:+8.1f} ms/step  "
            f"{statistics.median(gap_ratios):+.3f} x adamw  (median of {len(gaps)} rounds; "
            f"range {min(gap_ratios):+.3f} .. {max(gap_ratios):+.3f})"
        )
    destroy_distributed()


def _ratios(times: list[float], baseline: list[float]) -> list[float]:
    """Each round's step time over the baseline's in the same round."""
    return [t / b for t, b in zip(times, baseline, strict=True)]


def _model(args: argparse.Namespace) -> GPTConfig:
    """The model of --config (its sequence and micro-batch size into `args`), or of the flags."""
    if args.config is None:
        return GPTConfig(
            num_layers=args.layers,
            hidden_size=args.hidden,
            num_attention_heads=args.heads,
            vocab_size=args.vocab,
            seq_length=args.seq,
        )
    run = load_run_config(args.config)
    args.seq, args.micro_batch = run.data.seq_length, run.train.micro_batch_size
    vocab = args.vocab if run.model.vocab_size == AUTO_VOCAB else run.model.vocab_size
    return dataclasses.replace(run.model, vocab_size=vocab)


def _moe_shape(model: GPTConfig) -> str:
    parts = []
    if model.num_experts:
        parts.append(f"{model.num_experts} experts top-{model.moe_router_topk}")
        if model.moe_router_enable_expert_bias:
            parts.append("expert bias")
    if model.mtp_num_layers:
        parts.append(f"{model.mtp_num_layers} MTP layer(s)")
    return f" ({', '.join(parts)})" if parts else ""


def single_process() -> ParallelConfig:
    """Join a one-rank job (CPU emulation without a GPU); its layout."""
    if not torch.cuda.is_available():
        enable_cpu_emulation()
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "0")  # one process meets only itself: any free port
    parallel = ParallelConfig()
    initialize_distributed(parallel)
    return parallel


def build_sam(
    cfg: SAMConfig, model_cfg: GPTConfig, parallel: ParallelConfig, bf16: bool
) -> FuncSAM:
    """A fresh model, its Megatron optimizer and the SAM step around them."""
    reset_loss_trackers()  # megatron-core sizes them by the first model's depth
    config = transformer_config(model_cfg, parallel, bf16=bf16)
    model = wrap_model(build_model_chunks(model_cfg, config, parallel), config, parallel)
    return FuncSAM(cfg, model, build_optimizer(model, lr=1e-4, bf16=bf16))


def run_step(sam: FuncSAM, batches: list[dict]) -> dict[str, float | None]:
    """One step on `batches`; its metrics."""
    micro_batch, seq = batches[0]["tokens"].shape
    ok, _, _, metrics = sam.train_step(
        forward_step,
        iter(batches),
        num_microbatches=len(batches),
        seq_length=seq,
        micro_batch_size=micro_batch,
    )
    if not ok:
        raise RuntimeError("a benchmark step was skipped")
    return metrics


def random_batches(
    count: int, micro_batch: int, seq: int, vocab: int, device: str
) -> list[dict[str, torch.Tensor]]:
    """`count` micro-batches of random tokens (what a step costs does not depend on them)."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        stream = torch.randint(0, vocab, (micro_batch, seq + 1), generator=generator).to(device)
        batches.append(
            {
                "tokens": stream[:, :-1].contiguous(),
                "labels": stream[:, 1:].contiguous(),
                "loss_mask": torch.ones(micro_batch, seq, device=device),
                "position_ids": torch.arange(seq, device=device).expand(micro_batch, -1),
            }
        )
    return batches


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config", help="time a run file's model (its seq and micro-batch size; one process)"
    )
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192, help="(also for vocab_size: auto)")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--microbatches", type=int, default=2)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=25, help="timed rounds")
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=list(MODES),
        default=list(MODES),
        help="modes to time (adamw, the baseline, always runs)",
    )
    return parser.parse_args()


if __name__ == "__main__":
    main()
