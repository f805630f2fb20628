"""Context parallelism (CP): the SAM step at CP = 2 and at CP = 2 x DP = 2, and Megatron-LM's
pretrain_gpt.py with --context-parallel-size 2, all on gloo CPU ranks.

megatron-core's local attention refuses CP; our layer spec picks `ContextParallelAttention`
(megatron_fsam/compat/cp_attention.py) on the CPU, and Megatron-LM takes it through a
test-only spec (tests/cp_layer_spec.py, `--spec`). One single-process spawn computes the
paper's formulas (tests/reference.py) on the global batch; one 2-rank spawn (CP = 2, with and
without the distributed optimizer) and one 4-rank spawn (CP = 2 x DP = 2, distributed
optimizer) must give the same gradient to the optimizer for sam, fsam, precond fsam and the
exact ANGLE-SAM, record as logit cotangents and replay as micro-batches each CP rank's own
chunks, and reduce the norms and the loss over the data x context parallel ranks.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from megatron.core import parallel_state
from megatron.core.utils import get_batch_on_this_cp_rank, unwrap_model

from megatron_fsam import FuncSAM, SAMConfig
from megatron_fsam.compat.cp_attention import ContextParallelAttention, sequence_positions
from megatron_fsam.trainer.parallel import ParallelConfig, forward_backward_func
from tests import reference
from tests.sam_harness import (
    ADAM,
    SGD,
    build,
    my_batches,
    one_process_model,
    params_of,
    received_gradients,
    refusal_without_finalize,
    relative_error,
    sam_config,
    sam_step,
    use_layout,
)
from tests.spawn import run_ranks
from tests.test_megatron_lm import (
    COMPARED,
    DIRECT_TOLERANCE,
    FSAM,
    NO_DIFF,
    TAG,
    TREE,
    _assert_route_is_the_direct_step,
    _assert_same_params,
    _losses,
    _run,
)

TOLERANCE = 1e-5
SPAWN_TIMEOUT = 1200
RHO, ANGLE = 0.05, 30.0
MODES = {
    "sam": sam_config("sam", precond=False),
    "fsam": sam_config("fsam", precond=False),
    "precond fsam": sam_config("fsam", precond=True),
    "exact angle": SAMConfig(mode="angle", angle=ANGLE, angle_impl="exact", rho=RHO),
}
LAYOUTS_2 = {
    "cp2": ParallelConfig(context_parallel=2),
    "cp2_distopt": ParallelConfig(context_parallel=2, distributed_optimizer=True),
}
LAYOUTS_4 = {"cp2_dp2_distopt": ParallelConfig(context_parallel=2, distributed_optimizer=True)}


# ----- one process: the formulas on the global batch ----------------------------------------


def _single_process(rank: int, world: int, path: str) -> None:
    parallel, batches, gpt, full = one_process_model()
    # Precond: P from the Adam state of one plain step (beta1 = 0: v_hat = g0^2 exactly), the
    # SAM step from the weights that step left.
    g0 = reference.gradient(gpt, full, batches)
    precond = {n: 1.0 / (g0[n].abs() + ADAM["adam_eps"]) for n in g0}
    first, first_opt = build(parallel, full, ADAM)
    assert sam_step(FuncSAM(MODES["precond fsam"], first, first_opt), batches)[0]
    ascent = dict(rho=RHO, precond=precond, precond_norm="perturbation")
    gradients = {
        "sam": reference.sam_gradient(gpt, full, batches, mode="sam", rho=RHO),
        "fsam": reference.sam_gradient(gpt, full, batches, mode="fsam", rho=RHO),
        "precond fsam": reference.sam_gradient(
            gpt, params_of(first), batches, mode="fsam", **ascent
        ),
        "exact angle": reference.angle_gradient(gpt, full, batches, degrees=ANGLE, rho=RHO),
    }
    losses, cotangents = [], []
    for batch in batches:  # each micro-batch's share of the loss, and dL/dlogits [b, s, V]
        logits = reference.logits_at(gpt, full, batch).detach().requires_grad_(True)
        loss = reference.loss_of_logits(logits, batch, len(batches))
        (cotangent,) = torch.autograd.grad(loss, logits)
        losses.append(loss.item() * len(batches))
        cotangents.append(cotangent)
    torch.save(
        {
            "full": full,
            "batches": batches,
            "gradients": gradients,
            "grad_norm": torch.sqrt(sum(g.double().square().sum() for g in g0.values())).item(),
            "losses": losses,
            "cotangents": cotangents,
        },
        path,
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("cp") / "reference.pt")
    run_ranks(_single_process, 1, path, timeout=SPAWN_TIMEOUT)
    return path


# ----- CP layouts ----------------------------------------------------------------------------


class _Probe:
    """A forward_backward_func that notes, per pass, the tokens the first stage embeds and,
    after pass 1, the logit cotangents the gate recorded."""

    def __init__(self) -> None:
        self.sam: FuncSAM | None = None
        self.tokens: list[list[torch.Tensor]] = []
        self.cotangents: dict[int, torch.Tensor] = {}

    def __call__(self, **kwargs):
        embedding = unwrap_model(kwargs["model"][0]).embedding
        seen: list[torch.Tensor] = []
        handle = embedding.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append(kwargs["input_ids"].clone()), with_kwargs=True
        )
        try:
            out = forward_backward_func()(**kwargs)
        finally:
            handle.remove()
        self.tokens.append(seen)
        if len(self.tokens) == 1 and self.sam.gate is not None:  # sam keeps no cotangent
            self.cotangents = {i: c.clone() for i, c in self.sam.gate.clean.cotangents.items()}
        return out


def _own_chunks(probe: _Probe, mine: list[dict], expected_cotangents: list[torch.Tensor]) -> dict:
    """Every pass embedded this rank's chunks of its micro-batches, and pass 1 recorded the
    cotangents of those chunks: the reference's at this rank's positions, times DP x CP (the
    schedule scales by CP and 1 / local micro-batches, DDP averages over DP x CP)."""
    cp_size = parallel_state.get_context_parallel_world_size()
    positions = sequence_positions(
        mine[0]["tokens"].size(1), cp_size, parallel_state.get_context_parallel_rank()
    )
    chunks = [batch["tokens"][:, positions] for batch in mine]
    scale = parallel_state.get_data_parallel_world_size(with_context_parallel=True)
    errors = [
        _relative(probe.cotangents[i], scale * expected[:, positions].transpose(0, 1))
        for i, expected in enumerate(expected_cotangents)
        if probe.cotangents
    ]
    return {
        "pass_tokens": [
            len(tokens) == len(chunks)
            and all(torch.equal(seen, want) for seen, want in zip(tokens, chunks, strict=True))
            for tokens in probe.tokens
        ],
        "cotangent_error": max(errors, default=None),
        "cotangents_recorded": sorted(probe.cotangents) == list(range(len(mine))),
    }


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def _megatron_split(tokens: torch.Tensor) -> torch.Tensor:
    """megatron-core's own split of a batch for this CP rank (0.19 added `is_hybrid_cp`)."""
    extra = (
        {"is_hybrid_cp": False}
        if "is_hybrid_cp" in inspect.signature(get_batch_on_this_cp_rank).parameters
        else {}
    )
    batch = {"tokens": tokens.clone()}
    cp_group = parallel_state.get_context_parallel_group()
    return get_batch_on_this_cp_rank(batch, cp_group=cp_group, **extra)["tokens"]


def _layouts(rank: int, world: int, path: str, layouts: dict) -> dict:
    saved = torch.load(path, weights_only=False)
    full, batches = saved["full"], saved["batches"]
    report: dict = {}
    for name, parallel in layouts.items():
        use_layout(parallel)
        mine = my_batches(batches)
        first = len(mine) * parallel_state.get_data_parallel_rank()  # my_batches' share
        for mode, cfg in MODES.items():
            adam = cfg.precond or parallel.distributed_optimizer
            model, opt = build(parallel, full, ADAM if adam else SGD)
            probe = _Probe()
            sam = probe.sam = FuncSAM(cfg, model, opt, forward_backward_func=probe)
            if cfg.precond:  # the plain warm-up step that creates the Adam state
                assert sam_step(sam, batches)[0]
                probe.tokens = []
            ok, _, _, metrics = sam_step(sam, batches)
            assert ok
            report[(name, mode)] = relative_error(
                received_gradients(model, opt), saved["gradients"][mode]
            )
            report[(name, mode, "chunks")] = _own_chunks(
                probe, mine, saved["cotangents"][first : first + len(mine)]
            )
            if not cfg.precond:  # a step from the reference's weights: ||g|| and the loss
                report[(name, mode, "grad_norm")] = metrics["grad_norm"] / saved["grad_norm"]
                want = sum(saved["losses"][first : first + len(mine)]) / len(mine)
                report[(name, mode, "loss")] = metrics["loss_clean"] / want
        tokens = batches[0]["tokens"]
        positions = sequence_positions(
            tokens.size(1), parallel.context_parallel, parallel_state.get_context_parallel_rank()
        )
        report[(name, "split")] = torch.equal(_megatron_split(tokens), tokens[:, positions])
        attention = unwrap_model(model[0]).decoder.layers[0].self_attention.core_attention
        report[(name, "attention")] = type(attention).__name__
    if world == 2:  # CP = 2, DP = 1: the gradients need finalize_model_grads all the same
        use_layout(LAYOUTS_2["cp2"])
        report["error/no_finalize"] = refusal_without_finalize(*build(LAYOUTS_2["cp2"], full, SGD))
    return report


@pytest.fixture(scope="module")
def world2(saved: str) -> list[dict]:
    return run_ranks(_layouts, 2, saved, LAYOUTS_2, timeout=SPAWN_TIMEOUT)


@pytest.fixture(scope="module")
def world4(saved: str) -> list[dict]:
    return run_ranks(_layouts, 4, saved, LAYOUTS_4, timeout=SPAWN_TIMEOUT)


@pytest.fixture
def reports(request, layout: str) -> list[dict]:
    """Each rank's report of the spawn that ran `layout`."""
    return request.getfixturevalue("world2" if layout in LAYOUTS_2 else "world4")


LAYOUTS = [*LAYOUTS_2, *LAYOUTS_4]
FROM_REFERENCE_WEIGHTS = [mode for mode, cfg in MODES.items() if not cfg.precond]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", list(MODES))
def test_cp_layouts_give_the_reference_gradient(reports, layout, mode):
    for rank, report in enumerate(reports):
        error = report[(layout, mode)]
        print(f"{layout} {mode} rank {rank}: relative error {error:.2e}")
        assert error <= TOLERANCE, (rank, error)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", list(MODES))
def test_each_cp_rank_replays_its_own_chunks(reports, layout, mode):
    """Every pass embeds this rank's chunks of its micro-batches; pass 1 records the logit
    cotangents of those chunks (modes with a logit gate)."""
    passes = 3 if mode == "exact angle" else 2
    for rank, report in enumerate(reports):
        chunks = report[(layout, mode, "chunks")]
        assert chunks["pass_tokens"] == [True] * passes, (rank, chunks)
        if mode == "sam":
            assert not chunks["cotangents_recorded"], (rank, chunks)
        else:
            assert chunks["cotangents_recorded"], (rank, chunks)
            if mode in FROM_REFERENCE_WEIGHTS:
                assert chunks["cotangent_error"] <= TOLERANCE, (rank, chunks)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", FROM_REFERENCE_WEIGHTS)
def test_norms_and_loss_are_reduced_over_data_and_context_parallel_ranks(reports, layout, mode):
    """||g|| (the norm sums' all-reduce) is the global batch's on every rank, and each rank's
    pass-1 loss the mean of its micro-batches over all their tokens (CP-reduced sums and
    token counts), as in one process."""
    for rank, report in enumerate(reports):
        grad_norm, loss = report[(layout, mode, "grad_norm")], report[(layout, mode, "loss")]
        print(f"{layout} {mode} rank {rank}: grad_norm ratio {grad_norm}, loss ratio {loss}")
        assert grad_norm == pytest.approx(1.0, abs=TOLERANCE), rank
        assert loss == pytest.approx(1.0, abs=TOLERANCE), rank


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_layer_spec_picks_cp_attention_and_megatrons_split(reports, layout):
    for report in reports:
        assert report[(layout, "attention")] == ContextParallelAttention.__name__
        assert report[(layout, "split")]


def test_missing_grad_finalisation_is_refused_under_cp_alone(world2):
    for report in world2:
        assert "unset with context parallel size > 1" in report["error/no_finalize"]


# ----- Megatron-LM's pretrain_gpt.py at CP = 2 (2 ranks, through tests/cp_layer_spec.py) -----

megatron_lm = pytest.mark.skipif(
    TAG is None or not (TREE / "pretrain_gpt.py").is_file(),
    reason=f"no Megatron-LM tree for this megatron-core at {TREE} (set MEGATRON_LM_DIR)",
)
CP2 = ["--context-parallel-size", "2", "--spec", "cp_layer_spec", "LAYER_SPEC"]


@megatron_lm
def test_megatron_lm_cp2_rho0_is_plain_megatron_lm(tmp_path):
    """--sam-rho 0 through the no-diff route: the losses and weights of the script run as it
    is, bit for bit, at every iteration's end."""
    _, plain = _run(tmp_path, TREE, *CP2, record="plain")
    _, rho0 = _run(
        tmp_path, TREE, *CP2, "--sam-mode", "fsam", "--sam-rho", "0", driver=NO_DIFF, record="rho0"
    )
    losses = _losses(plain)
    print(f"Megatron-LM CP=2 losses, plain: {losses}; --sam-rho 0: {_losses(rho0)}")
    assert len(losses) == 5 and all(math.isfinite(x) for x in losses), losses
    assert _losses(rho0) == losses
    for rank_plain, rank_rho0 in zip(plain, rho0, strict=True):
        _assert_same_params(rank_plain["after"], rank_rho0["after"])


@megatron_lm
def test_megatron_lm_cp2_fsam_trains_as_funcsam_train_step(tmp_path):
    """Func-SAM (precond) at CP = 2 trains, its iteration DIRECT_AT through Megatron-LM's
    train_step equals FuncSAM.train_step called directly on the same state, and the logged
    pass-1 loss (averaged over the CP ranks' chunks) is Megatron-LM's."""
    tensorboard = tmp_path / "tb"
    output, records = _run(
        tmp_path, TREE, *CP2, *FSAM, "--tensorboard-dir", str(tensorboard), driver=COMPARED,
        record="fsam",
    )  # fmt: skip
    losses = _losses(records)
    print(f"Megatron-LM CP=2 losses, fsam precond rho 0.05: {losses}")
    _assert_route_is_the_direct_step(records, tolerance=DIRECT_TOLERANCE)
    assert len(losses) == 5 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert output.count(" sam eps_norm: 0.0500 |") == 5, output[-3000:]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tensorboard)).Reload()
    pass1_loss = [e.value for e in events.Scalars("sam/loss_clean")]
    assert pass1_loss == pytest.approx(losses, rel=1e-6)
