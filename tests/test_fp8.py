"""Transformer Engine's fp8 recipes and the SAM step, on the CPU (TE itself runs on a GPU only:
tests/test_gpu_te.py, through launch/gpu_check.sh).

- Delayed scaling keeps an amax history and scales per TE module that every forward-backward
  moves; the Megatron backend replays them like the MoE expert bias. Here a stand-in keeps
  that bookkeeping the way TE does (`fp8_meta["scaling_fwd" / "scaling_bwd"]`, one update per
  micro-batch and pass, none in a forward without grad) on a real layer of the tiny GPT, and
  one spawned process checks, against plain Megatron steps on the same batches: the SAM step
  ends with a plain step's history, its pass 2 starts from the scales pass 1 started from, and
  neither holds without the replay; a step whose pass 1 is a forward (a known direction)
  still moves the history once.
- Custom recipes are refused by both front ends: megatron-core's (`FuncSAM` reads the
  TransformerConfig) in that process, Megatron-LM's at argument parsing (its own process).
- The recipes that need nothing (current, block and MXFP8 scaling, NVFP4) pass the checks.
"""

from __future__ import annotations

import types

import pytest
import torch
from megatron.core.utils import get_model_config, unwrap_model

from megatron_fsam import FuncSAM, SAMConfig
from megatron_fsam.integrations.megatron_lm import sam_config_from_args
from tests.sam_harness import (
    ADAM,
    GLOBAL_MICROBATCHES,
    build,
    one_process_model,
    plain_step,
    sam_step,
)
from tests.spawn import SPAWN_TIMEOUT, run_ranks
from tests.test_megatron_lm import TAG, TREE, parse_in_one_process

FP8_MAX = 448.0  # E4M3's largest value, as TE's scale = FP8_MAX / amax
HISTORY = 4 * GLOBAL_MICROBATCHES  # room for every update of the steps below


class DelayedScalingLike(torch.nn.Module):
    """The fp8 bookkeeping Transformer Engine keeps for one module under delayed scaling, on a
    layer it watches: each forward writes the amax of the layer's output into row 0 of the
    forward history (a running max, as TE's casts do), and with grad enabled rolls the history
    and recomputes the scale from its max, as TE does when the autocast region exits; the
    backward does the same with the output's gradient. It keeps the scale each forward saw."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.fp8_meta = {
            key: types.SimpleNamespace(amax_history=torch.zeros(HISTORY, 1), scale=torch.ones(1))
            for key in ("scaling_fwd", "scaling_bwd")
        }
        self.scales_seen: list[float] = []
        layer.add_module("fp8_like", self)
        layer.register_forward_hook(self._forward)

    def _forward(self, module, args, output) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        forward = self.fp8_meta["scaling_fwd"]
        self.scales_seen.append(forward.scale.item())
        _record(forward, hidden.detach())
        if torch.is_grad_enabled():
            _update(forward)
            hidden.register_hook(self._backward)

    def _backward(self, grad: torch.Tensor) -> None:
        backward = self.fp8_meta["scaling_bwd"]
        _record(backward, grad)
        _update(backward)

    def state(self) -> list[torch.Tensor]:
        return [t.clone() for s in self.fp8_meta.values() for t in (s.amax_history, s.scale)]

    def updates(self, key: str) -> int:
        """Rows of the `key` history that updates have filled."""
        return int((self.fp8_meta[key].amax_history != 0).sum())


@torch.no_grad()
def _record(state, tensor: torch.Tensor) -> None:
    state.amax_history[0] = torch.maximum(state.amax_history[0], tensor.abs().max())


@torch.no_grad()
def _update(state) -> None:
    """TE's `_default_get_amax_and_update_history` (algorithm "max") and scale update."""
    state.scale.copy_(FP8_MAX / state.amax_history.max(dim=0).values)
    state.amax_history.copy_(state.amax_history.roll(-1, 0))
    state.amax_history[0] = 0


def _watched(model: list) -> DelayedScalingLike:
    return DelayedScalingLike(unwrap_model(model[0]).decoder.layers[0])


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _replay_facts(parallel, full, batches) -> dict:
    """One plain step, SAM steps with and without the replay, and a known-direction run."""
    micro = len(batches)
    model, opt = build(parallel, full, ADAM)
    plain = _watched(model)
    plain_step(model, opt, batches)
    out = {"plain_moved": plain.updates("scaling_fwd") == plain.updates("scaling_bwd") == micro}
    for name, replayed in (("replay", True), ("no_replay", False)):
        model, opt = build(parallel, full, ADAM)
        fake = _watched(model)
        sam = FuncSAM(SAMConfig(mode="fsam", rho=0.05), model, opt)
        if not replayed:
            sam.backend.te_modules = []
        ok, *_ = sam_step(sam, batches)
        pass1, pass2 = fake.scales_seen[:micro], fake.scales_seen[micro:]
        out[name] = {
            "ok": ok,
            "found": len(sam.backend.te_modules),
            "history_is_plain": _same(fake.state(), plain.state()),
            "pass2_starts_as_pass1": pass2[0] == pass1[0],
            "pass1_scales_move": len(set(pass1)) > 1,
        }
    # A known direction: step 1 plain (no direction yet), step 2 a forward at theta (moves
    # nothing) and pass 2, whose forward-backward is the step's one update.
    model, opt = build(parallel, full, ADAM)
    fake = _watched(model)
    sam = FuncSAM(SAMConfig(mode="fsam", rho=0.05, ascent="previous"), model, opt)
    updates = []
    for _ in range(2):
        _, _, _, metrics = sam_step(sam, batches)
        updates.append(
            (metrics["passes"], fake.updates("scaling_fwd"), fake.updates("scaling_bwd"))
        )
    out["known_direction"] = updates
    return out


CUSTOM = {
    "fp8_custom": dict(fp8="hybrid", fp8_recipe="custom", fp8_quantizer_factory="pkg.factory"),
    "fp4_custom": dict(fp4="e2m1", fp4_recipe="custom", fp4_quantizer_factory="pkg.factory"),
}
ACCEPTED = {
    "fp8_delayed": dict(fp8="hybrid", fp8_recipe="delayed"),
    "fp8_tensorwise": dict(fp8="hybrid", fp8_recipe="tensorwise"),
    "fp8_blockwise": dict(fp8="e4m3", fp8_recipe="blockwise"),
    "fp8_mxfp8": dict(fp8="e4m3", fp8_recipe="mxfp8"),
    "fp4_nvfp4": dict(fp4="e2m1", fp4_recipe="nvfp4"),
}


def _front_end_checks(parallel, full) -> dict[str, str | None]:
    """FuncSAM on a model whose TransformerConfig names each recipe: the error, or None."""
    out = {}
    for name, settings in {**CUSTOM, **ACCEPTED}.items():
        model, opt = build(parallel, full, ADAM)
        config = get_model_config(model[0])
        for field, value in settings.items():
            setattr(config, field, value)
        try:
            FuncSAM(SAMConfig(mode="fsam"), model, opt)
            out[name] = None
        except ValueError as error:
            out[name] = str(error)
    return out


def _single_process(rank: int, world: int) -> dict:
    parallel, batches, _, full = one_process_model()
    return {
        "replay": _replay_facts(parallel, full, batches),
        "front_end": _front_end_checks(parallel, full),
    }


@pytest.fixture(scope="module")
def single():
    (report,) = run_ranks(_single_process, 1, timeout=SPAWN_TIMEOUT)
    return report


def test_sam_step_ends_with_a_plain_steps_amax_history(single):
    facts = single["replay"]
    assert facts["plain_moved"]  # one update per micro-batch, forward and backward
    replayed, not_replayed = facts["replay"], facts["no_replay"]
    assert replayed["ok"] and replayed["found"] == 1
    assert replayed["history_is_plain"]
    assert not_replayed["ok"] and not not_replayed["history_is_plain"]  # the replay matters


def test_every_pass_starts_from_the_scales_the_step_started_with(single):
    replayed, not_replayed = single["replay"]["replay"], single["replay"]["no_replay"]
    assert replayed["pass1_scales_move"]  # the history moves within a pass
    assert replayed["pass2_starts_as_pass1"]
    assert not not_replayed["pass2_starts_as_pass1"]


def test_a_forward_only_clean_pass_leaves_the_update_to_pass_2(single):
    micro = GLOBAL_MICROBATCHES
    plain_first, known = single["replay"]["known_direction"]
    assert plain_first == (1.0, micro, micro)
    assert known[0] < 2.0 and known[1:] == (2 * micro, 2 * micro)  # one update, not 0 or 2


def test_megatron_core_refuses_custom_recipes_and_takes_the_others(single):
    checks = single["front_end"]
    for name in CUSTOM:
        assert checks[name] is not None and "custom fp8 / fp4 recipes" in checks[name], name
    for name in ACCEPTED:
        assert checks[name] is None, (name, checks[name])


def test_megatron_lm_argument_checks_of_each_recipe():
    """In-process: the checks `parse_args` runs on Megatron-LM's namespace."""
    for settings in CUSTOM.values():
        args = types.SimpleNamespace(sam_mode="fsam", **settings)
        with pytest.raises(ValueError, match="--fp8-recipe custom / --fp4-recipe custom"):
            sam_config_from_args(args)
    for settings in ACCEPTED.values():
        assert sam_config_from_args(types.SimpleNamespace(sam_mode="fsam", **settings))
    # The recipe flag defaults to "delayed"/"nvfp4" and says nothing without --fp8/fp4-format.
    assert sam_config_from_args(types.SimpleNamespace(sam_mode="fsam", fp8_recipe="custom"))


PARSED = {
    ("--fp8-format", "hybrid", "--fp8-recipe", "custom", "--fp8-quantizer-factory", "p.f"): (
        "does not work with --fp8-recipe custom"
    ),
    ("--fp4-format", "e2m1", "--fp4-recipe", "custom", "--fp4-quantizer-factory", "p.f"): (
        "does not work with --fp8-recipe custom"
    ),
    ("--fp8-format", "hybrid", "--fp8-param-gather"): "does not work with --fp8-param-gather",
}


@pytest.mark.skipif(
    TAG is None or not (TREE / "pretrain_gpt.py").is_file(),
    reason=f"no Megatron-LM tree at {TREE} (set MEGATRON_LM_DIR)",
)
def test_megatron_lm_stops_at_parsing_with_one_line(tmp_path):
    """Megatron-LM's own parser with --sam-mode fsam and each refused fp8 setting (one process:
    tests/megatron_lm_driver.py --parse-cases, the no-diff route's main)."""
    cases = [("--sam-mode", "fsam", *flags) for flags in PARSED]
    results = parse_in_one_process(tmp_path, cases)["results"]
    for result, message in zip(results, PARSED.values(), strict=True):
        errors = [line for line in result["stderr"].splitlines() if "error:" in line]
        assert result["status"] == 2, (result["args"], result["stderr"][-2000:])
        assert len(errors) == 1 and message in errors[0], (result["args"], errors)
