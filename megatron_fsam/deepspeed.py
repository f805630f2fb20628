"""`megatron_fsam.deepspeed.FuncSAM`: the DeepSpeed front end (`integrations/deepspeed.py`),
and the per-rank file of a kept ascent direction in its checkpoints."""

from megatron_fsam.directions import load_rank_state, save_rank_state
from megatron_fsam.integrations.deepspeed import FuncSAM

__all__ = ["FuncSAM", "load_rank_state", "save_rank_state"]
