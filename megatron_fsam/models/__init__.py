"""The paper's decoder as a megatron-core GPTModel, and weight exchange across layouts."""

from megatron_fsam.models.gpt import (
    GPTConfig,
    build_model_chunks,
    forward_step,
    init_weights,
    loss_func,
    transformer_config,
)
from megatron_fsam.models.weights import (
    full_shape,
    full_state,
    global_param_names,
    load_full_state,
    tp_slice,
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
