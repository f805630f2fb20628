"""The paper's decoder as a megatron-core GPTModel; the weight exchange across layouts lives in
the plugin (`megatron_fsam.backends.megatron_weights`) and is re-exported here."""

from megatron_fsam.backends.megatron_weights import (
    full_shape,
    full_state,
    global_param_names,
    load_full_state,
    tp_slice,
)
from megatron_fsam.trainer.models.gpt import (
    GPTConfig,
    build_model_chunks,
    forward_step,
    init_weights,
    loss_func,
    transformer_config,
)

__all__ = [
    "GPTConfig",
    "build_model_chunks",
    "forward_step",
    "full_shape",
    "full_state",
    "global_param_names",
    "init_weights",
    "load_full_state",
    "loss_func",
    "tp_slice",
    "transformer_config",
]
