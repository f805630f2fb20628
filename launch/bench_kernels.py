"""Time the SAM shard kernels: fused Triton vs the torch fallback vs a naive per-tensor loop.

    python -m launch.bench_kernels                    # timings on the default device
    python -m launch.bench_kernels --check            # Triton vs torch results first (CUDA)
    python -m launch.bench_kernels --step-model 1.3e9 # the kernels as a fraction of a step

Each row uses `--total` elements split into shards of one size, so small sizes mean many shards
(what a model's biases and norms look like to the kernels). All implementations of a row are
timed in the same run on the same tensors. On CPU there is no fused column: Triton runs there
only in its (slow) interpreter.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_fsam.kernels import Kernels, get_kernels, torch_ops, triton_kernels  # noqa: E402
from megatron_fsam.kernels.self_check import max_ulps  # noqa: E402
from megatron_fsam.kernels.shards import Shards  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# HBM bandwidth from the vendors' data sheets, GB/s; matched against torch's device name.
PEAK_GBS = (
    ("H200", 4800.0),
    ("H100 NVL", 3938.0),
    ("H100 PCIe", 2039.0),
    ("H100", 3352.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),
)


# ----- the naive reference: one tensor at a time, the way a first implementation reads ------


def _naive_precond(shards: Shards, i: int) -> torch.Tensor | float:
    if shards.second_moments is None:
        return 1.0
    v = shards.second_moments[i].float()
    return 1.0 / (torch.sqrt(v * shards.v_scales[i]) + shards.adam_eps[i])


def naive_norm_sums(shards: Shards) -> torch.Tensor:
    sums = torch.zeros(3, dtype=torch.float32, device=shards.grads[0].device)
    for i, counted in enumerate(shards.counted):
        if counted:
            g = shards.grads[i].float()
            pg = _naive_precond(shards, i) * g
            sums[0] += (g * g).sum()
            sums[1] += (pg * pg).sum()
            sums[2] += (g * pg).sum()
    return sums


@torch.no_grad()
def naive_perturb(shards: Shards, scale: float) -> None:
    for i, (theta, grad, target) in enumerate(
        zip(shards.thetas, shards.grads, shards.targets, strict=True)
    ):
        target.copy_(theta + scale * (_naive_precond(shards, i) * grad.float()))


@torch.no_grad()
def naive_restore(shards: Shards) -> None:
    for theta, target in zip(shards.thetas, shards.targets, strict=True):
        target.copy_(theta)


NAIVE = Kernels("naive", naive_norm_sums, naive_perturb, naive_restore)
IMPLEMENTATIONS = ("fused", "torch", "naive")
OPS = ("norm", "perturb", "restore")


# ----- shards and timing ---------------------------------------------------------------------


def make_shards(
    sizes: list[int], params: str, precond: bool, device: torch.device, unaligned: bool = False
) -> Shards:
    """fp32 theta and second moment; grads and targets in the params dtype (bf16 or fp32).

    unaligned: grads and targets are slices of one flat buffer at odd offsets, as the
    distributed optimizer's shards of the model's buffers can be.
    """
    dtype = DTYPES[params]

    def sliced(fill: Callable[[int], torch.Tensor]) -> list[torch.Tensor]:
        if not unaligned:
            return [fill(n) for n in sizes]
        flat = fill(sum(sizes) + len(sizes))
        starts = [sum(sizes[:i]) + i + 1 for i in range(len(sizes))]
        return [flat[s : s + n] for s, n in zip(starts, sizes, strict=True)]

    shards = Shards(
        thetas=[torch.randn(n, device=device) for n in sizes],
        grads=sliced(lambda n: torch.randn(n, device=device).mul_(1e-3).to(dtype)),
        targets=sliced(lambda n: torch.empty(n, dtype=dtype, device=device)),
        counted=[True] * len(sizes),
    )
    if precond:
        shards.second_moments = [torch.rand(n, device=device).mul_(1e-6) for n in sizes]
        shards.v_scales = [1.0 / (1.0 - 0.999**100)] * len(sizes)
        shards.adam_eps = [1e-8] * len(sizes)
    return shards


def op_bytes(shards: Shards, op: str) -> int:
    """Bytes each op must read and write at least once (tables and partial sums excluded), as a
    step runs it: norm_sums writes P g over the fp32 gradients it preconditions, and perturb
    reads it there instead of the second moment."""

    def size(tensors: list[torch.Tensor] | None) -> int:
        return sum(t.numel() * t.element_size() for t in tensors or [])

    stored = [i for i in range(len(shards)) if shards.stores_direction(i) and shards.counted[i]]
    moments = size(shards.second_moments)
    stored_moments = size([shards.second_moments[i] for i in stored]) if stored else 0
    if op == "floor":
        return moments
    if op == "norm":
        return size(shards.grads) + moments + size([shards.grads[i] for i in stored])
    if op == "perturb":
        return (
            size(shards.thetas)
            + size(shards.grads)
            + moments
            - stored_moments
            + size(shards.targets)
        )
    return size(shards.thetas) + size(shards.targets)


def run_op(kernels: Kernels, op: str, shards: Shards) -> None:
    if op == "norm":
        kernels.norm_sums(shards)
    elif op == "perturb":
        kernels.perturb(shards, 0.05)
    elif op == "floor":  # the precond floor's statistic: sum of v over the shards
        torch_ops.nonnegative_sums(shards.second_moments)
    else:
        kernels.restore(shards)


def step_state(kernels: Kernels, op: str, shards: Shards) -> Callable[[], None]:
    """What a step has done before `op` (untimed): new gradients (norm_sums replaces the fp32
    ones by P g when preconditioned), and before perturb, the sums that stored P g."""
    pass_1 = [g.clone() for g in shards.grads]

    def prepare() -> None:
        shards.directions.clear()
        torch._foreach_copy_(shards.grads, pass_1)
        if op == "perturb":
            kernels.norm_sums(shards)

    return prepare


def timed(
    fn: Callable[[], object],
    device: torch.device,
    budget_s: float = 0.3,
    prepare: Callable[[], object] | None = None,
) -> float:
    """Best seconds per call over about budget_s of calls, after warm-up (compilation);
    `prepare` runs untimed before each call.

    The best rather than the median: it is the kernel's own cost, least disturbed by other work
    on a shared machine."""

    def once() -> float:
        if prepare:
            prepare()
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    once()
    first = once()
    reps = max(3, min(50, int(budget_s / max(first, 1e-6))))
    return min(once() for _ in range(reps))


def peak_gbs(device: torch.device, override: float | None) -> float | None:
    if override or device.type != "cuda":
        return override
    name = torch.cuda.get_device_name(device)
    return next((gbs for key, gbs in PEAK_GBS if key in name), None)


# ----- the benchmark -------------------------------------------------------------------------


def benchmark(args: argparse.Namespace, device: torch.device, fused: Kernels | None) -> None:
    peak = peak_gbs(device, args.peak_gbs)
    print(f"\n== kernel timings on {describe(device)}, best call; a/b = time of a / time of b ==")
    if peak:
        print(f"peak memory bandwidth {peak:.0f} GB/s")
    header = f"{'op':8}{'params':>7}{'P':>3}{'shard':>10}{'shards':>7}"
    header += "".join(f"{name + ' ms':>11}" for name in ("fused", "torch", "naive"))
    if fused:
        header += f"{'torch/fused':>13}{'naive/fused':>13}{'fused GB/s':>12}{'% peak':>8}"
    header += f"{'naive/torch':>13}"
    print(header)
    impls = {"fused": fused, "torch": get_kernels("torch"), "naive": NAIVE}
    sizes = [int(s) for s in args.sizes if s <= args.total]
    for params in args.params:
        for size in sizes:
            n_shards = max(1, int(args.total) // size)
            per_step = {}  # (precond, implementation): seconds of the ops a SAM step runs
            for precond in (False, True):
                shards = make_shards([size] * n_shards, params, precond, device)
                for op in ("floor", "norm", "perturb", "restore") if precond else OPS:
                    times = {
                        name: timed(
                            functools.partial(run_op, kernels, op, shards),
                            device,
                            prepare=step_state(kernels, op, shards),
                        )
                        for name, kernels in impls.items()
                        if kernels is not None
                    }
                    for name, seconds in times.items():
                        per_step[precond, name] = per_step.get((precond, name), 0.0) + seconds
                    print(_row(op, params, precond, size, n_shards, times, shards, fused, peak))
                del shards
            ratios = ", ".join(
                f"{name} x{per_step[True, name] / per_step[False, name]:.2f}"
                for name in impls
                if (True, name) in per_step
            )
            print(
                f"  precond / plain, the kernels of one SAM step (floor, norm, perturb, "
                f"restore): {ratios}",
                flush=True,
            )
    if skipped := [f"{s:.0e}" for s in args.sizes if s > args.total]:
        print(f"(shard sizes {', '.join(skipped)} exceed --total {args.total:.0e}: skipped)")


def _row(op, params, precond, size, n_shards, times, shards, fused, peak) -> str:
    row = f"{op:8}{params:>7}{'y' if precond else 'n':>3}{size:>10.0e}{n_shards:>7}"
    row += "".join(
        f"{times[n] * 1e3:>11.3f}" if n in times else f"{'-':>11}" for n in IMPLEMENTATIONS
    )
    if fused:
        fused_s = times["fused"]
        gbs = op_bytes(shards, op) / fused_s / 1e9
        row += f"{times['torch'] / fused_s:>13.2f}{times['naive'] / fused_s:>13.2f}"
        row += f"{gbs:>12.0f}" + (f"{100 * gbs / peak:>7.0f}%" if peak else "       ?")
    return row + f"{times['naive'] / times['torch']:>13.2f}"


def sweep_blocks(args: argparse.Namespace, device: torch.device) -> None:
    """Fused kernels at several tile sizes on --total elements of bf16 params, preconditioned."""
    from megatron_fsam.kernels import triton_ops

    print(f"\n== Triton tile size sweep: {args.total:.0e} elements, bf16 params, P on ==")
    shards = make_shards([int(args.total)], "bf16", True, device)
    for block in args.sweep_blocks:
        cells = []
        for op, fn in (
            ("norm", functools.partial(triton_ops.norm_sums, shards, block=block)),
            ("perturb", functools.partial(triton_ops.perturb, shards, 0.05, block=block)),
            ("restore", functools.partial(triton_ops.restore, shards, block=block)),
        ):
            seconds = timed(fn, device)
            gbs = op_bytes(shards, op) / seconds / 1e9
            cells.append(f"{op} {seconds * 1e3:.3f} ms {gbs:.0f} GB/s")
        print(f"BLOCK {block:>6}: " + " | ".join(cells), flush=True)


def check(device: torch.device, fused: Kernels | None) -> bool:
    """Fused (or, without it, torch) against torch (or naive): sums, perturb ulps, restore bits."""
    candidate, reference = (fused, get_kernels("torch")) if fused else (get_kernels("torch"), NAIVE)
    print(f"\n== check: {candidate.name} vs {reference.name} on {describe(device)} ==")
    sizes = [1, 7, 1000, 12345, 1 << 20, 3_000_001]
    ok = True
    for params in DTYPES:
        for precond in (False, True):
            for unaligned in (False, True):
                results = []
                for kernels in (candidate, reference):
                    torch.manual_seed(0)
                    shards = make_shards(sizes, params, precond, device, unaligned)
                    sums = kernels.norm_sums(shards).double()
                    kernels.perturb(shards, 0.05)
                    perturbed = torch.cat([t.clone() for t in shards.targets])
                    kernels.restore(shards)
                    restored = torch.cat(shards.targets)
                    results.append((sums, perturbed, restored, torch.cat(shards.thetas)))
                (s1, p1, r1, theta), (s2, p2, r2, _) = results
                sums_rel = ((s1 - s2).abs() / s2.abs()).max().item()
                ulps = max_ulps(p1, p2)
                exact = (p1 == p2).float().mean().item()
                restore_exact = torch.equal(r1, r2) and torch.equal(r1, theta.to(r1.dtype))
                good = sums_rel < 1e-5 and ulps <= 1 and restore_exact
                ok &= good
                print(
                    f"{'ok  ' if good else 'FAIL'} params={params} P={'y' if precond else 'n'} "
                    f"{'unaligned' if unaligned else 'aligned  '} sums rel diff {sums_rel:.1e}, "
                    f"perturb: {100 * exact:.4f}% bit-equal, max {ulps} ulp; "
                    f"restore bit-exact: {restore_exact}",
                    flush=True,
                )
    return ok


# ----- the kernels as a fraction of a step -----------------------------------------------------


class Block(nn.Module):
    """Pre-norm GPT block: causal self-attention and a 4h GELU MLP."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.qkv, self.proj = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)
        self.fc1, self.fc2 = nn.Linear(hidden, 4 * hidden), nn.Linear(4 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, s, h))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, hidden: int, layers: int, heads: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(Block(hidden, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.embed.weight.T  # tied output layer


def step_model(args: argparse.Namespace, device: torch.device, kernels: Kernels) -> None:
    """Time forward+backward of a GPT of about --step-model parameters and the SAM kernels on
    shards shaped like its parameters (bf16 params, fp32 theta and Adam second moment)."""
    layers, vocab, head_dim = args.layers, args.vocab, 128
    # 12 L h^2 + V h parameters (blocks + tied embedding); hidden rounded to whole heads.
    hidden = (-vocab + math.sqrt(vocab**2 + 48 * layers * args.step_model)) / (24 * layers)
    hidden = max(head_dim, head_dim * round(hidden / head_dim))
    with device:  # initialised in place: a CPU init of billions of parameters takes minutes
        model = GPT(vocab, hidden, layers, hidden // head_dim)
    sizes = [p.numel() for p in model.parameters()]
    n_params = sum(sizes)
    tokens = torch.randint(0, vocab, (args.micro_batch, args.seq + 1), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def forward_backward() -> None:
        with autocast:
            logits = model(tokens[:, :-1])
        # Gradients accumulate across calls, as they do across micro-batches.
        F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()).backward()

    print(
        f"\n== step model on {describe(device)}: {n_params / 1e6:.1f}M parameters "
        f"(layers {layers}, hidden {hidden}, vocab {vocab}), micro-batch {args.micro_batch} "
        f"x seq {args.seq}, {'bf16 autocast' if device.type == 'cuda' else 'fp32'} =="
    )
    t_fb = timed(forward_backward, device, budget_s=2.0)
    shards = make_shards(sizes, "bf16", True, device)
    t_ops = {
        op: timed(functools.partial(run_op, kernels, op, shards), device)
        for op in ("norm", "perturb", "restore")
    }
    t_sam = sum(t_ops.values())
    t_step = 2 * args.micro_batches * t_fb
    print(f"forward+backward of one micro-batch: {t_fb * 1e3:.1f} ms (measured)")
    print(
        f"{kernels.name} kernels on {len(sizes)} shards: "
        + ", ".join(f"{op} {t * 1e3:.2f} ms" for op, t in t_ops.items())
        + f" = {t_sam * 1e3:.2f} ms per step (measured)"
    )
    print(
        f"SAM step = 2 passes x {args.micro_batches} micro-batches = {t_step * 1e3:.1f} ms of "
        f"forward+backward; kernels add {100 * t_sam / (t_step + t_sam):.2f}% of that step"
    )
    print(
        "not measured: optimizer step, gradient reduce, parameter all-gather, data loading "
        "(they make the true fraction smaller); with a distributed optimizer over D ranks each "
        "rank's kernels see 1/D of the parameters"
    )


def describe(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e5, 1e6, 1e7, 1e8])
    parser.add_argument(
        "--total",
        type=float,
        default=1e8 if cuda else 1e7,
        help="elements per row (caps the shard sizes; memory ~16 bytes per element)",
    )
    parser.add_argument("--params", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--peak-gbs", type=float, help="device peak bandwidth if not known")
    parser.add_argument("--check", action="store_true", help="compare results before timing")
    parser.add_argument("--no-bench", action="store_true", help="skip the timing table")
    parser.add_argument("--sweep-blocks", type=int, nargs="*", default=[])
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads (1: steadier on a busy host)"
    )
    parser.add_argument("--step-model", type=float, help="parameter count of the GPT to time")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--micro-batches", type=int, default=1, help="per step and rank")
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    fused = triton_kernels() if device.type == "cuda" else None
    if device.type == "cuda" and fused is None:
        print("triton is not importable: timing the torch kernels only")
    if args.check and not check(device, fused):
        sys.exit("check failed")
    if not args.no_bench:
        benchmark(args, device, fused)
    if args.sweep_blocks and fused:
        sweep_blocks(args, device)
    if args.step_model:
        step_model(args, device, fused or get_kernels("torch"))


if __name__ == "__main__":
    main()
