"""The paper's Nanodo decoder (google-deepmind/nanodo) as a megatron-core GPTModel.

Pre-LayerNorm blocks with bias-free LayerNorms, no biases in any linear layer, a GELU
MLP, learned absolute position embeddings, the input embedding tied to the output
projection, and a final LayerNorm. Layers are megatron-core's local (non-TE) modules,
so the same model runs on GPUs and, under ``enable_cpu_emulation``, on CPUs. Under context
parallelism the core attention is Transformer Engine's on GPUs (megatron-core's local one
refuses CP) and `ContextParallelAttention` on the CPU.

Optionally (``num_experts``) every MLP is megatron-core's mixture-of-experts layer (a
router and SequentialMLP experts, split over expert-parallel ranks), and
(``mtp_num_layers``) multi-token prediction layers follow the decoder on the last stage,
sharing its output layer.
"""

import importlib.util
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec_for_backend
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
)
from megatron.core.utils import init_method_normal, unwrap_model
from torch import Tensor

from megatron_fsam.backends.megatron_weights import full_shape, global_param_names, tp_slice
from megatron_fsam.compat.cp_attention import ContextParallelAttention, sequence_positions
from megatron_fsam.trainer.parallel import ParallelConfig


@dataclass
class GPTConfig:
    """Model shape and regularisation; defaults follow Nanodo (F = 4 D, no dropout)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    vocab_size: int
    seq_length: int
    ffn_hidden_size: int | None = None
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    layernorm_epsilon: float = 1e-6
    tie_embeddings: bool = True  # Nanodo's output projection is the input embedding
    # "learned_absolute" (Nanodo) or "rope". Under pipeline parallelism a multi-token
    # prediction stage keeps its own, untied copy of a learned position table (megatron-core
    # ties only the word embeddings across stages): a different model than in one process.
    position_embedding_type: str = "learned_absolute"
    # Mixture of experts: every MLP becomes a router over `num_experts` experts (None: dense).
    num_experts: int | None = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: int | None = None  # default: ffn_hidden_size
    moe_aux_loss_coeff: float = 0.0  # load-balancing loss (0: none)
    moe_z_loss_coeff: float | None = None  # router z-loss (None: none)
    moe_router_score_function: str = "softmax"  # "sigmoid" for the expert bias
    moe_router_enable_expert_bias: bool = False  # aux-loss-free balancing (DeepSeek-V3)
    moe_router_bias_update_rate: float = 1e-3
    moe_expert_capacity_factor: float | None = None  # None: dropless
    moe_token_dispatcher_type: str = "alltoall"  # or "allgather"
    # Multi-token prediction: extra heads predicting tokens 2..1+mtp_num_layers ahead.
    mtp_num_layers: int | None = None
    mtp_loss_scaling_factor: float = 0.1
    # The architecture the DeepSpeed entry point builds: "nanodo" (this decoder; TorchGPT on
    # DeepSpeed), or a Hugging Face causal LM built from these fields, "llama"
    # (LlamaForCausalLM) or "gpt2" (GPT2LMHeadModel); megatron-core builds "nanodo" only.
    family: str = "nanodo"
    # A transformers config JSON (any causal-LM model_type) instead of a family: the JSON
    # gives the architecture, the fields above its shape where the JSON leaves it out.
    hf_config: str | None = None


def gelu_tanh(x: Tensor) -> Tensor:
    """GELU, tanh approximation: what Nanodo's ``flax.linen.gelu`` computes."""
    return F.gelu(x, approximate="tanh")


class LayerNorm(torch.nn.LayerNorm):
    """Bias-free LayerNorm built from Megatron's norm arguments.

    Under sequence parallelism each tensor-parallel rank sees only its part of the
    sequence, so the weight's gradient must be summed across those ranks; Megatron's
    ``finalize_model_grads`` does that only for parameters marked ``sequence_parallel``
    (as apex's FusedLayerNorm marks them). Unmarked, training is silently wrong.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__(hidden_size, eps=eps, bias=False, dtype=config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel


class _NanodoModules(LocalSpecProvider):
    """megatron-core's local modules with Nanodo's bias-free LayerNorm (MoE and MTP specs)."""

    def layer_norm(self, *args, **kwargs) -> type:
        return LayerNorm


def _mlp_spec(model: "GPTConfig") -> ModuleSpec:
    if model.num_experts is None:
        return ModuleSpec(
            module=MLP,
            submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
        )
    return get_moe_module_spec_for_backend(
        backend=_NanodoModules(), num_experts=model.num_experts, moe_grouped_gemm=False
    )


def _core_attention(config: TransformerConfig) -> type:
    """megatron-core's local attention; under context parallelism Transformer Engine's on GPUs,
    the all-gathering `ContextParallelAttention` on the CPU."""
    if config.context_parallel_size == 1:
        return DotProductAttention
    if torch.cuda.is_available():
        from megatron.core.extensions.transformer_engine import TEDotProductAttention

        return TEDotProductAttention
    return ContextParallelAttention


def _layer_spec(model: "GPTConfig", config: TransformerConfig) -> ModuleSpec:
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=LayerNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=_core_attention(config),
                    linear_proj=RowParallelLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=LayerNorm,
            mlp=_mlp_spec(model),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def _check_layout(model: GPTConfig, parallel: ParallelConfig) -> None:
    tp = parallel.tensor_parallel
    if model.vocab_size % tp:
        raise ValueError(
            f"vocab_size {model.vocab_size} must be divisible by tensor_parallel {tp} "
            "(pad the tokenizer's vocabulary)"
        )
    cp = parallel.context_parallel
    if cp > 1 and model.seq_length % (2 * cp):
        raise ValueError(
            f"seq_length {model.seq_length} must be divisible by 2 x context_parallel {cp} "
            "(Megatron's context-parallel chunks)"
        )
    if cp > 1 and torch.cuda.is_available() and not importlib.util.find_spec("transformer_engine"):
        raise ValueError(
            "context_parallel > 1 on GPUs needs Transformer Engine's attention "
            "(megatron-core's local attention refuses context parallelism)"
        )
    if parallel.sequence_parallel and model.seq_length % (tp * cp):
        raise ValueError(
            f"seq_length {model.seq_length} must be divisible by tensor_parallel {tp} x "
            f"context_parallel {cp}"
        )
    ep = parallel.expert_parallel
    if ep > 1 and model.num_experts is None:
        raise ValueError(f"expert_parallel {ep} needs a mixture-of-experts model (num_experts)")
    if parallel.expert_tensor_parallel not in (None, tp) and ep == 1:
        raise ValueError(
            "expert_tensor_parallel other than tensor_parallel needs expert_parallel > 1"
        )
    if model.num_experts is not None and model.num_experts % ep:
        raise ValueError(
            f"num_experts {model.num_experts} must be divisible by expert_parallel {ep}"
        )


def transformer_config(
    model: GPTConfig, parallel: ParallelConfig, *, bf16: bool = False
) -> TransformerConfig:
    """Megatron's TransformerConfig for the Nanodo decoder in this layout.

    Megatron's own initialisation must stay on: megatron-core 0.16.1 marks parameters as
    tensor-parallel (``tensor_model_parallel``, ``partition_dim``) only inside it. Its
    init methods are Nanodo's; ``build_model_chunks`` then redraws every weight with
    ``init_weights``, which also gets the fans of the fused QKV and of TP shards right.
    """
    _check_layout(model, parallel)
    dtype = torch.bfloat16 if bf16 else torch.float32
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        ffn_hidden_size=model.ffn_hidden_size or 4 * model.hidden_size,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        layernorm_epsilon=model.layernorm_epsilon,
        normalization="LayerNorm",
        add_bias_linear=False,
        add_qkv_bias=False,
        gated_linear_unit=False,
        activation_func=gelu_tanh,
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
        sequence_parallel=parallel.sequence_parallel,
        context_parallel_size=parallel.context_parallel,
        bf16=bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        init_method=torch.nn.init.xavier_uniform_,
        output_layer_init_method=torch.nn.init.xavier_uniform_,
        embedding_init_method=init_method_normal(1.0 / math.sqrt(model.hidden_size)),
        deallocate_pipeline_outputs=True,
        cuda_graph_scope=[],  # megatron-core's default "full" only warns that it is deprecated
        **_moe_settings(model, parallel),
        mtp_num_layers=model.mtp_num_layers,
        mtp_loss_scaling_factor=model.mtp_loss_scaling_factor,
    )


def _moe_settings(model: GPTConfig, parallel: ParallelConfig) -> dict:
    """TransformerConfig's mixture-of-experts fields (none for a dense model)."""
    if model.num_experts is None:
        return {}
    return dict(
        num_moe_experts=model.num_experts,
        moe_router_topk=model.moe_router_topk,
        moe_ffn_hidden_size=model.moe_ffn_hidden_size
        or model.ffn_hidden_size
        or 4 * model.hidden_size,
        moe_aux_loss_coeff=model.moe_aux_loss_coeff,
        moe_z_loss_coeff=model.moe_z_loss_coeff,
        moe_router_load_balancing_type="aux_loss" if model.moe_aux_loss_coeff else "none",
        moe_router_score_function=model.moe_router_score_function,
        moe_router_enable_expert_bias=model.moe_router_enable_expert_bias,
        moe_router_bias_update_rate=model.moe_router_bias_update_rate,
        moe_expert_capacity_factor=model.moe_expert_capacity_factor,
        moe_token_dispatcher_type=model.moe_token_dispatcher_type,
        moe_grouped_gemm=False,
        expert_model_parallel_size=parallel.expert_parallel,
        expert_tensor_parallel_size=parallel.expert_tensor_parallel or parallel.tensor_parallel,
    )


def build_model_chunks(
    model: GPTConfig, config: TransformerConfig, parallel: ParallelConfig, *, seed: int = 1234
) -> list[GPTModel]:
    """This rank's model chunks, one per virtual pipeline stage, set up by ``init_weights``."""
    _check_layout(model, parallel)
    stages = [None] if parallel.virtual_pipeline is None else range(parallel.virtual_pipeline)
    chunks = [_gpt_chunk(model, config, vp_stage) for vp_stage in stages]
    init_weights(chunks, model.hidden_size, seed)
    return chunks


def count_parameters(model: GPTConfig) -> dict[str, int]:
    """Non-embedding and embedding parameter counts of the single-process model.

    Built on the meta device, so the largest configs cost no memory; needs Megatron's
    parallel state initialised for one rank.
    """
    config = replace(transformer_config(model, ParallelConfig()), use_cpu_initialization=True)
    with torch.device("meta"):
        gpt = _gpt_chunk(model, config, vp_stage=None)
    counts = {"non_embedding": 0, "embedding": 0}
    for name, param in gpt.named_parameters():
        counts[
            "embedding" if name.startswith(("embedding.", "output_layer.")) else "non_embedding"
        ] += param.numel()
    return counts


def _gpt_chunk(model: GPTConfig, config: TransformerConfig, vp_stage: int | None) -> GPTModel:
    """The Nanodo decoder's share of one (virtual) pipeline stage on this rank."""
    layer = _layer_spec(model, config)
    block = TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(config, vp_stage=vp_stage),
        layer_norm=LayerNorm,
    )
    mtp = None
    if model.mtp_num_layers:
        mtp = get_gpt_mtp_block_spec_for_backend(
            config, layer, backend=_NanodoModules(), vp_stage=vp_stage
        )
    return GPTModel(
        config=config,
        transformer_layer_spec=block,
        vocab_size=model.vocab_size,
        max_sequence_length=model.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        share_embeddings_and_output_weights=model.tie_embeddings,
        position_embedding_type=model.position_embedding_type,
        vp_stage=vp_stage,
        mtp_block_spec=mtp,
    )


def init_tensor(
    name: str, shape: torch.Size, hidden_size: int, generator: torch.Generator, device: torch.device
) -> Tensor:
    """Nanodo's initialisation of one single-process tensor (shape is [out, in] for kernels)."""
    if name.endswith(("layernorm.weight", "norm.weight")):  # MTP: enorm, hnorm
        return torch.ones(shape, device=device)
    # variance_scaling(1, fan_in, normal), fan_in = D; an untied output projection alike
    if name.endswith(("embeddings.weight", "output_layer.weight", "lm_head.weight")):
        std = 1.0 / math.sqrt(hidden_size)
        return torch.empty(shape, device=device).normal_(0.0, std, generator=generator)
    fan_out, fan_in = shape
    if name.endswith("linear_qkv.weight"):  # three D x D kernels (q, k, v) fused in Megatron
        fan_out //= 3
    elif not name.endswith(
        (
            "linear_proj.weight",
            "linear_fc1.weight",
            "linear_fc2.weight",
            "router.weight",
            "eh_proj.weight",
        )
    ):
        raise ValueError(f"no initialisation rule for parameter {name!r}")
    bound = math.sqrt(6.0 / (fan_in + fan_out))  # xavier_uniform
    return torch.empty(shape, device=device).uniform_(-bound, bound, generator=generator)


@torch.no_grad()
def init_weights(chunks: list[GPTModel], hidden_size: int, seed: int) -> None:
    """Initialise as Nanodo does, identically in every TP/PP layout.

    Each full (single-process) tensor is drawn from a generator seeded by ``seed`` and
    the parameter's global name, and each rank keeps its slice: the same seed gives the
    same model whatever the layout, so runs in different layouts are comparable.
    """
    for name, param in global_param_names(chunks).items():
        generator = torch.Generator(device=param.device)
        generator.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        full = init_tensor(name, full_shape(param), hidden_size, generator, param.device)
        param.data.copy_(tp_slice(full, param))


def loss_func(loss_mask: Tensor, output_tensor: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Mask-weighted mean token cross-entropy of one micro-batch.

    The 2-value return makes Megatron's schedule divide by the number of micro-batches,
    so the step's loss is the mean of the micro-batch means. It divides in place, hence
    the reported value is a copy.

    Under context parallelism each rank holds its chunks of the micro-batch: the sum and the
    token count are all-reduced over the CP group (as Megatron's GPT loss did before per-token
    losses), the other ranks' sum entering as a constant. The value is then the whole
    micro-batch's mean on every CP rank and each rank back-propagates its own tokens' share;
    the schedule's factor CP and DDP's average over data x context parallel ranks make the
    gradient the whole sequence's.
    """
    losses = output_tensor.float()
    mask = loss_mask.to(losses.dtype)
    total, count = (losses * mask).sum(), mask.sum()
    if parallel_state.get_context_parallel_world_size() > 1:
        totals = torch.stack([total.detach(), count])
        torch.distributed.all_reduce(totals, group=parallel_state.get_context_parallel_group())
        total, count = total + (totals[0] - total.detach()), totals[1]
    loss = total / count.clamp(min=1.0)
    return loss, {"lm loss": loss.detach().clone()}


def forward_step(
    data_iterator: Iterator[dict[str, Tensor]] | None, model: torch.nn.Module
) -> tuple[Tensor, partial]:
    """Megatron's forward-step function: one micro-batch through this rank's chunk.

    Batches are dicts of int64 [b, s] "tokens", "labels", "position_ids" and a float
    "loss_mask" of whole sequences; under context parallelism this rank takes its chunks of
    each (`sequence_positions`, as `get_batch_on_this_cp_rank`). Middle pipeline stages need
    no data (their iterator may be None); when an iterator is given every stage reads from it,
    which keeps the stages in step.
    """
    gpt = unwrap_model(model)
    if data_iterator is None:
        if gpt.pre_process or gpt.post_process:
            raise ValueError("the first and last pipeline stages need a data iterator")
        output = model(None, None, None)
        return output, partial(loss_func, None)
    device = next(model.parameters()).device
    batch = {k: v.to(device, non_blocking=True) for k, v in next(data_iterator).items()}
    cp_size = parallel_state.get_context_parallel_world_size()
    if cp_size > 1:
        positions = sequence_positions(
            batch["tokens"].size(1), cp_size, parallel_state.get_context_parallel_rank(), device
        )
        batch = {k: v.index_select(1, positions) for k, v in batch.items()}
    output = model(
        batch["tokens"],
        batch["position_ids"],
        None,  # causal mask: built by the attention kernel
        labels=batch["labels"] if gpt.post_process else None,
        loss_mask=batch["loss_mask"] if gpt.post_process else None,  # multi-token prediction
    )
    return output, partial(loss_func, batch["loss_mask"])
