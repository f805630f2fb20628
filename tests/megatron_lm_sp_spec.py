"""Megatron-LM's local GPT spec with a norm that takes sequence parallelism, for CPU tests.

    pretrain_gpt.py ... --sequence-parallel --spec megatron_lm_sp_spec BLOCK

Without apex or Transformer Engine, megatron-core's local spec builds torch's LayerNorm
(`WrappedTorchNorm`), which refuses sequence parallelism. This spec builds the same torch
LayerNorm (same arguments, so TP=1 with the default spec computes the same model) with its
parameters marked `sequence_parallel`, as apex's FusedLayerNorm marks them: each TP rank sees
only its part of the sequence, and `finalize_model_grads` sums the marked gradients over the TP
ranks. The block spec fixes the layer count to the tests' `--num-layers 2` (one stage).
"""

from typing import Any

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

NUM_LAYERS = 2


class SequenceParallelLayerNorm(torch.nn.LayerNorm):
    """torch's LayerNorm as `WrappedTorchNorm` builds it, parameters marked for sequence
    parallelism."""

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-5, **_: Any) -> None:
        super().__init__(hidden_size, eps=eps)
        for param in self.parameters():
            param.sequence_parallel = config.sequence_parallel


def _layer_spec() -> Any:
    spec = get_gpt_layer_local_spec()
    spec.submodules.input_layernorm = SequenceParallelLayerNorm
    spec.submodules.pre_mlp_layernorm = SequenceParallelLayerNorm
    return spec


BLOCK = TransformerBlockSubmodules(
    layer_specs=[_layer_spec()] * NUM_LAYERS, layer_norm=SequenceParallelLayerNorm
)
