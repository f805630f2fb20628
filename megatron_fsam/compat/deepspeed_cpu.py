"""Start DeepSpeed's comm on the CPU without its shared-memory allreduce.

On the CPU, ``deepspeed.init_distributed`` (deepspeed 0.19.8, ``comm/torch.py`` TorchBackend)
first JIT-builds a C++ op, ``deepspeed_shm_comm`` (``ops/csrc/cpu/comm/shm.cpp``): silently,
about 4 minutes on a 2-core machine, once per Python version (cached under
``~/.cache/torch_extensions``). Then, where the deepspeed launcher set LOCAL_SIZE, every rank
creates a 69 MB ``/dev/shm/deepspeed_allreduce_buffer_*`` file that DeepSpeed never unlinks.

The op serves one call, ``deepspeed.comm.inference_all_reduce`` (the inference engine's and
AutoTP's linear layers), which falls back to ``torch.distributed.all_reduce`` without it.
Training never calls it, so a training run on the CPU skips the op: no build, no /dev/shm files,
the same collectives. On an accelerator DeepSpeed builds no such op, and this changes nothing.
"""

from __future__ import annotations

import importlib


def skip_shm_allreduce() -> None:
    """Call before ``deepspeed.init_distributed`` (or before the Trainer's arguments, whose
    accelerate state starts DeepSpeed's comm): DeepSpeed's CPU comm then starts without the
    shared-memory allreduce op. Idempotent; a comm already started keeps what it has."""
    from deepspeed.accelerator import get_accelerator

    # The module by name: `deepspeed.comm.torch` as an attribute is the torch package.
    torch_backend = importlib.import_module("deepspeed.comm.torch")
    if get_accelerator().device_name() == "cpu":
        torch_backend.build_shm_op = lambda: None
