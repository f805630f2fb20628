"""On a GPU: the SAM step with Megatron's Transformer Engine layer spec, and with TE's fp8
delayed scaling.

Skipped where torch sees no CUDA device; `launch/gpu_check.sh` runs it on a GPU machine, in a
process of its own (one rank over NCCL, the layout of tests/test_gpu.py). Without TE the tests
skip, except under MEGATRON_FSAM_REQUIRE_TE=1 (gpu_check.sh sets it after installing TE),
where a missing TE fails them. TE's attention runs its deterministic algorithms here
(NVTE_ALLOW_NONDETERMINISTIC_ALGO=0), so that two runs of the same step are bit-equal.

- The TE spec: rho 0 is plain training bit for bit (bf16, distributed optimizer, both
  overlaps); fsam in fp32 equals the reference; bf16 ends at cast(main).
- fp8 with delayed scaling (`--fp8-format hybrid --fp8-recipe delayed`): after a plain step
  that creates TE's fp8 state, a SAM step leaves every TE module's amax history and scales
  exactly as a plain step on the same batch does, and without the replay it does not.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from megatron_fsam import FuncSAM, SAMConfig
from megatron_fsam.backends.megatron import DelayedScalingState, transformer_engine_modules
from megatron_fsam.backends.megatron_weights import full_state, load_full_state
from megatron_fsam.trainer.models.gpt import transformer_config
from megatron_fsam.trainer.parallel import build_optimizer, wrap_model
from tests import reference, test_gpu
from tests.sam_harness import (
    ADAM,
    TINY,
    model_is_cast_of_main,
    optimizer_state,
    params_of,
    plain_step,
    received_gradients,
    relative_error,
    sam_step,
    same,
)
from tests.test_gpu import GPU_LAYOUT

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

REQUIRE_TE = os.environ.get("MEGATRON_FSAM_REQUIRE_TE") == "1"
FP8_DELAYED = dict(
    fp8="hybrid", fp8_recipe="delayed", fp8_amax_history_len=16, fp8_amax_compute_algo="max"
)

gpu_process = test_gpu.gpu_process  # the one-rank process group, its batches


@pytest.fixture(scope="module", autouse=True)
def deterministic_attention():
    """TE's attention reads this when it is built: deterministic backward kernels."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NVTE_ALLOW_NONDETERMINISTIC_ALGO", "0")
        yield


def _transformer_engine_gpt(bf16: bool, **config_fields):
    """The tiny GPT with Megatron's Transformer Engine layer spec and `config_fields` set on
    its TransformerConfig (skips without TE, fails without it under REQUIRE_TE)."""
    if REQUIRE_TE:
        import transformer_engine.pytorch  # noqa: F401
    else:
        pytest.importorskip("transformer_engine.pytorch")
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_with_transformer_engine_spec,
    )

    config = transformer_config(TINY, GPU_LAYOUT, bf16=bf16)
    for name, value in config_fields.items():
        setattr(config, name, value)
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_with_transformer_engine_spec(),
        vocab_size=TINY.vocab_size,
        max_sequence_length=TINY.seq_length,
        share_embeddings_and_output_weights=True,
        position_embedding_type="learned_absolute",
    )
    return gpt.cuda(), config


def _built(full: dict, bf16: bool, **config_fields):
    """DDP over a TE GPT holding `full`, and the distributed optimizer over it."""
    gpt, config = _transformer_engine_gpt(bf16, **config_fields)
    load_full_state([gpt], full)
    model = wrap_model([gpt], config, GPU_LAYOUT)
    return model, build_optimizer(model, bf16=bf16, distributed_optimizer=True, **ADAM)


@pytest.fixture(scope="module")
def te_weights(gpu_process):
    """A TE GPT and its initial weights, which every model built here starts from."""
    gpt, _ = _transformer_engine_gpt(bf16=False)
    return gpt, full_state([gpt])


def test_rho0_is_plain_training_bitwise(gpu_process, te_weights):
    _, _, batches = gpu_process
    _, full = te_weights
    ends = []
    for rho in (None, 0.0):
        model, opt = _built(full, bf16=True)
        sam = None if rho is None else FuncSAM(SAMConfig(mode="fsam", rho=rho), model, opt)
        for _ in range(2):
            if sam is None:
                plain_step(model, opt, batches)
            else:
                sam_step(sam, batches)
        ends.append((params_of(model), optimizer_state(opt)))
    (plain_params, plain_state), (sam_params, sam_state) = ends
    assert same(sam_params, plain_params) and same(sam_state, plain_state)


def test_fsam_fp32_equals_the_reference_and_bf16_ends_at_cast_main(gpu_process, te_weights):
    _, _, batches = gpu_process
    reference_gpt, full = te_weights
    for bf16 in (False, True):
        model, opt = _built(full, bf16)
        ok, _, _, metrics = sam_step(FuncSAM(SAMConfig(mode="fsam", rho=0.05), model, opt), batches)
        assert ok and math.isfinite(metrics["loss_perturbed"])
        if bf16:
            assert model_is_cast_of_main(model, opt)
        else:
            want = reference.sam_gradient(reference_gpt, full, batches, mode="fsam", rho=0.05)
            assert relative_error(received_gradients(model, opt), want) < 1e-5


def _fp8_state(model: list) -> list[torch.Tensor]:
    """Copies of every TE module's delayed-scaling amax histories and scales."""
    return [
        value for _, value in DelayedScalingState.capture(transformer_engine_modules(model)).saved
    ]


def test_fp8_delayed_scaling_sam_step_keeps_a_plain_steps_amax_history(gpu_process, te_weights):
    import transformer_engine.pytorch as te

    available, reason = te.is_fp8_available(return_reason=True)
    if not available:
        pytest.skip(f"needs a CUDA device with fp8: {reason}")
    _, _, batches = gpu_process
    _, full = te_weights
    states = {}
    for run in ("plain", "replayed", "not replayed"):
        model, opt = _built(full, bf16=True, **FP8_DELAYED)
        plain_step(model, opt, batches)  # TE creates its fp8 state: alike in all three runs
        if run == "plain":
            plain_step(model, opt, batches)
        else:
            sam = FuncSAM(SAMConfig(mode="fsam", rho=0.05), model, opt)
            if run == "not replayed":
                sam.backend.te_modules = []
            ok, _, _, metrics = sam_step(sam, batches)
            assert ok and math.isfinite(metrics["loss_perturbed"]), run
        states[run] = _fp8_state(model)
    plain = states["plain"]
    assert plain and any(bool(t.any()) for t in plain)  # TE kept a history, and it moved
    assert same(states["replayed"], plain)
    assert not same(states["not replayed"], plain)
