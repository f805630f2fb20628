"""ANGLE-SAM / LOGIT-SAM, thinned-out SAM schedules, the fallback step and the precond floor.

One single-process spawn checks against the paper's formulas (tests/reference.py) and saves
the references; one 2-rank spawn (DP=2, distributed optimizer) and one 4-rank spawn
(TP=2 x PP=2) check the same numbers under parallel layouts.
"""

from __future__ import annotations

import math

import pytest
import torch
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_fsam import FuncSAM, SAMConfig
from megatron_fsam.trainer.parallel import ParallelConfig
from tests import reference
from tests.sam_harness import (
    ADAM,
    SGD,
    build,
    my_batches,
    one_process_model,
    optimizer_state,
    params_of,
    poisoned,
    received_gradients,
    relative_error,
    sam_step,
    same,
    use_layout,
)
from tests.spawn import run_ranks

TOLERANCE = 1e-5
SPAWN_TIMEOUT = 1200
ANGLES = (0.0, 30.0, 60.0, 90.0)
RADII = (0.1, 0.05, 0.025, 0.0125)  # first order vs exact at rho and rho / 2 for three rho
ANGLE_FOR_RADII = 60.0
# One plain step first (to create Adam state); the paper's P, as the references compute it.
OVERLAP = dict(distributed_optimizer=True, overlap_grad_reduce=True, overlap_param_gather=True)
PRECOND = dict(precond=True, precond_floor=0.0, rho_schedule="linear_warmup", rho_warmup_steps=1)
LAYOUT_CHECKS = {
    **{
        norm: SAMConfig(mode="angle", angle=30.0, precond_norm=norm, **PRECOND)
        for norm in ("grad", "perturbation", "dual")
    },
    "floor 0.5": SAMConfig(mode="angle", angle=30.0, **{**PRECOND, "precond_floor": 0.5}),
}


def _stepped(parallel, full, batches, cfg: SAMConfig, optimizer=SGD, steps: int = 1):
    """Model and optimizer after `steps` FuncSAM steps from `full`, and the last metrics."""
    model, opt = build(parallel, full, optimizer)
    sam = FuncSAM(cfg, model, opt)
    for _ in range(steps):
        ok, _, _, metrics = sam_step(sam, batches)
        assert ok
    return model, opt, metrics


def _angle(degrees: float, impl: str, rho: float = 0.05, **more) -> SAMConfig:
    return SAMConfig(mode="angle", angle=degrees, angle_impl=impl, rho=rho, **more)


def _precond_of_first_step(gpt, full, batches) -> dict[str, torch.Tensor]:
    """P after one plain Adam step with beta1 = 0 (v_hat = g0^2 exactly)."""
    g0 = reference.gradient(gpt, full, batches)
    return {n: 1.0 / (g0[n].abs() + ADAM["adam_eps"]) for n in g0}


# ----- one process: the formulas -----------------------------------------------------------


def _single_process(rank: int, world: int, path: str) -> dict:
    parallel, batches, gpt, full = one_process_model()
    report: dict = {}

    # Eq. 19 taken exactly (SGD, lr 1: the optimizer's gradient) against the reference.
    references = {}
    for degrees in ANGLES:
        references[degrees] = reference.angle_gradient(
            gpt, full, batches, degrees=degrees, rho=0.05
        )
        model, opt, metrics = _stepped(parallel, full, batches, _angle(degrees, "exact"))
        report[f"exact/{degrees:g}"] = relative_error(
            received_gradients(model, opt), references[degrees]
        )
        report[f"passes/{degrees:g}"] = metrics["passes"]

    # Preconditioned, dual norm: P from the Adam state of one plain step.
    precond = _precond_of_first_step(gpt, full, batches)
    cfg = _angle(45.0, "exact", precond_norm="dual", **PRECOND)
    model, opt, _ = _stepped(parallel, full, batches, cfg, ADAM, steps=2)
    first, _, _ = _stepped(parallel, full, batches, SAMConfig(mode="adamw"), ADAM)
    want = reference.angle_gradient(
        gpt, params_of(first), batches, degrees=45.0, rho=0.05, precond=precond,
        precond_norm="dual",
    )  # fmt: skip
    report["exact/precond_dual"] = relative_error(received_gradients(model, opt), want)

    # First order with precond under every normalisation, and a floor that binds on part of
    # the model (relative to the RMS of sqrt(v_hat) of the whole model): what the layouts
    # must reproduce.
    # Without a floor, each must also be App. D's two-pass formula with that normalisation.
    outcomes = {}
    for name, cfg in LAYOUT_CHECKS.items():
        model, opt, _ = _stepped(parallel, full, batches, cfg, ADAM, steps=2)
        outcomes[name] = _full_of(received_gradients(model, opt))
        if cfg.precond_floor == 0.0:
            want = reference.angle_first_order_gradient(
                gpt, params_of(first), batches, degrees=cfg.angle_degrees, rho=cfg.rho,
                precond=precond, precond_norm=cfg.precond_norm,
            )  # fmt: skip
            report[f"first_order_precond/{name}"] = relative_error(
                received_gradients(model, opt), want
            )
    plain, floored = outcomes["perturbation"], outcomes["floor 0.5"]
    change_sq = sum((plain[n] - floored[n]).double().square().sum() for n in plain)
    report["floor/changes_the_step"] = (
        (change_sq / sum(plain[n].double().square().sum() for n in plain)).sqrt().item()
    )

    # First order minus exact shrinks as rho^2.
    differences = []
    for rho in RADII:
        pair = []
        for impl in ("first_order", "exact"):
            model, opt, _ = _stepped(parallel, full, batches, _angle(ANGLE_FOR_RADII, impl, rho))
            pair.append(received_gradients(model, opt))
        differences.append(relative_error(pair[0], _full_of(pair[1])))
    report["radii_differences"] = differences

    # The first-order (two-pass) form at every angle against App. D's two-pass formula, and
    # the modes named for special angles against their own formulas: fsam and angle 0 against
    # Eq. 11, logit and angle 90 against the two-pass formula at 90 degrees (precond, Adam,
    # second step), the exact logit against Eq. 19 at 90 degrees.
    for degrees in ANGLES:
        want = reference.angle_first_order_gradient(gpt, full, batches, degrees=degrees, rho=0.05)
        model, opt, _ = _stepped(parallel, full, batches, _angle(degrees, "first_order"))
        report[f"first_order/{degrees:g}"] = relative_error(received_gradients(model, opt), want)
    ascent = dict(rho=0.05, precond=precond, precond_norm="perturbation")
    theta = params_of(first)
    eq11 = reference.sam_gradient(gpt, theta, batches, mode="fsam", **ascent)
    logit = reference.angle_first_order_gradient(gpt, theta, batches, degrees=90.0, **ascent)
    for name, cfg, want in (
        ("fsam", SAMConfig(mode="fsam", **PRECOND), eq11),
        ("angle0", _angle(0.0, "first_order", **PRECOND), eq11),
        ("logit", SAMConfig(mode="logit", **PRECOND), logit),
        ("angle90", _angle(90.0, "first_order", **PRECOND), logit),
    ):
        model, opt, _ = _stepped(parallel, full, batches, cfg, ADAM, steps=2)
        report[f"special/{name}"] = relative_error(received_gradients(model, opt), want)
    model, opt, _ = _stepped(parallel, full, batches, SAMConfig(mode="logit", angle_impl="exact"))
    report["special/exact_logit"] = relative_error(received_gradients(model, opt), references[90.0])

    # sam_interval: two passes exactly at steps 0, 4, 8; the plain steps are Megatron's.
    report["interval_passes"] = _passes_per_step(
        parallel, full, batches, SAMConfig(mode="fsam", sam_interval=4), steps=10
    )
    report["probability_passes"] = _passes_per_step(
        parallel, full, batches, SAMConfig(mode="fsam", sam_probability=0.5, seed=7), steps=12
    )

    # A floor above every sqrt(v_hat) makes P constant: the step of plain (unpreconditioned) SAM.
    floored, floored_opt, _ = _stepped(
        parallel,
        full,
        batches,
        SAMConfig(mode="fsam", **{**PRECOND, "precond_floor": 1e3}),
        ADAM,
        2,
    )
    plain_first, _, _ = _stepped(parallel, full, batches, SAMConfig(mode="adamw"), ADAM)
    want = reference.sam_gradient(gpt, params_of(plain_first), batches, mode="fsam", rho=0.05)
    report["floor/constant_P_is_plain_sam"] = relative_error(
        received_gradients(floored, floored_opt), want
    )

    # eps_top_share on a log step: the top 0.1% of g^2 (P = 1) of the whole model.
    model, opt = build(parallel, full, SGD)
    _, _, _, metrics = sam_step(FuncSAM(SAMConfig(mode="fsam"), model, opt), batches, log_step=True)
    report["top_share"] = (
        metrics["eps_top_share"],
        _top_share(reference.gradient(gpt, full, batches)),
    )

    saved = {"full": full, "batches": batches, "angles": references, "outcomes": outcomes}
    torch.save(saved, path)
    return report


def _full_of(received: dict) -> dict[str, torch.Tensor]:
    return {n: pieces[0][2] for n, pieces in received.items()}


def _top_share(grads: dict[str, torch.Tensor]) -> float:
    """Share of sum g^2 in the largest 0.1% of the coordinates (tied weights once)."""
    squares = torch.cat([g.reshape(-1).double().square() for g in grads.values()])
    k = math.ceil(1e-3 * squares.numel())
    return (torch.topk(squares, k).values.sum() / squares.sum()).item()


def _passes_per_step(parallel, full, batches, cfg: SAMConfig, steps: int) -> dict:
    """forward_backward_func calls of each step, and each step's sam_step metric."""
    calls: list[int] = []

    def counted(**kwargs):
        calls[-1] += 1
        return get_forward_backward_func()(**kwargs)

    model, opt = build(parallel, full, ADAM)
    sam = FuncSAM(cfg, model, opt, forward_backward_func=counted)
    kinds = []
    for _ in range(steps):
        calls.append(0)
        ok, _, _, metrics = sam_step(sam, batches)
        assert ok
        kinds.append(int(metrics["sam_step"]))
    return {"calls": calls, "sam_step": kinds}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("variants") / "references.pt")
    report = run_ranks(_single_process, 1, path, timeout=SPAWN_TIMEOUT)[0]
    return path, report


@pytest.mark.parametrize("degrees", ANGLES)
def test_exact_angle_matches_eq19(single, degrees):
    report = single[1]
    assert report[f"exact/{degrees:g}"] < TOLERANCE
    assert report[f"passes/{degrees:g}"] == (2 if degrees == 0.0 else 3)


def test_exact_angle_with_precond_matches_eq19(single):
    assert single[1]["exact/precond_dual"] < TOLERANCE


def test_first_order_error_shrinks_as_rho_squared(single):
    differences = single[1]["radii_differences"]
    ratios = [a / b for a, b in zip(differences, differences[1:], strict=False)]
    assert len(ratios) == 3
    assert all(3.0 < r < 5.0 for r in ratios), (differences, ratios)


@pytest.mark.parametrize("degrees", ANGLES)
def test_first_order_angle_matches_the_two_pass_formula(single, degrees):
    assert single[1][f"first_order/{degrees:g}"] < TOLERANCE


@pytest.mark.parametrize("name", ["fsam", "angle0", "logit", "angle90", "exact_logit"])
def test_special_angles_and_their_modes_match_their_formulas(single, name):
    assert single[1][f"special/{name}"] < TOLERANCE


def test_sam_interval_runs_sam_exactly_every_kth_step(single):
    interval = single[1]["interval_passes"]
    assert interval["calls"] == [2, 1, 1, 1, 2, 1, 1, 1, 2, 1]
    assert interval["sam_step"] == [1, 0, 0, 0, 1, 0, 0, 0, 1, 0]


def test_sam_probability_draws_from_seed_and_step(single):
    drawn = single[1]["probability_passes"]
    # Seed 7's draws for steps 0..11, 0.866 0.301 0.065 0.667 0.278 0.143 0.345 0.863 0.739
    # 0.423 0.263 0.255: the top 53 bits of blake2b(b"7:<step>", digest_size=8) over 2^53
    # (hashlib in a Python shell); SAM steps are those below 0.5.
    want = [0, 1, 1, 0, 1, 1, 1, 0, 0, 1, 1, 1]
    assert drawn["sam_step"] == want
    assert drawn["calls"] == [1 + k for k in want]
    assert 0 < sum(want) < 12  # both kinds occur


def test_floor_above_every_second_moment_is_plain_sam(single):
    assert single[1]["floor/constant_P_is_plain_sam"] < TOLERANCE


def test_eps_top_share_is_the_models_top_share(single):
    measured, want = single[1]["top_share"]
    assert 0.0 < want < 1.0
    assert measured == pytest.approx(want, rel=1e-4)  # fp32 sums against a float64 reference


# ----- parallel layouts: the same numbers ---------------------------------------------------


def _layouts(rank: int, world: int, path: str, layout: ParallelConfig) -> dict:
    saved = torch.load(path, weights_only=False)
    full, batches = saved["full"], saved["batches"]
    use_layout(layout)
    optimizer = ADAM if layout.distributed_optimizer else SGD
    report: dict = {}
    for degrees, want in saved["angles"].items():
        model, opt, _ = _stepped(layout, full, batches, _angle(degrees, "exact"), optimizer)
        report[f"exact/{degrees:g}"] = relative_error(received_gradients(model, opt), want)
    for name, want in saved["outcomes"].items():
        model, opt, _ = _stepped(layout, full, batches, LAYOUT_CHECKS[name], ADAM, steps=2)
        report[f"outcome/{name}"] = relative_error(received_gradients(model, opt), want)
    drawn = _passes_per_step(
        layout, full, batches, SAMConfig(mode="fsam", sam_probability=0.5, seed=3), steps=8
    )
    report["probability_draws"] = drawn["sam_step"]
    if layout.distributed_optimizer:
        # Pass 3's theta reaches every rank through the overlapped param gather too.
        overlap = ParallelConfig(**OVERLAP)
        use_layout(overlap)
        for degrees, want in saved["angles"].items():
            model, opt, _ = _stepped(overlap, full, batches, _angle(degrees, "exact"), ADAM)
            report[f"overlap_exact/{degrees:g}"] = relative_error(
                received_gradients(model, opt), want
            )
        use_layout(layout)
        report["fallback"] = _check_fallback(layout, full, batches)
        model, opt = build(layout, full, ADAM)
        sam = FuncSAM(SAMConfig(mode="fsam"), model, opt)
        report["top_share"] = sam_step(sam, batches, log_step=True)[3]["eps_top_share"]
    return report


def _check_fallback(layout, full, batches) -> dict[str, bool]:
    """NaN in pass 2 on rank 0 only, on_nonfinite="fallback": every rank applies the pass-1
    gradient as a plain Adam step, bit for bit what mode adamw does."""
    mine = len(my_batches(batches))
    cfg = SAMConfig(mode="fsam", on_nonfinite="fallback", **PRECOND)
    model, opt = build(layout, full, ADAM)
    sam = FuncSAM(cfg, model, opt)
    plain_model, plain_opt = build(layout, full, ADAM)
    plain = FuncSAM(SAMConfig(mode="adamw"), plain_model, plain_opt)
    for stepper in (sam, plain):
        assert sam_step(stepper, batches)[0]  # step 0: rho 0, plain in both
    calls = range(mine, mine + 1) if torch.distributed.get_rank() == 0 else range(0)
    with poisoned(model, calls):
        ok, _, _, metrics = sam_step(sam, batches)
    assert sam_step(plain, batches)[0]
    return {
        "ok": ok,
        "counted": metrics["fallback"] == 1.0 and metrics["fallback_steps"] == 1.0,
        "params_bitwise": same(params_of(model), params_of(plain_model)),
        "state_bitwise": same(optimizer_state(opt), optimizer_state(plain_opt)),
        "next_step_sam": sam_step(sam, batches)[3]["fallback"] == 0.0,
    }


@pytest.fixture(scope="module")
def dp2(single):
    layout = ParallelConfig(distributed_optimizer=True)
    return run_ranks(_layouts, 2, single[0], layout, timeout=SPAWN_TIMEOUT)


@pytest.fixture(scope="module")
def tp2_pp2(single):
    layout = ParallelConfig(tensor_parallel=2, pipeline_parallel=2)
    return run_ranks(_layouts, 4, single[0], layout, timeout=SPAWN_TIMEOUT)


@pytest.mark.parametrize("degrees", ANGLES)
def test_exact_angle_matches_eq19_in_parallel_layouts(dp2, tp2_pp2, degrees):
    for rank_report in (*dp2, *tp2_pp2):
        assert rank_report[f"exact/{degrees:g}"] < TOLERANCE


@pytest.mark.parametrize("degrees", ANGLES)
def test_exact_angle_under_overlapped_param_gather(dp2, degrees):
    for rank_report in dp2:
        assert rank_report[f"overlap_exact/{degrees:g}"] < TOLERANCE


@pytest.mark.parametrize("name", ["grad", "perturbation", "dual", "floor 0.5"])
def test_first_order_angle_with_precond_in_parallel_layouts(dp2, tp2_pp2, name):
    for rank_report in (*dp2, *tp2_pp2):
        assert rank_report[f"outcome/{name}"] < TOLERANCE


@pytest.mark.parametrize("norm", ["grad", "perturbation", "dual"])
def test_first_order_angle_with_precond_matches_the_two_pass_formula(single, norm):
    assert single[1][f"first_order_precond/{norm}"] < TOLERANCE


def test_relative_floor_changes_the_step(single):
    assert single[1]["floor/changes_the_step"] > 1e-3


def test_sam_probability_draws_agree_on_every_rank(tp2_pp2):
    draws = [r["probability_draws"] for r in tp2_pp2]
    assert len(draws) == 4 and all(d == draws[0] for d in draws)
    assert draws[0] == [int(reference.uniform_draw(3, step) < 0.5) for step in range(8)]


def test_fallback_is_a_plain_step_on_g_bitwise(dp2):
    for rank_report in dp2:
        assert rank_report["fallback"] == {
            "ok": True,
            "counted": True,
            "params_bitwise": True,
            "state_bitwise": True,
            "next_step_sam": True,
        }


def test_eps_top_share_is_exact_across_ranks(single, dp2):
    measured_single, _ = single[1]["top_share"]
    for rank_report in dp2:
        assert rank_report["top_share"] == pytest.approx(measured_single, rel=1e-5)
