"""The Func-SAM step inside megatron-core: equivalence, layouts, skips, precision.

All checks that share a process group run in one spawn, since every spawn costs
seconds of start-up: one single-process spawn, one of 2 ranks and one of 4.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from megatron.core import parallel_state
from megatron.core.utils import get_model_config

from megatron_fsam import FuncSAM, SAMConfig
from megatron_fsam.backends.megatron import gather_params
from megatron_fsam.trainer.checkpoint import load_checkpoint, save_checkpoint
from megatron_fsam.trainer.parallel import ParallelConfig
from tests import reference
from tests.sam_harness import (
    ADAM,
    SGD,
    beyond,
    build,
    model_is_cast_of_main,
    my_batches,
    one_process_model,
    optimizer_state,
    params_of,
    plain_step,
    poisoned,
    received_gradients,
    refusal_without_finalize,
    relative_error,
    sam_config,
    sam_step,
    same,
    step_collectives,
    use_layout,
)
from tests.spawn import run_ranks

TOLERANCE = 1e-5
SPAWN_TIMEOUT = 1200  # generous: a loaded CI machine runs these spawns several times slower
TRITON_ON_CPU = {"TRITON_INTERPRET": "1"}  # the fused kernels run in Triton's interpreter
VARIANTS = [(mode, precond) for mode in ("sam", "fsam") for precond in (False, True)]


# ----- single process: the step against the paper's formulas -------------------------------


def _received_full(model, opt) -> dict[str, torch.Tensor]:
    return {
        n: pieces[0][2].detach().clone() for n, pieces in received_gradients(model, opt).items()
    }


def _run_variant(
    parallel, full, batches, mode, precond, precond_norm="perturbation", kernels="auto"
):
    """One SAM step (after a plain warm-up step when preconditioning); the model and optimizer."""
    # Megatron's distributed optimizer takes only Adam; the received gradient is the same.
    model, opt = build(parallel, full, ADAM if precond or parallel.distributed_optimizer else SGD)
    sam = FuncSAM(sam_config(mode, precond, precond_norm, kernels=kernels), model, opt)
    assert sam.kernels.name == kernels
    if precond:
        ok, *_ = sam_step(sam, batches)
        assert ok
    ok, _, _, metrics = sam_step(sam, batches)
    assert ok and metrics["rho"] == 0.05
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        assert metrics["loss_perturbed"] > 0 and metrics["loss_clean"] > 0
    return model, opt, metrics


def _check_skips(parallel, full, batches, *, bf16: bool) -> dict[str, bool]:
    """Inject NaN in pass 1, then pass 2: each step is skipped with nothing changed."""
    model, opt = build(parallel, full, ADAM, bf16=bf16)
    sam = FuncSAM(SAMConfig(mode="fsam", rho=0.05, precond=True), model, opt)
    assert sam_step(sam, batches)[0]
    mine = len(my_batches(batches))
    out = {}
    for where, calls in (("pass1", range(0, 1)), ("pass2", range(mine, mine + 1))):
        before, state = params_of(model), optimizer_state(opt)
        with poisoned(model, calls):
            ok, *_ = sam_step(sam, batches)
        out[f"skipped_{where}"] = not ok
        out[f"params_unchanged_{where}"] = same(before, params_of(model))
        out[f"state_unchanged_{where}"] = same(state, optimizer_state(opt))
    before = params_of(model)
    ok, _, _, metrics = sam_step(sam, batches)
    after = params_of(model)
    out["next_step_ok"] = ok and not same(before, after)
    out["next_step_finite"] = all(torch.isfinite(t).all() for t in after.values())
    if bf16:
        out["model_is_cast_main"] = model_is_cast_of_main(model, opt)
    return out


def _plain_megatron(model, opt, batches, steps: int) -> None:
    for _ in range(steps):
        plain_step(model, opt, batches)


def _single_process(rank: int, world: int, path: str) -> dict:
    parallel, batches, gpt, full = one_process_model()
    report: dict = {}

    # SGD, lr 1: the gradient the optimizer used against Listing 1, 1 and 4 micro-batches.
    for mode in ("sam", "fsam"):
        for count in (1, 4):
            model, opt, _ = _run_variant(parallel, full, batches[:count], mode, False)
            want = reference.sam_gradient(gpt, full, batches[:count], mode=mode, rho=0.05)
            report[f"{mode}/microbatches={count}"] = relative_error(
                received_gradients(model, opt), want
            )

    # Preconditioned: P from the Adam state of one plain step (v_hat = g0^2 exactly).
    g0 = reference.gradient(gpt, full, batches)
    precond = {n: 1.0 / (g0[n].abs() + ADAM["adam_eps"]) for n in g0}
    for mode in ("sam", "fsam"):
        for norm in ("grad", "perturbation", "dual"):
            model, opt, _ = _run_variant(parallel, full, batches, mode, True, norm)
            # theta1: rebuild the plain first step to read the weights the SAM step started from.
            first, first_opt = build(parallel, full, ADAM)
            sam_step(FuncSAM(sam_config(mode, True, norm), first, first_opt), batches)
            theta1 = params_of(first)
            want = reference.sam_gradient(
                gpt, theta1, batches, mode=mode, rho=0.05, precond=precond, precond_norm=norm
            )
            report[f"{mode}/precond/{norm}"] = relative_error(received_gradients(model, opt), want)

    # Outcomes on all 8 micro-batches that every parallel layout must reproduce.
    outcomes = {}
    for mode, precond in VARIANTS:
        model, opt, _ = _run_variant(parallel, full, batches, mode, precond)
        outcomes[(mode, precond)] = _received_full(model, opt)
    torch.save({"full": full, "batches": batches, "outcomes": outcomes}, path)
    for mode, precond in VARIANTS:  # the fused Triton kernels give the same step
        model, opt, _ = _run_variant(parallel, full, batches, mode, precond, kernels="triton")
        report[f"triton/{mode}/{precond}"] = relative_error(
            received_gradients(model, opt), outcomes[(mode, precond)]
        )

    # Mode "adamw" and rho = 0 are plain Megatron, bit for bit.
    plain, plain_opt = build(parallel, full, ADAM)
    _plain_megatron(plain, plain_opt, batches, steps=2)
    for name, cfg in (("adamw", SAMConfig(mode="adamw")), ("rho0", SAMConfig(mode="fsam", rho=0))):
        model, opt = build(parallel, full, ADAM)
        sam = FuncSAM(cfg, model, opt)
        for _ in range(2):
            sam_step(sam, batches)
        report[f"bitwise/{name}"] = same(params_of(plain), params_of(model))

    report["skip/fp32"] = _check_skips(parallel, full, batches, bf16=False)
    report["skip/bf16"] = _check_skips(parallel, full, batches, bf16=True)
    report["collectives"] = step_collectives(
        parallel,
        full,
        batches,
        {
            name: SAMConfig(mode=name.split()[0], rho=0.05, precond=True, precond_floor=floor)
            for name, floor in (("adamw", 0.0), ("fsam", 0.0), ("fsam floor", 0.1))
        },
    )

    model, opt = build(parallel, full, SGD)
    report["offload_reaches_gate"] = FuncSAM(
        SAMConfig(cotangent_offload=True), model, opt
    ).gate.offload

    errors = {}
    model, opt = build(parallel, full, SGD)
    try:
        FuncSAM(SAMConfig(mode="fsam", precond=True), model, opt)
    except ValueError as e:
        errors["precond_sgd"] = str(e)
    try:
        FuncSAM(SAMConfig(mode="fsam", logits_module="no_such_module"), model, opt)
    except ValueError as e:
        errors["no_logits"] = str(e)
    report["errors"] = errors
    report["refused"] = _refusals(parallel, full)
    report["shard_cache"] = _check_shard_cache(parallel, full, batches)
    return report


def _check_shard_cache(parallel, full, batches) -> dict[str, bool]:
    """The shard lists are built once and reused across steps; the copy of theta that fp32
    params need is refreshed at every step; new buffers are noticed."""
    model, opt = build(parallel, full, ADAM)
    sam = FuncSAM(SAMConfig(mode="fsam", rho=0.05), model, opt)
    first = sam.backend.shards(precondition=False)
    assert sam_step(sam, batches)[0]
    second = sam.backend.shards(precondition=False)
    mains, _ = sam.backend.main_params()
    refreshed = all(
        torch.equal(theta, main) for theta, main in zip(second.all.thetas, mains, strict=True)
    )
    buffer = model[0].buffers[0]
    buffer.grad_data = buffer.grad_data.clone()  # as if Megatron had reallocated it
    third = sam.backend.shards(precondition=False)
    return {
        "reused": second is first and len(first.aliased) > 0,
        "theta_copies_refreshed": refreshed,
        "rebuilt_for_new_buffers": third is not first,
    }


REFUSED = {
    "fp8_param": lambda model, opt: setattr(get_model_config(model[0]), "fp8_param", True),
    "mxfp8_reuse": lambda model, opt: setattr(
        model[0].ddp_config, "reuse_grad_buf_for_mxfp8_param_ag", True
    ),
    "megatron_fsdp": lambda model, opt: setattr(model[0].ddp_config, "use_megatron_fsdp", True),
    "cuda_graphs": lambda model, opt: setattr(
        get_model_config(model[0]), "cuda_graph_impl", "local"
    ),
    "quantile_balancing": lambda model, opt: setattr(
        get_model_config(model[0]), "moe_router_load_balancing_type", "quantile_balancing"
    ),
    "cpu_offload": lambda model, opt: setattr(opt.config, "optimizer_cpu_offload", True),
    "fp4_param": lambda model, opt: setattr(get_model_config(model[0]), "fp4_param", True),
    # megatron-core 0.19 settings (set on a 0.16 config too: the checks read them by name)
    "optimizer_cuda_graph": lambda model, opt: setattr(opt.config, "optimizer_cuda_graph", True),
    "gtp_weight_remat": lambda model, opt: setattr(
        get_model_config(model[0]), "gtp_weight_remat_size", 2
    ),
}


def _refusals(parallel, full) -> dict[str, str | None]:
    """What the step cannot do right is refused when FuncSAM is built, before any pass."""
    out = {}
    for name, configure in REFUSED.items():
        model, opt = build(parallel, full, ADAM)
        configure(model, opt)
        try:
            FuncSAM(SAMConfig(mode="fsam"), model, opt)
            out[name] = None
        except ValueError as e:
            out[name] = str(e)
    return out


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sam") / "reference.pt")
    (report,) = run_ranks(_single_process, 1, path, timeout=SPAWN_TIMEOUT, env=TRITON_ON_CPU)
    return path, report


@pytest.mark.parametrize("mode", ["sam", "fsam"])
@pytest.mark.parametrize("count", [1, 4])
def test_step_matches_listing1(single, mode, count):
    assert single[1][f"{mode}/microbatches={count}"] < TOLERANCE


@pytest.mark.parametrize("mode", ["sam", "fsam"])
@pytest.mark.parametrize("norm", ["grad", "perturbation", "dual"])
def test_preconditioned_step_matches_reference(single, mode, norm):
    assert single[1][f"{mode}/precond/{norm}"] < TOLERANCE


@pytest.mark.parametrize("mode, precond", VARIANTS)
def test_fused_triton_kernels_give_the_same_step(single, layouts_2, mode, precond):
    assert single[1][f"triton/{mode}/{precond}"] < TOLERANCE
    for rank_report in layouts_2:
        assert rank_report[("dp2_distopt_triton", mode, precond)] < TOLERANCE


@pytest.mark.parametrize("name", ["adamw", "rho0"])
def test_adamw_and_rho0_are_plain_megatron_bitwise(single, name):
    assert single[1][f"bitwise/{name}"]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_nonfinite_step_is_skipped_and_changes_nothing(single, dtype):
    checks = single[1][f"skip/{dtype}"]
    assert all(checks.values()), checks


def test_one_all_reduce_for_the_norm_sums(single):
    sizes = single[1]["collectives"]
    # One 3-vector (the norm sums) and the pass-2 finiteness flag; nothing else.
    assert beyond(sizes["fsam"], sizes["adamw"]) == [1, 3], sizes
    # The precond floor adds one 2-vector (the RMS of sqrt(v_hat)).
    assert beyond(sizes["fsam floor"], sizes["adamw"]) == [1, 2, 3], sizes


def test_cotangent_offload_setting_reaches_the_gate(single):
    assert single[1]["offload_reaches_gate"] is True


def test_bad_optimizer_or_model_raises_clear_error(single):
    errors = single[1]["errors"]
    assert "needs an Adam-type optimizer" in errors["precond_sgd"]
    assert "no module named 'no_such_module'" in errors["no_logits"]


# ----- parallel layouts: the same update as the single process -----------------------------

OVERLAP = dict(distributed_optimizer=True, overlap_grad_reduce=True, overlap_param_gather=True)
LAYOUTS_2 = {
    "tp2": ParallelConfig(tensor_parallel=2),
    "tp2_sp": ParallelConfig(tensor_parallel=2, sequence_parallel=True),
    "pp2": ParallelConfig(pipeline_parallel=2),
    "pp2_vp2": ParallelConfig(pipeline_parallel=2, virtual_pipeline=2),
    "dp2_distopt": ParallelConfig(distributed_optimizer=True),
    "dp2_distopt_overlap": ParallelConfig(**OVERLAP),
}
LAYOUTS_4 = {
    "tp2_pp2": ParallelConfig(tensor_parallel=2, pipeline_parallel=2),
    "tp2_dp2_distopt": ParallelConfig(tensor_parallel=2, distributed_optimizer=True),
    "pp2_vp2_dp2_distopt_overlap": ParallelConfig(
        pipeline_parallel=2, virtual_pipeline=2, **OVERLAP
    ),
}


def _check_overlap(parallel, full, batches, checkpoint_root: str) -> dict[str, bool]:
    """Under overlap_param_gather: one param all-gather per pass (the forward pre-hooks or
    the interleaved schedule gather theta + eps, nothing else does), and a checkpoint saved
    right after a SAM step holds theta, not the other ranks' theta + eps."""
    plain_model, plain_opt = build(parallel, full, ADAM)
    plain = FuncSAM(SAMConfig(mode="adamw"), plain_model, plain_opt)
    model, opt = build(parallel, full, ADAM)
    sam = FuncSAM(SAMConfig(mode="fsam", rho=0.05, precond=True), model, opt)
    for stepper in (plain, sam):  # the first step of a run gathers once more
        assert sam_step(stepper, batches)[0]
    with _counting_all_gathers() as plain_gathers:
        assert sam_step(plain, batches)[0]
    with _counting_all_gathers() as sam_gathers:
        assert sam_step(sam, batches)[0]
    save_checkpoint(checkpoint_root, 2, model, opt, extra={})
    loaded_model, loaded_opt = build(parallel, full, ADAM)
    load_checkpoint(checkpoint_root, loaded_model, loaded_opt)
    gather_params(model)  # now every rank's model reads theta
    return {
        "gathers_per_pass": sam_gathers[0] == 2 * plain_gathers[0] > 0,
        "saved_theta": same(params_of(model), params_of(loaded_model)),
    }


@contextmanager
def _counting_all_gathers():
    from megatron.core.distributed import param_and_grad_buffer

    count = [0]
    gather = param_and_grad_buffer.dist_all_gather_func

    def counted(*args, **kwargs):
        count[0] += 1
        return gather(*args, **kwargs)

    param_and_grad_buffer.dist_all_gather_func = counted
    try:
        yield count
    finally:
        param_and_grad_buffer.dist_all_gather_func = gather


def _check_nan_check_skip(parallel, full, batches) -> dict[str, bool]:
    """DDP's check_for_nan_in_grad on, NaN on rank 0 only in pass 2: a SAM skip on every
    rank (Megatron's check would raise on rank 0 alone and leave rank 1 waiting)."""
    model, opt = build(parallel, full, ADAM)
    for chunk in model:
        chunk.ddp_config.check_for_nan_in_grad = True
    sam = FuncSAM(SAMConfig(mode="fsam", rho=0.05, precond=True), model, opt)
    assert sam_step(sam, batches)[0]
    mine = len(my_batches(batches))
    before, state = params_of(model), optimizer_state(opt)
    calls = range(mine, mine + 1) if torch.distributed.get_rank() == 0 else range(0)
    with poisoned(model, calls):
        ok, _, losses, _ = sam_step(sam, batches)
    return {
        "skipped": not ok,
        "pass1_losses_returned": len(losses) == mine,
        "params_unchanged": same(before, params_of(model)),
        "state_unchanged": same(state, optimizer_state(opt)),
        "next_step_ok": sam_step(sam, batches)[0],
    }


def _layouts(rank: int, world: int, path: str, layouts: dict) -> dict:
    saved = torch.load(path, weights_only=False)
    full, batches = saved["full"], saved["batches"]
    report = {}
    for name, parallel in layouts.items():
        use_layout(parallel)
        for mode, precond in VARIANTS:
            model, opt, _ = _run_variant(parallel, full, batches, mode, precond)
            report[(name, mode, precond)] = relative_error(
                received_gradients(model, opt), saved["outcomes"][(mode, precond)]
            )
        if parallel.overlap_param_gather:
            report[("overlap", name)] = _check_overlap(parallel, full, batches, path + name)
    if world == 2:
        distopt = ParallelConfig(distributed_optimizer=True)
        use_layout(distopt)
        for mode, precond in VARIANTS:
            model, opt, _ = _run_variant(distopt, full, batches, mode, precond, kernels="triton")
            report[("dp2_distopt_triton", mode, precond)] = relative_error(
                received_gradients(model, opt), saved["outcomes"][(mode, precond)]
            )
        report["nan_check/pass2_one_rank"] = _check_nan_check_skip(distopt, full, batches)
        report["skip/distopt/fp32"] = _check_skips(distopt, full, batches, bf16=False)
        report["skip/distopt/bf16"] = _check_skips(distopt, full, batches, bf16=True)
        report["error/no_finalize"] = refusal_without_finalize(*build(distopt, full, ADAM))
    return report


@pytest.fixture(scope="module")
def layouts_2(single):
    return run_ranks(_layouts, 2, single[0], LAYOUTS_2, timeout=SPAWN_TIMEOUT, env=TRITON_ON_CPU)


@pytest.fixture(scope="module")
def layouts_4(single):
    return run_ranks(_layouts, 4, single[0], LAYOUTS_4, timeout=SPAWN_TIMEOUT, env=TRITON_ON_CPU)


@pytest.mark.parametrize("layout", list(LAYOUTS_2))
@pytest.mark.parametrize("mode, precond", VARIANTS)
def test_two_rank_layouts_match_single_process(layouts_2, layout, mode, precond):
    for rank_report in layouts_2:
        assert rank_report[(layout, mode, precond)] < TOLERANCE


@pytest.mark.parametrize("layout", list(LAYOUTS_4))
@pytest.mark.parametrize("mode, precond", VARIANTS)
def test_four_rank_layouts_match_single_process(layouts_4, layout, mode, precond):
    for rank_report in layouts_4:
        assert rank_report[(layout, mode, precond)] < TOLERANCE


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_distributed_optimizer_skip_restores_every_rank(layouts_2, dtype):
    for rank_report in layouts_2:
        checks = rank_report[f"skip/distopt/{dtype}"]
        assert all(checks.values()), checks


@pytest.mark.parametrize(
    "layout", [name for name in {**LAYOUTS_2, **LAYOUTS_4} if "overlap" in name]
)
def test_overlapped_param_gather_gathers_once_per_pass_and_saves_theta(
    layouts_2, layouts_4, layout
):
    for rank_report in layouts_2 if layout in LAYOUTS_2 else layouts_4:
        checks = rank_report[("overlap", layout)]
        assert all(checks.values()), checks


def test_nan_check_in_pass2_on_one_rank_is_a_skip_on_every_rank(layouts_2):
    for rank_report in layouts_2:
        checks = rank_report["nan_check/pass2_one_rank"]
        assert all(checks.values()), checks


def test_shard_lists_are_cached_across_steps(single):
    checks = single[1]["shard_cache"]
    assert all(checks.values()), checks


@pytest.mark.parametrize("name", list(REFUSED))
def test_unsupported_settings_are_refused_before_any_work(single, name):
    error = single[1]["refused"][name]
    assert error is not None and error.startswith("megatron_fsam:"), error


def test_missing_grad_finalisation_is_refused(layouts_2):
    for rank_report in layouts_2:
        assert (
            "finalize_model_grads_func is unset with data parallel size > 1"
            in rank_report["error/no_finalize"]
        )
