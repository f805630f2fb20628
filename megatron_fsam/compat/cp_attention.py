"""Context parallelism with megatron-core's local (non-Transformer-Engine) attention.

megatron-core's `DotProductAttention` refuses context parallelism ("only supported by
TEDotProductAttention"): on GPUs, CP runs through Transformer Engine's attention. This core
attention is for the CPU emulation and the tests. Megatron splits each sequence of length s
into 2 x CP chunks and gives context-parallel rank r chunks r and 2 x CP - 1 - r
(`get_batch_on_this_cp_rank`: every rank then has the same share of the causal work);
`sequence_positions` names them. Each rank all-gathers the keys and values over the CP group
(Megatron's sequence-parallel gather, whose backward reduce-scatters their gradients), puts
them back in sequence order, and masks each of its queries causally by the query's position
in the whole sequence. The gathered keys and values cost memory for the whole sequence (no
ring exchange as in Transformer Engine): a reference, not a fast kernel.
"""

from __future__ import annotations

import copy

import torch
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor


def sequence_positions(
    seq_length: int, cp_size: int, cp_rank: int, device: torch.device | None = None
) -> Tensor:
    """Where the tokens of context-parallel rank `cp_rank` sit in the whole sequence, in the
    order the rank holds them (chunks `cp_rank` and 2 x cp_size - 1 - cp_rank)."""
    if seq_length % (2 * cp_size):
        raise ValueError(
            f"sequence length {seq_length} is not divisible by 2 x context parallel size {cp_size}"
        )
    chunk = seq_length // (2 * cp_size)
    offsets = torch.arange(chunk, device=device)
    return torch.cat([offsets + cp_rank * chunk, offsets + (2 * cp_size - 1 - cp_rank) * chunk])


class ContextParallelAttention(DotProductAttention):
    """`DotProductAttention` over the whole sequence for this rank's chunk of the queries.

    A drop-in `core_attention` of megatron-core's `SelfAttention` (causal masks only). Its
    queries, keys and values are [s / CP, b, heads, head dim] of this rank's chunks; a given
    `attention_mask` (Megatron-LM's data loader, split by `get_batch_on_this_cp_rank`) is
    [b, 1, s / CP, s]: this rank's queries against keys in sequence order, as used here.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
    ) -> None:
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"ContextParallelAttention masks causally, not {attn_mask_type}")
        # DotProductAttention asserts CP = 1 for itself; the CP group is handled here.
        local = copy.copy(config)
        local.context_parallel_size = 1
        # The mask built in `forward` is applied as given: with the causal type the fused
        # softmax would apply a square upper-triangular one instead.
        super().__init__(
            local,
            layer_number,
            AttnMaskType.padding,
            attention_type,
            attention_dropout=attention_dropout,
            softmax_scale=softmax_scale,
            cp_comm_type=cp_comm_type,
            pg_collection=pg_collection,
        )
        self.config = config
        cp_group = getattr(pg_collection, "cp", None)
        self.cp_group = cp_group or parallel_state.get_context_parallel_group()

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
        packed_seq_params=None,
    ) -> Tensor:
        """[s / CP, b, hidden / TP] attention output of this rank's queries."""
        cp_size, cp_rank = self.cp_group.size(), self.cp_group.rank()
        seq_length, device = query.size(0) * cp_size, query.device
        gathered = torch.cat(
            [sequence_positions(seq_length, cp_size, r, device) for r in range(cp_size)]
        )
        order = torch.argsort(gathered)  # gathered (rank by rank) -> sequence order
        key, value = (
            gather_from_sequence_parallel_region(t, group=self.cp_group).index_select(0, order)
            for t in (key, value)
        )
        if attention_mask is None:  # True: masked out (Megatron's convention)
            queries = sequence_positions(seq_length, cp_size, cp_rank, device)
            attention_mask = torch.arange(seq_length, device=device) > queries[:, None]
            attention_mask = attention_mask[None, None]
        return super().forward(
            query,
            key,
            value,
            attention_mask,
            attn_mask_type=attn_mask_type,
            attention_bias=attention_bias,
            packed_seq_params=packed_seq_params,
        )
