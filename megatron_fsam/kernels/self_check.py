"""A one-time self-check of the Triton kernels against the torch ones, on tiny shards.

A Triton that imports is not a Triton that works: a driver, compiler or GPU architecture it does
not support shows up only when a kernel is first compiled and run. Before the Triton kernels are
used on a device, `self_check(device)` compiles and runs norm_sums, perturb and restore on a few
tiny shards (fp32 gradients with fp32 or bf16 targets, bf16 gradients with bf16 targets, with
and without preconditioning, each with aligned and unaligned shards: the kernel variants a step
with fp32 or bf16 params launches; once more with a preconditioner floor) and compares them with
the torch kernels: norm sums within a relative 1e-5, perturb within 1 ulp of the target dtype (on
CUDA both should give the same bits; on CPU torch's sqrt is not correctly rounded), restore
bit-identical to cast(theta). Its cost is compiling those variants (which Triton caches on
disk); in the CPU interpreter it takes ~4 s.

The data comes from a private generator: the global RNG, which a SAM step records and replays,
is never touched. Run it by hand with `python -m megatron_fsam.kernels.self_check`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from megatron_fsam.kernels import torch_ops
from megatron_fsam.kernels.shards import Shards

if TYPE_CHECKING:
    from megatron_fsam.kernels import Kernels

__all__ = ["self_check", "max_ulps"]

SIZES = (1, 7, 0, 333, 5000)
COUNTED = (True, True, True, False, True)
# Gradients and targets of these shards are slices of one buffer at odd element offsets (as the
# distributed optimizer's shards of the model's buffers can be): a separate, unaligned launch.
UNALIGNED = (False, False, False, True, True)
F32, BF16 = torch.float32, torch.bfloat16
# (gradient dtype, target dtype, preconditioned, precond_floor). The floor is a kernel argument,
# not a variant: one case checks it, at a value above sqrt(v * v_scale) for part of the shards.
FLOOR = 1e-4
CASES = tuple(
    (g, t, p, 0.0) for g, t in ((F32, F32), (F32, BF16), (BF16, BF16)) for p in (False, True)
) + ((F32, BF16, True, FLOOR),)
SUMS_RTOL = 1e-5
PG_ULPS = 4
RHO = 0.05


@torch.no_grad()
def self_check(device: torch.device | str, kernels: Kernels | None = None) -> str | None:
    """Run the Triton kernels (or `kernels`) on tiny shards on `device` and compare them with the
    torch kernels. Returns None when they agree, else one line saying what failed: a mismatch,
    or an exception from the Triton import, a kernel's compilation or its run (never raised)."""
    device = torch.device(device)
    where = "import"
    try:
        if kernels is None:
            from megatron_fsam import kernels as package

            kernels = package.triton_kernels()
            if kernels is None:
                return "the triton package is not importable"
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            for seed, (grad_dtype, target_dtype, precond, floor) in enumerate(CASES):
                case = (
                    f"grads {_name(grad_dtype)}, targets {_name(target_dtype)}, "
                    f"P {'on' if precond else 'off'}{f', floor {floor:g}' if floor else ''}"
                )

                def twin(seed=seed, case=(grad_dtype, target_dtype, precond, floor)) -> Shards:
                    """The case's shards; every call makes the same values anew."""
                    generator = torch.Generator().manual_seed(1234 + seed)
                    return _tiny_shards(*case, device, generator)

                for op in ("norm_sums", "perturb", "restore"):
                    where = f"{op} ({case})"
                    problem = _CHECKS[op](kernels, twin, device)
                    if problem is not None:
                        return f"{where} {problem}"
    except Exception as exc:  # any failure means: do not use these kernels
        return f"{where} raised {type(exc).__name__}: {_first_line(exc)}"
    return None


def _check_norm_sums(kernels: Kernels, twin: Callable[[], Shards], device) -> str | None:
    """The sums, and the P g they leave in the fp32 gradients, against torch's."""
    expected_shards, shards = twin(), twin()
    expected = torch_ops.norm_sums(expected_shards).double().cpu()
    got = _synced(kernels.norm_sums(shards), device).double().cpu()
    rel = ((got - expected).abs() / expected.abs()).max().item()
    if not rel <= SUMS_RTOL:  # also catches NaN
        return (
            f"differs from torch by {rel:.1e} relative (allowed {SUMS_RTOL:.0e}): "
            f"{got.tolist()} vs {expected.tolist()}"
        )
    if shards.directions and not expected_shards.directions:
        return "stored P g where torch does not"
    # P g is five fp32 roundings from g and v in either; the Triton interpreter on the CPU
    # rounds them differently from torch there (3 ulp seen).
    ulps = max(map(max_ulps, shards.grads, expected_shards.grads))
    if ulps > PG_ULPS:
        return f"leaves P g {ulps} ulp from torch's (allowed {PG_ULPS})"
    return None


def _check_perturb(kernels: Kernels, twin: Callable[[], Shards], device) -> str | None:
    """After torch's norm_sums on both twins (the same P g stored), the targets against
    torch's: read from the stored P g, and built where it is not stored."""
    expected_shards, shards = twin(), twin()
    scale = RHO / math.sqrt(torch_ops.norm_sums(expected_shards)[1].item())  # ||eps|| = rho
    torch_ops.norm_sums(shards)
    _poison(expected_shards)
    torch_ops.perturb(expected_shards, scale)
    _poison(shards)
    kernels.perturb(shards, scale)
    _synced(None, device)
    pairs = zip(shards.targets, expected_shards.targets, strict=True)
    ulps = max(max_ulps(a, b) for a, b in pairs)
    if ulps > 1:
        return f"differs from torch by {ulps} ulp (allowed 1)"
    return None


def _check_restore(kernels: Kernels, twin: Callable[[], Shards], device) -> str | None:
    shards = twin()
    _poison(shards)
    kernels.restore(shards)
    _synced(None, device)
    for i, (theta, target) in enumerate(zip(shards.thetas, shards.targets, strict=True)):
        if max_ulps(target, theta.to(target.dtype)) != 0:
            return f"is not bit-identical to cast(theta) in shard {i}"
    return None


_CHECKS = {"norm_sums": _check_norm_sums, "perturb": _check_perturb, "restore": _check_restore}


def max_ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest distance between a and b in units of the last place of their (same) dtype; inf
    where only one is NaN or the signs differ (a zero of either sign matches any zero)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return math.inf
    if a.numel() == 0:
        return 0
    a, b = a.detach().cpu(), b.detach().cpu()
    if not torch.equal(a.isnan(), b.isnan()):
        return math.inf
    keep = ~a.isnan()
    a, b = a[keep], b[keep]
    if ((a < 0) != (b < 0)).logical_and((a != 0) | (b != 0)).any():
        return math.inf
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
    int_type = bits[a.dtype]
    a = a.abs().view(int_type).long()
    b = b.abs().view(int_type).long()
    return int((a - b).abs().max().item()) if a.numel() else 0


def _tiny_shards(
    grad_dtype: torch.dtype,
    target_dtype: torch.dtype,
    precond: bool,
    floor: float,
    device: torch.device,
    generator: torch.Generator,
) -> Shards:
    def randn(n: int, std: float = 1.0) -> torch.Tensor:
        return torch.randn(n, generator=generator).mul_(std)

    shards = Shards(
        thetas=[randn(n).to(device) for n in SIZES],
        grads=_placed([randn(n, 1e-3) for n in SIZES], grad_dtype, device),
        targets=_placed([torch.zeros(n) for n in SIZES], target_dtype, device),
        counted=list(COUNTED),
    )
    if precond:
        # v spanning many decades, down to where P = 1 / (sqrt(v) + eps) is set by eps.
        shards.second_moments = [
            torch.rand(n, generator=generator).pow(8).mul_(1e-6).to(device) for n in SIZES
        ]
        shards.v_scales = [1.0 / (1.0 - 0.999**t) for t in range(1, len(SIZES) + 1)]
        shards.adam_eps = [1e-8] * len(SIZES)
        shards.precond_floor = floor
    return shards


def _placed(values: list[torch.Tensor], dtype: torch.dtype, device: torch.device):
    """values in dtype on device: separate tensors, or UNALIGNED ones in one buffer at odd
    element offsets (never 16-byte aligned, for either dtype)."""
    buffer = torch.zeros(sum(SIZES) + 2 * len(SIZES), dtype=dtype, device=device)
    offset = 1
    placed = []
    for value, unaligned in zip(values, UNALIGNED, strict=True):
        if unaligned:
            offset += 1 - offset % 2  # odd
            tensor = buffer[offset : offset + value.numel()]
            tensor.copy_(value)
            offset += value.numel()
        else:
            tensor = value.to(device, dtype)
        placed.append(tensor)
    return placed


def _poison(shards: Shards) -> None:
    """NaN into every target, so that an op that writes nothing cannot pass."""
    for target in shards.targets:
        target.fill_(math.nan)


def _synced(value, device: torch.device):
    """value, after the device has finished (asynchronous kernel errors surface here)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return value


def _name(dtype: torch.dtype) -> str:
    return {F32: "fp32", BF16: "bf16"}.get(dtype, str(dtype))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"


def main() -> int:
    """Print the verdict (through the package's once-per-process cache, as a step sees it) and
    which kernels kernels="auto" then uses; exit status 1 when the check failed."""
    from megatron_fsam.kernels import resolve_kernels, triton_verdict

    parser = argparse.ArgumentParser(description="Self-check the Triton SAM kernels on a device.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    start = time.perf_counter()
    problem = triton_verdict(device)
    seconds = time.perf_counter() - start
    auto = resolve_kernels("auto", device).name
    verdict = "passed" if problem is None else f"FAILED ({problem})"
    print(
        f"self-check of the Triton kernels on {device}: {verdict}, {seconds:.1f}s with "
        f"compilation; kernels='auto' uses {auto} there"
    )
    return 0 if problem is None else 1


if __name__ == "__main__":
    sys.exit(main())
