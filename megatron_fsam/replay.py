"""Replaying a step's data and randomness so pass 2 sees exactly what pass 1 saw."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch


class RecordingIterator:
    """Passes batches through from `source` and keeps them for `replay()`.

    A dict batch is kept, and replayed, as a dict of its own: Megatron-LM's `get_batch`
    (core_v0.19.0) writes the device copies and this context-parallel rank's chunks into the
    dict it reads, so the replay would otherwise split the sequence a second time.
    """

    def __init__(self, source: Iterator[Any]) -> None:
        self.source = source
        self.batches: list[Any] = []

    def __iter__(self) -> RecordingIterator:
        return self

    def __next__(self) -> Any:
        batch = next(self.source)
        self.batches.append(_own_container(batch))
        return batch

    def replay(self) -> Iterator[Any]:
        return (_own_container(batch) for batch in self.batches)


def _own_container(batch: Any) -> Any:
    """A shallow copy of a dict batch (the tensors are shared), other batches as they are."""
    return dict(batch) if isinstance(batch, dict) else batch


class MicrobatchReplay:
    """Wraps a Megatron data iterator (None, one iterator, or one per virtual stage)."""

    def __init__(self, data_iterator: Any) -> None:
        self.is_list = isinstance(data_iterator, list)
        sources = data_iterator if self.is_list else [data_iterator]
        self.recorders = [None if it is None else RecordingIterator(it) for it in sources]

    def recording(self) -> Any:
        return self.recorders if self.is_list else self.recorders[0]

    def replaying(self) -> Any:
        replays = [None if r is None else r.replay() for r in self.recorders]
        return replays if self.is_list else replays[0]


@dataclass
class RNGState:
    """CPU, CUDA and Megatron tensor-parallel tracker states (dropout masks; no tracker
    where megatron-core is not loaded).

    A graph-safe tracker (`use_cudagraphable_rng`, Transformer Engine's) keeps
    `torch.Generator` objects that its forks advance in place, and its `get_states()`
    hands out those very objects: the snapshot holds copies, and every restore installs
    fresh copies, so neither pass 2 nor a later restore can move it.
    """

    cpu: torch.Tensor
    cuda: torch.Tensor | None
    tracker: dict[str, Any] | None

    @classmethod
    def capture(cls) -> RNGState:
        # CUDA's generators exist once CUDA is initialised (or emulated on a CPU).
        cuda = torch.cuda.get_rng_state() if torch.cuda.default_generators else None
        tracker = _megatron_tracker()
        states = None if tracker is None else _copied(tracker.get_states())
        return cls(torch.get_rng_state(), cuda, states)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda)
        tracker = _megatron_tracker()
        if tracker is not None and self.tracker is not None:
            tracker.set_states(_copied(self.tracker))


def _megatron_tracker() -> Any:
    """Megatron's tensor-parallel RNG tracker, or None where megatron-core is not loaded (no
    layer draws from it then, and the front ends without Megatron must not import it)."""
    random = sys.modules.get("megatron.core.tensor_parallel.random")
    return None if random is None else random.get_cuda_rng_tracker()


def _copied(states: dict[str, Any]) -> dict[str, Any]:
    """Tracker states with each generator object replaced by a copy (tensors are values)."""
    return {
        name: state.clone_state() if isinstance(state, torch.Generator) else state
        for name, state in states.items()
    }
