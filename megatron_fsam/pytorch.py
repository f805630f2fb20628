"""`megatron_fsam.pytorch.FuncSAM`: the PyTorch-native front end (`integrations/pytorch.py`)."""

from megatron_fsam.integrations.pytorch import FuncSAM

__all__ = ["FuncSAM"]
