"""What Func-SAM holds between its passes in each cotangent_memory mode.

    python launch/bench_memory.py                 # the paper's 1.2B run and Llama-like runs
    python launch/bench_memory.py --hidden 4096 --vocab 128256 --seq 8192 --micro-batch 1 \\
        --microbatches 16 --tp 4 --sp           # any shape: a row of its own
    python launch/bench_memory.py --check         # measured on the demo model, one process

The table gives, per rank of the last pipeline stage, the bytes kept from pass 1 to pass 2
(`megatron_fsam.memory`): "device" keeps the logit cotangents on the accelerator, "offload"
the same bytes in pinned host memory, "recompute" the logits module's inputs plus one copy of
its weight shard. The exact ANGLE-SAM form keeps twice as much (both sides, during pass 3).

`--check` builds the demo model (configs/demo_cpu.yaml's shape and micro-batches per rank),
runs one step of fsam and of the exact angle form in every memory mode, and prints the bytes
the gate actually held (the sum of its stored tensors) next to the formula; then the same with
1 and 2 multi-token-prediction layers, whose heads call the logits layer once more each per
micro-batch (`--mtp-check 0` skips them). On a GPU it also prints
torch.cuda.max_memory_allocated of an AdamW step and of each SAM step.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).* not installed")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from launch.bench_step import build_sam, random_batches, run_step, single_process
from megatron_fsam import SAMConfig
from megatron_fsam.memory import LogitShapes, bytes_between_passes
from megatron_fsam.trainer.models.gpt import GPTConfig
from megatron_fsam.trainer.parallel import destroy_distributed

GiB = 2**30
# The paper's largest Nanodo run (configs/nanodo_h64.yaml: 1.2B non-embedding parameters,
# global batch 256 x 512 in micro-batches of 8) on 8 data-parallel ranks, bf16.
PAPER_1B = LogitShapes(
    seq_length=512, micro_batch_size=8, num_microbatches=4, hidden_size=4096, vocab_size=32000
)
# A Llama-3-8B-like run: vocab 128,256, sequence 4,096, 32 micro-batches of 1 per rank.
LLAMA = LogitShapes(
    seq_length=4096, micro_batch_size=1, num_microbatches=32, hidden_size=4096, vocab_size=128256
)
SHAPES = {
    "paper 1.2B, DP=8": PAPER_1B,
    "llama-like, TP=1": LLAMA,
    "llama-like, TP=8 SP": dataclasses.replace(LLAMA, tensor_parallel=8, sequence_parallel=True),
}
# The demo (configs/demo_cpu.yaml): 2 layers x 128, vocab 4,096, 2 micro-batches of 8 x 128
# per rank (global batch 32 over DP=2).
DEMO = GPTConfig(
    num_layers=2, hidden_size=128, num_attention_heads=4, vocab_size=4096, seq_length=128
)
DEMO_MICRO_BATCH, DEMO_MICROBATCHES = 8, 2
CHECKED_MODES = {
    "fsam": (SAMConfig(mode="fsam"), 2),
    "angle 45 exact": (SAMConfig(mode="angle", angle=45.0, angle_impl="exact"), 3),
}


def main() -> None:
    args = _parse_args()
    if args.check:
        check(bf16=args.bf16, mtp_depths=range(args.mtp_check + 1))
        return
    shapes = dict(SHAPES)
    if args.hidden:
        shapes["given"] = LogitShapes(
            seq_length=args.seq,
            micro_batch_size=args.micro_batch,
            num_microbatches=args.microbatches,
            hidden_size=args.hidden,
            vocab_size=args.vocab,
            tensor_parallel=args.tp,
            sequence_parallel=args.sp,
            logits_calls=1 + args.mtp_layers,
        )
    print_table(shapes)


def print_table(shapes: dict[str, LogitShapes]) -> None:
    print(
        f"{'run':>20} | {'seq x mb x n':>14} | {'hidden':>6} | {'vocab/TP':>8} | "
        f"{'device':>9} | {'offload (host)':>14} | {'recompute':>9} | device/recompute"
    )
    for name, s in shapes.items():
        device = bytes_between_passes(s, "device")
        recompute = bytes_between_passes(s, "recompute")
        print(
            f"{name:>20} | {s.seq_length:>5} x {s.micro_batch_size} x {s.num_microbatches:<3} | "
            f"{s.hidden_size:>6} | {s.vocab_shard:>8} | {_gib(device):>9} | "
            f"{_gib(bytes_between_passes(s, 'offload')):>14} | {_gib(recompute):>9} | "
            f"x{device / recompute:.1f} (vocab/TP / hidden = {s.vocab_shard / s.hidden_size:.1f})"
        )


def check(bf16: bool, mtp_depths=(0, 1, 2)) -> None:
    """Held bytes measured on the demo model (and with MTP layers) against the formula; GPU
    peak memory if any."""
    parallel = single_process()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    batches = random_batches(
        DEMO_MICROBATCHES, DEMO_MICRO_BATCH, DEMO.seq_length, DEMO.vocab_size, device
    )
    element = 2 if bf16 else 4
    print(
        f"demo model on {device}, {'bf16' if bf16 else 'fp32'}: {DEMO_MICROBATCHES} micro-batches "
        f"of {DEMO_MICRO_BATCH} x {DEMO.seq_length}, hidden {DEMO.hidden_size}, vocab "
        f"{DEMO.vocab_size}"
    )
    _, peak = _measured_step(build_sam(SAMConfig(mode="adamw"), DEMO, parallel, bf16), batches)
    print(f"  {'adamw':>26}: peak {peak}")
    for depth in mtp_depths:
        model = dataclasses.replace(DEMO, mtp_num_layers=depth or None)
        shapes = LogitShapes(
            seq_length=DEMO.seq_length,
            micro_batch_size=DEMO_MICRO_BATCH,
            num_microbatches=DEMO_MICROBATCHES,
            hidden_size=DEMO.hidden_size,
            vocab_size=DEMO.vocab_size,
            logits_calls=1 + depth,
            activation_bytes=element,
            weight_bytes=element,
        )
        mtp = f" mtp {depth}" if depth else ""
        for name, (cfg, passes) in CHECKED_MODES.items():
            for memory in ("device", "offload", "recompute"):
                sam_cfg = dataclasses.replace(cfg, cotangent_memory=memory)
                metrics, peak = _measured_step(build_sam(sam_cfg, model, parallel, bf16), batches)
                held = int(metrics["held_bytes"])
                want = bytes_between_passes(shapes, memory, passes)
                print(
                    f"  {name + mtp:>20} {memory:>9}: held {held:>11,} B, formula {want:>11,} B "
                    f"({'equal' if held == want else 'DIFFERENT'}), peak {peak}"
                )
    destroy_distributed()


def _measured_step(sam, batches: list[dict]) -> tuple[dict, str]:
    """A warm-up step, then a measured one: its metrics and torch.cuda.max_memory_allocated."""
    run_step(sam, batches)
    if not torch.cuda.is_available():
        return run_step(sam, batches), "n/a (no GPU)"
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    metrics = run_step(sam, batches)
    torch.cuda.synchronize()
    return metrics, f"{torch.cuda.max_memory_allocated() / 2**20:,.1f} MiB"


def _gib(count: int) -> str:
    return f"{count / GiB:.2f} GiB"


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="measure on the demo model")
    parser.add_argument("--bf16", action="store_true", help="--check with bf16 params")
    parser.add_argument(
        "--mtp-check",
        type=int,
        default=2,
        help="--check also with 1 .. this many multi-token-prediction layers (0: none)",
    )
    shape = parser.add_argument_group("a run of your own (one more table row)")
    shape.add_argument("--hidden", type=int, help="hidden size (turns the row on)")
    shape.add_argument("--vocab", type=int, default=128256, help="padded vocabulary")
    shape.add_argument("--seq", type=int, default=4096)
    shape.add_argument("--micro-batch", type=int, default=1)
    shape.add_argument("--microbatches", type=int, default=32, help="per rank and step")
    shape.add_argument("--tp", type=int, default=1)
    shape.add_argument("--sp", action="store_true", help="sequence parallel")
    shape.add_argument("--mtp-layers", type=int, default=0, help="multi-token prediction")
    return parser.parse_args()


if __name__ == "__main__":
    main()
