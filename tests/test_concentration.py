"""top_share against a brute force: torch.topk over the concatenated float64 (P g)^2 of the
counted shards, in one process and over two gloo ranks that hold parts of the shards.

Tolerances: without P, (P g)^2 = g^2 of bf16 gradients is exact in float32, so the share differs
from the brute force only by float64 sums taken in another order (rtol 1e-12). With P, the
kernels' float32 P g is a few roundings of 2^-24 away from the float64 one (rtol 1e-6).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.distributed as dist

from megatron_fsam.kernels import torch_ops
from megatron_fsam.kernels.concentration import top_share
from megatron_fsam.kernels.shards import Shards
from tests.spawn import run_ranks

SIZES = (5, 0, 3000, 1, 9000, 700)
COUNTED = (True, True, False, True, True, True)
UNCOUNTED_SPIKE = 1e6  # one huge gradient in the uncounted shard: counted, it would hold it all
FLOOR = 0.1  # above sqrt(v * v_scale) for part of the coordinates
PRECONDS = [None, 0.0, FLOOR]  # None: no P; else the precond_floor
FRACTIONS = (1e-3, 0.05, 1.0)
CHUNK = 1000  # several batches per shard: the running top k is merged across batches


def make_shards(floor: float | None) -> Shards:
    """bf16 gradients (many ties among their squares); sqrt(v * v_scale) from 0.01 to 0.35."""
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(n, generator=gen).bfloat16() for n in SIZES]
    grads[COUNTED.index(False)][7] = UNCOUNTED_SPIKE
    shards = Shards(
        thetas=[torch.zeros(n) for n in SIZES],
        grads=grads,
        targets=[torch.zeros(n) for n in SIZES],
        counted=list(COUNTED),
    )
    if floor is not None:
        shards.second_moments = [
            (torch.rand(n, generator=gen) + 0.1).square().mul(1e-4) for n in SIZES
        ]
        shards.v_scales = [1.0 / (1.0 - 0.999**t) for t in range(1, len(SIZES) + 1)]
        shards.adam_eps = [1e-8] * len(SIZES)
        shards.precond_floor = floor
    return shards


def brute_force(shards: Shards, fraction: float) -> float:
    """Share of the top ceil(fraction * N) of all counted (P g)^2, from the formula in float64."""
    squares = []
    for i in range(len(shards)):
        if shards.counted[i]:
            pg = shards.grads[i].double()
            if shards.preconditioned:
                root = (shards.second_moments[i].double() * shards.v_scales[i]).sqrt()
                pg = pg / (root.clamp_min(shards.precond_floor) + shards.adam_eps[i])
            squares.append(pg.square())
    squares = torch.cat(squares)
    k = math.ceil(fraction * squares.numel())
    return (squares.topk(k).values.sum() / squares.sum()).item()


def rtol(floor: float | None) -> float:
    return 1e-12 if floor is None else 1e-6  # see the module docstring


@pytest.mark.parametrize("fraction", FRACTIONS)
@pytest.mark.parametrize("floor", PRECONDS)
def test_top_share_matches_brute_force(floor: float | None, fraction: float, monkeypatch):
    monkeypatch.setitem(torch_ops.CHUNK_NUMEL, "cpu", CHUNK)
    shards = make_shards(floor)
    expected = brute_force(shards, fraction)
    assert top_share(shards, fraction) == pytest.approx(expected, rel=rtol(floor), abs=0)
    if fraction < 1.0:  # the uncounted shard is left out, not merely small
        all_counted = dataclasses.replace(shards, counted=[True] * len(SIZES))
        assert expected < 0.9 < brute_force(all_counted, fraction)


def test_top_share_ties_zeros_and_no_shards():
    """Values tied with the k-th largest count only up to k; no mass, or none at all, gives 0."""
    ones = dataclasses.replace(
        make_shards(None), grads=[torch.ones(n) for n in SIZES], counted=[True] * len(SIZES)
    )
    n = sum(SIZES)
    assert top_share(ones, 0.01) == math.ceil(0.01 * n) / n
    zeros = dataclasses.replace(ones, grads=[torch.zeros(n) for n in SIZES])
    assert top_share(zeros) == 0.0
    assert top_share(Shards([], [], [], [])) == 0.0
    with pytest.raises(ValueError, match="fraction"):
        top_share(ones, 0.0)


def half(shards: Shards, rank: int) -> Shards:
    """This rank's half of every shard, as a sharded optimizer splits them."""

    def cut(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return [t[rank * t.numel() // 2 : (rank + 1) * t.numel() // 2] for t in tensors]

    moments = shards.second_moments
    return dataclasses.replace(
        shards,
        thetas=cut(shards.thetas),
        grads=cut(shards.grads),
        targets=cut(shards.targets),
        second_moments=None if moments is None else cut(moments),
    )


def _two_ranks(rank: int, world_size: int) -> dict[tuple, list[float]]:
    """Shares over each rank's half of every shard, and over all shards on rank 0 with none
    (empty lists) on rank 1."""
    dist.init_process_group("gloo")
    torch_ops.CHUNK_NUMEL["cpu"] = CHUNK
    shares, nothing = {}, Shards([], [], [], [])
    for floor in PRECONDS:
        whole = make_shards(floor)
        layouts = {"halves": half(whole, rank), "rank 1 empty": whole if rank == 0 else nothing}
        for layout, shards in layouts.items():
            shares[layout, floor] = [top_share(shards, fraction) for fraction in FRACTIONS]
    return shares


def test_top_share_over_two_ranks_is_that_of_the_union():
    """Both ranks get the same share, that of the union of their shards."""
    rank0, rank1 = run_ranks(_two_ranks, 2)
    assert rank0 == rank1
    assert len(rank0) == 2 * len(PRECONDS)
    for (_, floor), shares in rank0.items():
        whole = make_shards(floor)
        for fraction, share in zip(FRACTIONS, shares, strict=True):
            assert share == pytest.approx(brute_force(whole, fraction), rel=rtol(floor), abs=0)
