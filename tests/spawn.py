"""Run a function on several gloo CPU ranks and collect what each returns.

A failure on any rank fails the caller with that rank's traceback; a rank that hangs
(typically in a collective its peers never reach) is killed at the timeout. ``fn``
must be defined at module level so it pickles.
"""

import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(
    rank: int, world_size: int, port: int, fn: Callable, args: tuple, results: mp.Queue
) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        from megatron_fsam.compat import enable_cpu_emulation
        from megatron_fsam.trainer.parallel import destroy_distributed

        enable_cpu_emulation()
        try:
            value = fn(rank, world_size, *args)
        finally:
            destroy_distributed()
        # Plain pickle: the queue's own pickler would share tensors through file
        # descriptors that die with this process.
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def run_ranks(
    fn: Callable,
    world_size: int,
    *args: Any,
    timeout: float = 300,
    env: dict[str, str] | None = None,
) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` CPU ranks; return each rank's value.

    ``env`` is set in the ranks' environment from their start, before any import (e.g.
    TRITON_INTERPRET, which must precede Triton's import).
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(rank, world_size, port, fn, args, results))
        for rank in range(world_size)
    ]
    saved = dict(os.environ)
    os.environ.update(env or {})
    try:
        for p in procs:
            p.start()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    values: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(values) < world_size:
            try:
                rank, ok, value = results.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in values and p.exitcode]
                if dead:
                    raise RuntimeError(
                        f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}"
                    ) from None
                if time.monotonic() > deadline:
                    missing = sorted(set(range(world_size)) - set(values))
                    raise TimeoutError(f"ranks {missing} did not finish in {timeout} s") from None
                continue
            if not ok:
                raise RuntimeError(f"rank {rank} of {world_size} failed:\n{value}")
            values[rank] = pickle.loads(value)
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results.close()
    return [values[r] for r in range(world_size)]
