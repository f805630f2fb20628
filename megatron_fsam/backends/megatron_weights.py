"""Move weights between the single-process model and any TP/PP/DP layout.

Every parameter a rank holds is named as in the single-process (TP=1, PP=1) model, and
holds a contiguous slice of that full tensor along its ``partition_dim`` when it is
tensor-parallel. That is all it takes to export a model from one process and load it
into any layout, to compare updates across layouts, and to initialise every layout
with the same weights.

Experts of a mixture-of-experts layer are named by their global index (this rank's local
expert i of E/EP is expert ep_rank * E/EP + i) and are split over the expert
tensor-parallel ranks, which Megatron marks as expert parallel (``allreduce=False``).
"""

import re

import torch
from megatron.core import parallel_state
from megatron.core.utils import unwrap_model
from torch import Tensor
from torch.nn import Module, Parameter

_LOCAL_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_LOCAL_EXPERT = re.compile(r"\.experts\.local_experts\.(\d+)\.")
_TIED_OUTPUT = "output_layer.weight"
_WORD_EMBEDDINGS = "embedding.word_embeddings.weight"


def global_param_names(chunks: list[Module]) -> dict[str, Parameter]:
    """Map the single-process name of every parameter of this rank's chunks to the parameter.

    Chunks may be wrapped (DDP, Float16Module). Local layer indices become global ones via
    each TransformerLayer's 1-based global ``layer_number``; the last stage's copy of the
    tied output weight becomes ``embedding.word_embeddings.weight``. A last stage with
    multi-token prediction keeps the tied weight in its own embedding and reads that;
    megatron-core still allocates an output-layer weight there that nothing reads, which is
    left out.
    """
    names: dict[str, Parameter] = {}
    for chunk in chunks:
        model = unwrap_model(chunk)
        layers = model.decoder.layers
        for local_name, param in model.named_parameters():
            name = local_name
            match = _LOCAL_LAYER.match(local_name)
            if match:
                layer_number = layers[int(match.group(1))].layer_number
                name = f"decoder.layers.{layer_number - 1}.{local_name[match.end() :]}"
            elif local_name == _TIED_OUTPUT and model.share_embeddings_and_output_weights:
                if getattr(model, "embedding", None) is not None:
                    continue  # unread: the tied weight is the stage's embedding (MTP)
                name = _WORD_EMBEDDINGS
            name = _LOCAL_EXPERT.sub(_global_expert(model, name), name)
            if name in names and names[name] is not param:
                raise ValueError(f"two parameters on this rank map to {name!r}")
            names[name] = param
    return names


def _global_expert(model: Module, name: str):
    """Renames a local expert index to the global one (the layer's experts are split over EP)."""
    num_experts = model.config.num_moe_experts or 0
    local_count = num_experts // parallel_state.get_expert_model_parallel_world_size()
    first = parallel_state.get_expert_model_parallel_rank() * local_count

    def rename(match: re.Match) -> str:
        return f".experts.local_experts.{first + int(match.group(1))}."

    return rename


def _tp_rank_and_size(param: Tensor) -> tuple[int, int]:
    """The tensor-parallel group that splits ``param``: expert TP for experts, else TP."""
    if getattr(param, "allreduce", True) is False:  # an expert-parallel expert weight
        return (
            parallel_state.get_expert_tensor_parallel_rank(),
            parallel_state.get_expert_tensor_parallel_world_size(),
        )
    return (
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_world_size(),
    )


def full_shape(param: Tensor) -> torch.Size:
    """Shape of the single-process tensor that this (maybe tensor-parallel) param slices."""
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= _tp_rank_and_size(param)[1]
    return torch.Size(shape)


def tp_slice(full: Tensor, param: Tensor) -> Tensor:
    """This tensor-parallel rank's slice of ``full`` for ``param`` (all of it if not split)."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    size = param.shape[param.partition_dim]
    start = _tp_rank_and_size(param)[0] * size
    return full.narrow(param.partition_dim, start, size)


@torch.no_grad()
def load_full_state(chunks: list[Module], full: dict[str, Tensor]) -> None:
    """Copy this rank's slices of single-process weights into its parameters.

    Copies into ``param.data`` because, under DDP with the distributed optimizer, the
    parameters are views into the flat parameter buffer. With bf16 (or fp16) parameters a
    Megatron optimizer keeps separate fp32 main copies: call ``optimizer.reload_model_params()``
    afterwards (or load before building the optimizer).
    """
    names = global_param_names(chunks)
    missing = sorted(set(names) - set(full))
    if missing:
        raise KeyError(f"full state lacks {missing}")
    for name, param in names.items():
        param.data.copy_(tp_slice(full[name], param))


@torch.no_grad()
def full_state(chunks: list[Module]) -> dict[str, Tensor]:
    """Copies of all weights of a single-process (TP=1, PP=1) model under their global names."""
    if (
        parallel_state.get_tensor_model_parallel_world_size() != 1
        or parallel_state.get_pipeline_model_parallel_world_size() != 1
    ):
        raise ValueError("full_state needs the whole model on one rank (TP=1, PP=1)")
    return {name: param.detach().clone() for name, param in global_param_names(chunks).items()}
