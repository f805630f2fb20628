"""One pretraining run as typed sections, loaded from YAML plus ``section.key=value`` overrides.

A run file holds the sections of ``RunConfig`` (model, parallel, data, sam, optimizer, train,
checkpoint, logging) and may start with ``include: other.yaml`` (or a list of files, relative
to it) whose sections it extends key by key; files whose names start with ``_`` are such
shared fragments, not runs. Every mistake is a ``ConfigError`` with a one-line message, raised
before any process group or model exists.

Conventions the loader applies:
- ``model.vocab_size: auto`` (stored as ``AUTO_VOCAB``, 0) takes the tokenizer's vocabulary,
  padded for TP, at start-up (``resolve_vocab_size``);
- ``data.seq_length`` defaults to ``model.seq_length``;
- ``logging.run_name`` defaults to the run file's name.

Mixture of experts (``model.num_experts`` and the ``model.moe_*`` keys, with
``parallel.expert_parallel`` / ``expert_tensor_parallel``) and multi-token prediction
(``model.mtp_num_layers``) are checked here too, so that megatron-core never meets a
combination it would reject deep inside model construction or, worse, in the first forward.

``model.family`` names the architecture: "nanodo" (the default; megatron-core's GPTModel, or
TorchGPT on DeepSpeed) or a Hugging Face causal LM built from the model section, "llama" or
"gpt2"; ``model.hf_config`` (a transformers config JSON) builds any causal LM instead. Hugging
Face models train through launch/pretrain_deepspeed.py only (``validate_layout``, the Megatron
check, refuses them).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from megatron_fsam.config import PHASE_BOUNDS, SAMConfig
from megatron_fsam.schedules import phase_step
from megatron_fsam.trainer.checkpoint import SHARDING_TYPES
from megatron_fsam.trainer.data import DataConfig
from megatron_fsam.trainer.models.gpt import GPTConfig
from megatron_fsam.trainer.parallel import ParallelConfig

AUTO_VOCAB = 0
LR_DECAY_STYLES = ("cosine", "linear", "constant")
POSITION_EMBEDDINGS = ("learned_absolute", "rope")
MOE_SCORE_FUNCTIONS = ("softmax", "sigmoid")
MOE_DISPATCHERS = ("alltoall", "allgather")  # "flex" needs DeepEP / HybridEP (GPU only)
FAMILIES = ("nanodo", "llama", "gpt2")


class ConfigError(ValueError):
    """A run configuration that cannot work; the message is one line naming the culprit."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


@dataclass
class OptimizerSettings:
    """AdamW and its learning-rate schedule, Nanodo's defaults (google-deepmind/nanodo).

    Always Adam: the preconditioned perturbation reads Adam's second moment. The schedule
    warms up linearly from ``warmup_init_ratio * lr`` to ``lr`` over ``lr_warmup_steps`` (or
    ``lr_warmup_fraction`` of the run; at most one is set), then decays to
    ``min_lr_ratio * lr`` at the last step. Nanodo starts and ends at 10% of the peak and
    does not clip gradients (``clip_grad = 0``).
    """

    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_init_ratio: float = 0.1
    lr_warmup_steps: int | None = None
    lr_warmup_fraction: float | None = None
    lr_decay_style: str = "cosine"
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_eps: float = 1e-9
    clip_grad: float = 0.0

    @property
    def min_lr(self) -> float:
        return self.lr * self.min_lr_ratio

    @property
    def warmup_init_lr(self) -> float:
        return self.lr * self.warmup_init_ratio

    def warmup_steps(self, total_steps: int) -> int:
        """Warm-up length of a run of ``total_steps`` steps."""
        if self.lr_warmup_fraction is not None:
            return round(self.lr_warmup_fraction * total_steps)
        return self.lr_warmup_steps or 0


@dataclass
class TrainSettings:
    """Batch sizes (in sequences), run length and cadence.

    The run lasts ``train_steps`` steps or, when that is None, Chinchilla-style
    ``tokens_per_param`` training tokens per non-embedding parameter (20 in Hoffmann et al.).
    """

    micro_batch_size: int = 8
    global_batch_size: int = 256
    train_steps: int | None = None
    tokens_per_param: float | None = None
    seed: int = 1234
    bf16: bool = False
    eval_interval: int = 500
    eval_iters: int = 50
    log_interval: int = 10


@dataclass
class CheckpointSettings:
    """Where and how often to save; without ``save_interval`` only the final state is saved.

    ``sharding_type`` "fully_reshardable" lets a run resume under another TP/PP layout;
    "dp_reshardable" saves faster but only resumes under the same TP x PP.
    """

    save_dir: str | None = None
    save_interval: int | None = None
    load_dir: str | None = None
    keep_last: int = 2
    sharding_type: str = "fully_reshardable"


@dataclass
class DiagnosticsSettings:
    """Sharpness-gradient composition (tau_logit, tau_func, tau_cross) during training.

    Every ``sharpness_interval`` steps (None: never) the taus are measured by finite
    differences of step ``sharpness_h`` on a fixed step's worth of validation micro-batches,
    3 extra forward-backward passes (4 with ``sharpness_central``).
    """

    sharpness_interval: int | None = None
    sharpness_h: float = 1e-3
    sharpness_central: bool = True


@dataclass
class LoggingSettings:
    """TensorBoard event directory (None: no TensorBoard) and the run's name in the logs."""

    tensorboard_dir: str | None = None
    run_name: str = "run"


@dataclass
class RunConfig:
    """Everything one pretraining run needs, checked for consistency on construction."""

    model: GPTConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sam: SAMConfig = field(default_factory=SAMConfig)
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    diagnostics: DiagnosticsSettings = field(default_factory=DiagnosticsSettings)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def total_steps(self) -> int:
        """``train.train_steps``, or the steps that reach ``tokens_per_param`` tokens/param."""
        if self.train.train_steps is not None:
            return self.train.train_steps
        if self.train.tokens_per_param is None:
            raise ConfigError("set train.train_steps or train.tokens_per_param")
        tokens = self.train.tokens_per_param * non_embedding_params(self.model)
        return math.ceil(tokens / (self.train.global_batch_size * self.data.seq_length))

    def validate(self) -> None:
        """Checks that need no world size; ``validate_layout`` adds the parallel ones."""
        m, t, o, c = self.model, self.train, self.optimizer, self.checkpoint
        for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length"):
            _positive(f"model.{name}", getattr(m, name))
        if m.vocab_size < 0:
            raise ConfigError(f"model.vocab_size must be >= 1 or 'auto', got {m.vocab_size}")
        if m.ffn_hidden_size is not None:
            _positive("model.ffn_hidden_size", m.ffn_hidden_size)
        if m.hidden_size % m.num_attention_heads:
            raise ConfigError(
                f"model.hidden_size {m.hidden_size} is not divisible by "
                f"model.num_attention_heads {m.num_attention_heads}"
            )
        if m.position_embedding_type not in POSITION_EMBEDDINGS:
            raise ConfigError(
                f"model.position_embedding_type must be one of {POSITION_EMBEDDINGS}, "
                f"got {m.position_embedding_type!r}"
            )
        _validate_moe(m)
        _validate_mtp(m)
        _validate_family(m)
        _positive("data.seq_length", self.data.seq_length)
        if self.data.seq_length > m.seq_length:
            raise ConfigError(
                f"data.seq_length {self.data.seq_length} exceeds the model's maximum "
                f"model.seq_length {m.seq_length} (its learned position table)"
            )
        for name in ("micro_batch_size", "global_batch_size", "eval_interval", "log_interval"):
            _positive(f"train.{name}", getattr(t, name))
        if t.eval_iters < 0:
            raise ConfigError(f"train.eval_iters must be >= 0, got {t.eval_iters}")
        if t.train_steps is not None:
            _positive("train.train_steps", t.train_steps)
        if t.tokens_per_param is not None and t.tokens_per_param <= 0:
            raise ConfigError(f"train.tokens_per_param must be > 0, got {t.tokens_per_param}")
        total = self.total_steps
        if o.lr <= 0 or o.adam_eps <= 0:
            raise ConfigError(f"optimizer.lr and adam_eps must be > 0, got {o.lr}, {o.adam_eps}")
        for name in ("min_lr_ratio", "warmup_init_ratio"):
            if not 0.0 <= getattr(o, name) <= 1.0:
                raise ConfigError(f"optimizer.{name} must be in [0, 1], got {getattr(o, name)}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(o, name) < 1.0:
                raise ConfigError(f"optimizer.{name} must be in [0, 1), got {getattr(o, name)}")
        if o.weight_decay < 0 or o.clip_grad < 0:
            raise ConfigError("optimizer.weight_decay and clip_grad must be >= 0 (0: off)")
        if o.lr_decay_style not in LR_DECAY_STYLES:
            raise ConfigError(
                f"optimizer.lr_decay_style must be one of {LR_DECAY_STYLES}, "
                f"got {o.lr_decay_style!r}"
            )
        if o.lr_warmup_steps is not None and o.lr_warmup_fraction is not None:
            raise ConfigError("set one of optimizer.lr_warmup_steps and lr_warmup_fraction")
        if o.lr_warmup_fraction is not None and not 0.0 <= o.lr_warmup_fraction < 1.0:
            raise ConfigError(
                f"optimizer.lr_warmup_fraction must be in [0, 1), got {o.lr_warmup_fraction}"
            )
        if not 0 <= o.warmup_steps(total) < total:
            raise ConfigError(
                f"optimizer.lr_warmup_steps {o.warmup_steps(total)} must be in [0, {total}) "
                f"for a {total}-step run"
            )
        if self.sam.rho_schedule != "constant" and self.sam.rho_warmup_steps > total:
            raise ConfigError(
                f"sam.rho_warmup_steps {self.sam.rho_warmup_steps} exceeds the run's {total} "
                "steps: rho would never reach sam.rho"
            )
        if c.save_interval is not None:
            _positive("checkpoint.save_interval", c.save_interval)
            if c.save_dir is None:
                raise ConfigError("checkpoint.save_interval is set but checkpoint.save_dir is not")
        _positive("checkpoint.keep_last", c.keep_last)
        if self.diagnostics.sharpness_interval is not None:
            _positive("diagnostics.sharpness_interval", self.diagnostics.sharpness_interval)
        if not self.diagnostics.sharpness_h > 0:
            raise ConfigError(
                f"diagnostics.sharpness_h must be > 0, got {self.diagnostics.sharpness_h}"
            )
        if c.sharding_type not in SHARDING_TYPES:
            raise ConfigError(
                f"checkpoint.sharding_type must be one of {SHARDING_TYPES}, got {c.sharding_type!r}"
            )


_MOE_DEFAULTS = {f.name: f.default for f in fields(GPTConfig) if f.name.startswith("moe_")}


def _validate_moe(m: GPTConfig) -> None:
    """The mixture-of-experts keys of the model section (megatron-core's rules, said early)."""
    if m.num_experts is None:
        changed = [k for k, default in _MOE_DEFAULTS.items() if getattr(m, k) != default]
        if changed:
            raise ConfigError(
                f"model.{changed[0]} is set but model.num_experts is not (a dense model); "
                "set model.num_experts to make every MLP a mixture of experts"
            )
        return
    _positive("model.num_experts", m.num_experts)
    if not 1 <= m.moe_router_topk <= m.num_experts:
        raise ConfigError(
            f"model.moe_router_topk must be in [1, num_experts = {m.num_experts}], "
            f"got {m.moe_router_topk}"
        )
    if m.moe_ffn_hidden_size is not None:
        _positive("model.moe_ffn_hidden_size", m.moe_ffn_hidden_size)
    if m.moe_router_score_function not in MOE_SCORE_FUNCTIONS:
        raise ConfigError(
            f"model.moe_router_score_function must be one of {MOE_SCORE_FUNCTIONS}, "
            f"got {m.moe_router_score_function!r}"
        )
    if m.moe_router_topk == 1 and m.moe_router_score_function == "softmax":
        raise ConfigError(
            "model.moe_router_topk 1 with the softmax score function gives the router a zero "
            "gradient (softmax over one expert); use moe_router_topk >= 2 or "
            "moe_router_score_function: sigmoid"
        )
    if m.moe_router_enable_expert_bias and m.moe_router_score_function != "sigmoid":
        raise ConfigError(
            "model.moe_router_enable_expert_bias needs model.moe_router_score_function: "
            f"sigmoid, got {m.moe_router_score_function!r}"
        )
    if not m.moe_router_bias_update_rate > 0:
        raise ConfigError(
            f"model.moe_router_bias_update_rate must be > 0, got {m.moe_router_bias_update_rate}"
        )
    if not m.moe_aux_loss_coeff >= 0:
        raise ConfigError(f"model.moe_aux_loss_coeff must be >= 0, got {m.moe_aux_loss_coeff}")
    if m.moe_z_loss_coeff is not None and not m.moe_z_loss_coeff > 0:
        raise ConfigError(
            f"model.moe_z_loss_coeff must be > 0 or null (no z-loss), got {m.moe_z_loss_coeff}"
        )
    if m.moe_expert_capacity_factor is not None and not m.moe_expert_capacity_factor > 0:
        raise ConfigError(
            "model.moe_expert_capacity_factor must be > 0 or null (dropless), "
            f"got {m.moe_expert_capacity_factor}"
        )
    if m.moe_token_dispatcher_type not in MOE_DISPATCHERS:
        raise ConfigError(
            f"model.moe_token_dispatcher_type must be one of {MOE_DISPATCHERS}, "
            f"got {m.moe_token_dispatcher_type!r}"
        )


def _validate_mtp(m: GPTConfig) -> None:
    if m.mtp_num_layers is not None:
        _positive("model.mtp_num_layers", m.mtp_num_layers)
    if not m.mtp_loss_scaling_factor >= 0:
        raise ConfigError(
            f"model.mtp_loss_scaling_factor must be >= 0, got {m.mtp_loss_scaling_factor}"
        )


def _validate_family(m: GPTConfig) -> None:
    """model.family / model.hf_config: the Hugging Face models are dense, built as named."""
    if m.family not in FAMILIES:
        raise ConfigError(f"model.family must be one of {FAMILIES}, got {m.family!r}")
    if m.hf_config is not None and m.family != "nanodo":
        raise ConfigError(
            f"model.family {m.family!r} and model.hf_config both name the architecture: set "
            "one (with model.hf_config, the JSON's model_type is the family)"
        )
    if m.hf_config is not None and not m.hf_config.strip():
        raise ConfigError("model.hf_config must be the path of a transformers config JSON")
    if not is_hugging_face(m):
        return
    which = "model.hf_config" if m.hf_config is not None else f"model.family {m.family!r}"
    for name in ("num_experts", "mtp_num_layers"):
        if getattr(m, name) is not None:
            raise ConfigError(
                f"model.{name} is set, but {which} builds a dense Hugging Face model: mixture "
                "of experts and multi-token prediction are the megatron-core Nanodo model's "
                "(model.family: nanodo, launch/pretrain.py)"
            )
    if m.family == "gpt2" and m.position_embedding_type != "learned_absolute":
        raise ConfigError(
            f"model.position_embedding_type {m.position_embedding_type!r}: GPT-2 has learned "
            "absolute positions (model.family 'llama' has rotary ones)"
        )
    if m.family == "llama" and m.hidden_dropout:
        raise ConfigError(
            f"model.hidden_dropout {m.hidden_dropout}: LlamaForCausalLM has no hidden dropout "
            "(only model.attention_dropout); set it to 0"
        )


def is_hugging_face(model: GPTConfig) -> bool:
    """Whether the model section names a Hugging Face model (a family other than nanodo, or
    a transformers config JSON)."""
    return model.family != "nanodo" or model.hf_config is not None


def _layer_params(model: GPTConfig, *, active: bool = False) -> int:
    """One transformer layer: attention 4 D^2, two LayerNorms 2 D, and the MLP (dense 2 D F;
    mixture of experts: the router E D plus E experts of 2 D F_moe each, or, with `active`,
    the top-k experts one token passes through). Llama: a SwiGLU MLP 3 D F and two RMSNorms;
    GPT-2: biases on every linear layer (3 D + D + F + D) and LayerNorms with biases (4 D)."""
    d = model.hidden_size
    f = model.ffn_hidden_size or 4 * d
    if model.family == "llama":
        return 4 * d * d + 3 * d * f + 2 * d
    if model.family == "gpt2":
        return 4 * d * d + 2 * d * f + f + 9 * d
    if model.num_experts is None:
        mlp = 2 * d * f
    else:
        experts = model.moe_router_topk if active else model.num_experts
        mlp = model.num_experts * d + experts * 2 * d * (model.moe_ffn_hidden_size or f)
    return 4 * d * d + 2 * d + mlp


def non_embedding_params(model: GPTConfig, *, active: bool = False) -> int:
    """Parameters outside the embeddings: the count scaling laws (and the paper) quote.

    Per layer: q, k, v and output projections 4 D^2, MLP 2 D F, two bias-free LayerNorm
    weights 2 D; plus the final LayerNorm D. There are no biases anywhere. A mixture of
    experts counts every expert (``active=True``: the top-k a token uses, the router in
    full); each multi-token-prediction layer adds a layer, its input projection 2 D^2 and
    three LayerNorms 3 D (Chinchilla-style ``tokens_per_param`` uses the total).
    """
    if model.hf_config is not None:
        raise ConfigError(
            "the parameter count of a model.hf_config model is known once it is built; set "
            "train.train_steps instead of train.tokens_per_param"
        )
    d = model.hidden_size
    layer = _layer_params(model, active=active)
    mtp = (model.mtp_num_layers or 0) * (layer + 2 * d * d + 3 * d)
    final_norm = 2 * d if model.family == "gpt2" else d  # GPT-2's ln_f has a bias
    return model.num_layers * layer + final_norm + mtp


def embedding_params(model: GPTConfig) -> int:
    """Tied token embedding V D (also the output layer) plus learned positions S D (none
    with rope, or for Llama, whose positions are rotary)."""
    if model.vocab_size == AUTO_VOCAB:
        raise ConfigError("model.vocab_size is 'auto': resolve it from the tokenizer first")
    if model.hf_config is not None:
        raise ConfigError("the parameter count of a model.hf_config model is known once built")
    tables = 1 if model.tie_embeddings else 2  # input embedding (and output projection)
    learned = model.family == "gpt2" or (
        model.family == "nanodo" and model.position_embedding_type == "learned_absolute"
    )
    positions = model.seq_length if learned else 0
    return (tables * model.vocab_size + positions) * model.hidden_size


def resolve_vocab_size(cfg: RunConfig, tokenizer_vocab_size: int, padded_vocab_size: int) -> int:
    """Fill an 'auto' model vocabulary with the TP-padded tokenizer's; check an explicit one."""
    if cfg.model.vocab_size == AUTO_VOCAB:
        cfg.model.vocab_size = padded_vocab_size
    elif cfg.model.vocab_size < tokenizer_vocab_size:
        raise ConfigError(
            f"model.vocab_size {cfg.model.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer_vocab_size} tokens (set it to 'auto')"
        )
    return cfg.model.vocab_size


def validate_layout(cfg: RunConfig, world_size: int) -> int:
    """Check that the run fits ``world_size`` ranks as Megatron requires; return the DP size."""
    cfg.validate()
    p, m, t = cfg.parallel, cfg.model, cfg.train
    if is_hugging_face(m):
        which = "model.hf_config" if m.hf_config is not None else f"model.family {m.family!r}"
        raise ConfigError(
            f"{which} is a Hugging Face model, trained by launch/pretrain_deepspeed.py; "
            "megatron-core (launch/pretrain.py) builds the Nanodo model only (model.family: nanodo)"
        )
    tp, pp, vp = p.tensor_parallel, p.pipeline_parallel, p.virtual_pipeline or 1
    cp = p.context_parallel
    if min(tp, pp, vp, cp) < 1:
        raise ConfigError(f"parallel sizes must be >= 1, got TP={tp} PP={pp} virtual={vp} CP={cp}")
    if world_size < 1 or world_size % (tp * pp * cp):
        raise ConfigError(
            f"world size {world_size} is not divisible by tensor_parallel x pipeline_parallel "
            f"x context_parallel = {tp} x {pp} x {cp}"
        )
    dp = world_size // (tp * pp * cp)
    if m.num_attention_heads % tp:
        raise ConfigError(
            f"model.num_attention_heads {m.num_attention_heads} is not divisible by "
            f"parallel.tensor_parallel {tp}"
        )
    if m.num_layers % (pp * vp):
        raise ConfigError(
            f"model.num_layers {m.num_layers} is not divisible by pipeline_parallel x "
            f"virtual_pipeline = {pp} x {vp}"
        )
    if p.virtual_pipeline is not None and pp < 2:
        raise ConfigError("parallel.virtual_pipeline needs parallel.pipeline_parallel >= 2")
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"train.global_batch_size {t.global_batch_size} is not divisible by "
            f"micro_batch_size x data-parallel size = {t.micro_batch_size} x {dp}"
        )
    micro_batches = t.global_batch_size // (t.micro_batch_size * dp)
    if p.virtual_pipeline is not None and micro_batches % pp:
        raise ConfigError(
            f"the interleaved schedule needs the {micro_batches} micro-batches per step "
            f"(global batch / (micro batch x DP)) to be a multiple of pipeline_parallel {pp}"
        )
    if p.sequence_parallel and tp < 2:
        raise ConfigError("parallel.sequence_parallel needs parallel.tensor_parallel >= 2")
    if cp > 1 and cfg.data.seq_length % (2 * cp):
        raise ConfigError(
            f"context parallelism splits data.seq_length {cfg.data.seq_length} into 2 x "
            f"context_parallel {cp} chunks: it must be divisible"
        )
    if p.sequence_parallel and cfg.data.seq_length % (tp * cp):
        raise ConfigError(
            f"sequence parallelism splits data.seq_length {cfg.data.seq_length} across "
            f"tensor_parallel {tp} x context_parallel {cp}: it must be divisible"
        )
    if m.vocab_size != AUTO_VOCAB and m.vocab_size % tp:
        raise ConfigError(
            f"model.vocab_size {m.vocab_size} is not divisible by parallel.tensor_parallel {tp} "
            "(pad it, or set it to 'auto')"
        )
    if p.overlap_param_gather and not p.distributed_optimizer:
        raise ConfigError("parallel.overlap_param_gather needs parallel.distributed_optimizer")
    if m.mtp_num_layers and pp > 1 and m.position_embedding_type == "learned_absolute":
        raise ConfigError(
            "model.mtp_num_layers with parallel.pipeline_parallel > 1 and learned positions: "
            "megatron-core gives the multi-token-prediction layers on the last stage their own "
            "copy of the position table (it ties only the word embeddings across stages), a "
            "model other than the one configured; set model.position_embedding_type: rope"
        )
    _validate_expert_layout(cfg, world_size)
    return dp


def _validate_expert_layout(cfg: RunConfig, world_size: int) -> None:
    """Expert parallelism: megatron-core's grid of experts, and its sequence-parallel rule."""
    p, m = cfg.parallel, cfg.model
    ep, etp = p.expert_parallel, p.expert_tensor_parallel
    if ep < 1 or (etp is not None and etp < 1):
        raise ConfigError(
            f"parallel.expert_parallel and expert_tensor_parallel must be >= 1, got {ep}, {etp}"
        )
    if m.num_experts is None:
        if ep > 1 or etp is not None:
            raise ConfigError(
                "parallel.expert_parallel / expert_tensor_parallel need a mixture-of-experts "
                "model (set model.num_experts)"
            )
        return
    if m.num_experts % ep:
        raise ConfigError(
            f"model.num_experts {m.num_experts} is not divisible by parallel.expert_parallel {ep}"
        )
    tp, pp = p.tensor_parallel, p.pipeline_parallel
    etp = tp if etp is None else etp
    if etp != tp and ep == 1:
        raise ConfigError(
            f"parallel.expert_tensor_parallel {etp} differs from tensor_parallel {tp}: that "
            "needs parallel.expert_parallel > 1"
        )
    if world_size % (etp * ep * pp):
        raise ConfigError(
            f"world size {world_size} is not divisible by expert_tensor_parallel x "
            f"expert_parallel x pipeline_parallel = {etp} x {ep} x {pp}"
        )
    moe_ffn = m.moe_ffn_hidden_size or m.ffn_hidden_size or 4 * m.hidden_size
    if moe_ffn % etp:
        raise ConfigError(
            f"the experts' hidden size {moe_ffn} (model.moe_ffn_hidden_size) is not divisible "
            f"by expert_tensor_parallel {etp}"
        )
    if tp > 1 and not p.sequence_parallel:
        raise ConfigError(
            "a mixture-of-experts model with parallel.tensor_parallel > 1 needs "
            "parallel.sequence_parallel: true (megatron-core refuses it in training otherwise)"
        )


# --- loading -----------------------------------------------------------------------------

_SECTIONS: dict[str, type] = typing.get_type_hints(RunConfig)


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-3`` as a string; read exponent floats as floats, as YAML 1.2 does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_run_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a run file (with its includes), apply ``section.key=value`` overrides, validate.

    Override values are YAML (``train.bf16=true``, ``train.train_steps=null``,
    ``optimizer.lr=3e-4``, ``data.data_paths=[a.jsonl,b.jsonl]``).
    """
    path = Path(path)
    raw = _read_with_includes(path.resolve(), ())
    for item in overrides:
        section, key, value = _parse_override(item)
        if section not in _SECTIONS:
            raise _unknown_section(section)
        _merge(raw, {section: {}})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"section '{section}' must be a mapping")
        raw[section][key] = value
    return _build(raw, run_name=path.stem)


def _read_with_includes(path: Path, stack: tuple[Path, ...]) -> dict[str, Any]:
    if path in stack:
        chain = " -> ".join(p.name for p in (*stack, path))
        raise ConfigError(f"include cycle: {chain}")
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read config {path}: {err.strerror}") from None
    try:
        doc = yaml.load(text, Loader=_Loader) or {}
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        problem = getattr(err, "problem", None) or err
        raise ConfigError(f"{path}: invalid YAML{line}: {problem}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(doc).__name__}")
    includes = doc.pop("include", [])
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ConfigError(f"{path}: include must be a file name or a list of them")
    merged: dict[str, Any] = {}
    for name in includes:
        _merge(merged, _read_with_includes((path.parent / name).resolve(), (*stack, path)))
    _merge(merged, doc)
    return merged


def _merge(into: dict[str, Any], doc: dict[str, Any]) -> None:
    """Sections merge key by key; the later file wins."""
    for section, values in doc.items():
        values = {} if values is None else values  # an empty section keeps the included keys
        if isinstance(values, dict) and isinstance(into.get(section), dict):
            into[section].update(values)
        else:
            into[section] = values


def _parse_override(item: str) -> tuple[str, str, Any]:
    dotted, sep, text = item.partition("=")
    parts = dotted.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    try:
        value = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        raise ConfigError(f"override {item!r}: the value is not valid YAML") from None
    return parts[0], parts[1], value


def _unknown_section(section: str) -> ConfigError:
    return ConfigError(
        f"unknown section '{section}'; allowed sections: include, {', '.join(_SECTIONS)}"
    )


def _build(raw: dict[str, Any], *, run_name: str) -> RunConfig:
    for section in raw:
        if section not in _SECTIONS:
            raise _unknown_section(section)
    if "model" not in raw:
        raise ConfigError("section 'model' is required")
    sections = {name: dict(_mapping(raw, name)) for name in _SECTIONS}
    if sections["model"].get("vocab_size") == "auto":
        sections["model"]["vocab_size"] = AUTO_VOCAB
    if "seq_length" in sections["model"]:
        sections["data"].setdefault("seq_length", sections["model"]["seq_length"])
    sections["logging"].setdefault("run_name", run_name)
    # SAM phase bounds may be fractions of the run, resolved once the run's length is known.
    fractions = {
        key: sections["sam"].pop(key)
        for key in PHASE_BOUNDS
        if isinstance(sections["sam"].get(key), float)
    }
    cfg = RunConfig(
        **{name: _section(name, cls, sections[name]) for name, cls in _SECTIONS.items()}
    )
    if fractions:
        try:
            steps = {key: phase_step(v, cfg.total_steps) for key, v in fractions.items()}
            cfg.sam = dataclasses.replace(cfg.sam, **steps)
        except ValueError as err:
            raise ConfigError(f"sam: {err}") from None
    return cfg


def _mapping(raw: dict[str, Any], section: str) -> dict[str, Any]:
    values = raw.get(section) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"section '{section}' must be a mapping, got {values!r}")
    return values


def _section(name: str, cls: type, values: dict[str, Any]) -> Any:
    """One section's dataclass from its mapping, each value checked against its annotation."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(
                f"unknown key '{name}.{key}'; allowed keys of '{name}': {', '.join(known)}"
            )
        kwargs[key] = _typed(f"{name}.{key}", value, hints[key])
    for key, f in known.items():
        if key not in kwargs and f.default is MISSING and f.default_factory is MISSING:
            raise ConfigError(f"{name}.{key} is required")
    try:
        return cls(**kwargs)
    except ValueError as err:
        raise ConfigError(f"{name}: {err}") from None


def _typed(where: str, value: Any, annotation: Any) -> Any:
    """``value`` as ``annotation`` (int, float, bool, str, list[...] and their Optionals)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is not type(None):
                try:
                    return _typed(where, value, option)
                except ConfigError:
                    pass
    elif origin is list:
        if isinstance(value, list):
            (item,) = typing.get_args(annotation)
            return [_typed(f"{where}[{i}]", v, item) for i, v in enumerate(value)]
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, annotation):
        return value
    raise ConfigError(
        f"{where} must be {_type_name(annotation)}, got {type(value).__name__} {value!r}"
    )


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if typing.get_origin(annotation) is list:
        return f"a list of {_type_name(typing.get_args(annotation)[0])}"
    return annotation.__name__


def _positive(where: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{where} must be >= 1, got {value}")
