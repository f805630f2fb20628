"""Run Megatron-LM's own training loop (`pretrain_gpt.py`) on CPU-only machines.

On top of ``enable_cpu_emulation`` (megatron-core's CUDA calls), Megatron-LM's loop needs
four more redirections before it starts: ``initialize_megatron`` asserts CUDA unless told
``allow_no_cuda``; with ``torch.cuda.device_count() == 0`` it silently skips building the
model-parallel groups and the RNG tracker; ``_compile_dependencies`` runs make and nvcc;
and argument validation asks the GPU's architecture (TP > 1). Megatron-LM's modules must be
importable (its tree on ``sys.path``). Tests and demos only: refused where a GPU exists.
Measured with Megatron-LM core_v0.16.1 and core_v0.19.0: the same four redirections suffice
for both (core_v0.19.0 moved argument parsing out of ``initialize_megatron``, which changes
nothing here: ``initialize_megatron`` still asserts CUDA and still counts devices).
"""

from __future__ import annotations

import functools
import os

import torch

from megatron_fsam.compat.cpu import enable_cpu_emulation, share_cpu_cores

_enabled = False


def enable_megatron_lm_cpu_emulation() -> None:
    """Switch on the CPU emulation for Megatron-LM's training loop (idempotent)."""
    global _enabled
    enable_cpu_emulation()
    if _enabled:
        return
    from megatron.training import arguments, initialize, training

    torch.cuda.device_count = lambda: 1
    torch.cuda.set_device = lambda device: None
    initialize._compile_dependencies = lambda: None
    training.initialize_megatron = functools.partial(
        initialize.initialize_megatron, allow_no_cuda=True
    )
    arguments.get_device_arch_version = lambda: 9  # Hopper: no Blackwell-only code paths
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")  # asserted for TP > 1
    share_cpu_cores()
    _enabled = True
