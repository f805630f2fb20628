"""Mixture-of-experts and multi-token prediction models: the SAM step in every expert layout.

The model is the tiny GPT of the other step tests with every MLP a mixture of 4 experts
(top-2), a load-balancing loss and a router z-loss. One single-process spawn checks the step
against the paper's formulas (tests/reference.py, which takes the router losses as loss terms
with a constant cotangent, and one cotangent per call of the output layer under multi-token
prediction) and saves the references; one 2-rank spawn (EP=2 x DP=2 with and without the
distributed optimizer, PP=2 with experts in both stages, 1F1B and interleaved, the expert
bias, MTP on the last stage) and one 4-rank spawn (EP=2 x TP=2 with sequence parallelism,
expert TP 2 and 1) check the same numbers.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from megatron_fsam import FuncSAM, SAMConfig
from megatron_fsam.trainer.models.gpt import GPTConfig
from megatron_fsam.trainer.parallel import ParallelConfig
from tests import reference
from tests.sam_harness import (
    ADAM,
    SGD,
    TINY,
    beyond,
    build,
    expert_biases,
    make_batches,
    my_batches,
    one_process_model,
    params_of,
    plain_step,
    poisoned,
    received_gradients,
    relative_error,
    sam_config,
    sam_step,
    step_collectives,
    use_layout,
)
from tests.spawn import run_ranks

TOLERANCE = 1e-5
SPAWN_TIMEOUT = 1500
MOE = dataclasses.replace(
    TINY,
    num_layers=2,
    num_experts=4,
    moe_router_topk=2,
    moe_aux_loss_coeff=0.1,  # large, so that a wrong weighting of the router losses shows
    moe_z_loss_coeff=0.01,
)
MOE4 = dataclasses.replace(MOE, num_layers=4)  # one layer per virtual stage under PP=2 x VP=2
DISPATCHERS = ("alltoall", "allgather")
VARIANTS = (("sam", False), ("fsam", False), ("fsam", True))
MTP_DEPTHS = (1, 2)
MEMORY = ("device", "offload", "recompute")
MICROBATCHES = 4
# Every pass routes with the bias the step started from; lr 0 keeps the weights (and so the
# routing of a plain run) put while the bias and the Adam state move.
BIASED = dataclasses.replace(
    MOE, moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
    moe_router_bias_update_rate=1e-2,
)  # fmt: skip
FROZEN_ADAM = {**ADAM, "lr": 0.0}
BIAS_STEPS = 3  # fsam (P = 1: no Adam state yet), precond fsam, a skipped step


def _moe(dispatcher: str = "alltoall", base: GPTConfig = MOE, **more) -> GPTConfig:
    return dataclasses.replace(base, moe_token_dispatcher_type=dispatcher, **more)


def _mtp(depth: int) -> GPTConfig:
    """MTP heads on a rotary model: with learned positions, an MTP stage under PP would keep
    its own untied position table (see GPTConfig.position_embedding_type)."""
    return _moe(mtp_num_layers=depth, position_embedding_type="rope")


def _step_variant(parallel, full, batches, model: GPTConfig, mode: str, precond: bool, **cfg):
    """One SAM step (after a plain warm-up step when preconditioning): model and optimizer."""
    optimizer = ADAM if precond or parallel.distributed_optimizer else SGD
    chunks, opt = build(parallel, full, optimizer, model=model)
    config = dataclasses.replace(sam_config(mode, precond), **cfg)
    sam = FuncSAM(config, chunks, opt)
    for _ in range(2 if precond else 1):
        ok, _, _, metrics = sam_step(sam, batches)
        assert ok
    return chunks, opt, metrics


def _references(model: GPTConfig, batches) -> dict:
    """The weights of `model` and its sam / fsam / precond fsam references."""
    parallel, _, gpt, full = one_process_model(model)
    references = {
        (mode, False): reference.sam_gradient(gpt, full, batches, mode=mode, rho=0.05)
        for mode in ("sam", "fsam")
    }
    references["fsam", True] = _precond_reference(gpt, full, batches, parallel, model)
    return {"full": full, "references": references}


def _precond_reference(gpt, full, batches, parallel, model: GPTConfig) -> dict:
    """fsam with P from one plain Adam step (beta1 = 0: v_hat = g0^2), at the weights after it."""
    g0 = reference.gradient(gpt, full, batches)
    precond = {n: 1.0 / (g0[n].abs() + ADAM["adam_eps"]) for n in g0}
    chunks, opt = build(parallel, full, ADAM, model=model)
    sam_step(FuncSAM(SAMConfig(mode="adamw"), chunks, opt), batches)
    theta1 = params_of(chunks)
    return reference.sam_gradient(gpt, theta1, batches, mode="fsam", rho=0.05, precond=precond)


def _norm(tensors: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(t.double().square().sum().item() for t in tensors.values()))


# ----- one process: the formulas -----------------------------------------------------------


def _single_process(rank: int, world: int, path: str) -> dict:
    report: dict = {}
    saved: dict = {}
    parallel, batches, gpt, full = one_process_model(MOE)
    batches = batches[:MICROBATCHES]
    saved.update(full=full, batches=batches)

    # The router losses matter: their gradient is a visible part of g.
    g = reference.gradient(gpt, full, batches)
    report["aux_share"] = _norm(reference.aux_gradient(gpt, full, batches)) / _norm(g)

    # sam / fsam (SGD, lr 1: the gradient the optimizer used) and precond fsam.
    references = {
        (mode, False): reference.sam_gradient(gpt, full, batches, mode=mode, rho=0.05)
        for mode in ("sam", "fsam")
    }
    references["fsam", True] = _precond_reference(gpt, full, batches, parallel, MOE)
    saved["references"] = references
    saved["deep"] = _references(MOE4, batches)
    for mode, precond in VARIANTS:
        for dispatcher in DISPATCHERS:
            model, opt, _ = _step_variant(parallel, full, batches, _moe(dispatcher), mode, precond)
            report[f"{mode}/{precond}/{dispatcher}"] = relative_error(
                received_gradients(model, opt), references[mode, precond]
            )

    # ANGLE-SAM: the exact form against Eq. 19, and the two-pass form against its formula,
    # in which pass 2 weights the router losses by cos(phi) (with weight 1 they would add
    # (1 - cos) A(theta + eps)). Routing that flips between theta and theta + eps makes the
    # two forms differ by O(rho) here, not O(rho^2) as in a dense model.
    for impl, formula in (
        ("exact", reference.angle_gradient),
        ("first_order", reference.angle_first_order_gradient),
    ):
        want = formula(gpt, full, batches, degrees=60.0, rho=0.05)
        model, opt, _ = _step_variant(parallel, full, batches, MOE, "angle", False, angle=60.0,
                                      angle_impl=impl)  # fmt: skip
        report[f"angle/{impl}"] = relative_error(received_gradients(model, opt), want)

    # Capacity-factor routing (tokens beyond an expert's capacity dropped).
    capped = _moe(moe_expert_capacity_factor=1.0)
    parallel, _, gpt, _ = one_process_model(capped)
    references["capacity"] = reference.sam_gradient(gpt, full, batches, mode="fsam", rho=0.05)
    model, opt, _ = _step_variant(parallel, full, batches, capped, "fsam", False)
    report["capacity"] = relative_error(received_gradients(model, opt), references["capacity"])

    # Multi-token prediction: each call of the output layer replays its own clean cotangent.
    for depth in MTP_DEPTHS:
        mtp = _mtp(depth)
        parallel, _, gpt, mtp_full = one_process_model(mtp)
        want = {
            "fsam": reference.sam_gradient(gpt, mtp_full, batches, mode="fsam", rho=0.05),
            "angle": reference.angle_gradient(gpt, mtp_full, batches, degrees=30.0, rho=0.05),
        }
        saved[f"mtp{depth}"] = {"full": mtp_full, **want}
        for memory in MEMORY:
            for mode, more in (("fsam", {}), ("angle", dict(angle=30.0, angle_impl="exact"))):
                model, opt, metrics = _step_variant(
                    parallel, mtp_full, batches, mtp, mode, False, cotangent_memory=memory, **more
                )
                report[f"mtp{depth}/{mode}/{memory}"] = relative_error(
                    received_gradients(model, opt), want[mode]
                )

    saved["bias"] = _bias_references(batches)
    torch.save(saved, path)
    return report


def _bias_batches() -> list[list[dict]]:
    return [make_batches(MICROBATCHES, seed=10 + step) for step in range(BIAS_STEPS)]


def _bias_references(batches) -> dict:
    """Plain steps' expert biases (lr 0, single process) and the SAM gradient of each step at
    the bias it starts from: fsam with P = 1, then precond fsam with P from the first."""
    parallel, _, gpt, full = one_process_model(BIASED)
    model, opt = build(parallel, full, FROZEN_ADAM, model=BIASED)
    steps = _bias_batches()
    biases = [expert_biases(model)]
    for step_batches in steps:
        plain_step(model, opt, step_batches)
        biases.append(expert_biases(model))
    wants = []
    precond = None
    for step, step_batches in enumerate(steps[:2]):
        _set_biases(gpt, biases[step])
        want = reference.sam_gradient(
            gpt, full, step_batches, mode="fsam", rho=0.05, precond=precond
        )
        wants.append(want)
        precond = {n: 1.0 / (want[n].abs() + ADAM["adam_eps"]) for n in want}
    return {"full": full, "biases": biases, "gradients": wants}


def _set_biases(gpt, biases: list[torch.Tensor]) -> None:
    routers = [m for m in gpt.modules() if getattr(m, "expert_bias", None) is not None]
    for router, bias in zip(routers, biases, strict=True):
        router.expert_bias.data.copy_(bias)


# ----- parallel layouts ---------------------------------------------------------------------


LAYOUTS_2 = {
    "ep2_dp2_distopt": ParallelConfig(expert_parallel=2, distributed_optimizer=True),
    "ep2_dp2": ParallelConfig(expert_parallel=2),
    "pp2": ParallelConfig(pipeline_parallel=2),
}
INTERLEAVED = {"pp2_vp2": ParallelConfig(pipeline_parallel=2, virtual_pipeline=2)}
LAYOUTS_4 = {
    "ep2_tp2_sp": ParallelConfig(
        tensor_parallel=2, sequence_parallel=True, expert_parallel=2, distributed_optimizer=True
    ),
    "ep2_tp2_sp_etp1": ParallelConfig(
        tensor_parallel=2,
        sequence_parallel=True,
        expert_parallel=2,
        expert_tensor_parallel=1,
        distributed_optimizer=True,
    ),
}


def _layouts(
    layouts: dict[str, ParallelConfig], saved: dict, batches, base: GPTConfig = MOE
) -> dict:
    report = {}
    full, references = saved["full"], saved["references"]
    for name, parallel in layouts.items():
        use_layout(parallel)
        for mode, precond in VARIANTS:
            for dispatcher in DISPATCHERS:
                model, opt, _ = _step_variant(
                    parallel, full, batches, _moe(dispatcher, base), mode, precond
                )
                report[name, mode, precond, dispatcher] = relative_error(
                    received_gradients(model, opt), references[mode, precond]
                )
    return report


def _two_ranks(rank: int, world: int, path: str) -> dict:
    saved = torch.load(path, weights_only=False)
    report = _layouts(LAYOUTS_2, saved, saved["batches"])
    report.update(_layouts(INTERLEAVED, saved["deep"], saved["batches"], MOE4))

    parallel = LAYOUTS_2["ep2_dp2_distopt"]
    use_layout(parallel)
    capped = _moe(moe_expert_capacity_factor=1.0)
    model, opt, _ = _step_variant(parallel, saved["full"], saved["batches"], capped, "fsam", False)
    report["capacity"] = relative_error(
        received_gradients(model, opt), saved["references"]["capacity"]
    )
    report["bias"] = _bias_steps(parallel, saved["bias"])
    use_layout(LAYOUTS_2["ep2_dp2"])
    report["collectives"] = step_collectives(
        LAYOUTS_2["ep2_dp2"],
        saved["full"],
        saved["batches"],
        {mode: SAMConfig(mode=mode, rho=0.05) for mode in ("adamw", "fsam")},
        model=MOE,
    )

    # Multi-token prediction on the last pipeline stage.
    parallel = LAYOUTS_2["pp2"]
    use_layout(parallel)
    for depth in MTP_DEPTHS:
        mtp = saved[f"mtp{depth}"]
        for memory in ("device", "recompute"):
            for mode, more in (("fsam", {}), ("angle", dict(angle=30.0, angle_impl="exact"))):
                model, opt, _ = _step_variant(
                    parallel, mtp["full"], saved["batches"], _mtp(depth), mode,
                    False, cotangent_memory=memory, **more,
                )  # fmt: skip
                report[f"pp2/mtp{depth}/{mode}/{memory}"] = relative_error(
                    received_gradients(model, opt), mtp[mode]
                )
    return report


def _bias_steps(parallel: ParallelConfig, saved: dict) -> dict:
    """3 SAM steps (fsam, precond fsam, one skipped) against 3 plain steps, lr 0."""
    steps = _bias_batches()
    plain, plain_opt = build(parallel, saved["full"], FROZEN_ADAM, model=BIASED)
    model, opt = build(parallel, saved["full"], FROZEN_ADAM, model=BIASED)
    sam = FuncSAM(SAMConfig(mode="fsam", rho=0.05, precond=True, precond_floor=0.0), model, opt)
    out = {"plain_equal": [], "sam_equal": [], "errors": [], "applied": []}
    for step, step_batches in enumerate(steps):
        plain_step(plain, plain_opt, step_batches)
        skip = step == BIAS_STEPS - 1
        calls = len(my_batches(step_batches))
        with poisoned(model, range(calls, calls + 1) if skip else range(0)):
            ok, *_ = sam_step(sam, step_batches)
        out["applied"].append(ok)
        want = saved["biases"][step + 1]
        out["plain_equal"].append(_all_equal(expert_biases(plain), want))
        out["sam_equal"].append(_all_equal(expert_biases(model), want))
        if not skip:
            out["errors"].append(
                relative_error(received_gradients(model, opt), saved["gradients"][step])
            )
    out["moved"] = not _all_equal(saved["biases"][0], saved["biases"][-1])
    return out


def _all_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _four_ranks(rank: int, world: int, path: str) -> dict:
    saved = torch.load(path, weights_only=False)
    return _layouts(LAYOUTS_4, saved, saved["batches"])


# ----- fixtures and tests -------------------------------------------------------------------


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("moe") / "references.pt")
    (report,) = run_ranks(_single_process, 1, path, timeout=SPAWN_TIMEOUT)
    return path, report


@pytest.fixture(scope="module")
def two(single):
    return run_ranks(_two_ranks, 2, single[0], timeout=SPAWN_TIMEOUT)


@pytest.fixture(scope="module")
def four(single):
    return run_ranks(_four_ranks, 4, single[0], timeout=SPAWN_TIMEOUT)


def test_router_losses_are_a_visible_part_of_the_gradient(single):
    assert single[1]["aux_share"] > 1e-3


@pytest.mark.parametrize("dispatcher", DISPATCHERS)
@pytest.mark.parametrize("mode, precond", VARIANTS)
def test_one_process_matches_the_reference(single, mode, precond, dispatcher):
    assert single[1][f"{mode}/{precond}/{dispatcher}"] < TOLERANCE


@pytest.mark.parametrize("impl", ["exact", "first_order"])
def test_angle_weights_the_router_losses_as_eq19(single, impl):
    assert single[1][f"angle/{impl}"] < TOLERANCE


def test_capacity_factor_routing(single, two):
    assert single[1]["capacity"] < TOLERANCE
    for rank_report in two:
        assert rank_report["capacity"] < TOLERANCE


@pytest.mark.parametrize("depth", MTP_DEPTHS)
@pytest.mark.parametrize("memory", MEMORY)
@pytest.mark.parametrize("mode", ["fsam", "angle"])
def test_mtp_replays_each_heads_cotangent(single, depth, memory, mode):
    assert single[1][f"mtp{depth}/{mode}/{memory}"] < TOLERANCE


@pytest.mark.parametrize("layout", [*LAYOUTS_2, *INTERLEAVED])
@pytest.mark.parametrize("dispatcher", DISPATCHERS)
@pytest.mark.parametrize("mode, precond", VARIANTS)
def test_expert_layouts_match_the_reference(two, layout, mode, precond, dispatcher):
    for rank_report in two:
        assert rank_report[layout, mode, precond, dispatcher] < TOLERANCE


@pytest.mark.parametrize("layout", LAYOUTS_4)
@pytest.mark.parametrize("dispatcher", DISPATCHERS)
@pytest.mark.parametrize("mode, precond", VARIANTS)
def test_expert_tensor_parallel_layouts_match_the_reference(
    four, layout, mode, precond, dispatcher
):
    for rank_report in four:
        assert rank_report[layout, mode, precond, dispatcher] < TOLERANCE


def test_expert_bias_moves_once_per_step_as_in_a_plain_step(two):
    for rank_report in two:
        bias = rank_report["bias"]
        assert bias["moved"]
        assert bias["applied"] == [True, True, False]
        assert all(bias["plain_equal"]) and all(bias["sam_equal"]), bias
        assert max(bias["errors"]) < TOLERANCE, bias


def test_norm_sums_run_once_per_stats_group(two):
    """Experts without the distributed optimizer: dense params sum over the model-parallel
    ranks, experts over the expert-model-parallel ranks: two groups, two 3-vectors and two
    finiteness flags, nothing else."""
    for rank_report in two:
        sizes = rank_report["collectives"]
        assert beyond(sizes["fsam"], sizes["adamw"]) == [1, 1, 3, 3], sizes


@pytest.mark.parametrize("depth", MTP_DEPTHS)
@pytest.mark.parametrize("memory", ["device", "recompute"])
@pytest.mark.parametrize("mode", ["fsam", "angle"])
def test_mtp_on_the_last_pipeline_stage(two, depth, memory, mode):
    for rank_report in two:
        assert rank_report[f"pp2/mtp{depth}/{mode}/{memory}"] < TOLERANCE


@pytest.mark.parametrize(
    "asked", [dict(num_experts=4), dict(mtp_num_layers=1), dict(position_embedding_type="rope")]
)
def test_the_plain_pytorch_gpt_refuses_what_it_does_not_build(asked):
    """The DeepSpeed entry point's dense decoder must not silently drop experts or MTP."""
    from megatron_fsam.trainer.models.torch_gpt import TorchGPT

    with pytest.raises(ValueError, match="dense Nanodo decoder"):
        TorchGPT(dataclasses.replace(TINY, **asked))
