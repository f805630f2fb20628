"""Run a function on several gloo CPU ranks and collect what each returns.

A failure on any rank fails the caller with that rank's traceback; a rank that hangs
(typically in a collective its peers never reach) is killed at the timeout. ``fn``
must be defined at module level so it pickles.

Ranks fork from one server process that imported torch and megatron-core once for the whole
session (multiprocessing's forkserver), instead of re-importing them in every rank (about
10 s each on 2 cores). The ranks meet at a TCPStore that this process holds open on a port
the OS chose (torchelastic's agent-store rendezvous), so no port is ever handed out unbound.
"""

import os
import pickle
import queue
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# What every rank imports anyway: imported once, in the fork server.
PRELOAD = ["torch", "megatron.core", "megatron_fsam.compat.cpu", "megatron_fsam.trainer.parallel"]
SPAWN_TIMEOUT = 900.0


@contextmanager
def rendezvous() -> Iterator[dict[str, str]]:
    """The environment that makes torch.distributed's env:// rendezvous of any process join a
    TCPStore held here, listening on a port the OS picked for it (no bind-close-reuse race).
    Launchers (torchrun, deepspeed) pass it on to their ranks unchanged."""
    store = dist.TCPStore(
        "127.0.0.1",
        0,
        is_master=True,
        wait_for_workers=False,
        timeout=timedelta(seconds=SPAWN_TIMEOUT),
    )
    try:
        yield {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(store.port),
            "TORCHELASTIC_USE_AGENT_STORE": "True",
        }
    finally:
        del store


def _context(env: dict[str, str] | None) -> Any:
    """The fork server, unless the ranks need an environment of their own before any import
    (Triton, which megatron-core imports, reads TRITON_INTERPRET when it is imported)."""
    if env:
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _rank_main(
    rank: int, world_size: int, meeting: dict, fn: Callable, args: tuple, results: mp.Queue
) -> None:
    os.environ.update(meeting, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
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


def start_deepspeed_comm() -> None:
    """DeepSpeed's comm in a rank, started as the entry points start it on the CPU: without the
    shared-memory allreduce op (megatron_fsam/compat/deepspeed_cpu.py), which would cost a
    first run minutes of compiling."""
    import deepspeed

    from megatron_fsam.compat.deepspeed_cpu import skip_shm_allreduce

    skip_shm_allreduce()
    deepspeed.init_distributed(dist_backend="gloo")


def run_ranks(
    fn: Callable,
    world_size: int,
    *args: Any,
    timeout: float = SPAWN_TIMEOUT,
    env: dict[str, str] | None = None,
) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` CPU ranks; return each rank's value.

    ``env`` is set in the ranks' environment from their start, before any import (e.g.
    TRITON_INTERPRET); such ranks are spawned afresh instead of forked from the server.
    """
    with rendezvous() as meeting:
        return _run(fn, world_size, args, timeout, env, meeting)


def _run(
    fn: Callable, world_size: int, args: tuple, timeout: float, env: dict | None, meeting: dict
) -> list:
    ctx = _context(env)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_rank_main, args=(rank, world_size, meeting, fn, args, results))
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
