"""megatron_fsam: Functional-SAM and preconditioned SAM for Megatron-core pretraining
(`FuncSAM`), DeepSpeed engines (`megatron_fsam.deepspeed.FuncSAM`) and plain PyTorch loops
(`megatron_fsam.pytorch.FuncSAM`)."""

from __future__ import annotations

from typing import Any

from megatron_fsam.config import SAMConfig

__all__ = ["SAMConfig", "FuncSAM", "enable_cpu_emulation"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy: importing the config must not pull in megatron-core or the CPU emulation.
    if name == "FuncSAM":
        from megatron_fsam.integrations.megatron_core import FuncSAM

        return FuncSAM
    if name == "enable_cpu_emulation":
        from megatron_fsam.compat.cpu import enable_cpu_emulation

        return enable_cpu_emulation
    raise AttributeError(f"module 'megatron_fsam' has no attribute {name!r}")
