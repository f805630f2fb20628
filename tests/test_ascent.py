"""A direction known before the step (`SAMConfig.ascent`), SAM phases, and what steps cost.

Every consecutive step of a run whose eps follows the previous step's applied gradient or
Adam's first moment is compared with a float64 reference that runs its own AdamW
(`reference.known_direction_run`), and the network is counted to receive exactly one
backward per micro-batch per step: the clean pass of fsam is a forward, and sam has none.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_fsam import FuncSAM, SAMConfig
from megatron_fsam.backends.megatron_weights import global_param_names
from megatron_fsam.cost import passes as cost_over_plain
from megatron_fsam.cost import planned_passes, sam_passes
from megatron_fsam.directions import (
    Direction,
    PreviousGradient,
    load_rank_state,
    rank_state_path,
    save_rank_state,
)
from megatron_fsam.schedules import rho_at
from megatron_fsam.trainer.parallel import ParallelConfig
from tests import reference
from tests.received import BackwardCounter
from tests.sam_harness import (
    TINY,
    build,
    my_batches,
    one_process_model,
    optimizer_state,
    params_of,
    poisoned,
    received_gradients,
    relative_error,
    sam_step,
    use_layout,
)
from tests.spawn import run_ranks

TOLERANCE = 1e-5
STEPS = 4  # the first has no direction yet: three SAM steps follow
RHO = 0.05
# beta1 0.9: the momentum differs from the previous gradient (beta1 0 would make them equal).
ADAM = dict(name="adam", lr=1e-3, adam_beta1=0.9, adam_beta2=0.98, adam_eps=1e-3)
FORMS, ASCENTS = reference.KNOWN_DIRECTION_FORMS, reference.KNOWN_DIRECTIONS
PHASE_START = 2
MOE = dataclasses.replace(
    TINY, num_layers=2, num_experts=4, moe_router_topk=2, moe_aux_loss_coeff=0.1,
    moe_z_loss_coeff=0.01, moe_token_dispatcher_type="alltoall",
)  # fmt: skip
MODELS = {"dense": TINY, "moe": MOE}
LAYOUTS_2 = {
    "dp2_distopt": (ParallelConfig(distributed_optimizer=True), "dense"),
    "ep2_dp2_distopt": (ParallelConfig(expert_parallel=2, distributed_optimizer=True), "moe"),
}
LAYOUTS_4 = {
    "tp2_pp2": (ParallelConfig(tensor_parallel=2, pipeline_parallel=2), "dense"),
    "tp2_pp2_vp2": (
        ParallelConfig(tensor_parallel=2, pipeline_parallel=2, virtual_pipeline=2),
        "dense",
    ),
}
SPAWN_TIMEOUT = 1500


def _first_layer(model: list) -> torch.nn.Module:
    return next(m for n, m in model[0].named_modules() if n.endswith("layers.0"))


def _run(parallel, full, batches, cfg: SAMConfig, steps: int, model_config=TINY):
    """Each step's received gradients, metrics and backward count."""
    model, opt = build(parallel, full, ADAM, model=model_config)
    sam = FuncSAM(cfg, model, opt)
    counter = BackwardCounter(_first_layer(model))
    out = []
    for _ in range(steps):
        counter.count = 0
        ok, _, _, metrics = sam_step(sam, batches)
        assert ok
        out.append((_copied(received_gradients(model, opt)), metrics, counter.count))
    return model, opt, out


def _copied(received: dict) -> dict:
    """The step's gradients as values (the optimizer's grad tensors are reused)."""
    return {
        name: [(param, span, grad.detach().clone()) for param, span, grad in pieces]
        for name, pieces in received.items()
    }


def _bitwise(a: dict, b: dict) -> bool:
    return all(torch.equal(x[2], y[2]) for name in a for x, y in zip(a[name], b[name], strict=True))


def _config(ascent: str, form: str) -> SAMConfig:
    return SAMConfig(rho=RHO, ascent=ascent, **FORMS[form])


def _references(model_config) -> dict:
    """The float64 run of every (ascent, form), and the weights it starts from."""
    parallel, batches, gpt, full = one_process_model(model_config)
    runs = {}
    for ascent in ASCENTS:
        for form in FORMS:
            runs[ascent, form] = reference.known_direction_run(
                gpt, full, [batches] * STEPS, mode=FORMS[form]["mode"], ascent=ascent,
                rho=RHO, precond=_config(ascent, form).precond, lr=ADAM["lr"],
                betas=(ADAM["adam_beta1"], ADAM["adam_beta2"]), adam_eps=ADAM["adam_eps"],
            )  # fmt: skip
    return {"full": full, "batches": batches, "runs": runs}


def _compared(parallel, saved: dict, model_config) -> dict:
    """Every (ascent, form) run in this layout against the reference, step by step."""
    report = {}
    for (ascent, form), want in saved["runs"].items():
        _, _, steps = _run(
            parallel, saved["full"], saved["batches"], _config(ascent, form), STEPS, model_config
        )
        report[f"{ascent}/{form}"] = {
            "errors": [relative_error(got, w) for (got, _, _), w in zip(steps, want, strict=True)],
            "backwards": [count for _, _, count in steps],
            "micro_batches": len(my_batches(saved["batches"])),
            "passes": [metrics["passes"] for _, metrics, _ in steps],
            "no_direction": [metrics["no_direction"] for _, metrics, _ in steps],
        }
    return report


def _single_process(rank: int, world: int, path: str) -> dict:
    saved = {name: _references(config) for name, config in MODELS.items()}
    torch.save(saved, path)
    parallel, batches, gpt, full = one_process_model()
    report: dict = _compared(parallel, saved["dense"], TINY)

    # A SAM phase from step PHASE_START: plain AdamW steps before it, bit for bit (the step
    # at PHASE_START too: the rho warm-up starts there, at 0), then the paper's precond fsam.
    phase = SAMConfig(
        mode="fsam", rho=RHO, precond=True, precond_floor=0.0, sam_start_step=PHASE_START,
        rho_schedule="linear_warmup", rho_warmup_steps=1,
    )  # fmt: skip
    plain_steps = PHASE_START + 1
    plain_model, plain_opt, plain = _run(
        parallel, full, batches, SAMConfig(mode="adamw"), plain_steps
    )
    _, _, phased = _run(parallel, full, batches, phase, plain_steps + 1)
    report["phase_plain_bitwise"] = [
        _bitwise(a[0], b[0]) for a, b in zip(plain, phased[:plain_steps], strict=True)
    ]
    report["phase_sam_steps"] = [m["sam_step"] for _, m, _ in phased]
    theta, precond = params_of(plain_model), _precond(plain_model, plain_opt)
    want = reference.sam_gradient(gpt, theta, batches, mode="fsam", rho=RHO, precond=precond)
    report["phase_sam_error"] = relative_error(phased[-1][0], want)
    report["nonfinite"] = {
        ascent: _nonfinite_clean_pass(parallel, full, batches, ascent) for ascent in ASCENTS
    }
    return report


def _nonfinite_clean_pass(parallel, full, batches, ascent: str) -> dict:
    """A NaN in the forward-only clean pass of step 2 (its first micro-batch): the step is
    skipped with params and Adam state bit-identical, and the next step has a direction
    again only where it does not come from the skipped step (momentum)."""
    model, opt = build(parallel, full, ADAM)
    sam = FuncSAM(SAMConfig(mode="fsam", rho=RHO, ascent=ascent), model, opt)
    sam_step(sam, batches)  # plain: no direction yet
    before = (params_of(model), optimizer_state(opt))
    micro_batches = len(my_batches(batches))
    with poisoned(model, range(micro_batches, micro_batches + 1)):
        ok, _, _, skipped = sam_step(sam, batches)
    after = (params_of(model), optimizer_state(opt))
    _, _, _, following = sam_step(sam, batches)
    return {
        "skipped": (ok, skipped["skipped"]),
        "bitwise": all(torch.equal(a, b) for a, b in zip(before[1], after[1], strict=True))
        and all(torch.equal(before[0][n], after[0][n]) for n in before[0]),
        "next_no_direction": following["no_direction"],
    }


def _precond(model: list, opt) -> dict[str, torch.Tensor]:
    """P = 1 / (sqrt(v_hat) + eps) from the optimizer's state (one process, fp32)."""
    beta2, eps = ADAM["adam_beta2"], ADAM["adam_eps"]
    names = {id(p): n for n, p in global_param_names(model).items()}
    precond = {}
    for group in opt.optimizer.param_groups:
        for p in group["params"]:
            state = opt.optimizer.state[p]
            v_hat = state["exp_avg_sq"] / (1.0 - beta2 ** int(state["step"]))
            precond[names[id(p)]] = 1.0 / (v_hat.sqrt() + eps)
    return precond


def _layouts(rank: int, world: int, path: str, layouts: dict) -> dict:
    saved = torch.load(path, weights_only=False)
    report = {}
    for name, (parallel, model) in layouts.items():
        use_layout(parallel)
        report[name] = _compared(parallel, saved[model], MODELS[model])
    return report


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("ascent") / "references.pt")


@pytest.fixture(scope="module")
def single(references) -> dict:
    return run_ranks(_single_process, 1, references, timeout=SPAWN_TIMEOUT)[0]


@pytest.fixture(scope="module")
def runs(single, references) -> dict[str, list[dict]]:
    """Each layout's report on every rank."""
    out = {"one process": [single]}
    for world, layouts in ((2, LAYOUTS_2), (4, LAYOUTS_4)):
        ranks = run_ranks(_layouts, world, references, layouts, timeout=SPAWN_TIMEOUT)
        out.update({name: [report[name] for report in ranks] for name in layouts})
    return out


LAYOUTS = ("one process", *LAYOUTS_2, *LAYOUTS_4)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("ascent", ASCENTS)
@pytest.mark.parametrize("form", FORMS)
def test_every_step_equals_the_float64_reference(runs, layout, ascent, form):
    for rank_report in runs[layout]:
        errors = rank_report[f"{ascent}/{form}"]["errors"]
        assert max(errors) <= TOLERANCE, errors


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("ascent", ASCENTS)
@pytest.mark.parametrize("form", FORMS)
def test_one_backward_per_micro_batch_per_step(runs, layout, ascent, form):
    for rank_report in runs[layout]:
        run = rank_report[f"{ascent}/{form}"]
        assert run["backwards"] == [run["micro_batches"]] * STEPS


@pytest.mark.parametrize("ascent", ASCENTS)
def test_the_first_step_is_plain_and_counted(single, ascent):
    for form in FORMS:
        run = single[f"{ascent}/{form}"]
        assert run["no_direction"] == [1.0] + [0.0] * (STEPS - 1)
        sam_cost = 4.0 / 3.0 if "fsam" in form else 1.0
        assert run["passes"] == [1.0] + [pytest.approx(sam_cost)] * (STEPS - 1)


def test_a_sam_phase_is_plain_adamw_before_it_and_sam_in_it(single):
    assert single["phase_plain_bitwise"] == [True] * (PHASE_START + 1)
    assert single["phase_sam_steps"] == [0.0] * (PHASE_START + 1) + [1.0]
    assert single["phase_sam_error"] <= TOLERANCE


@pytest.mark.parametrize("ascent", ASCENTS)
def test_a_nonfinite_clean_pass_skips_the_step(single, ascent):
    report = single["nonfinite"][ascent]
    assert report["skipped"] == (False, 1.0) and report["bitwise"]
    assert report["next_no_direction"] == (1.0 if ascent == "previous" else 0.0)


# ----- configuration and cost: no model ------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        (dict(ascent="previous", on_nonfinite="fallback"), "on_nonfinite='skip'"),
        (dict(ascent="momentum", mode="angle", angle=30.0), "use ascent='gradient'"),
        (dict(ascent="previous", mode="logit"), "use ascent='gradient'"),
        (dict(ascent="previous", mode="angle", angle=60.0, angle_impl="exact"), "mixes in g"),
        (dict(ascent="sideways"), "ascent must be one of"),
        (dict(sam_start_step=-1), "sam_start_step must be a step number"),
        (dict(sam_start_step=10, sam_end_step=10), "must be after sam_start_step"),
    ],
)
def test_bad_settings_are_refused_in_one_line(settings, words):
    with pytest.raises(ValueError) as error:
        SAMConfig(**settings)
    message = str(error.value)
    assert words in message and "\n" not in message


def test_forms_that_need_no_g_take_a_known_direction():
    for settings in (
        dict(mode="fsam"),
        dict(mode="sam"),
        dict(mode="angle", angle=0.0),
        dict(mode="angle", angle=90.0, angle_impl="exact"),
    ):
        SAMConfig(ascent="previous", **settings)


@pytest.mark.parametrize(
    ("settings", "forward_equivalents"),
    [
        (dict(mode="sam"), 6),  # two forward-backward passes
        (dict(mode="fsam"), 6),
        (dict(mode="angle", angle=30.0, angle_impl="exact"), 9),
        (dict(mode="fsam", ascent="previous"), 4),  # a forward, then a forward-backward
        (dict(mode="sam", ascent="momentum"), 3),  # one forward-backward at theta + eps
        (dict(mode="angle", angle=90.0, angle_impl="exact", ascent="previous"), 7),
    ],
)
def test_a_sam_step_costs_its_forwards_and_backwards(settings, forward_equivalents):
    passes = sam_passes(SAMConfig(**settings))
    assert cost_over_plain(passes) == pytest.approx(forward_equivalents / 3)
    # Full activation recomputation adds a forward to each backward: plain 4.
    backwards = sum(passes)
    assert cost_over_plain(passes, 1.0) == pytest.approx((forward_equivalents + backwards) / 4)


def test_planned_passes_follow_the_phase_the_interval_and_the_first_step():
    cfg = SAMConfig(mode="fsam", ascent="previous", sam_start_step=2, sam_end_step=8,
                    sam_interval=2)  # fmt: skip
    plan = [cost_over_plain(planned_passes(cfg, step)) for step in range(10)]
    sam = pytest.approx(4 / 3)
    assert plan == [1, 1, sam, 1, sam, 1, sam, 1, 1, 1]
    first = SAMConfig(mode="fsam", ascent="momentum")
    assert cost_over_plain(planned_passes(first, 0)) == 1.0  # no direction yet


def test_rho_warmup_starts_at_the_phase():
    cfg = SAMConfig(rho=0.08, rho_schedule="linear_warmup", rho_warmup_steps=4, sam_start_step=10)
    assert [rho_at(cfg, s) for s in (0, 9, 10, 11, 14, 20)] == pytest.approx(
        [0.0, 0.0, 0.0, 0.02, 0.08, 0.08]
    )


def test_a_kept_direction_round_trips_through_its_rank_file(tmp_path):
    kept = PreviousGradient()
    kept.kept = [torch.randn(5), torch.randn(3)]
    save_rank_state(kept.rank_state_dict(), tmp_path)
    assert rank_state_path(tmp_path).name == "megatron_fsam_rank00000.pt"
    loaded = PreviousGradient()
    loaded.load_rank_state_dict(load_rank_state(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(loaded.kept, kept.kept, strict=True))
    empty = tmp_path / "paper"  # ascent="gradient" keeps nothing: no file, nothing to load
    empty.mkdir()
    save_rank_state(Direction().rank_state_dict(), empty)
    assert not any(empty.iterdir()) and load_rank_state(empty) is None
