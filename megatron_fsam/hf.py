"""`megatron_fsam.hf.FuncSAMTrainer`: the Trainer front end (`integrations/hf_trainer.py`)."""

from megatron_fsam.integrations.hf_trainer import FuncSAMTrainer

__all__ = ["FuncSAMTrainer"]
