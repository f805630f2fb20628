"""Unlink the /dev/shm files of DeepSpeed's CPU shared-memory allreduce once every rank maps them.

On the CPU, ``deepspeed.init_distributed`` (deepspeed 0.19.8, ``comm/torch.py`` TorchBackend,
``ops/csrc/cpu/comm/shm.cpp``) starts a shared-memory allreduce whenever the launcher's
LOCAL_SIZE equals the world size (the deepspeed launcher sets it): each rank creates
``/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>`` (69 MB),
then maps every peer's file, looping until it exists. DeepSpeed never unlinks them, so every
launched run left one file per rank holding RAM until reboot. (Ranks spawned without
LOCAL_SIZE, as tests/spawn.py's, create none.)

Once every rank has mapped every file, the names serve nothing: DeepSpeed opens them only in
that one-time initialisation, and the mappings keep the memory alive until the processes exit,
when the kernel frees it. Unlinking right then covers every way a run ends (normal exit, an
exception, a killed launcher, SIGKILL), which no exit-time cleanup can; and a process removes
only files it maps, so never another job's. Only a run killed between DeepSpeed creating the
files and the barrier below (in ``init_distributed``, or a peer that never gets there) can still
leave them.
"""

from __future__ import annotations

from pathlib import Path

import torch

SHM_PREFIX = "/dev/shm/deepspeed_"


def mapped_shm_files(pid: int | str = "self") -> set[Path]:
    """The ``/dev/shm/deepspeed_*`` files that process ``pid`` maps (an unlinked one's path
    ends in " (deleted)", as /proc/PID/maps shows it)."""
    fields = (line.split(maxsplit=5) for line in Path(f"/proc/{pid}/maps").read_text().splitlines())
    return {Path(f[5]) for f in fields if len(f) == 6 and f[5].startswith(SHM_PREFIX)}


def unlink_shm_buffers() -> list[Path]:
    """Call on every rank right after ``deepspeed.init_distributed``: wait until every rank has
    mapped its peers' buffers (a barrier), then unlink the ones this process maps. Returns them;
    nothing happens (and no barrier) where DeepSpeed started no shared-memory allreduce."""
    buffers = sorted(p for p in mapped_shm_files() if p.exists())
    if not buffers:
        return []
    torch.distributed.barrier()  # every rank is past DeepSpeed's shm initialisation
    for path in buffers:
        path.unlink(missing_ok=True)  # the peers unlink the same files
    return buffers
