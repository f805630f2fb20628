"""Functional-SAM for Megatron-core pretraining."""

from typing import Any

__all__ = ["enable_cpu_emulation"]


def __getattr__(name: str) -> Any:
    # Lazy, so importing the package never imports (or switches on) the CPU emulation.
    if name == "enable_cpu_emulation":
        from megatron_fsam.compat import enable_cpu_emulation

        return enable_cpu_emulation
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
