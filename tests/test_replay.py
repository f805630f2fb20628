"""Replaying pass 1's randomness in pass 2, with the RNG trackers GPU runs use."""

from __future__ import annotations

import pytest
import torch
from megatron.core.tensor_parallel import random as mp_random

from megatron_fsam.replay import RecordingIterator, RNGState


class _GraphSafeCudaRNG:
    """CPU stand-in for the CUDA generator under `use_cudagraphable_rng`.

    On a GPU, `graphsafe_set_state(g)` makes the device generator draw from `g` itself, so
    `g` advances in place, and `graphsafe_get_state()` returns that same object. Here the
    CPU generator does the drawing and the registered object is brought up to date
    whenever it is read, which shows the same aliasing.
    """

    def __init__(self) -> None:
        self.registered: torch.Generator | None = None

    def get(self, device="cuda", clone: bool = False, graph_safe: bool = False):
        if not graph_safe:
            return torch.get_rng_state()
        if clone or self.registered is None:
            generator = torch.Generator()
            generator.set_state(torch.get_rng_state())
            if clone:
                return generator
            self.registered = generator
        self.registered.set_state(torch.get_rng_state())
        return self.registered

    def set(self, new_state, device=-1, graph_safe: bool = False) -> None:
        if graph_safe:
            self.registered = new_state
            new_state = new_state.get_state()
        torch.set_rng_state(new_state)


@pytest.fixture
def graph_safe_tracker(monkeypatch):
    rng = _GraphSafeCudaRNG()
    # The tracker checks that torch can capture generators in CUDA graphs (CPU builds cannot).
    monkeypatch.setattr(
        torch.cuda.CUDAGraph, "register_generator_state", lambda *a: None, raising=False
    )
    monkeypatch.setattr(mp_random, "_get_cuda_rng_state", rng.get)
    monkeypatch.setattr(mp_random, "_set_cuda_rng_state", rng.set)
    tracker = mp_random.CudaRNGStatesTracker(use_cudagraphable_rng=True)
    monkeypatch.setattr(mp_random, "_CUDA_RNG_STATE_TRACKER", tracker)
    monkeypatch.setattr(mp_random, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", True)
    tracker.add(mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME, 1234)
    return tracker


def _dropout_masks(tracker) -> tuple[torch.Tensor, torch.Tensor]:
    """A tensor-parallel (tracker) mask and a default-generator mask, as a layer draws them."""
    with tracker.fork():
        in_tracker = torch.nn.functional.dropout(torch.ones(4096), p=0.5) > 0
    return in_tracker, torch.nn.functional.dropout(torch.ones(4096), p=0.5) > 0


def test_graph_safe_tracker_replays_the_same_dropout_masks(graph_safe_tracker):
    assert isinstance(
        graph_safe_tracker.get_states()[mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME],
        torch.Generator,
    )
    before = RNGState.capture()
    pass1 = _dropout_masks(graph_safe_tracker)
    after = RNGState.capture()
    before.restore()
    assert _same(pass1, _dropout_masks(graph_safe_tracker))
    before.restore()  # a snapshot survives its own restore: the same masks a third time
    assert _same(pass1, _dropout_masks(graph_safe_tracker))
    after.restore()  # and the run continues where pass 1 left it, with new masks
    next_masks = _dropout_masks(graph_safe_tracker)
    after.restore()
    assert _same(next_masks, _dropout_masks(graph_safe_tracker))
    assert not torch.equal(next_masks[0], pass1[0])


def _same(masks: tuple, others: tuple) -> bool:
    return all(torch.equal(a, b) for a, b in zip(masks, others, strict=True))


def test_replay_hands_out_each_batch_as_read_though_its_reader_edits_it():
    """Megatron-LM core_v0.19.0's get_batch writes this context-parallel rank's chunks into the
    dict it read: every replay (pass 2, the exact angle's pass 3) still gets the whole one."""
    recorder = RecordingIterator(iter([{"tokens": torch.arange(8)}]))
    batch = next(recorder)
    batch["tokens"] = batch["tokens"][:4]
    for _ in range(2):
        (replayed,) = recorder.replay()
        assert torch.equal(replayed["tokens"], torch.arange(8))
        replayed["tokens"] = replayed["tokens"][:4]
