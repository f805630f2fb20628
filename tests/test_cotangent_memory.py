"""cotangent_memory="recompute" against "device": the same update, and the bytes it holds.

One single-process spawn (tied and untied embeddings, fsam, precond fsam, the exact angle
form, bf16, the refusals, 1 and 2 multi-token-prediction layers: one more logits-layer call per
micro-batch each) and one 2-rank spawn that walks the layouts (TP=2 with and without sequence
parallel, PP=2 with 1F1B and interleaved, DP=2 with the distributed optimizer).
Recompute and device runs start from the same weights in the same layout, so they must agree
to fp32 rounding; the bytes held must equal `megatron_fsam.memory`'s formulas.
"""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from megatron.core import parallel_state
from megatron.core.utils import unwrap_model

from megatron_fsam import FuncSAM, SAMConfig
from megatron_fsam.memory import LogitShapes, bytes_between_passes
from megatron_fsam.trainer.parallel import ParallelConfig
from tests.sam_harness import (
    ADAM,
    MICRO_BATCH,
    SGD,
    TINY,
    build,
    gradient_difference,
    my_batches,
    one_process_model,
    received_gradients,
    sam_step,
    use_layout,
)
from tests.spawn import run_ranks

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-6
SPAWN_TIMEOUT = 900
UNTIED = dataclasses.replace(TINY, tie_embeddings=False)
MODELS = {"tied": TINY, "untied": UNTIED}
# Multi-token prediction: the output layer runs 1 + k times per micro-batch, the gate keeps
# one cotangent (device, offload) or one input (recompute) per call.
MTP_MODELS = {f"mtp{k}": dataclasses.replace(TINY, mtp_num_layers=k) for k in (1, 2)}
MTP_CASES = ("fsam", "angle 30 exact")
PRECOND = dict(precond=True, precond_floor=0.0, rho_schedule="linear_warmup", rho_warmup_steps=1)
# name: (config without cotangent_memory, optimizer, steps, passes)
CASES = {
    "fsam": (dict(mode="fsam"), SGD, 1, 2),
    "precond fsam": (dict(mode="fsam", **PRECOND), ADAM, 2, 2),
    "angle 30 exact": (dict(mode="angle", angle=30.0, angle_impl="exact"), SGD, 1, 3),
    "logit exact": (dict(mode="logit", angle_impl="exact", **PRECOND), ADAM, 2, 3),
}
LAYOUTS = {
    "tp2": ParallelConfig(tensor_parallel=2),
    "tp2 sp": ParallelConfig(tensor_parallel=2, sequence_parallel=True),
    "pp2 1f1b": ParallelConfig(pipeline_parallel=2),
    "pp2 interleaved": ParallelConfig(pipeline_parallel=2, virtual_pipeline=2),
    "dp2 distopt": ParallelConfig(distributed_optimizer=True),
}


def _run(layout, full, batches, model, case: str, memory: str, *, bf16: bool = False):
    """The model, optimizer and metrics after CASES[case]'s steps with this memory."""
    settings, optimizer, steps, _ = CASES[case]
    if layout.distributed_optimizer:  # megatron-core's supports Adam only
        optimizer = ADAM
    chunks, opt = build(layout, full, optimizer, model=model, bf16=bf16)
    sam = FuncSAM(SAMConfig(cotangent_memory=memory, **settings), chunks, opt)
    for _ in range(steps):
        ok, _, _, metrics = sam_step(sam, batches)
        assert ok
    return sam, received_gradients(chunks, opt), metrics


def _formula(layout: ParallelConfig, batches, model, memory: str, passes: int, elt: int) -> int:
    shapes = LogitShapes(
        seq_length=model.seq_length,
        micro_batch_size=MICRO_BATCH,
        num_microbatches=len(my_batches(batches)),
        hidden_size=model.hidden_size,
        vocab_size=model.vocab_size,
        tensor_parallel=layout.tensor_parallel,
        sequence_parallel=layout.sequence_parallel,
        logits_calls=1 + (model.mtp_num_layers or 0),
        activation_bytes=elt,
        weight_bytes=elt,
    )
    return bytes_between_passes(shapes, memory, passes)


def _compare(layout, full, batches, model, case: str) -> dict:
    """recompute vs device in one layout: update difference, and held bytes vs formula."""
    passes = CASES[case][3]
    _, device_grads, device_metrics = _run(layout, full, batches, model, case, "device")
    sam, recompute_grads, metrics = _run(layout, full, batches, model, case, "recompute")
    error, bitwise = gradient_difference(recompute_grads, device_grads)
    last_stage = sam.gate is not None
    return {
        "error": error,
        "bitwise": bitwise,
        "gate": type(sam.gate).__name__ if last_stage else None,
        "held": (device_metrics["held_bytes"], metrics["held_bytes"]),
        "formula": (
            _formula(layout, batches, model, "device", passes, 4),
            _formula(layout, batches, model, "recompute", passes, 4),
        )
        if last_stage
        else (None, None),
        "losses": (metrics["loss_clean"], metrics["loss_pass2_clean"], metrics["loss_perturbed"]),
    }


# ----- one process ---------------------------------------------------------------------------


class _IncomingCotangents:
    """dL/dlogits of every logits-module call, in order (hooked after the gate's substitution)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.seen: list[torch.Tensor] = []
        self._handle = module.register_forward_hook(self._on_forward)

    def _on_forward(self, module, args, output) -> None:
        logits = output[0] if isinstance(output, tuple) else output
        if logits.requires_grad:
            logits.register_hook(lambda grad: self.seen.append(grad.detach().clone()))

    def remove(self) -> None:
        self._handle.remove()


def _bf16_cotangents(layout, full, batches) -> dict:
    """bf16 params: pass 2's incoming cotangent under recompute vs pass 1's c(theta)."""
    recorded = {}
    for memory in ("device", "recompute"):
        chunks, opt = build(layout, full, SGD, bf16=True)
        sam = FuncSAM(SAMConfig(mode="fsam", cotangent_memory=memory), chunks, opt)
        watch = _IncomingCotangents(unwrap_model(chunks[0]).output_layer)
        assert sam_step(sam, batches)[0]
        watch.remove()
        recorded[memory] = watch.seen
    mine = len(my_batches(batches))
    clean = recorded["device"][:mine]  # pass 1
    replayed = recorded["recompute"][mine:]  # pass 2
    assert len(replayed) == mine and clean[0].dtype == torch.bfloat16
    worst = max(
        ((r.float() - c.float()).abs().max() / c.float().abs().max()).item()
        for r, c in zip(replayed, clean, strict=True)
    )
    bitwise = all(torch.equal(r, c) for r, c in zip(replayed, clean, strict=True))
    return {"max_relative": worst, "bitwise": bitwise}


def _refusals(layout, full, batches) -> dict:
    """What recompute refuses, and how auto falls back."""
    out = {}
    try:
        SAMConfig(mode="angle", angle=30.0, cotangent_memory="recompute")
    except ValueError as error:
        out["first_order_angle"] = str(error)
    try:
        SAMConfig(cotangent_memory="recompute", cotangent_offload=True)
    except ValueError as error:
        out["offload_conflict"] = str(error)
    out["offload_alias"] = SAMConfig(cotangent_offload=True).cotangent_memory
    chunks, opt = build(layout, full, SGD)
    odd_module = dict(mode="fsam", logits_module="decoder.final_layernorm")
    try:
        FuncSAM(SAMConfig(cotangent_memory="recompute", **odd_module), chunks, opt)
    except ValueError as error:
        out["custom_module"] = str(error)
    captured = _Warnings()
    sam = FuncSAM(SAMConfig(cotangent_memory="auto", **odd_module), chunks, opt)
    out["auto_custom"] = (type(sam.gate).__name__, captured.stop())
    sam.gate.remove()
    sam = FuncSAM(SAMConfig(cotangent_memory="auto"), chunks, opt)
    out["auto_megatron"] = type(sam.gate).__name__
    sam.gate.remove()
    captured = _Warnings()
    sam = FuncSAM(SAMConfig(mode="angle", angle=30.0, cotangent_memory="auto"), chunks, opt)
    out["auto_first_order"] = (type(sam.gate).__name__, captured.stop())
    return out


class _Warnings(logging.Handler):
    """megatron_fsam's warnings from now until stop()."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        logging.getLogger("megatron_fsam").addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def stop(self) -> list[str]:
        logging.getLogger("megatron_fsam").removeHandler(self)
        return self.messages


def _single_process(rank: int, world: int) -> dict:
    report: dict = {}
    for tie, model in MODELS.items():
        parallel, batches, _, full = one_process_model(model)
        for case in CASES:
            report[f"{tie}/{case}"] = _compare(parallel, full, batches, model, case)
    for name, model in MTP_MODELS.items():
        parallel, batches, _, full = one_process_model(model)
        for case in MTP_CASES:
            result = _compare(parallel, full, batches, model, case)
            passes = CASES[case][3]
            _, _, offload = _run(parallel, full, batches, model, case, "offload")
            result["offload"] = (
                offload["held_bytes"],
                _formula(parallel, batches, model, "offload", passes, 4),
            )
            report[f"{name}/{case}"] = result
    parallel, batches, _, full = one_process_model(TINY)
    report["bf16"] = _bf16_cotangents(parallel, full, batches)
    report["refusals"] = _refusals(parallel, full, batches)
    return report


@pytest.fixture(scope="module")
def single():
    return run_ranks(_single_process, 1, timeout=SPAWN_TIMEOUT)[0]


CHECKS = [f"{tie}/{case}" for tie in MODELS for case in CASES]


@pytest.mark.parametrize("check", CHECKS)
def test_recompute_gives_the_device_update(single, check):
    result = single[check]
    assert result["gate"] == "RecomputeGate"
    assert result["error"] <= TOLERANCE, result


@pytest.mark.parametrize("check", CHECKS)
def test_held_bytes_equal_the_formula(single, check):
    result = single[check]
    assert result["held"] == result["formula"]
    device, recompute = result["held"]
    # The tiny model's vocab (64) is only twice its hidden size (32); the weight copy is
    # part of the price, so recompute is smaller here by less than vocab / hidden.
    assert recompute < device


@pytest.mark.parametrize("check", CHECKS)
def test_pass2_loss_of_recompute_is_the_clean_loss(single, check):
    clean, pass2_clean, perturbed = single[check]["losses"]
    assert perturbed is None
    assert pass2_clean == pytest.approx(clean, rel=1e-6)


MTP_CHECKS = [f"{name}/{case}" for name in MTP_MODELS for case in MTP_CASES]


@pytest.mark.parametrize("check", MTP_CHECKS)
def test_mtp_held_bytes_equal_the_formula_in_every_memory(single, check):
    """1 + k logits-layer calls per micro-batch: device, offload and recompute hold what
    `megatron_fsam.memory` says, and recompute still gives the device update."""
    result = single[check]
    assert result["gate"] == "RecomputeGate"
    assert result["error"] <= TOLERANCE, result
    assert result["held"] == result["formula"], result
    held, formula = result["offload"]
    assert held == formula == result["formula"][0]  # offload holds the device bytes (host)
    depth = int(check.split("/")[0].removeprefix("mtp"))
    assert result["formula"][0] == (1 + depth) * single[f"tied/{check.split('/')[1]}"]["held"][0]


def test_bf16_recompute_reproduces_the_clean_cotangent(single):
    bf16 = single["bf16"]
    assert bf16["max_relative"] <= 2.0**-8, bf16  # one bf16 rounding at most


def test_recompute_refuses_what_it_cannot_do(single):
    refusals = single["refusals"]
    assert "angle_impl='exact'" in refusals["first_order_angle"]
    assert "set only cotangent_memory" in refusals["offload_conflict"]
    assert refusals["offload_alias"] == "offload"
    assert "not a Megatron ColumnParallelLinear" in refusals["custom_module"]
    gate, warnings = refusals["auto_custom"]
    assert gate == "LogitGate" and any("keeps the logit cotangents" in w for w in warnings)
    assert refusals["auto_megatron"] == "RecomputeGate"
    gate, warnings = refusals["auto_first_order"]
    assert gate == "LogitGate" and any("mix of two cotangents" in w for w in warnings)


# ----- two ranks: every layout ---------------------------------------------------------------


def _layouts(rank: int, world: int) -> dict:
    report: dict = {}
    fulls = {}
    for tie, model in MODELS.items():  # each rank builds the single-process model (DP=2)
        _, batches, _, fulls[tie] = one_process_model(model)
    for name, layout in LAYOUTS.items():
        use_layout(layout)
        for tie, model in MODELS.items():
            for case in ("fsam", "precond fsam", "angle 30 exact"):
                result = _compare(layout, fulls[tie], batches, model, case)
                result["last_stage"] = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
                report[f"{name}/{tie}/{case}"] = result
    return report


@pytest.fixture(scope="module")
def layouts():
    return run_ranks(_layouts, 2, timeout=SPAWN_TIMEOUT)


LAYOUT_CHECKS = [
    f"{name}/{tie}/{case}"
    for name in LAYOUTS
    for tie in MODELS
    for case in ("fsam", "precond fsam", "angle 30 exact")
]


@pytest.mark.parametrize("check", LAYOUT_CHECKS)
def test_recompute_gives_the_device_update_in_every_layout(layouts, check):
    for rank, report in enumerate(layouts):
        result = report[check]
        assert result["error"] <= TOLERANCE, (rank, result)
        if result["last_stage"]:
            assert result["gate"] == "RecomputeGate"
            assert result["held"] == result["formula"], (rank, result)


# ----- the benchmark's own check --------------------------------------------------------------


def test_bench_memory_check_finds_the_formula_on_the_demo_model():
    """`launch/bench_memory.py --check`: held bytes equal the formula in every memory mode."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "bench_memory.py"), "--check"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if "held" in line]
    assert len(lines) == 18 and all("(equal)" in line for line in lines), result.stdout
    assert sum(" mtp 2 " in line for line in lines) == 6, result.stdout


def test_formula_of_the_issue_shapes():
    """The shapes the docs quote: the paper's 1.2B per rank, and a Llama-like run."""
    paper = LogitShapes(
        seq_length=512, micro_batch_size=8, num_microbatches=4, hidden_size=4096, vocab_size=32000
    )
    assert bytes_between_passes(paper, "device") == 4 * 8 * 512 * 32000 * 2  # ~1 GB
    assert bytes_between_passes(paper, "offload") == bytes_between_passes(paper, "device")
    inputs, weight = 4 * 8 * 512 * 4096 * 2, 32000 * 4096 * 2
    assert bytes_between_passes(paper, "recompute") == inputs + weight
    assert bytes_between_passes(paper, "recompute", passes=3) == 2 * (inputs + weight)
    llama = LogitShapes(
        seq_length=4096, micro_batch_size=1, num_microbatches=32, hidden_size=4096,
        vocab_size=128256, tensor_parallel=8, sequence_parallel=True, logits_calls=2,
    )  # fmt: skip
    assert bytes_between_passes(llama, "device") == 64 * 4096 * 16032 * 2
    assert bytes_between_passes(llama, "recompute") == 64 * 512 * 4096 * 2 + 16032 * 4096 * 2
    with pytest.raises(ValueError, match="memory must be one of"):
        bytes_between_passes(paper, "disk")
