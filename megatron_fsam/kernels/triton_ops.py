"""Triton implementations of the SAM shard kernels: one launch for many shards.

A model has hundreds to thousands of shards, many of them small (biases, norms), so a launch per
shard would be dominated by launch latency. Instead all shards whose tensors share dtypes (and
16-byte alignment, which decides vector loads) are processed by one launch: a per-shard table
holds each shard's size, first tile and the element offset of each of its tensors from the
group's first tensor, and a per-tile table maps every program to its shard. Each program reads
one tile of BLOCK elements once.

Arithmetic is fp32 in the order of the torch kernels, with IEEE sqrt and division and no FMA
contraction, so on CUDA both should give the same bits (on CPU torch's vectorised sqrt is not
correctly rounded: 1-ulp differences, measured). bf16 stores are rounded to nearest even by
hand: the interpreter's fp32->bf16 cast truncates, and on GPU the hand rounding gives the same
bits as the hardware cast.

Under TRITON_INTERPRET=1 (set before this module is imported) the kernels run on CPU tensors,
which is how the tests exercise them; each program then costs milliseconds, so BLOCK is larger.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from megatron_fsam.kernels.shards import Shards

__all__ = ["BLOCK", "norm_sums", "perturb", "restore"]

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK = 1 << 16 if INTERPRET else 4096
NUM_WARPS = 8


@triton.jit
def _load_f32(ptr, offs, numel, full):
    """Load a tile as fp32; only the last tile of a shard is masked (keeps loads vectorised)."""
    if full:
        x = tl.load(ptr + offs)
    else:
        x = tl.load(ptr + offs, mask=offs < numel, other=0.0)
    return x.to(tl.float32)


@triton.jit
def _round_bf16(x):
    """fp32 -> bf16, round to nearest even; NaN stays NaN."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(x != x, 0x7FC0, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _store_cast(ptr, x, offs, numel, full):
    """Store fp32 values into ptr's dtype."""
    if ptr.dtype.element_ty == tl.bfloat16:
        y = _round_bf16(x)
    else:
        y = x.to(ptr.dtype.element_ty)
    if full:
        tl.store(ptr + offs, y)
    else:
        tl.store(ptr + offs, y, mask=offs < numel)


@triton.jit
def _shard_pointer(base, row, col, ALIGNED: tl.constexpr):
    """base + the shard's element offset; ALIGNED: every shard of the launch starts on 16 bytes,
    so the offset is a multiple of 16 bytes' worth of elements (enables vector loads)."""
    offset = tl.load(row + col)
    if ALIGNED:
        offset = tl.multiple_of(offset, 128 // base.dtype.element_ty.primitive_bitwidth)
    return base + offset


@triton.jit
def _tile(table, tile_shard, COLS: tl.constexpr, BLOCK: tl.constexpr):
    """This program's shard row, element offsets within the shard, size, and fullness."""
    tile = tl.program_id(0)
    shard = tl.load(tile_shard + tile)
    row = table + shard * COLS
    numel = tl.load(row + 0)
    start = (tile - tl.load(row + 1)) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    return tile, shard, row, offs, numel, start + BLOCK <= numel


@triton.jit
def _precond(v, shard, consts, floor):
    """P = 1 / (max(sqrt(v * v_scale), floor) + eps); NaN propagates, as in torch's clamp_min
    (a floor of 0 then changes no bits)."""
    v_scale = tl.load(consts + 2 * shard)
    eps = tl.load(consts + 2 * shard + 1)
    one = tl.full(v.shape, 1.0, tl.float32)
    root = tl.maximum(tl.sqrt_rn(v * v_scale), floor, propagate_nan=tl.PropagateNan.ALL)
    return tl.div_rn(one, root + eps)


@triton.jit
def _norm_kernel(
    grad,
    moment,
    table,
    consts,
    tile_shard,
    partials,
    n_tiles,
    floor,
    PRECOND: tl.constexpr,
    STORE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Per-tile partial sums of g^2, (P g)^2 and g (P g); with STORE (fp32 gradients) P g is
    written over g. Columns: numel, first, g[, v]."""
    COLS: tl.constexpr = 4 if PRECOND else 3
    tile, shard, row, offs, numel, full = _tile(table, tile_shard, COLS, BLOCK)
    grad_ptr = _shard_pointer(grad, row, 2, ALIGNED)
    g = _load_f32(grad_ptr, offs, numel, full)
    gg = tl.sum(g * g)
    if PRECOND:
        v = _load_f32(_shard_pointer(moment, row, 3, ALIGNED), offs, numel, full)
        pg = _precond(v, shard, consts, floor) * g
        pgpg = tl.sum(pg * pg)
        gpg = tl.sum(g * pg)
        if STORE:
            _store_cast(grad_ptr, pg, offs, numel, full)
    else:
        pgpg = gg
        gpg = gg
    tl.store(partials + tile, gg)
    tl.store(partials + n_tiles + tile, pgpg)
    tl.store(partials + 2 * n_tiles + tile, gpg)


@triton.jit
def _perturb_kernel(
    theta,
    grad,
    target,
    moment,
    table,
    consts,
    tile_shard,
    scale,
    floor,
    PRECOND: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """target <- cast(theta + scale * (P g)); columns: numel, first, theta, g, target[, v]."""
    COLS: tl.constexpr = 6 if PRECOND else 5
    tile, shard, row, offs, numel, full = _tile(table, tile_shard, COLS, BLOCK)
    d = _load_f32(_shard_pointer(grad, row, 3, ALIGNED), offs, numel, full)
    if PRECOND:
        v = _load_f32(_shard_pointer(moment, row, 5, ALIGNED), offs, numel, full)
        d = _precond(v, shard, consts, floor) * d
    t = _load_f32(_shard_pointer(theta, row, 2, ALIGNED), offs, numel, full)
    _store_cast(_shard_pointer(target, row, 4, ALIGNED), t + scale * d, offs, numel, full)


@triton.jit
def _restore_kernel(theta, target, table, tile_shard, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """target <- cast(theta); columns: numel, first, theta, target."""
    tile, shard, row, offs, numel, full = _tile(table, tile_shard, 4, BLOCK)
    t = _load_f32(_shard_pointer(theta, row, 2, ALIGNED), offs, numel, full)
    _store_cast(_shard_pointer(target, row, 3, ALIGNED), t, offs, numel, full)


@dataclass
class _Plan:
    """The tables of one launch over a dtype and alignment group of shards, kept across calls.

    They depend only on the shards' pointers, sizes and dtypes (and the tile size), so a plan is
    reused while those stay the same. It holds no shard tensor: the pointer bases are looked up
    in the current shards, whose tensors then sit at the same addresses."""

    first: int  # the group's first shard: its tensors are the pointer bases
    members: list[int]
    table: torch.Tensor  # as _Launch's, on the device
    tile_shard: torch.Tensor
    n_tiles: int
    aligned: bool
    consts: torch.Tensor | None = None  # built by _consts
    consts_of: tuple | None = None  # the (v_scale, eps) values consts holds; None: placeholders


@dataclass
class _Launch:
    """Everything one launch over a dtype group of shards needs."""

    bases: list[torch.Tensor]  # the group's first tensor of each field: pointer base and dtype
    table: torch.Tensor  # int64 [n_shards, 2 + n_fields], flattened
    consts: torch.Tensor  # fp32 [n_shards, 2]: v_scale, eps
    tile_shard: torch.Tensor  # int32 [n_tiles]
    n_tiles: int
    aligned: bool


# Plans by the identity of the shards they were built for, most recently used last. A step uses
# a few keys (norm, perturb and restore over one or two shard lists); stale entries hold only
# small device tables and are evicted.
PLAN_CACHE_SIZE = 16
_plans: OrderedDict[tuple, list[_Plan]] = OrderedDict()


def norm_sums(shards: Shards, block: int = BLOCK) -> torch.Tensor:
    """Local [||g||^2, ||P g||^2, g.(P g)] over the counted shards, fp32, no host sync; where
    preconditioned, P g replaces their fp32 gradients (`Shards.directions`), as in torch_ops."""
    fields = _fields(shards, "grads")
    counted = [i for i in _nonempty(shards) if shards.counted[i]]
    shards.check_gradients(counted)
    sums = torch.zeros(3, dtype=torch.float64, device=_device(shards))
    for launch in _launches(shards, counted, fields, block):
        partials = torch.empty(3, launch.n_tiles, dtype=torch.float32, device=sums.device)
        grad, moment = launch.bases[0], launch.bases[-1]  # moment unused without P
        _norm_kernel[(launch.n_tiles,)](
            grad,
            moment,
            launch.table,
            launch.consts,
            launch.tile_shard,
            partials,
            launch.n_tiles,
            float(shards.precond_floor),
            PRECOND=shards.preconditioned,
            STORE=shards.preconditioned and grad.dtype == torch.float32,
            ALIGNED=launch.aligned,
            BLOCK=block,
            num_warps=NUM_WARPS,
            enable_fp_fusion=False,
        )
        sums += partials.sum(dim=1, dtype=torch.float64)
    shards.directions.update(id(shards.grads[i]) for i in counted if shards.stores_direction(i))
    return sums.float()


@torch.no_grad()
def perturb(shards: Shards, scale: float, block: int = BLOCK) -> None:
    """targets <- cast(theta + scale * P g), one read of theta, g (and v, where the gradient
    does not hold P g already) and one write per element."""
    nonempty = _nonempty(shards)
    held = [i for i in nonempty if shards.holds_direction(i)]
    built = [i for i in nonempty if not shards.holds_direction(i)]
    for indices, precond in ((held, False), (built, shards.preconditioned)):
        fields = ["thetas", "grads", "targets", *(["second_moments"] if precond else [])]
        for launch in _launches(shards, indices, fields, block):
            theta, grad, target = launch.bases[:3]
            _perturb_kernel[(launch.n_tiles,)](
                theta,
                grad,
                target,
                launch.bases[-1],  # the second moment; unused without P
                launch.table,
                launch.consts,
                launch.tile_shard,
                float(scale),
                float(shards.precond_floor),
                PRECOND=precond,
                ALIGNED=launch.aligned,
                BLOCK=block,
                num_warps=NUM_WARPS,
                enable_fp_fusion=False,
            )


@torch.no_grad()
def restore(shards: Shards, block: int = BLOCK) -> None:
    """targets <- cast(theta)."""
    for launch in _launches(shards, _nonempty(shards), ["thetas", "targets"], block):
        theta, target = launch.bases
        _restore_kernel[(launch.n_tiles,)](
            theta,
            target,
            launch.table,
            launch.tile_shard,
            ALIGNED=launch.aligned,
            BLOCK=block,
            num_warps=NUM_WARPS,
            enable_fp_fusion=False,
        )


def _fields(shards: Shards, *names: str) -> list[str]:
    return [*names, "second_moments"] if shards.preconditioned else list(names)


def _nonempty(shards: Shards) -> list[int]:
    return [i for i, g in enumerate(shards.grads) if g.numel()]


def _launches(
    shards: Shards, indices: list[int], fields: list[str], block: int
) -> Iterator[_Launch]:
    """One launch per combination of the fields' dtypes and 16-byte alignment (usually one or
    two): unaligned shards must not cost the aligned ones their vector loads.

    The tables are built once per set of shard tensors: the key is every tensor's address, size
    and dtype (with the shard list, fields and tile size), so a step over the same buffers only
    pays for building the key, and for the preconditioner constants when they change."""
    columns = [getattr(shards, f) for f in fields]
    key = _plan_key(shards, indices, fields, columns, block)
    plans = _plans.get(key)
    if plans is None:
        plans = _plans[key] = _build_plans(shards, indices, columns, block)
        while len(_plans) > PLAN_CACHE_SIZE:
            _plans.popitem(last=False)
    else:
        _plans.move_to_end(key)
    for plan in plans:
        yield _Launch(
            [column[plan.first] for column in columns],
            plan.table,
            _consts(shards, plan, "second_moments" in fields),
            plan.tile_shard,
            plan.n_tiles,
            plan.aligned,
        )


def _plan_key(
    shards: Shards,
    indices: list[int],
    fields: list[str],
    columns: list[list[torch.Tensor]],
    block: int,
) -> tuple:
    """What the tables depend on: (address, numel, dtype) of every tensor the launch reads."""
    tensors = [column[i] for column in columns for i in indices]
    return (
        tuple(fields),
        block,
        _device(shards),
        tuple(indices),
        tuple([t.data_ptr() for t in tensors]),
        tuple([t.numel() for t in tensors]),
        tuple([t.dtype for t in tensors]),
    )


def _build_plans(
    shards: Shards, indices: list[int], columns: list[list[torch.Tensor]], block: int
) -> list[_Plan]:
    if not indices:
        return []
    pointers = torch.tensor([[column[i].data_ptr() for i in indices] for column in columns])
    aligned = (pointers % 16 == 0).all(dim=0).tolist()
    dtypes = [[column[i].dtype for i in indices] for column in columns]
    groups: dict[tuple, list[int]] = {}
    for position, key in enumerate(zip(*dtypes, aligned, strict=True)):
        groups.setdefault(key, []).append(position)
    return [
        _plan(
            shards, [indices[p] for p in positions], columns, pointers[:, positions], key[-1], block
        )
        for key, positions in groups.items()
    ]


def _plan(
    shards: Shards,
    members: list[int],
    columns: list[list[torch.Tensor]],
    pointers: torch.Tensor,
    aligned: bool,
    block: int,
) -> _Plan:
    """The launch tables, built with a few whole-list operations (thousands of shards)."""
    bases = [column[members[0]] for column in columns]
    device = bases[0].device
    if device.type != "cuda" and not INTERPRET:
        raise RuntimeError("triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
    if len({column[i].device for column in columns for i in members}) > 1:
        raise ValueError("triton kernels: all shards must be on one device")
    distances = pointers - pointers[:, :1]
    element_sizes = torch.tensor([b.element_size() for b in bases]).unsqueeze(1)
    if (distances % element_sizes).any():
        raise ValueError("triton kernels: a shard is not aligned to its element size")
    numels = torch.tensor([shards.grads[i].numel() for i in members])
    tiles = (numels + block - 1) // block
    table = torch.stack((numels, tiles.cumsum(0) - tiles, *(distances // element_sizes)), dim=1)
    n_tiles = int(tiles.sum())
    tile_shard = torch.repeat_interleave(
        torch.arange(len(members), dtype=torch.int32, device=device),
        _upload(tiles, device),
        output_size=n_tiles,
    )
    return _Plan(members[0], members, _upload(table.view(-1), device), tile_shard, n_tiles, aligned)


def _consts(shards: Shards, plan: _Plan, preconditioned: bool) -> torch.Tensor:
    """The plan's per-shard v_scale and eps on the device, rebuilt only when they change (the
    bias correction v_scale changes every step). Without P they are never read: placeholders."""
    values = None
    if preconditioned:
        values = tuple([(shards.v_scales[i], shards.adam_eps[i]) for i in plan.members])
    if plan.consts is None or plan.consts_of != values:
        rows = values or [(1.0, 0.0)] * len(plan.members)
        consts = torch.tensor(rows, dtype=torch.float32).view(-1)
        plan.consts = _upload(consts, plan.table.device)
        plan.consts_of = values
    return plan.consts


def _upload(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host table to device without blocking the host (pinned, asynchronous copy)."""
    if device.type != "cuda":
        return table
    return table.pin_memory().to(device, non_blocking=True)


def _device(shards: Shards) -> torch.device:
    return shards.grads[0].device if len(shards) else torch.device("cpu")
