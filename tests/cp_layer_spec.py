"""A test-only layer spec for Megatron-LM's pretrain_gpt.py: megatron-core's local GPT layer
with `ContextParallelAttention`, so that `--context-parallel-size` > 1 runs on the CPU
(megatron-core's local attention refuses CP). tests/megatron_lm_driver.py's folder is on the
ranks' path: `--spec cp_layer_spec LAYER_SPEC`."""

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

from megatron_fsam.compat.cp_attention import ContextParallelAttention

LAYER_SPEC = get_gpt_layer_local_spec()
LAYER_SPEC.submodules.self_attention.submodules.core_attention = ContextParallelAttention
