"""Hugging Face `transformers` causal LMs on the DeepSpeed front end, at ZeRO-2 and ZeRO-3.

A tiny LlamaForCausalLM (untied embeddings) and a tiny GPT2LMHeadModel (lm_head tied to the
token embedding), built from configs in code, run one SAM step on two gloo ranks with two
gradient-accumulation micro-batches each, the engine's forward being `causal_lm_loss`. The
gradient the engine's optimizer receives is checked against the single-process torch.func
reference (tests/reference.py, which calls a transformers model with keywords and takes
`.logits`), with the logit gate on `lm_head` and GPT-2's tie intact on the engine's module,
at ZeRO-2, ZeRO-3 with every parameter partitioned (the model built under zero.Init) and
ZeRO-3 with DeepSpeed's default persistence threshold. One 2-rank spawn runs every case.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from megatron_fsam import SAMConfig
from megatron_fsam.trainer.models.hf import causal_lm_loss
from tests import reference
from tests.received import Received, relative_error
from tests.sam_harness import TINY, make_batches
from tests.spawn import run_ranks, start_deepspeed_comm

# Not importorskip: importing deepspeed here would set PYTORCH_NVML_BASED_CUDA_CHECK in this
# process's environment, which the Megatron-LM tests' subprocesses then inherit (with a CUDA
# build of torch on a machine without a driver, their torch.compile'd kernels then fail).
# deepspeed and transformers are imported in the spawned ranks only.
pytestmark = [
    pytest.mark.one_env,  # DeepSpeed and PyTorch on HF models: no megatron-core
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed"),
    pytest.mark.skipif(
        importlib.util.find_spec("transformers") is None, reason="needs transformers"
    ),
]

TOLERANCE = 1e-5
SPAWN_TIMEOUT = 900
ACCUMULATION = 2  # micro-batches per rank; DP = 2
RHO, LR, ADAM_EPS = 0.05, 1e-3, 1e-3
PRECOND = dict(precond=True, precond_floor=0.0, rho_schedule="linear_warmup", rho_warmup_steps=1)
FAMILIES = ("llama", "gpt2")
# ZeRO-3 with every parameter partitioned (threshold 0, the model built under zero.Init and
# the reference weights loaded through GatheredParameters), and with DeepSpeed's default
# persistence threshold (1e5 elements: every parameter of these tiny models stays whole).
LAYOUTS = {
    "zero2": {"stage": 2},
    "zero3": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "zero3 persistent": {"stage": 3},
}
ZERO_INIT = ("zero3",)
MODES = ("sam", "fsam", "precond fsam")


def _model(family: str) -> torch.nn.Module:
    """2 layers, hidden 32, 4 heads, TINY's vocabulary and sequence length; no dropout."""
    if family == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=TINY.vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=TINY.seq_length,
            tie_word_embeddings=False,
            use_cache=False,
        )
        return LlamaForCausalLM(config)
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=TINY.vocab_size,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=TINY.seq_length,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        use_cache=False,
    )
    return GPT2LMHeadModel(config)


def _ds_config(layout: str) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": ACCUMULATION,
        "optimizer": {
            "type": "Adam",
            "params": {
                "lr": LR,
                "betas": [0.0, 0.98],
                "eps": ADAM_EPS,
                "weight_decay": 0.0,
                "torch_adam": True,
            },
        },  # fmt: skip
        "zero_optimization": dict(LAYOUTS[layout]),
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
    }


def _engine(family: str, layout: str, theta: dict[str, torch.Tensor]):
    """A DeepSpeed engine around a fresh model holding the reference weights `theta`."""
    import deepspeed

    ds_config = _ds_config(layout)
    if layout in ZERO_INIT:
        with deepspeed.zero.Init(config_dict_or_path=copy.deepcopy(ds_config)):
            model = _model(family)
    else:
        model = _model(family)
    params = dict(model.named_parameters())  # a tied weight once
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(theta[name])
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=None, config=copy.deepcopy(ds_config)
    )
    return engine


def _full_params(engine) -> dict[str, torch.Tensor]:
    """Every parameter's full value (gathered under ZeRO-3)."""
    import deepspeed

    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {n: p.detach().clone() for n, p in params.items()}


def _mine(batches: list[dict]) -> list[dict]:
    rank = torch.distributed.get_rank()
    return batches[rank * ACCUMULATION : (rank + 1) * ACCUMULATION]


def _compared(sam) -> int:
    """How many coordinates `relative_error` compared, over the data-parallel ranks."""
    count = sum(e.span.stop - e.span.start for e in sam.backend._entries() if e.counted)
    total = torch.tensor([count], dtype=torch.float64)
    torch.distributed.all_reduce(total)
    return int(total.item())


def _case(family, layout, mode, model, theta, batches) -> dict:
    """One SAM step (precond: after a plain Adam step at rho 0) against the reference."""
    from megatron_fsam.deepspeed import FuncSAM

    engine = _engine(family, layout, theta)
    precond = mode.startswith("precond ")
    base = mode.removeprefix("precond ")
    cfg = SAMConfig(mode=base, **PRECOND) if precond else SAMConfig(mode=base, rho=RHO)
    sam = FuncSAM(cfg, engine)
    received = Received(engine.basic_optimizer)
    out = {"gate": None if sam.gate is None else sam.gate.module is engine.module.lm_head}
    start, ascent = theta, {"rho": RHO}
    if precond:
        sam.train_step(_mine(batches), causal_lm_loss)  # rho 0: a plain Adam step
        start = _full_params(engine)
        g0 = reference.gradient(model, theta, batches)
        # Adam with beta1 = 0 after one step: sqrt(v_hat) = |g0|.
        ascent["precond"] = {n: 1.0 / (g0[n].abs() + ADAM_EPS) for n in g0}
    sam.train_step(_mine(batches), causal_lm_loss)
    want = reference.sam_gradient(model, start, batches, mode=base, **ascent)
    out["error"] = relative_error(sam, received, want)
    out["compared"] = (_compared(sam), sum(v.numel() for v in theta.values()))
    if base == "fsam":  # the clean cotangent replayed at lm_head made a difference
        sam_want = reference.sam_gradient(model, start, batches, mode="sam", **ascent)
        out["vs_sam"] = relative_error(sam, received, sam_want)
    out["rho"] = sam.metrics["rho"]
    params = list(engine.module.parameters())
    out["persistent"] = (sum(getattr(p, "ds_persist", False) for p in params), len(params))
    if family == "gpt2":
        module = engine.module
        out["tied"] = module.lm_head.weight is module.transformer.wte.weight
    return out


def _two_ranks(rank: int, world: int) -> dict:
    start_deepspeed_comm()
    batches = make_batches(2 * ACCUMULATION)
    report: dict = {}
    for family in FAMILIES:
        torch.manual_seed(0)
        model = _model(family)
        theta = {n: p.detach().clone() for n, p in model.named_parameters()}
        for layout in LAYOUTS:
            for mode in MODES:
                report[f"{family}/{layout}/{mode}"] = _case(
                    family, layout, mode, model, theta, batches
                )
    return report


@pytest.fixture(scope="module")
def two_ranks():
    return run_ranks(_two_ranks, 2, timeout=SPAWN_TIMEOUT)


CASES = [(f, layout, m) for f in FAMILIES for layout in LAYOUTS for m in MODES]


@pytest.mark.parametrize(("family", "layout", "mode"), CASES)
def test_update_equals_the_reference(two_ranks, family, layout, mode):
    for report in two_ranks:
        case = report[f"{family}/{layout}/{mode}"]
        compared, numel = case["compared"]  # every coordinate once
        assert case["rho"] == RHO and compared == numel and case["error"] <= TOLERANCE, case


@pytest.mark.parametrize(("family", "layout", "mode"), [c for c in CASES if c[2] != "sam"])
def test_logit_gate_sits_on_lm_head(two_ranks, family, layout, mode):
    """The gate is on the model's lm_head, and what it replays matters: the fsam update is
    far from the sam one."""
    for report in two_ranks:
        case = report[f"{family}/{layout}/{mode}"]
        assert case["gate"] is True and case["vs_sam"] > 100 * TOLERANCE, case


@pytest.mark.parametrize("family", FAMILIES)
def test_zero3_layouts_partition_as_configured(two_ranks, family):
    """Threshold 0: no parameter kept whole; the default threshold: all of them."""
    for report in two_ranks:
        for mode in MODES:
            persistent, count = report[f"{family}/zero3/{mode}"]["persistent"]
            assert persistent == 0 and count > 0
            assert report[f"{family}/zero3 persistent/{mode}"]["persistent"] == (count, count)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gpt2_lm_head_stays_tied_to_the_embedding(two_ranks, layout):
    for report in two_ranks:
        assert all(report[f"gpt2/{layout}/{mode}"]["tied"] for mode in MODES)
