"""Run configs: every shipped file loads, paper sizes, overrides, one-line errors, layouts.

No process groups: these tests only build and check dataclasses.
"""

import dataclasses
import math
from pathlib import Path

import pytest

from megatron_fsam.trainer.run_config import (
    AUTO_VOCAB,
    ConfigError,
    RunConfig,
    embedding_params,
    load_run_config,
    non_embedding_params,
    resolve_vocab_size,
    validate_layout,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RUNS = sorted(p for p in CONFIGS.glob("*.yaml") if not p.name.startswith("_"))
TINY = CONFIGS / "tiny_test.yaml"
MOE = CONFIGS / "moe_demo_cpu.yaml"
TWO_RANKS = ("demo_cpu", "moe_demo_cpu")  # the CPU demos run on 2 ranks

# Non-embedding parameter counts stated in the paper. Table 1's "2M" model counts
# 2,361,088 (4.59M with its 8192 x 256 embedding and 512 positions).
STATED = {"2m": 2_361_088, "h9": 23.9e6, "h12": 42.5e6, "h20": 117.9e6, "h64": 1208e6}


def _one_line_error(path: Path, overrides: list[str] = ()) -> str:
    with pytest.raises(ConfigError) as info:
        load_run_config(path, list(overrides))
    message = str(info.value)
    assert message and "\n" not in message
    return message


def _layout_error(cfg: RunConfig, world_size: int) -> str:
    with pytest.raises(ConfigError) as info:
        validate_layout(cfg, world_size)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_configs_are_shipped():
    names = {p.name for p in RUNS}
    for size in STATED:
        assert {f"nanodo_{size}.yaml", f"nanodo_{size}_10k.yaml"} <= names
    assert {"demo_cpu.yaml", "tiny_test.yaml", "moe_demo_cpu.yaml"} <= names


@pytest.mark.parametrize("path", RUNS, ids=lambda p: p.stem)
def test_every_config_loads_and_fits_its_world(path: Path):
    cfg = load_run_config(path, [])
    assert cfg.logging.run_name == path.stem
    assert cfg.data.seq_length == cfg.model.seq_length
    assert cfg.total_steps >= 1
    world = 2 if path.stem in TWO_RANKS else 1
    assert validate_layout(cfg, world) == world


@pytest.mark.parametrize("size", STATED)
def test_paper_non_embedding_params(size: str):
    for scheme in ("", "_10k"):
        cfg = load_run_config(CONFIGS / f"nanodo_{size}{scheme}.yaml", [])
        count = non_embedding_params(cfg.model)
        assert count == pytest.approx(STATED[size], rel=0.01)
        assert cfg.model.num_layers == (3 if size == "2m" else 6)
        if size != "2m":  # heads of 64, MLP 4x
            assert cfg.model.hidden_size == 64 * int(size[1:])
            assert cfg.model.ffn_hidden_size == 4 * cfg.model.hidden_size


def test_2m_model_is_table_1():
    model = load_run_config(CONFIGS / "nanodo_2m.yaml", []).model
    assert (model.num_layers, model.num_attention_heads, model.hidden_size) == (3, 4, 256)
    assert (model.ffn_hidden_size, model.vocab_size) == (1024, 8192)
    assert non_embedding_params(model) == 2_361_088
    assert embedding_params(model) == 8192 * 256 + 512 * 256
    untied = dataclasses.replace(model, tie_embeddings=False)  # an output projection too
    assert embedding_params(untied) == 2 * 8192 * 256 + 512 * 256


def test_paper_training_settings():
    cfg = load_run_config(CONFIGS / "nanodo_h20_10k.yaml", [])
    o = cfg.optimizer
    assert (o.lr, o.weight_decay, o.adam_beta2, o.adam_eps) == (1e-3, 0.1, 0.98, 1e-9)
    assert o.lr_decay_style == "cosine" and o.min_lr == pytest.approx(1e-4)
    assert o.warmup_steps(cfg.total_steps) == 1000
    assert (cfg.train.global_batch_size, cfg.data.seq_length) == (256, 512)
    assert (cfg.sam.mode, cfg.sam.precond, cfg.sam.precond_norm) == ("fsam", True, "perturbation")
    assert cfg.sam.rho_schedule == "linear_warmup"


@pytest.mark.parametrize("size", STATED)
def test_chinchilla_steps(size: str):
    cfg = load_run_config(CONFIGS / f"nanodo_{size}.yaml", [])
    assert cfg.train.train_steps is None and cfg.train.tokens_per_param == 20
    tokens = 20 * non_embedding_params(cfg.model)
    assert cfg.total_steps == math.ceil(tokens / (256 * 512))
    assert load_run_config(CONFIGS / f"nanodo_{size}_10k.yaml", []).total_steps == 10_000


def test_chinchilla_h9_steps_and_explicit_steps_win():
    cfg = load_run_config(CONFIGS / "nanodo_h9.yaml", [])
    assert cfg.total_steps == 3647  # ceil(20 * 23,895,360 / 131,072)
    assert load_run_config(CONFIGS / "nanodo_h9.yaml", ["train.train_steps=500"]).total_steps == 500


def test_overrides_apply_with_types():
    cfg = load_run_config(
        TINY,
        [
            "optimizer.lr=3e-4",
            "train.train_steps=12",
            "train.tokens_per_param=10",
            "train.bf16=true",
            "checkpoint.save_dir=null",
            "data.data_paths=[a.jsonl, b.jsonl]",
            "model.vocab_size=1024",
            "model.seq_length=16",
            "sam.mode=sam",
            "logging.run_name=probe",
        ],
    )
    assert cfg.optimizer.lr == 3e-4 and isinstance(cfg.optimizer.lr, float)
    assert cfg.train.train_steps == 12 and cfg.train.tokens_per_param == 10.0
    assert isinstance(cfg.train.tokens_per_param, float) and cfg.train.bf16 is True
    assert cfg.checkpoint.save_dir is None
    assert cfg.data.data_paths == ["a.jsonl", "b.jsonl"]
    assert cfg.model.vocab_size == 1024
    assert cfg.data.seq_length == 16  # follows the model unless the data section sets it
    assert cfg.sam.mode == "sam" and cfg.logging.run_name == "probe"
    assert load_run_config(TINY, ["model.vocab_size=auto"]).model.vocab_size == AUTO_VOCAB


def test_sam_variants_load_from_run_files():
    overrides = [
        "sam.mode=angle",
        "sam.angle=30",
        "sam.angle_impl=exact",
        "sam.seed=3",
        "sam.sam_probability=0.5",
        "sam.on_nonfinite=fallback",
        "sam.precond_floor=0.2",
    ]
    sam = load_run_config(TINY, overrides).sam  # fmt: skip
    assert (sam.mode, sam.angle, sam.angle_impl, sam.seed) == ("angle", 30.0, "exact", 3)
    assert (sam.sam_probability, sam.on_nonfinite, sam.precond_floor) == (0.5, "fallback", 0.2)
    assert load_run_config(TINY, ["sam.mode=logit", "sam.sam_interval=4"]).sam.sam_interval == 4
    memory = ["sam.cotangent_memory=recompute", "model.tie_embeddings=false"]
    cfg = load_run_config(TINY, memory)
    assert (cfg.sam.cotangent_memory, cfg.model.tie_embeddings) == ("recompute", False)
    assert load_run_config(TINY, ["sam.cotangent_offload=true"]).sam.cotangent_memory == "offload"


def test_include_merges_key_by_key_and_rejects_cycles(tmp_path: Path):
    (tmp_path / "_base.yaml").write_text(
        "model: {num_layers: 2, hidden_size: 32, num_attention_heads: 4, seq_length: 32,"
        " vocab_size: 256}\ntrain: {train_steps: 10, global_batch_size: 8, micro_batch_size: 2}\n"
    )
    (tmp_path / "run.yaml").write_text("include: _base.yaml\nmodel: {num_layers: 4}\ntrain:\n")
    cfg = load_run_config(tmp_path / "run.yaml", [])
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.total_steps) == (4, 32, 10)
    assert load_run_config(tmp_path / "run.yaml", ["train.train_steps=7"]).total_steps == 7

    (tmp_path / "a.yaml").write_text("include: b.yaml\n")
    (tmp_path / "b.yaml").write_text("include: [a.yaml]\n")
    assert "include cycle" in _one_line_error(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("include: missing.yaml\n")
    assert "cannot read config" in _one_line_error(tmp_path / "c.yaml")


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["optimizer.lrr=1"], "unknown key 'optimizer.lrr'; allowed keys of 'optimizer': lr,"),
        (["optimiser.lr=1"], "unknown section 'optimiser'; allowed sections: include, model,"),
        (["train.train_steps=ten"], "train.train_steps must be int or null, got str 'ten'"),
        (["train.train_steps=1.5"], "train.train_steps must be int or null, got float"),
        (["train.bf16=1"], "train.bf16 must be bool, got int 1"),
        (["train.micro_batch_size=true"], "train.micro_batch_size must be int, got bool"),
        (["data.data_paths=a.jsonl"], "data.data_paths must be a list of str or null"),
        (["model.num_layers=null"], "model.num_layers must be int, got NoneType"),
        (["sam.mode=asam"], "sam: SAMConfig.mode must be one of"),
        (["sam.angle=100"], "sam: SAMConfig.angle must be a finite number in [0, 90]"),
        (["sam.seed=abc"], "sam.seed must be int or null"),
        (["sam.cotangent_memory=disk"], "sam: SAMConfig.cotangent_memory must be one of"),
        (
            ["sam.mode=angle", "sam.cotangent_memory=recompute"],
            "sam: SAMConfig: cotangent_memory='recompute' with mode='angle'",
        ),
        (["parallel.sequence_parallel=true"], "parallel: sequence_parallel needs tensor_parallel"),
        (["optimizer.lr"], "is not of the form section.key=value"),
        (["lr=1"], "is not of the form section.key=value"),
        (["model.vocab_size=auto2"], "model.vocab_size must be int"),
    ],
)
def test_bad_overrides_give_one_line_errors(overrides: list[str], expected: str):
    assert expected in _one_line_error(TINY, overrides)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("optimizer: {lrr: 1}\n", "unknown key 'optimizer.lrr'"),
        ("optimiser: {lr: 1}\n", "unknown section 'optimiser'"),
        ("train: {global_batch_size: '256'}\n", "train.global_batch_size must be int, got str"),
        ("train: 5\n", "section 'train' must be a mapping"),
        ("train: {eval_iters: [1\n", "invalid YAML"),
    ],
)
def test_bad_files_give_one_line_errors(tmp_path: Path, text: str, expected: str):
    path = tmp_path / "bad.yaml"
    path.write_text(f"include: {TINY}\n{text}")
    assert expected in _one_line_error(path)


def test_model_section_and_keys_are_required(tmp_path: Path):
    (tmp_path / "list.yaml").write_text("- model\n")
    assert "expected a mapping of sections" in _one_line_error(tmp_path / "list.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert "section 'model' is required" in _one_line_error(tmp_path / "empty.yaml")
    (tmp_path / "partial.yaml").write_text("model: {num_layers: 2}\n")
    assert "model.hidden_size is required" in _one_line_error(tmp_path / "partial.yaml")


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["data.seq_length=64"], "data.seq_length 64 exceeds the model's maximum"),
        (["model.hidden_size=30"], "model.hidden_size 30 is not divisible by"),
        (["train.train_steps=null"], "set train.train_steps or train.tokens_per_param"),
        (["sam.rho_warmup_steps=7"], "rho would never reach sam.rho"),
        (["optimizer.lr_warmup_steps=6"], "must be in [0, 6) for a 6-step run"),
        (["optimizer.lr_warmup_fraction=0.1"], "set one of optimizer.lr_warmup_steps"),
        (["checkpoint.save_interval=2"], "checkpoint.save_dir is not"),
        (["optimizer.adam_beta2=1.0"], "optimizer.adam_beta2 must be in [0, 1)"),
        (["optimizer.lr_decay_style=step"], "optimizer.lr_decay_style must be one of"),
        (["train.eval_interval=0"], "train.eval_interval must be >= 1"),
    ],
)
def test_inconsistent_runs_are_rejected(overrides: list[str], expected: str):
    assert expected in _one_line_error(TINY, overrides)


def _tiny(*overrides: str) -> RunConfig:
    return load_run_config(TINY, list(overrides))


def test_validate_layout_returns_data_parallel_size():
    cfg = _tiny("parallel.tensor_parallel=2", "parallel.pipeline_parallel=2")
    assert validate_layout(cfg, 8) == 2
    interleaved = _tiny(
        "model.num_layers=4", "parallel.pipeline_parallel=2", "parallel.virtual_pipeline=2"
    )
    assert validate_layout(interleaved, 2) == 1
    assert validate_layout(_tiny("parallel.context_parallel=2"), 4) == 2  # CP ranks: same data


@pytest.mark.parametrize(
    "overrides, world_size, expected",
    [
        (["parallel.tensor_parallel=2"], 3, "world size 3 is not divisible by"),
        (["parallel.tensor_parallel=3"], 3, "num_attention_heads 4 is not divisible by"),
        (["parallel.pipeline_parallel=4"], 4, "num_layers 2 is not divisible by"),
        (
            ["parallel.pipeline_parallel=2", "parallel.virtual_pipeline=2"],
            2,
            "pipeline_parallel x virtual_pipeline = 2 x 2",
        ),
        ([], 8, "global_batch_size 8 is not divisible by micro_batch_size x data-parallel"),
        (
            [
                "model.num_layers=4",
                "parallel.pipeline_parallel=2",
                "parallel.virtual_pipeline=2",
                "train.global_batch_size=6",
            ],
            2,
            "interleaved schedule needs the 3 micro-batches",
        ),
        (
            [
                "parallel.tensor_parallel=2",
                "parallel.sequence_parallel=true",
                "model.seq_length=31",
            ],
            2,
            "data.seq_length 31 across tensor_parallel 2",
        ),
        (["parallel.tensor_parallel=2", "model.vocab_size=4097"], 2, "vocab_size 4097 is not"),
        (["parallel.context_parallel=2"], 3, "x context_parallel = 1 x 1 x 2"),
        (
            ["parallel.context_parallel=2", "model.seq_length=30"],
            2,
            "data.seq_length 30 into 2 x context_parallel 2 chunks",
        ),
    ],
)
def test_layout_errors(overrides: list[str], world_size: int, expected: str):
    assert expected in _layout_error(_tiny(*overrides), world_size)


def test_layout_errors_after_edits():
    cfg = _tiny()
    cfg.parallel.sequence_parallel = True  # ParallelConfig checks only on construction
    assert "sequence_parallel needs parallel.tensor_parallel >= 2" in _layout_error(cfg, 1)
    cfg = _tiny()
    cfg.data.seq_length = 64
    assert "exceeds the model's maximum" in _layout_error(cfg, 1)


def test_vocab_resolution():
    cfg = _tiny()
    with pytest.raises(ConfigError, match="resolve it from the tokenizer"):
        embedding_params(cfg.model)
    assert resolve_vocab_size(cfg, 500, 512) == 512 == cfg.model.vocab_size
    assert embedding_params(cfg.model) == (512 + 32) * 32
    explicit = _tiny("model.vocab_size=256")
    with pytest.raises(ConfigError, match="smaller than the tokenizer's 500 tokens"):
        resolve_vocab_size(explicit, 500, 512)


# ----- mixture of experts and multi-token prediction ------------------------------------------


def test_moe_demo_maps_to_the_model_and_layout():
    cfg = load_run_config(MOE, [])
    m, p = cfg.model, cfg.parallel
    assert (m.num_experts, m.moe_router_topk, m.moe_ffn_hidden_size) == (4, 2, 256)
    assert (m.moe_router_score_function, m.moe_router_enable_expert_bias) == ("sigmoid", True)
    assert (m.moe_aux_loss_coeff, m.moe_router_bias_update_rate) == (1e-3, 1e-3)
    assert (m.moe_token_dispatcher_type, m.moe_expert_capacity_factor) == ("alltoall", None)
    assert (m.mtp_num_layers, m.mtp_loss_scaling_factor) == (1, 0.1)
    assert (p.expert_parallel, p.expert_tensor_parallel, p.distributed_optimizer) == (2, None, True)
    assert (cfg.sam.mode, cfg.sam.precond) == ("fsam", True)
    assert validate_layout(cfg, 2) == 2  # experts split over the 2 data-parallel ranks
    overrides = [
        "model.moe_z_loss_coeff=1e-3",
        "model.moe_expert_capacity_factor=1.5",
        "model.moe_token_dispatcher_type=allgather",
        "model.mtp_num_layers=2",
        "parallel.expert_tensor_parallel=1",
    ]
    cfg = load_run_config(MOE, overrides)
    assert (cfg.model.moe_z_loss_coeff, cfg.model.moe_expert_capacity_factor) == (1e-3, 1.5)
    assert (cfg.model.moe_token_dispatcher_type, cfg.model.mtp_num_layers) == ("allgather", 2)
    assert cfg.parallel.expert_tensor_parallel == 1


def test_moe_and_mtp_parameter_counts():
    """Every expert counts; active: the top-k a token uses; MTP: a layer, 2 D^2 and 3 D."""
    model = load_run_config(MOE, ["model.vocab_size=4096"]).model
    d, f, moe_f, layers = 128, 512, 256, 2
    attention = 4 * d * d + 2 * d
    layer = attention + 4 * d + 4 * 2 * d * moe_f  # router 4 D, four experts
    active = attention + 4 * d + 2 * 2 * d * moe_f  # the top-2
    mtp = layer + 2 * d * d + 3 * d
    assert non_embedding_params(model) == layers * layer + d + mtp
    assert (
        non_embedding_params(model, active=True) == layers * active + d + active + 2 * d * d + 3 * d
    )
    dense = load_run_config(TINY, ["model.mtp_num_layers=2"]).model
    dense_layer = 4 * 32 * 32 + 2 * 32 + 2 * 32 * 128
    assert non_embedding_params(dense) == 2 * dense_layer + 32 + 2 * (
        dense_layer + 2 * 32 * 32 + 3 * 32
    )
    assert non_embedding_params(dense, active=True) == non_embedding_params(dense)
    assert f == load_run_config(MOE, []).model.ffn_hidden_size


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["model.moe_router_topk=4"], "model.moe_router_topk is set but model.num_experts is not"),
        (["model.mtp_num_layers=0"], "model.mtp_num_layers must be >= 1"),
        (["model.mtp_loss_scaling_factor=-1"], "model.mtp_loss_scaling_factor must be >= 0"),
        (
            ["model.num_experts=4", "model.moe_router_topk=5"],
            "model.moe_router_topk must be in [1, num_experts = 4], got 5",
        ),
        (["model.num_experts=0"], "model.num_experts must be >= 1"),
        (["model.num_experts=4", "model.moe_ffn_hidden_size=0"], "moe_ffn_hidden_size must be >="),
        (
            ["model.num_experts=4", "model.moe_router_score_function=relu"],
            "model.moe_router_score_function must be one of ('softmax', 'sigmoid')",
        ),
        (
            ["model.num_experts=4", "model.moe_router_topk=1"],
            "model.moe_router_topk 1 with the softmax score function",
        ),
        (
            ["model.num_experts=4", "model.moe_router_enable_expert_bias=true"],
            "moe_router_enable_expert_bias needs model.moe_router_score_function: sigmoid",
        ),
        (
            ["model.num_experts=4", "model.moe_router_bias_update_rate=0"],
            "model.moe_router_bias_update_rate must be > 0",
        ),
        (["model.num_experts=4", "model.moe_aux_loss_coeff=-1"], "moe_aux_loss_coeff must be >= 0"),
        (["model.num_experts=4", "model.moe_z_loss_coeff=0"], "model.moe_z_loss_coeff must be > 0"),
        (
            ["model.num_experts=4", "model.moe_expert_capacity_factor=0"],
            "model.moe_expert_capacity_factor must be > 0 or null (dropless)",
        ),
        (
            ["model.num_experts=4", "model.moe_token_dispatcher_type=flex"],
            "model.moe_token_dispatcher_type must be one of ('alltoall', 'allgather')",
        ),
        (["model.num_experts=four"], "model.num_experts must be int or null"),
        (["model.position_embedding_type=alibi"], "model.position_embedding_type must be one of"),
        (["parallel.expert_parallel=0"], "parallel: expert_parallel and expert_tensor_parallel"),
    ],
)
def test_moe_and_mtp_mistakes_give_one_line_errors(overrides: list[str], expected: str):
    assert expected in _one_line_error(TINY, overrides)


def test_sigmoid_router_allows_top_1():
    assert "softmax" in _one_line_error(TINY, ["model.num_experts=4", "model.moe_router_topk=1"])
    ok = _tiny(
        "model.num_experts=4", "model.moe_router_topk=1", "model.moe_router_score_function=sigmoid"
    )
    assert validate_layout(ok, 1) == 1


@pytest.mark.parametrize(
    "overrides, world_size, expected",
    [
        (
            ["parallel.expert_parallel=2"],
            2,
            "need a mixture-of-experts model (set model.num_experts)",
        ),
        (
            ["parallel.expert_tensor_parallel=1"],
            1,
            "need a mixture-of-experts model (set model.num_experts)",
        ),
        (
            ["model.num_experts=3", "parallel.expert_parallel=2"],
            2,
            "model.num_experts 3 is not divisible by parallel.expert_parallel 2",
        ),
        (
            ["model.num_experts=4", "parallel.expert_parallel=4", "train.global_batch_size=4"],
            2,
            "world size 2 is not divisible by expert_tensor_parallel x expert_parallel x "
            "pipeline_parallel = 1 x 4 x 1",
        ),
        (
            [
                "model.num_experts=4",
                "parallel.expert_tensor_parallel=2",
                "train.global_batch_size=4",
            ],
            2,
            "expert_tensor_parallel 2 differs from tensor_parallel 1: that needs",
        ),
        (
            [
                "model.num_experts=4",
                "model.moe_ffn_hidden_size=33",
                "parallel.expert_parallel=2",
                "parallel.expert_tensor_parallel=2",
            ],
            4,
            "the experts' hidden size 33 (model.moe_ffn_hidden_size) is not divisible by "
            "expert_tensor_parallel 2",
        ),
        (
            ["model.num_experts=4", "parallel.tensor_parallel=2"],
            2,
            "with parallel.tensor_parallel > 1 needs parallel.sequence_parallel: true",
        ),
        (
            ["model.mtp_num_layers=1", "parallel.pipeline_parallel=2"],
            2,
            "model.mtp_num_layers with parallel.pipeline_parallel > 1 and learned positions",
        ),
    ],
)
def test_expert_layout_errors(overrides: list[str], world_size: int, expected: str):
    assert expected in _layout_error(_tiny(*overrides), world_size)


def test_rope_allows_mtp_under_pipeline_parallelism():
    cfg = _tiny(
        "model.mtp_num_layers=1",
        "parallel.pipeline_parallel=2",
        "model.position_embedding_type=rope",
    )
    assert validate_layout(cfg, 2) == 1
    resolve_vocab_size(cfg, 500, 512)
    assert embedding_params(cfg.model) == 512 * 32  # no position table


def test_expert_layouts_that_fit():
    four = _tiny("model.num_experts=4", "parallel.expert_parallel=4", "train.global_batch_size=8")
    assert validate_layout(four, 4) == 4  # EP 4 over DP 4
    tp_ep = _tiny(
        "model.num_experts=4",
        "parallel.tensor_parallel=2",
        "parallel.sequence_parallel=true",
        "parallel.expert_parallel=2",
        "parallel.expert_tensor_parallel=1",
    )
    assert validate_layout(tp_ep, 2) == 1  # DP 1; experts over the two TP ranks instead


# ----- Hugging Face models (model.family, model.hf_config) ----------------------------------


def test_model_family_defaults_to_nanodo():
    cfg = _tiny()
    assert (cfg.model.family, cfg.model.hf_config) == ("nanodo", None)
    llama = _tiny("model.family=llama", "model.tie_embeddings=false")
    assert (llama.model.family, llama.model.tie_embeddings) == ("llama", False)
    assert _tiny("model.hf_config=configs/llama.json").model.hf_config == "configs/llama.json"


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["model.family=mistral"], "model.family must be one of ('nanodo', 'llama', 'gpt2')"),
        (["model.family=3"], "model.family must be str, got int 3"),
        (
            ["model.family=llama", "model.hf_config=llama.json"],
            "model.family 'llama' and model.hf_config both name the architecture",
        ),
        (["model.hf_config=' '"], "model.hf_config must be the path of a transformers config"),
        (
            ["model.family=llama", "model.num_experts=4"],
            "model.num_experts is set, but model.family 'llama' builds a dense Hugging Face",
        ),
        (
            ["model.hf_config=x.json", "model.mtp_num_layers=1"],
            "model.mtp_num_layers is set, but model.hf_config builds a dense Hugging Face",
        ),
        (
            ["model.family=gpt2", "model.position_embedding_type=rope"],
            "GPT-2 has learned absolute positions",
        ),
        (
            ["model.family=llama", "model.hidden_dropout=0.1"],
            "LlamaForCausalLM has no hidden dropout",
        ),
        (
            ["model.hf_config=x.json", "train.train_steps=null", "train.tokens_per_param=20"],
            "set train.train_steps instead of train.tokens_per_param",
        ),
    ],
)
def test_model_family_mistakes_give_one_line_errors(overrides: list[str], expected: str):
    assert expected in _one_line_error(TINY, overrides)


@pytest.mark.parametrize(
    "overrides, which",
    [
        (["model.family=llama"], "model.family 'llama'"),
        (["model.hf_config=x.json"], "model.hf_config"),
    ],
)
def test_megatron_refuses_hugging_face_models(overrides: list[str], which: str):
    error = _layout_error(_tiny(*overrides), 2)
    assert error == (
        f"{which} is a Hugging Face model, trained by launch/pretrain_deepspeed.py; megatron-core "
        "(launch/pretrain.py) builds the Nanodo model only (model.family: nanodo)"
    )


def test_hugging_face_parameter_counts():
    """Llama: SwiGLU MLP 3 D F, two RMSNorms, rotary positions; GPT-2: biases everywhere,
    LayerNorms with biases, learned positions. The totals are the built models' (the launcher
    logs 65,696 and 42,880 for tiny_test; tests/test_pretrain_deepspeed.py counts them)."""
    d, f, v, s = 32, 128, 512, 32
    llama = _tiny("model.family=llama", "model.tie_embeddings=false")
    resolve_vocab_size(llama, 500, 512)
    assert non_embedding_params(llama.model) == 2 * (4 * d * d + 3 * d * f + 2 * d) + d
    assert embedding_params(llama.model) == 2 * v * d
    assert non_embedding_params(llama.model) + embedding_params(llama.model) == 65_696
    gpt2 = _tiny("model.family=gpt2")
    resolve_vocab_size(gpt2, 500, 512)
    layer = 4 * d * d + 3 * d + d + 2 * d * f + f + d + 4 * d  # weights, biases, 2 LayerNorms
    assert non_embedding_params(gpt2.model) == 2 * layer + 2 * d
    assert embedding_params(gpt2.model) == (v + s) * d
    assert non_embedding_params(gpt2.model) + embedding_params(gpt2.model) == 42_880
    from_json = _tiny("model.hf_config=x.json")
    with pytest.raises(ConfigError, match="known once it is built"):
        non_embedding_params(from_json.model)
