"""`megatron_fsam.deepspeed.FuncSAM`: the DeepSpeed front end (`integrations/deepspeed.py`)."""

from megatron_fsam.integrations.deepspeed import FuncSAM

__all__ = ["FuncSAM"]
