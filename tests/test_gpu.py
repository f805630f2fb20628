"""On a GPU: the step with Megatron's usual GPU options, against the reference.

Skipped where torch sees no CUDA device; `launch/gpu_check.sh` runs it on a GPU machine.
One process on one GPU over NCCL: the distributed optimizer with overlap_grad_reduce and
overlap_param_gather (DP = 1), bf16 and its fp32 twin, the graph-safe RNG tracker, and the
phase timers read from CUDA events. Transformer Engine's layers and fp8: tests/test_gpu_te.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from megatron.core.tensor_parallel import random as mp_random

from megatron_fsam import FuncSAM, SAMConfig
from megatron_fsam.backends.megatron_weights import full_state
from megatron_fsam.replay import RNGState
from megatron_fsam.trainer.models.gpt import build_model_chunks, transformer_config
from megatron_fsam.trainer.parallel import (
    ParallelConfig,
    destroy_distributed,
)
from tests import reference
from tests.sam_harness import (
    ADAM,
    GLOBAL_MICROBATCHES,
    TINY,
    build,
    gradient_difference,
    make_batches,
    model_is_cast_of_main,
    received_gradients,
    relative_error,
    sam_config,
    sam_step,
    use_layout,
)
from tests.spawn import rendezvous

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GPU_LAYOUT = ParallelConfig(
    distributed_optimizer=True, overlap_grad_reduce=True, overlap_param_gather=True
)


@pytest.fixture(scope="module")
def gpu_process():
    """A one-rank process group for the module; the rank variables are this module's only."""
    with rendezvous() as meeting, pytest.MonkeyPatch.context() as patch:
        for name, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", **meeting).items():
            patch.setenv(name, value)
        use_layout(GPU_LAYOUT)
        gpt = build_model_chunks(TINY, transformer_config(TINY, GPU_LAYOUT), GPU_LAYOUT)[0]
        batches = [{k: v.cuda() for k, v in b.items()} for b in make_batches(GLOBAL_MICROBATCHES)]
        try:
            yield gpt, full_state([gpt]), batches
        finally:
            destroy_distributed()


@pytest.mark.parametrize("mode", ["sam", "fsam"])
def test_fp32_twin_with_overlap_equals_the_reference(gpu_process, mode):
    gpt, full, batches = gpu_process
    model, opt = build(GPU_LAYOUT, full, ADAM)
    ok, _, _, _ = sam_step(FuncSAM(sam_config(mode, False), model, opt), batches)
    want = reference.sam_gradient(gpt, full, batches, mode=mode, rho=0.05)
    assert ok and relative_error(received_gradients(model, opt), want) < 1e-5


def test_bf16_steps_with_overlap_leave_the_model_at_cast_main(gpu_process):
    _, full, batches = gpu_process
    model, opt = build(GPU_LAYOUT, full, ADAM, bf16=True)
    sam = FuncSAM(SAMConfig(mode="fsam", rho=0.05, precond=True), model, opt)
    assert sam.kernels.name in ("auto", "triton")
    for _ in range(3):
        ok, _, _, metrics = sam_step(sam, batches)
        assert ok and math.isfinite(metrics["loss_perturbed"]) and metrics["passes"] == 2.0
        # Under overlap_param_gather the other slices are gathered by the next forward;
        # with DP = 1 this rank holds every slice, so the model is cast(main) right away.
        assert model_is_cast_of_main(model, opt)
    times = sam.phase_times()
    assert set(times) == {"time_pass1", "time_perturb", "time_pass2", "time_optimizer"}
    assert all(t > 0 for t in times.values())


@pytest.mark.parametrize("bf16", [False, True])
def test_recompute_gives_the_device_update_and_holds_less(gpu_process, bf16):
    """cotangent_memory="recompute" against "device" on CUDA (cuBLAS, overlapped gathers):
    the same update (fp32 to rounding; bf16 within one bf16 rounding of c(theta)) and fewer
    bytes held between the passes."""
    _, full, batches = gpu_process
    grads, held = {}, {}
    for memory in ("device", "recompute"):
        model, opt = build(GPU_LAYOUT, full, ADAM, bf16=bf16)
        sam = FuncSAM(SAMConfig(mode="fsam", rho=0.05, cotangent_memory=memory), model, opt)
        ok, _, _, metrics = sam_step(sam, batches)
        assert ok and math.isfinite(metrics["loss_clean"])
        grads[memory], held[memory] = received_gradients(model, opt), metrics["held_bytes"]
    error, _ = gradient_difference(grads["recompute"], grads["device"])
    assert error <= (1e-2 if bf16 else 1e-6), error
    assert held["recompute"] < held["device"]


def test_graph_safe_rng_tracker_replays_dropout_masks(gpu_process):
    mp_random.initialize_rng_tracker(use_cudagraphable_rng=True, force_reset=True)
    tracker = mp_random.get_cuda_rng_tracker()
    tracker.add(mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME, 4321)
    ones = torch.ones(1 << 16, device="cuda")

    def masks():
        with tracker.fork():
            inside = torch.nn.functional.dropout(ones, p=0.5) > 0
        return inside, torch.nn.functional.dropout(ones, p=0.5) > 0

    before = RNGState.capture()
    first = masks()
    before.restore()
    second = masks()
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
