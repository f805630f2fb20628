"""Hugging Face causal LMs as models for the DeepSpeed entry point (launch/pretrain_deepspeed.py).

    model = build_model(model_config(cfg.model, tokenizer_vocab_size=..., padded_vocab_size=...,
                                     seq_length=...), seed=1234)
    loss = causal_lm_loss(engine, batch)      # the masked mean token cross-entropy

`transformers` is an optional dependency (`pip install megatron-fsam[hf]`), imported only
inside the functions that need it. Models are built from configs made in code or read from a
JSON file, with `from_config`: nothing is fetched from the hub.

- `model.family: llama` builds `LlamaForCausalLM` from the run file's model section (RMSNorm,
  SwiGLU MLP, rotary positions, no biases; the output projection untied unless
  `tie_embeddings`), `model.family: gpt2` a `GPT2LMHeadModel` (LayerNorms and linear layers
  with biases, GELU-tanh, learned positions; `lm_head` tied to `wte` unless `tie_embeddings`
  is false, which transformers honours for GPT-2 too).
- `model.hf_config: PATH.json` builds any `model_type` that `AutoModelForCausalLM` knows. The
  JSON gives the architecture; its vocabulary must hold the tokenizer's (filled from the data
  when absent), its `max_position_embeddings` the sequence length (filled from
  `model.seq_length` when absent), and its layers / width / heads / MLP width agree with the
  run file's (filled from it when absent).

Weights: `build_model` constructs the model without transformers' own initialisation and
then runs the model's `_init_weights` on every module, children before parents as
transformers does, each module drawing from the CPU generator seeded by (seed, the module's
name) on fp32 CPU copies of its parameters. The weights therefore depend on the seed alone:
the same with and without DeepSpeed ZeRO-3's `zero.Init` (which partitions each parameter as
it is made; the module's parameters are gathered while they are written), on any device and
in any world size. transformers' own ZeRO-3 initialisation draws on rank 0 in traversal order
from the global generator, so its weights differ from the ones built without ZeRO-3: where a
ZeRO-3 config is known to transformers (`HfDeepSpeedConfig`, as the Trainer's
`TrainingArguments(deepspeed=...)` made before the model sets it, launch/pretrain_hf_trainer.py),
`from_config` builds under its `zero.Init` and draws those, and `init_weights` replaces them.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatron_fsam.trainer.models.gpt import GPTConfig

FAMILIES = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}
INSTALL = "pip install megatron-fsam[hf]"
AUTO_VOCAB = 0  # run_config.AUTO_VOCAB: model.vocab_size 'auto'

# Run-file fields that a transformers config JSON may also state: (GPTConfig field,
# the transformers attribute). A JSON that states one must agree with the run file.
_SHAPE = (
    ("num_layers", "num_hidden_layers"),
    ("hidden_size", "hidden_size"),
    ("num_attention_heads", "num_attention_heads"),
    ("ffn_hidden_size", "intermediate_size"),
)


def transformers_module() -> Any:
    """`transformers`, or an ImportError that says how to install it."""
    try:
        import transformers
    except ImportError as error:
        raise ImportError(
            f"Hugging Face models need the transformers package: {INSTALL}"
        ) from error
    return transformers


# ----- configs -----------------------------------------------------------------------------


def model_config(
    model: GPTConfig, *, tokenizer_vocab_size: int, padded_vocab_size: int, seq_length: int
) -> Any:
    """The transformers config of the run file's model section (`family` or `hf_config`).

    `model.vocab_size` 'auto' takes `padded_vocab_size`; an explicit one (or the JSON's) must
    hold the tokenizer's `tokenizer_vocab_size` tokens. `seq_length` is the data's. On return
    `model.vocab_size` is the vocabulary the model is built with.
    """
    if model.hf_config is not None:
        return _json_config(model, tokenizer_vocab_size, padded_vocab_size, seq_length)
    if model.family not in FAMILIES:
        raise ValueError(
            f"model.family {model.family!r} is not a Hugging Face family {tuple(FAMILIES)}"
        )
    vocab = _vocab(model.vocab_size, tokenizer_vocab_size, padded_vocab_size, "model.vocab_size")
    model.vocab_size = vocab
    transformers = transformers_module()
    ffn = model.ffn_hidden_size or 4 * model.hidden_size
    if model.family == "llama":
        return transformers.LlamaConfig(
            vocab_size=vocab,
            hidden_size=model.hidden_size,
            intermediate_size=ffn,
            num_hidden_layers=model.num_layers,
            num_attention_heads=model.num_attention_heads,
            num_key_value_heads=model.num_attention_heads,
            max_position_embeddings=model.seq_length,
            rms_norm_eps=model.layernorm_epsilon,
            attention_dropout=model.attention_dropout,
            tie_word_embeddings=model.tie_embeddings,
            use_cache=False,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
        )
    return transformers.GPT2Config(
        vocab_size=vocab,
        n_positions=model.seq_length,
        n_embd=model.hidden_size,
        n_layer=model.num_layers,
        n_head=model.num_attention_heads,
        n_inner=ffn,
        activation_function="gelu_new",  # GELU, tanh approximation (Nanodo's)
        resid_pdrop=model.hidden_dropout,
        embd_pdrop=model.hidden_dropout,
        attn_pdrop=model.attention_dropout,
        layer_norm_epsilon=model.layernorm_epsilon,
        tie_word_embeddings=model.tie_embeddings,
        use_cache=False,
        bos_token_id=None,
        eos_token_id=None,
    )


def _vocab(given: int, tokenizer: int, padded: int, where: str) -> int:
    if given == AUTO_VOCAB:
        return padded
    if given < tokenizer:
        raise ValueError(
            f"{where} {given} is smaller than the tokenizer's {tokenizer} tokens "
            "(leave it out of the JSON, or set model.vocab_size to 'auto')"
        )
    return given


def _json_config(model: GPTConfig, tokenizer: int, padded: int, seq_length: int) -> Any:
    """A transformers config from `model.hf_config`, checked against (or filled from) the run."""
    path = Path(model.hf_config)
    try:
        raw = json.loads(path.read_text())
    except OSError as error:
        raise ValueError(f"model.hf_config: cannot read {path}: {error.strerror}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"model.hf_config: {path} is not JSON: {error}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str):
        raise ValueError(f"model.hf_config: {path} has no model_type (a transformers config)")
    transformers = transformers_module()
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = raw.pop("model_type")
    try:
        cls = CONFIG_MAPPING[model_type]
    except KeyError:
        raise ValueError(
            f"model.hf_config: {path}: transformers {transformers.__version__} does not know "
            f"model_type {model_type!r}"
        ) from None
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(
            f"model.hf_config: {path}: model_type {model_type!r} has no causal-LM head in "
            f"transformers {transformers.__version__} (AutoModelForCausalLM)"
        )
    for key in ("dtype", "torch_dtype"):  # the run file's train.bf16 and DeepSpeed decide
        raw.pop(key, None)
    aliases = getattr(cls, "attribute_map", {}) or {}
    defaults = cls()

    def stated(name: str) -> str | None:
        """The key under which the JSON states attribute `name`, if it does."""
        for key in (name, aliases.get(name)):
            if key is not None and key in raw:
                return key
        return None

    where = f"model.hf_config {path.name}"
    vocab_key = stated("vocab_size")
    if vocab_key is not None:
        vocab = _vocab(raw[vocab_key], tokenizer, padded, f"{where}: vocab_size")
        if model.vocab_size not in (AUTO_VOCAB, vocab):
            raise ValueError(
                f"{where} gives vocab_size {vocab}, the run file model.vocab_size "
                f"{model.vocab_size}; set one"
            )
    else:
        vocab = _vocab(model.vocab_size, tokenizer, padded, "model.vocab_size")
        raw["vocab_size"] = vocab
    model.vocab_size = vocab
    positions_key = stated("max_position_embeddings")
    if positions_key is not None and raw[positions_key] < seq_length:
        raise ValueError(
            f"{where} gives max_position_embeddings {raw[positions_key]}, shorter than "
            f"data.seq_length {seq_length}"
        )
    if positions_key is None and hasattr(defaults, "max_position_embeddings"):
        raw["max_position_embeddings"] = model.seq_length
    for field, name in _SHAPE:
        ours, key = getattr(model, field), stated(name)
        if key is None:
            if hasattr(defaults, name):  # the JSON leaves it out: the run file's
                raw[aliases.get(name, name)] = 4 * model.hidden_size if ours is None else ours
        elif ours is not None and raw[key] != ours:  # ffn_hidden_size unset: the JSON's
            raise ValueError(
                f"{where} gives {key} {raw[key]}, the run file model.{field} {ours}: the run "
                "file's shape must agree with the JSON's"
            )
    raw["use_cache"] = False
    return cls(**raw)


# ----- the model ---------------------------------------------------------------------------


def build_model(config: Any, *, seed: int, zero_init: dict | None = None) -> nn.Module:
    """The causal LM of `config` (from `model_config`), its weights drawn from `seed` alone.

    `zero_init`: a DeepSpeed config dict of ZeRO stage 3, under whose `deepspeed.zero.Init` the
    model is built (each parameter partitioned over the data-parallel ranks as it is made);
    the weights are the same as without it. Leave it None where transformers knows a ZeRO-3
    config already (the Trainer's): `from_config` then partitions under that one.
    """
    transformers = transformers_module()
    with _construction(zero_init):
        model = transformers.AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # init_weights, which ties, was skipped
    init_weights(model, seed)
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and head.weight is embedding.weight
    if tied != bool(getattr(model.config, "tie_word_embeddings", tied)):
        raise ValueError(
            f"{type(model).__name__} came out {'tied' if tied else 'untied'}, but its config "
            f"says tie_word_embeddings={model.config.tie_word_embeddings} (transformers "
            f"{transformers.__version__})"
        )
    return model


@contextmanager
def _construction(zero_init: dict | None) -> Iterator[None]:
    """No weight initialisation (init_weights draws them afterwards), under zero.Init if asked."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    if zero_init is None:
        with no_init_weights():
            yield
        return
    import deepspeed

    try:  # zero.Init would cast the RoPE buffers' arange to its dtype (bf16)
        from transformers.integrations.deepspeed import prevent_arange_dtype_change
    except ImportError:
        prevent_arange_dtype_change = nullcontext
    with (
        no_init_weights(),
        prevent_arange_dtype_change(),
        deepspeed.zero.Init(config_dict_or_path=zero_init),
    ):
        yield


@torch.no_grad()
def init_weights(model: nn.Module, seed: int) -> None:
    """transformers' initialisation of every module, each from (seed, the module's name).

    Children before parents, each module with its nearest `PreTrainedModel`'s `_init_weights`
    (as transformers' `initialize_weights` does: a parent may rescale a child's weight, like
    GPT-2's residual projections). Every parameter is set to NaN first, so a parameter that
    the model's `_init_weights` never writes is reported instead of kept as garbage.
    """
    transformers = transformers_module()
    pretrained = transformers.PreTrainedModel
    zero3 = any(hasattr(p, "ds_id") for p in model.parameters())
    writer = not zero3 or torch.distributed.get_rank() == 0

    def visit(prefix: str, module: nn.Module, owner: nn.Module) -> None:
        for name, child in module.named_children():
            visit(f"{prefix}.{name}" if prefix else name, child,
                  child if isinstance(child, pretrained) else owner)  # fmt: skip
        own = list(module.parameters(recurse=False))
        touched = _unique(
            own
            + [
                p
                for child in module.children()
                if not isinstance(child, pretrained)
                for p in child.parameters(recurse=False)
            ]
        )
        with _gathered(touched, zero3):
            if writer:
                for param in own:
                    param.fill_(math.nan)
                with _cpu_fp32(touched), torch.random.fork_rng(devices=[]):
                    torch.random.default_generator.manual_seed(
                        seed * 1_000_003 + zlib.crc32(prefix.encode())
                    )
                    owner._init_weights(module)

    visit("", model, model)
    _check_initialised(model, zero3)


def _unique(params: list[nn.Parameter]) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for param in params:
        seen.setdefault(id(param), param)
    return list(seen.values())


def _gathered(params: list[nn.Parameter], zero3: bool):
    """The full params while rank 0 writes them (ZeRO-3: broadcast and re-partitioned after)."""
    if not zero3 or not params:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


@contextmanager
def _cpu_fp32(params: list[nn.Parameter]) -> Iterator[None]:
    """Params as fp32 CPU tensors while they are drawn (the CPU generator, in fp32, whatever
    the device and dtype), written back after."""
    swapped = []
    for param in params:
        data = param.data
        work = data.to("cpu", torch.float32)
        if work is not data:
            param.data = work
            swapped.append((param, data))
    try:
        yield
    finally:
        for param, data in swapped:
            data.copy_(param.data)
            param.data = data


def _check_initialised(model: nn.Module, zero3: bool) -> None:
    names = {}
    for name, param in model.named_parameters():
        local = param.ds_tensor if zero3 else param
        names[name] = bool(local.isnan().any())
    missed = [name for name, bad in names.items() if bad]
    if zero3:
        count = torch.tensor([len(missed)], dtype=torch.int64)
        torch.distributed.all_reduce(count)
        if count.item() and not missed:
            missed = ["(on another rank)"]
    if missed:
        raise ValueError(
            f"{type(model).__name__}'s _init_weights leaves {len(missed)} parameter(s) "
            f"uninitialised, e.g. {missed[0]}"
        )


# ----- loss and logits ---------------------------------------------------------------------


def causal_lm_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Masked mean token cross-entropy of one micro-batch (batches as `microbatch_iterator`
    yields them; labels are the next tokens already) from the model's `.logits`; `model` is a
    transformers causal LM or an engine wrapping one. `micro_batch_loss` for TorchGPT."""
    device = next(model.parameters()).device
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    logits = model(input_ids=batch["tokens"], position_ids=batch["position_ids"]).logits
    labels = batch["labels"]
    losses = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none"
    ).view_as(labels)
    mask = batch["loss_mask"].to(losses.dtype)
    return (losses * mask).sum() / mask.sum().clamp(min=1.0)
