"""Compatibility shims that are switched on explicitly, never imported by the algorithm."""

from megatron_fsam.compat.cpu import enable_cpu_emulation

__all__ = ["enable_cpu_emulation"]
