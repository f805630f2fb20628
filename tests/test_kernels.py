"""SAM shard kernels against a float64 reference.

The torch kernels run here. The Triton kernels run here only on a GPU; on CPU they run in a
child pytest with TRITON_INTERPRET=1, because the interpreter must be switched on before any
kernel is defined and must not leak into the rest of the suite. The compiled perturb kernel is
also built here for sm_90 (no GPU needed) and its PTX inspected.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import subprocess
import sys
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from megatron_fsam.kernels import get_kernels, torch_ops, triton_kernels
from megatron_fsam.kernels.self_check import PG_ULPS, max_ulps
from megatron_fsam.kernels.shards import Shards

SIZES = (1, 7, 0, 1000, 12345)
COUNTED = (True, False, True, True, True)
TRITON_BLOCK = 1024  # several tiles and a masked tail per large shard, few interpreted programs
RHO = 0.05
# Above sqrt(v * v_scale) for part of make_shards' coordinates (which spans 0 to ~0.3).
FLOOR = 0.1
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

needs_triton = pytest.mark.skipif(
    triton_kernels() is None or not (INTERPRET or torch.cuda.is_available()),
    reason="needs a CUDA device (on the CPU the TRITON_INTERPRET=1 subprocess test runs it)",
)
BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]
CHILD = "triton and not subprocess"
CASES = [(g, t, p) for g in DTYPES for t in DTYPES for p in (False, True)]


def make_shards(grad: str, target: str, precond: bool, device: str, seed: int = 0) -> Shards:
    """Odd-sized shards; grads are unaligned slices of one buffer, as a sharded optimizer has."""
    gen = torch.Generator().manual_seed(seed)
    flat = torch.randn(sum(SIZES) + 3 * len(SIZES), generator=gen).to(device, DTYPES[grad])
    starts = [sum(SIZES[:i]) + 3 * i + 1 for i in range(len(SIZES))]
    shards = Shards(
        thetas=[torch.randn(n, generator=gen).to(device) for n in SIZES],
        grads=[flat[s : s + n] for s, n in zip(starts, SIZES, strict=True)],
        targets=[torch.zeros(n, dtype=DTYPES[target], device=device) for n in SIZES],
        counted=list(COUNTED),
    )
    if precond:
        shards.second_moments = [
            (torch.rand(n, generator=gen) * 1e-2).square().add(1e-12).to(device) for n in SIZES
        ]
        shards.v_scales = [1.0 / (1.0 - 0.999**t) for t in range(1, len(SIZES) + 1)]
        shards.adam_eps = [1e-8] * len(SIZES)
    return shards


def kernels_for(backend: str) -> tuple[Callable, Callable, Callable]:
    """norm_sums, perturb, restore; Triton with small tiles so that shards span several."""
    if backend == "torch":
        kernels = get_kernels("torch")
        return kernels.norm_sums, kernels.perturb, kernels.restore
    from megatron_fsam.kernels import triton_ops

    return tuple(
        functools.partial(op, block=TRITON_BLOCK)
        for op in (triton_ops.norm_sums, triton_ops.perturb, triton_ops.restore)
    )


def device_for(backend: str) -> str:
    return "cuda" if backend == "triton" and not INTERPRET else "cpu"


def precond64(shards: Shards, i: int) -> torch.Tensor:
    if not shards.preconditioned:
        return torch.ones(SIZES[i], dtype=torch.float64)
    v = shards.second_moments[i].cpu().double() * shards.v_scales[i]
    return 1.0 / (v.sqrt().clamp_min(shards.precond_floor) + shards.adam_eps[i])


def gradients(shards: Shards) -> list[torch.Tensor]:
    """The pass-1 gradients as float64 (norm_sums then replaces the fp32 ones by P g)."""
    return [g.cpu().double() for g in shards.grads]


def reference_sums(shards: Shards, grads: list[torch.Tensor] | None = None) -> torch.Tensor:
    grads = grads or gradients(shards)
    sums = torch.zeros(3, dtype=torch.float64)
    for i, counted in enumerate(shards.counted):
        if counted:
            g = grads[i]
            pg = precond64(shards, i) * g
            sums += torch.stack((g @ g, pg @ pg, g @ pg))
    return sums


def assert_close_to_reference(shards: Shards, scale: float, grads: list[torch.Tensor]) -> None:
    """targets are theta + scale * P g up to fp32 arithmetic and one rounding to their dtype."""
    for i in range(len(SIZES)):
        theta = shards.thetas[i].cpu().double()
        step = scale * precond64(shards, i) * grads[i]
        out = shards.targets[i].cpu().double()
        exact = theta + step
        rounding = 2.0**-8 if shards.targets[i].dtype == torch.bfloat16 else 0.0
        bound = rounding * exact.abs() + 8 * 2.0**-24 * (theta.abs() + step.abs())
        assert torch.all((out - exact).abs() <= bound), f"shard {i}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("grad", "target", "precond"), CASES)
def test_kernels_match_float64_reference(backend: str, grad: str, target: str, precond: bool):
    norm_sums, perturb, restore = kernels_for(backend)
    shards = make_shards(grad, target, precond, device_for(backend))
    g = gradients(shards)
    sums = norm_sums(shards)
    assert sums.dtype == torch.float32 and sums.device == shards.grads[0].device
    torch.testing.assert_close(sums.cpu().double(), reference_sums(shards, g), rtol=1e-5, atol=0)
    assert_gradients_after_norm_sums(shards, g)

    grad_sq, pg_sq, cross = sums.tolist()
    normalisations = {"grad": grad_sq, "perturbation": pg_sq, "dual": cross}
    for name, denominator in normalisations.items():
        scale = RHO / math.sqrt(denominator)
        perturb(shards, scale)
        assert_close_to_reference(shards, scale, g)
        # What each normalisation promises, over the counted shards (float64 from the scale).
        eps_sq = eps_p_inv_eps = 0.0
        for i, counted in enumerate(shards.counted):
            if counted:
                p = precond64(shards, i)
                eps = scale * p * g[i]
                eps_sq += float(eps @ eps)
                eps_p_inv_eps += float(eps @ (eps / p))
        expected = {
            "grad": RHO * math.sqrt(pg_sq / grad_sq),  # ||eps|| = rho ||P g|| / ||g||
            "perturbation": RHO,  # ||eps|| = rho
            "dual": RHO * math.sqrt(pg_sq / cross),
        }[name]
        assert math.sqrt(eps_sq) == pytest.approx(expected, rel=1e-5)
        if name == "dual":  # eps has norm rho in the optimizer's metric P^-1
            assert math.sqrt(eps_p_inv_eps) == pytest.approx(RHO, rel=1e-5)

    restore(shards)
    for theta, out in zip(shards.thetas, shards.targets, strict=True):
        assert torch.equal(out, theta.to(out.dtype))  # bit-exact: round to nearest even


def assert_gradients_after_norm_sums(shards: Shards, g: list[torch.Tensor]) -> None:
    """P g replaced the counted preconditioned fp32 gradients (to fp32 rounding); every other
    gradient is g, bit for bit; a second norm_sums on them is refused."""
    for i, counted in enumerate(shards.counted):
        now = shards.grads[i].cpu().double()
        if counted and g[i].numel() and shards.stores_direction(i):
            assert shards.holds_direction(i)
            want = precond64(shards, i) * g[i]
            assert torch.all((now - want).abs() <= 4 * 2.0**-24 * want.abs()), f"shard {i}"
        else:
            assert not shards.holds_direction(i) and torch.equal(now, g[i]), f"shard {i}"
    if shards.directions:
        with pytest.raises(RuntimeError, match="hold P g already"):
            get_kernels("torch").norm_sums(shards)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shards_of_mixed_dtypes(backend: str):
    """Shards whose dtypes differ (separate Triton launches) each keep their own dtype."""
    norm_sums, perturb, restore = kernels_for(backend)
    shards = make_shards("fp32", "fp32", True, device_for(backend))
    shards.grads[3] = shards.grads[3].bfloat16()
    shards.targets[4] = shards.targets[4].bfloat16()
    g = gradients(shards)
    torch.testing.assert_close(
        norm_sums(shards).cpu().double(), reference_sums(shards, g), rtol=1e-5, atol=0
    )
    assert_gradients_after_norm_sums(shards, g)
    perturb(shards, 0.1)
    assert_close_to_reference(shards, 0.1, g)
    restore(shards)
    for theta, target in zip(shards.thetas, shards.targets, strict=True):
        assert torch.equal(target, theta.to(target.dtype))


def roots(shards: Shards) -> torch.Tensor:
    """sqrt(v * v_scale) of every coordinate, float64."""
    moments = zip(shards.second_moments, shards.v_scales, strict=True)
    return torch.cat([(v.cpu().double() * v_scale).sqrt() for v, v_scale in moments])


@pytest.mark.parametrize("backend", BACKENDS)
def test_precond_floor_matches_float64_reference(backend: str):
    """norm_sums and perturb follow P = 1 / (max(sqrt(v * v_scale), floor) + eps), with a floor
    that binds on part of the coordinates and changes ||P g||^2 well beyond the tolerance."""
    norm_sums, perturb, _ = kernels_for(backend)
    shards = make_shards("fp32", "bf16", True, device_for(backend))
    shards.precond_floor = FLOOR
    binds = roots(shards) < FLOOR
    assert binds.any() and not binds.all()
    g = gradients(shards)
    reference = reference_sums(shards, g)
    assert reference[1] < 0.9 * reference_sums(dataclasses.replace(shards, precond_floor=0.0))[1]
    torch.testing.assert_close(norm_sums(shards).cpu().double(), reference, rtol=1e-5, atol=0)
    perturb(shards, 0.1)
    assert_close_to_reference(shards, 0.1, g)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_second_moments_are_scaled_in_fp32(backend: str):
    """A bf16 optimizer state (torch's AdamW on bf16 params keeps one) enters P as its fp32
    value: v * v_scale rounded to bf16 first would be ~2^-9 off, far beyond the tolerance."""
    norm_sums, perturb, _ = kernels_for(backend)
    shards = make_shards("fp32", "fp32", True, device_for(backend))
    shards.second_moments = [v.bfloat16() for v in shards.second_moments]
    g = gradients(shards)
    sums = norm_sums(shards)
    torch.testing.assert_close(sums.cpu().double(), reference_sums(shards, g), rtol=1e-5, atol=0)
    assert_gradients_after_norm_sums(shards, g)
    perturb(shards, 0.1)
    assert_close_to_reference(shards, 0.1, g)


@pytest.mark.parametrize("backend", BACKENDS)
def test_precond_floor_zero_changes_no_bits(backend: str, monkeypatch):
    """A floor of 0 gives P without a floor, bit for bit: the bits of a floor below every
    sqrt(v * v_scale) (which max and clamp_min return unchanged); the torch kernels skip the
    clamp altogether, so they run the ops they ran before the floor existed."""
    norm_sums, perturb, _ = kernels_for(backend)
    shards = make_shards("fp32", "bf16", True, device_for(backend))
    fresh = make_shards("fp32", "bf16", True, device_for(backend))  # the same values
    below = dataclasses.replace(fresh, precond_floor=0.5 * roots(shards).min().item())
    with monkeypatch.context() as patch:
        if backend == "torch":
            patch.setattr(torch, "_foreach_clamp_min_", None)  # calling it would raise
        sums = norm_sums(shards)
        perturb(shards, 0.1)
        targets = [t.clone() for t in shards.targets]
    assert torch.equal(norm_sums(below), sums)
    perturb(below, 0.1)
    assert all(torch.equal(a, b) for a, b in zip(below.targets, targets, strict=True))


def test_precond_floor_must_not_be_negative():
    with pytest.raises(ValueError, match="precond_floor"):
        dataclasses.replace(make_shards("fp32", "fp32", True, "cpu"), precond_floor=-1e-3)


@needs_triton
def test_triton_matches_torch_with_precond_floor():
    """The floor is the same in both: sums within 1e-5, targets within 1 ulp (0 on CUDA)."""
    norm_sums, perturb, _ = kernels_for("triton")
    shards = make_shards("fp32", "bf16", True, device_for("triton"))
    shards.precond_floor = FLOOR
    expected = make_shards("fp32", "bf16", True, device_for("triton"))  # the same values
    expected.precond_floor = FLOOR
    torch.testing.assert_close(norm_sums(shards), torch_ops.norm_sums(expected), rtol=1e-5, atol=0)
    assert max(map(max_ulps, shards.grads, expected.grads)) <= PG_ULPS  # the P g both stored
    perturb(shards, 0.1)
    torch_ops.perturb(expected, 0.1)
    assert max(map(max_ulps, shards.targets, expected.targets)) <= 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_rounding_is_nearest_even(backend: str):
    """Ties and near-ties between bf16 neighbours, NaN and infinities round as torch does."""
    restore = kernels_for(backend)[2]
    device = device_for(backend)
    base = torch.tensor([1.0, -1.0, 3.0, 1e-30, 3.0e38, 1.0], dtype=torch.float32)
    bits = base.view(torch.int32)
    ties = [bits + 0x8000, bits + 0x7FFF, bits + 0x8001, bits + 0x18000]
    theta = torch.cat([base, *(t.view(torch.float32) for t in ties)])
    theta = torch.cat([theta, torch.tensor([float("nan"), float("inf"), -float("inf")])])
    shards = Shards(
        thetas=[theta.to(device)],
        grads=[torch.zeros_like(theta, device=device)],
        targets=[torch.zeros_like(theta, dtype=torch.bfloat16, device=device)],
        counted=[True],
    )
    restore(shards)
    out, expected = shards.targets[0].cpu(), theta.to(torch.bfloat16)
    assert torch.equal(out.isnan(), expected.isnan())  # NaN payloads differ between devices
    finite = ~expected.isnan()
    assert torch.equal(out[finite].view(torch.int16), expected[finite].view(torch.int16))


def test_auto_uses_torch_for_cpu_shards():
    auto, plain = get_kernels("auto"), get_kernels("torch")
    assert torch.equal(
        auto.norm_sums(make_shards("fp32", "fp32", True, "cpu")),
        plain.norm_sums(make_shards("fp32", "fp32", True, "cpu")),
    )
    with pytest.raises(ValueError, match="unknown kernel backend"):
        get_kernels("cuda")


def test_torch_kernels_chunking_does_not_change_results():
    """Batches split shards anywhere; the sums agree and perturb is bit-identical."""
    from megatron_fsam.kernels import torch_ops

    for grad in ("bf16", "fp32"):  # fp32: P g stored by norm_sums, read by perturb
        shards, chunked = (make_shards(grad, "bf16", True, "cpu") for _ in range(2))
        whole = torch_ops.norm_sums(shards)
        torch.testing.assert_close(
            torch_ops.norm_sums(chunked, chunk=100), whole, rtol=1e-6, atol=0
        )
        assert all(torch.equal(a, b) for a, b in zip(shards.grads, chunked.grads, strict=True))
        torch_ops.perturb(shards, 0.3)
        torch_ops.perturb(chunked, 0.3, chunk=100)
        assert all(torch.equal(a, b) for a, b in zip(shards.targets, chunked.targets, strict=True))


# ----- the one-time self-check of the Triton kernels, and what "auto" and "triton" do with it -----


class BrokenKernel:
    """Stands in for a Triton kernel. "raises": its launch fails, as a kernel that cannot compile
    does; "wrong": runs the real kernel, then skews its partial sums (_norm_kernel's 6th arg)."""

    def __init__(self, kernel, how: str) -> None:
        self.kernel, self.how = kernel, how

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if self.how == "raises":
                raise RuntimeError("simulated compilation failure")
            self.kernel[grid](*args, **kwargs)
            args[5].mul_(1.0 + 1e-3)

        return launch


# breakage: (kernel replaced, op the self-check must name)
BREAKAGES = {"raises": ("_perturb_kernel", "perturb"), "wrong": ("_norm_kernel", "norm_sums")}


@pytest.fixture
def checked_device(monkeypatch) -> torch.device:
    """The device the Triton kernels run on here, with the self-check and "auto"'s choice
    guarding it (on CPU: in the interpreter) and no verdict cached before or after the test."""
    import megatron_fsam.kernels as kernels

    on_cuda = device_for("triton") == "cuda"
    device = torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")
    monkeypatch.setattr(kernels, "TRITON_DEVICE_TYPES", (*kernels.TRITON_DEVICE_TYPES, "cpu"))
    kernels.reset_self_check()
    yield device
    kernels.reset_self_check()


def sam_warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "megatron_fsam" and r.levelno >= logging.WARNING]


@needs_triton
def test_triton_self_check_passes_and_auto_uses_triton(checked_device, caplog):
    from megatron_fsam.kernels import resolve_kernels
    from megatron_fsam.kernels.self_check import self_check

    assert self_check(checked_device) is None
    caplog.set_level(logging.WARNING, logger="megatron_fsam")
    assert resolve_kernels("auto", checked_device) is triton_kernels()
    assert resolve_kernels("triton", checked_device) is triton_kernels()
    shards = make_shards("bf16", "bf16", True, checked_device.type)
    expected = make_shards("bf16", "bf16", True, checked_device.type)
    for backend in ("auto", "triton"):
        kernels = get_kernels(backend)
        assert kernels.name == backend
        assert torch.equal(kernels.norm_sums(shards), triton_kernels().norm_sums(expected))
        kernels.perturb(shards, 0.1)
        triton_kernels().perturb(expected, 0.1)
        assert all(torch.equal(a, b) for a, b in zip(shards.targets, expected.targets, strict=True))
    assert sam_warnings(caplog) == []


@needs_triton
@pytest.mark.parametrize("how", list(BREAKAGES))
def test_triton_failing_self_check_auto_falls_back_triton_raises(
    checked_device, caplog, monkeypatch, how: str
):
    """A Triton kernel that cannot compile (or computes wrong sums): the self-check names the op,
    runs once per process, "auto" uses torch with one warning, "triton" raises."""
    import megatron_fsam.kernels.self_check as check_module
    from megatron_fsam.kernels import KernelSelfCheckError, resolve_kernels, triton_ops

    kernel, op = BREAKAGES[how]
    monkeypatch.setattr(triton_ops, kernel, BrokenKernel(getattr(triton_ops, kernel), how))
    problem = check_module.self_check(checked_device)
    assert problem is not None and problem.startswith(op), problem

    runs = []
    real_check = check_module.self_check
    monkeypatch.setattr(check_module, "self_check", lambda d: runs.append(d) or real_check(d))
    caplog.set_level(logging.WARNING, logger="megatron_fsam")
    auto, plain = get_kernels("auto"), get_kernels("torch")
    assert auto.name == "auto"
    for _ in range(2):  # two steps: new gradients each
        shards = make_shards("fp32", "bf16", True, checked_device.type)
        expected = make_shards("fp32", "bf16", True, checked_device.type)
        assert torch.equal(auto.norm_sums(shards), plain.norm_sums(expected))
        auto.perturb(shards, 0.1)
        plain.perturb(expected, 0.1)
        assert all(torch.equal(a, b) for a, b in zip(shards.targets, expected.targets, strict=True))
        auto.restore(shards)
    assert resolve_kernels("auto", checked_device) is resolve_kernels("torch", checked_device)
    (warning,) = sam_warnings(caplog)
    assert "self-check" in warning.getMessage() and problem in warning.getMessage()

    triton = get_kernels("triton")  # chosen before any shards are seen: the check runs on use
    for call in (triton.norm_sums, triton.restore):
        with pytest.raises(KernelSelfCheckError, match=f"self-check on .*: {op}"):
            call(shards)
    assert len(runs) == 1  # one check per process and device, shared by "auto" and "triton"
    assert len(sam_warnings(caplog)) == 1


@needs_triton
def test_triton_launch_tables_are_built_once_per_set_of_shards(monkeypatch):
    """The launch tables are cached on the shards' addresses, sizes and dtypes: a second step over
    the same buffers (even through a new Shards) builds none, a replaced buffer rebuilds those
    of the ops that read it, and results stay bit-identical throughout."""
    from megatron_fsam.kernels import triton_ops

    builds = []
    real_plan = triton_ops._plan
    monkeypatch.setattr(triton_ops, "_plan", lambda *a, **k: builds.append(1) or real_plan(*a, **k))
    monkeypatch.setattr(triton_ops, "_plans", OrderedDict(), raising=False)  # an empty cache
    norm_sums, perturb, restore = kernels_for("triton")
    shards = make_shards("bf16", "bf16", True, device_for("triton"))

    def step(shards: Shards) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        sums = norm_sums(shards)
        perturb(shards, 0.1)
        perturbed = [t.clone() for t in shards.targets]
        restore(shards)
        return sums, perturbed, [t.clone() for t in shards.targets]

    def same(a, b) -> bool:
        return torch.equal(a[0], b[0]) and all(
            torch.equal(x, y) for x, y in zip(a[1] + a[2], b[1] + b[2], strict=True)
        )

    first = step(shards)
    n_first = len(builds)
    assert n_first >= 3  # at least one launch per op
    assert same(step(shards), first) and len(builds) == n_first
    again = Shards(
        list(shards.thetas), list(shards.grads), list(shards.targets), list(shards.counted),
        list(shards.second_moments), list(shards.v_scales), list(shards.adam_eps),
    )  # fmt: skip
    assert same(step(again), first) and len(builds) == n_first

    # A new bias correction changes only the constants: no table build, new numbers.
    again.v_scales = [2 * v for v in again.v_scales]
    changed = step(again)
    assert len(builds) == n_first and not torch.equal(changed[0], first[0])
    again.v_scales = list(shards.v_scales)
    assert same(step(again), first) and len(builds) == n_first

    # A gradient moved to a new buffer (as unaligned as before): norm_sums and perturb rebuild,
    # restore does not read it.
    moved = torch.empty(SIZES[4] + 1, dtype=again.grads[4].dtype, device=again.grads[4].device)
    moved[1:] = again.grads[4]
    again.grads[4] = moved[1:]
    assert same(step(again), first)
    rebuilt = len(builds) - n_first
    assert rebuilt >= 2
    assert same(step(again), first) and len(builds) == n_first + rebuilt
    triton_ops._plans.clear()  # built from scratch: the same bits
    assert same(step(again), first)


@pytest.mark.skipif(INTERPRET, reason="compiles kernels; the interpreter has none")
@pytest.mark.skipif(triton_kernels() is None, reason="triton is not installed")
@pytest.mark.parametrize(("dtype", "aligned"), [("bf16", True), ("fp32", True), ("bf16", False)])
def test_perturb_compiles_for_sm90(dtype: str, aligned: bool):
    """The compiled (not interpreted) perturb kernel builds for an H100 without one, keeps the
    reference rounding (IEEE sqrt and division, no FMA), a floor that lets NaN through as torch's
    clamp_min does, and 16-byte accesses when aligned."""
    compiler = pytest.importorskip("triton.compiler")
    from triton.backends.compiler import GPUTarget

    from megatron_fsam.kernels import triton_ops

    pointers = ("theta", "grad", "target", "moment", "table", "consts", "tile_shard")
    kinds = ("fp32", dtype, dtype, "fp32", "i64", "fp32", "i32")
    signature = {name: f"*{kind}" for name, kind in zip(pointers, kinds, strict=True)}
    signature |= {"scale": "fp32", "floor": "fp32", "PRECOND": "constexpr", "ALIGNED": "constexpr"}
    signature |= {"BLOCK": "constexpr"}
    source = compiler.ASTSource(
        triton_ops._perturb_kernel,
        signature,
        constexprs={"PRECOND": True, "ALIGNED": aligned, "BLOCK": 4096},
        attrs={(i,): [["tt.divisibility", 16]] for i in range(len(pointers))},
    )
    options = {"num_warps": triton_ops.NUM_WARPS, "enable_fp_fusion": False}
    ptx = compiler.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
    assert "sqrt.rn.f32" in ptx and "div.rn.f32" in ptx and "fma.rn.f32" not in ptx
    assert "max.NaN.f32" in ptx
    assert ("ld.global.v4.b32" in ptx and "st.global.v4.b32" in ptx) == aligned


@pytest.mark.skipif(INTERPRET, reason="this is the parent of the interpreted run")
@pytest.mark.skipif(triton_kernels() is None, reason="triton is not installed")
def test_triton_kernels_interpreted_in_subprocess():
    """The Triton cases above, run by a child pytest with the interpreter on."""
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-p", "no:cacheprovider"]
        + [__file__, "-k", CHILD],
        cwd=root,
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]
