"""The Nanodo decoder in plain PyTorch, for engines that take any `nn.Module` (DeepSpeed).

Same architecture and initialisation as `models/gpt.py` (pre-LayerNorm blocks without
biases, GELU-tanh MLP, learned positions, the output projection `lm_head` tied to the input
embedding unless `tie_embeddings=False`), but built from torch modules only: no process
groups, no megatron-core. `forward(tokens, position_ids, attention_mask=None, labels=None)`
returns [b, s, vocab] logits, or the per-token loss [b, s] when labels are given, as
megatron-core's GPTModel does.
"""

from __future__ import annotations

import zlib
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatron_fsam.trainer.models.gpt import GPTConfig, gelu_tanh, init_tensor


class _Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        hidden, ffn = cfg.hidden_size, cfg.ffn_hidden_size or 4 * cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.input_layernorm = nn.LayerNorm(hidden, eps=cfg.layernorm_epsilon, bias=False)
        self.linear_qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.linear_proj = nn.Linear(hidden, hidden, bias=False)
        self.pre_mlp_layernorm = nn.LayerNorm(hidden, eps=cfg.layernorm_epsilon, bias=False)
        self.linear_fc1 = nn.Linear(hidden, ffn, bias=False)
        self.linear_fc2 = nn.Linear(ffn, hidden, bias=False)
        self.attention_dropout = cfg.attention_dropout
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, s, h = x.shape
        q, k, v = self.linear_qkv(self.input_layernorm(x)).split(h, dim=-1)
        q, k, v = (t.view(b, s, self.heads, h // self.heads).transpose(1, 2) for t in (q, k, v))
        dropout = self.attention_dropout if self.training else 0.0
        attended = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        x = x + self.dropout(self.linear_proj(attended.transpose(1, 2).reshape(b, s, h)))
        mlp = self.linear_fc2(gelu_tanh(self.linear_fc1(self.pre_mlp_layernorm(x))))
        return x + self.dropout(mlp)


def _check_dense(cfg: GPTConfig) -> None:
    """This decoder has no experts, MTP heads or rotary positions: refuse a config that asks."""
    asked = [
        name
        for name, value in (
            ("num_experts", cfg.num_experts),
            ("mtp_num_layers", cfg.mtp_num_layers),
            ("position_embedding_type", cfg.position_embedding_type != "learned_absolute"),
        )
        if value
    ]
    if asked:
        raise ValueError(
            f"TorchGPT (the DeepSpeed entry point's model) is the dense Nanodo decoder; it does "
            f"not build {', '.join(asked)}: train mixture-of-experts / MTP / rope models with "
            "launch/pretrain.py (megatron-core)"
        )


class TorchGPT(nn.Module):
    """Nanodo's decoder as one `nn.Module`; `seed` fixes the initial weights."""

    def __init__(self, cfg: GPTConfig, seed: int = 1234) -> None:
        super().__init__()
        _check_dense(cfg)
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.seq_length, cfg.hidden_size)
        self.embedding_dropout = nn.Dropout(cfg.hidden_dropout)
        self.layers = nn.ModuleList(_Block(cfg) for _ in range(cfg.num_layers))
        self.final_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon, bias=False)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.word_embeddings.weight
        self._init_weights(cfg.hidden_size, seed)

    def forward(
        self,
        tokens: Tensor,
        position_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> Tensor:
        if attention_mask is not None:
            raise ValueError("TorchGPT is causal; pass attention_mask=None")
        if position_ids is None:
            position_ids = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        x = self.word_embeddings(tokens) + self.position_embeddings(position_ids)
        x = self.embedding_dropout(x)
        for layer in self.layers:
            x = layer(x)
        logits = self.lm_head(self.final_layernorm(x))
        if labels is None:
            return logits
        flat = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none"
        )
        return flat.view_as(labels)

    @torch.no_grad()
    def _init_weights(self, hidden_size: int, seed: int) -> None:
        """Nanodo's initialisation, each tensor drawn from (seed, its name) as in gpt.py; also
        when built under DeepSpeed's `zero.Init`, which partitions each param as it is made."""
        for name, param in self.named_parameters():
            with _gathered(param):
                generator = torch.Generator(device=param.device)
                generator.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                param.copy_(init_tensor(name, param.shape, hidden_size, generator, param.device))


def _gathered(param: nn.Parameter) -> AbstractContextManager:
    """The full param while it is written, for a param partitioned by ZeRO-3's `zero.Init`."""
    if not hasattr(param, "ds_id"):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([param], modifier_rank=0)


def micro_batch_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Masked mean token cross-entropy of one micro-batch (batches as `microbatch_iterator`
    yields them); `model` is a TorchGPT or an engine wrapping one."""
    device = next(model.parameters()).device
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    losses = model(batch["tokens"], batch["position_ids"], labels=batch["labels"])
    mask = batch["loss_mask"].to(losses.dtype)
    return (losses * mask).sum() / mask.sum().clamp(min=1.0)
