"""Run preprocessing once, on global rank 0, and hand its result to every rank."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch.distributed as dist

T = TypeVar("T")


def is_rank0() -> bool:
    """True on global rank 0, or when torch.distributed is not initialised."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def run_on_rank0(fn: Callable[[], T]) -> T:
    """Call `fn` on rank 0 only and broadcast its (picklable) result to all ranks.

    The broadcast doubles as the barrier. A failure on rank 0 is broadcast too, so the other
    ranks raise instead of waiting forever for a result that never comes; a ValueError or
    OSError (bad input data) keeps its type, so callers handle it the same on every rank.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return fn()
    payload: list[object] = [None]
    error: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            payload = [("ok", fn())]
        except Exception as exc:
            error = exc
            payload = [("error", (type(exc).__name__, str(exc)))]
    dist.broadcast_object_list(payload, src=0)
    if error is not None:
        raise error
    status, value = payload[0]
    if status == "error":
        name, message = value
        kind = {"FileNotFoundError": FileNotFoundError, "ValueError": ValueError}.get(name)
        if kind is not None:
            raise kind(message)
        raise RuntimeError(f"data preparation failed on rank 0: {name}: {message}")
    return value
