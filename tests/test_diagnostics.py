"""Diagnostics against exact second-order quantities, and the same numbers in every layout.

The reference differentiates twice with ``functional_call`` and ``torch.autograd.grad``
through the single-process Megatron model: torch.func transforms reject Megatron's custom
autograd functions, but at TP=1 their backward is differentiable. A model small enough
(500 parameters) for the full Hessian and Gauss-Newton matrix gives exact taus,
lambda_max and traces. It is first trained a few Adam steps on its batches: at
initialisation this model's H_G u and H_F u nearly cancel (tau_logit = 32.6,
tau_cross = -64.6), where the taus say little and amplify every error.

One single-process spawn compares the finite-difference diagnostics with the exact values
and saves weights, batches and results; one 4-rank spawn recomputes everything under
TP2 x PP2 and under PP2 x DP2 with the distributed optimizer. A spawn trains the tiny
config for six steps and runs diagnose.py and plot.py on its checkpoints.

A last 2-rank spawn does the same for a mixture-of-experts model with an expert bias, router
losses and a multi-token-prediction layer: the diagnostics agree between EP=1, EP=2 (two stats
groups: experts without the distributed optimizer) and EP=2 with the distributed optimizer,
leave the weights and the expert bias as they found them, the logit pass is J^T c alone (the
router losses left out), and diagnose.py runs on a checkpoint of launch/pretrain.py.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from megatron.core import parallel_state

from megatron_fsam.backends.megatron import reset_loss_trackers
from megatron_fsam.backends.megatron_weights import full_state, global_param_names, load_full_state
from megatron_fsam.diagnostics import (
    GradientProbe,
    ModelShards,
    evaluate_loss,
    hessian_metrics,
    magnitude_thresholds,
    pruning_curve,
    sharpness_composition,
)
from megatron_fsam.diagnostics.hessian import _products
from megatron_fsam.diagnostics.sharpness import composition, sharpness_deltas
from megatron_fsam.trainer.checkpoint import load_checkpoint
from megatron_fsam.trainer.data import microbatch_iterator
from megatron_fsam.trainer.models.gpt import (
    GPTConfig,
    build_model_chunks,
    forward_step,
    transformer_config,
)
from megatron_fsam.trainer.parallel import (
    ParallelConfig,
    build_optimizer,
    forward_backward_func,
    wrap_model,
)
from tests import reference
from tests.sam_harness import expert_biases, my_batches, use_layout
from tests.spawn import run_ranks

SMALL = GPTConfig(
    num_layers=2,
    hidden_size=4,
    num_attention_heads=2,
    ffn_hidden_size=16,
    vocab_size=16,
    seq_length=8,
)
MICRO_BATCH, MICROBATCHES = 2, 4
H_FORWARD, H_CENTRAL, H_HESSIAN = 3e-4, 3e-4, 1e-3
TRAIN_STEPS, TRAIN_LR = 30, 3e-2
SPARSITIES = [0.0, 0.3, 0.6, 0.9]
TAU_KEYS = ("tau_logit", "tau_func", "tau_cross")
LAYOUTS = {
    "tp2_pp2": ParallelConfig(tensor_parallel=2, pipeline_parallel=2),
    "pp2_dp2_distopt": ParallelConfig(pipeline_parallel=2, distributed_optimizer=True),
}
# Finite differences divide the layouts' different fp32 rounding by h: measured up to 2e-4
# (relative, on |H_F u|) between TP2 x PP2 and one process.
LAYOUT_TOLERANCE = 1e-3


def _batches(count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        stream = torch.randint(
            0, SMALL.vocab_size, (MICRO_BATCH, SMALL.seq_length + 1), generator=generator
        )
        mask = (torch.rand(MICRO_BATCH, SMALL.seq_length, generator=generator) > 0.2).float()
        out.append(
            {
                "tokens": stream[:, :-1].contiguous(),
                "labels": stream[:, 1:].contiguous(),
                "loss_mask": mask,
                "position_ids": torch.arange(SMALL.seq_length).expand(MICRO_BATCH, -1).contiguous(),
            }
        )
    return out


def _build(parallel: ParallelConfig, full: dict[str, torch.Tensor]):
    config = transformer_config(SMALL, parallel)
    chunks = build_model_chunks(SMALL, config, parallel)
    load_full_state(chunks, full)
    model = wrap_model(chunks, config, parallel)
    optimizer = (
        dict(name="adam", lr=1e-3, distributed_optimizer=True)
        if parallel.distributed_optimizer
        else dict(name="sgd", lr=1.0)
    )
    return model, build_optimizer(model, **optimizer)


def _trained(parallel: ParallelConfig, full: dict[str, torch.Tensor], batches: list) -> dict:
    """Weights after TRAIN_STEPS plain Adam steps on `batches`."""
    config = transformer_config(SMALL, parallel)
    chunks = build_model_chunks(SMALL, config, parallel)
    load_full_state(chunks, full)
    model = wrap_model(chunks, config, parallel)
    optimizer = build_optimizer(model, name="adam", lr=TRAIN_LR)
    for _ in range(TRAIN_STEPS):
        for chunk in model:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(batches),
            model=model,
            forward_only=False,
            **_schedule(batches),
        )
        optimizer.step()
    return full_state(model)


def _schedule(batches: list) -> dict[str, int]:
    return dict(
        num_microbatches=len(batches), seq_length=SMALL.seq_length, micro_batch_size=MICRO_BATCH
    )


# ----- exact references ---------------------------------------------------------------------


def _rows(outputs: torch.Tensor, params: list[torch.Tensor], chunk: int = 125) -> torch.Tensor:
    """d outputs / d params as a dense [outputs, params] matrix, one batched backward per chunk."""
    rows = []
    for start in range(0, outputs.numel(), chunk):
        count = min(chunk, outputs.numel() - start)
        seeds = torch.zeros(count, outputs.numel())
        seeds[torch.arange(count), torch.arange(start, start + count)] = 1.0
        grads = torch.autograd.grad(
            outputs, params, seeds, retain_graph=True, is_grads_batched=True
        )
        rows.append(torch.cat([g.reshape(count, -1) for g in grads], dim=1))
    return torch.cat(rows).double()


def _exact(gpt, full: dict[str, torch.Tensor], batches: list[dict]) -> dict:
    """Gradient, full Hessian and Gauss-Newton matrix of the global loss (names order)."""
    params = {n: t.detach().clone().requires_grad_(True) for n, t in full.items()}
    leaves = list(params.values())
    logits = [reference.logits_at(gpt, params, b) for b in batches]
    pairs = zip(logits, batches, strict=True)
    loss = sum(reference.loss_of_logits(out, b, len(batches)) for out, b in pairs)
    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, leaves, create_graph=True)])
    hessian = _rows(grad, leaves)
    jacobian = _rows(torch.cat([out.reshape(-1) for out in logits]), leaves)
    blocks = []  # H_out per token: a (diag p - p p^T), a = mask / sum(mask) / #micro-batches
    for out, batch in zip(logits, batches, strict=True):
        p = torch.softmax(out.detach().double(), dim=-1).reshape(-1, SMALL.vocab_size)
        mask = batch["loss_mask"].reshape(-1).double()
        weight = mask / mask.sum() / len(batches)
        blocks.append(weight[:, None, None] * (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]))
    h_out = torch.block_diag(*torch.cat(blocks))
    return {
        "grad": grad.detach().double(),
        "hessian": (hessian + hessian.T) / 2,
        "ggn": jacobian.T @ h_out @ jacobian,
    }


def _taus(delta_logit: torch.Tensor, delta_func: torch.Tensor) -> dict[str, float]:
    total = (delta_logit + delta_func).square().sum()
    return {
        "tau_logit": (delta_logit.square().sum() / total).item(),
        "tau_func": (delta_func.square().sum() / total).item(),
        "tau_cross": (2 * delta_logit @ delta_func / total).item(),
    }


def _full_vector(shards: ModelShards, vector: list[torch.Tensor], names: list[str]) -> torch.Tensor:
    """A single-process vector in the reference's parameter order."""
    by_name = {span.name: v for span, v in zip(shards.spans, vector, strict=True)}
    return torch.cat([by_name[n].reshape(-1) for n in names]).double()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ----- the diagnostics in one layout ----------------------------------------------------------


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in global_param_names(model).items()}


def _untouched(model, before: dict[str, torch.Tensor], rng: torch.Tensor) -> bool:
    """Bit-identical weights, zeroed gradient buffers, the same RNG state."""
    same = all(torch.equal(p, before[n]) for n, p in global_param_names(model).items())
    zero = all(not p.main_grad.any() for p in global_param_names(model).values())
    return same and zero and torch.equal(torch.get_rng_state(), rng)


def _diagnose(model, optimizer, batches: list) -> dict:
    """Every diagnostic on this rank's batches, and whether each left the model untouched."""
    schedule = _schedule(batches)
    out: dict = {"untouched": {}}
    for name, central, h in (("forward", False, H_FORWARD), ("central", True, H_CENTRAL)):
        before, rng = _snapshot(model), torch.get_rng_state()
        out[name] = sharpness_composition(
            model, optimizer, forward_step, batches, h=h, central=central, **schedule
        )
        out["untouched"][name] = _untouched(model, before, rng)
    before, rng = _snapshot(model), torch.get_rng_state()
    out["hessian"] = hessian_metrics(
        model, optimizer, forward_step, batches, h=H_HESSIAN, trace_samples=8, **schedule
    )
    out["untouched"]["hessian"] = _untouched(model, before, rng)

    before = _snapshot(model)
    out["plain_loss"] = evaluate_loss(model, forward_step, batches, **schedule)
    out["pruning"] = pruning_curve(model, optimizer, forward_step, batches, SPARSITIES, **schedule)
    out["untouched"]["pruning"] = _untouched(model, before, torch.get_rng_state())
    with ModelShards(model, optimizer) as shards:
        out["thresholds"] = magnitude_thresholds(shards, SPARSITIES)
    return out


# SMALL's weights of two or more dimensions (the embeddings and the linear layers), written
# out from its parameter names: pruning keeps the LayerNorm weights (1-D, "as is usual").
PRUNABLE = [
    "embedding.word_embeddings.weight",
    "embedding.position_embeddings.weight",
    *(
        f"decoder.layers.{layer}.{weight}.weight"
        for layer in range(SMALL.num_layers)
        for weight in (
            "self_attention.linear_qkv",
            "self_attention.linear_proj",
            "mlp.linear_fc1",
            "mlp.linear_fc2",
        )
    ),
]


def _expected_thresholds(full: dict[str, torch.Tensor]) -> list[tuple[float, int]]:
    """(threshold, prunable count) per sparsity from the whole model's weights: the
    floor(s N)-th smallest magnitude among the N weights of PRUNABLE (-1 when none)."""
    magnitudes = torch.cat([full[n].abs().reshape(-1) for n in PRUNABLE])
    count = magnitudes.numel()
    return [
        (magnitudes.kthvalue(int(s * count)).values.item() if int(s * count) else -1.0, count)
        for s in SPARSITIES
    ]


def _single_process(rank: int, world: int, path: str) -> dict:
    parallel = ParallelConfig()
    use_layout(parallel)
    batches = _batches(MICROBATCHES)
    gpt = build_model_chunks(SMALL, transformer_config(SMALL, parallel), parallel)[0]
    full = _trained(parallel, full_state([gpt]), batches)
    names = list(full)
    exact = _exact(gpt, full, batches)
    hessian, ggn = exact["hessian"], exact["ggn"]
    u = exact["grad"] / exact["grad"].norm()
    delta_logit, delta_func = ggn @ u, hessian @ u - ggn @ u

    model, optimizer = _build(parallel, full)
    report = _diagnose(model, optimizer, batches)
    report["exact"] = {
        "central": _taus(delta_logit, delta_func),
        "grad_norm": exact["grad"].norm().item(),
        "curvature_logit": (u @ delta_logit).item(),
        "curvature_func": (u @ delta_func).item(),
        "delta_logit_norm": delta_logit.norm().item(),
        "delta_func_norm": delta_func.norm().item(),
        "lambda_max": torch.linalg.eigvalsh(hessian)[-1].item(),
        "trace_hessian": hessian.trace().item(),
        "trace_ggn": ggn.trace().item(),
    }
    # The finite-difference vectors themselves, and the exact quadratic forms of the
    # very Rademacher vectors that Hutchinson drew (seeds 1.. of hessian_metrics).
    errors = {}
    with GradientProbe(model, optimizer, forward_step, batches, **_schedule(batches)) as probe:
        for name, central, h in (("forward", False, H_FORWARD), ("central", True, H_CENTRAL)):
            d = sharpness_deltas(probe, h, central)
            errors[f"{name}/delta_logit"] = _relative(
                _full_vector(probe, d.delta_logit, names), delta_logit
            )
            errors[f"{name}/delta_func"] = _relative(
                _full_vector(probe, d.delta_func, names), delta_func
            )
        samples = [_full_vector(probe, probe.random(1 + i), names) for i in range(8)]
    report["exact"]["samples_hessian"] = [(v @ hessian @ v).item() for v in samples]
    report["exact"]["samples_ggn"] = [(v @ ggn @ v).item() for v in samples]
    report["errors"] = errors
    report["expected_thresholds"] = _expected_thresholds(full)
    torch.save({"full": full, "batches": batches, "report": report}, path)
    return report


def _layouts(rank: int, world: int, path: str) -> dict:
    saved = torch.load(path, weights_only=False)
    out = {}
    for name, parallel in LAYOUTS.items():
        use_layout(parallel)
        model, optimizer = _build(parallel, saved["full"])
        out[name] = _diagnose(model, optimizer, my_batches(saved["batches"]))
        out[name]["last_stage"] = parallel_state.is_pipeline_last_stage()
    return out


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("diagnostics") / "single.pt")
    (report,) = run_ranks(_single_process, 1, path)
    return path, report


@pytest.fixture(scope="module")
def layouts(single):
    return run_ranks(_layouts, 4, single[0])


# ----- single process against exact products --------------------------------------------------


@pytest.mark.parametrize("name, tolerance", [("forward", 2e-2), ("central", 2e-3)])
def test_finite_difference_deltas_match_exact_products(single, name, tolerance):
    errors = single[1]["errors"]
    assert errors[f"{name}/delta_logit"] < tolerance, errors
    assert errors[f"{name}/delta_func"] < tolerance, errors


@pytest.mark.parametrize("name, tolerance", [("forward", 1e-2), ("central", 1e-3)])
def test_taus_match_exact(single, name, tolerance):
    report = single[1]
    exact = report["exact"]["central"]
    for key in TAU_KEYS:
        assert abs(report[name][key] - exact[key]) < tolerance, (key, report[name], exact)


@pytest.mark.parametrize("name, tolerance", [("forward", 2e-2), ("central", 2e-3)])
def test_curvatures_and_gradient_norm_match_exact(single, name, tolerance):
    """u'H_G u and u'H_F u within the deltas' own tolerance (above) times |H_G u| and |H_F u|
    (|u'(d - d_exact)| <= |d - d_exact|); |g| in fp32 against fp64."""
    got, exact = single[1][name], single[1]["exact"]
    for kind in ("logit", "func"):
        error = abs(got[f"curvature_{kind}"] - exact[f"curvature_{kind}"])
        assert error < tolerance * exact[f"delta_{kind}_norm"], (kind, got, exact)
    assert got["grad_norm"] == pytest.approx(exact["grad_norm"], rel=1e-6)


def test_lambda_max_matches_exact(single):
    report = single[1]
    metrics, exact = report["hessian"], report["exact"]["lambda_max"]
    assert metrics.lanczos_converged  # a Ritz residual within lanczos_tol = 1e-3 of lambda
    assert metrics.lambda_max == pytest.approx(exact, rel=1e-3)  # measured 1.0e-4


def test_hutchinson_samples_match_exact_quadratic_forms(single):
    report = single[1]
    metrics, exact = report["hessian"], report["exact"]
    assert metrics.samples_hessian == pytest.approx(exact["samples_hessian"], rel=1e-3)
    assert metrics.samples_ggn == pytest.approx(exact["samples_ggn"], rel=1e-3)


@pytest.mark.parametrize("which", ["hessian", "ggn"])
def test_traces_within_hutchinson_standard_error(single, which):
    metrics, exact = single[1]["hessian"].scalars(), single[1]["exact"]
    error = abs(metrics[f"trace_{which}"] - exact[f"trace_{which}"])
    assert error < 2 * metrics[f"trace_{which}_stderr"], (metrics, exact)


def test_diagnostics_leave_the_model_untouched(single):
    assert all(single[1]["untouched"].values()), single[1]["untouched"]


def test_pruning_threshold_and_losses(single):
    report = single[1]
    got = [(t.value, t.prunable) for t in report["thresholds"]]
    assert got == report["expected_thresholds"]
    points = report["pruning"]
    assert points[0].pruned_fraction == 0.0 and points[0].loss == report["plain_loss"]
    for point in points[1:]:
        assert point.pruned_fraction == pytest.approx(point.sparsity, abs=1e-2)
    assert points[-1].loss > points[0].loss


# ----- every layout equals the single process -------------------------------------------------


def _same_composition(got: dict[str, float], want: dict[str, float]) -> bool:
    """Equal up to fp32 rounding divided by h: taus (fractions of 1) to LAYOUT_TOLERANCE,
    norms relatively, curvatures (possibly near 0) relative to the size of H u."""
    scale = want["delta_logit_norm"] + want["delta_func_norm"]
    return (
        all(abs(got[k] - want[k]) < LAYOUT_TOLERANCE for k in TAU_KEYS)
        and all(
            math.isclose(got[k], want[k], rel_tol=LAYOUT_TOLERANCE)
            for k in ("grad_norm", "delta_logit_norm", "delta_func_norm")
        )
        and all(
            abs(got[k] - want[k]) < LAYOUT_TOLERANCE * scale
            for k in ("curvature_logit", "curvature_func")
        )
    )


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_taus_equal_single_process(single, layouts, layout):
    for rank_report in layouts:
        for name in ("forward", "central"):
            got, want = rank_report[layout][name], single[1][name]
            assert _same_composition(got, want), (name, got, want)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_hessian_metrics_equal_single_process(single, layouts, layout):
    want = single[1]["hessian"]
    for rank_report in layouts:
        got = rank_report[layout]["hessian"]
        assert got.lambda_max == pytest.approx(want.lambda_max, rel=LAYOUT_TOLERANCE)
        assert got.samples_hessian == pytest.approx(want.samples_hessian, rel=LAYOUT_TOLERANCE)
        assert got.samples_ggn == pytest.approx(want.samples_ggn, rel=LAYOUT_TOLERANCE)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_pruning_equals_single_process(single, layouts, layout):
    want = single[1]
    for rank_report in layouts:
        report = rank_report[layout]
        thresholds = [(t.value, t.prunable) for t in report["thresholds"]]
        assert thresholds == want["expected_thresholds"]
        assert [p.pruned_fraction for p in report["pruning"]] == [
            p.pruned_fraction for p in want["pruning"]
        ]
        for got, ref in zip(report["pruning"], want["pruning"], strict=True):
            assert got.loss == pytest.approx(ref.loss, rel=1e-5)
        assert report["pruning"][0].loss == report["plain_loss"]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_diagnostics_leave_the_model_untouched(layouts, layout):
    for rank_report in layouts:
        assert all(rank_report[layout]["untouched"].values()), rank_report[layout]["untouched"]


# ----- the command-line tools on a short run ---------------------------------------------------


def _in_process(config: str, overrides: list[str], checkpoint: str, hessian: dict) -> dict:
    """Central-difference taus (h 1e-3) and, with `hessian` (hessian_metrics' settings),
    lambda_max and the Hutchinson samples, computed here without diagnose.py: the model set
    up as pretrain.py does, `checkpoint` (an iter_ directory) loaded, the first global batch
    of the train split (this rank's micro-batches)."""
    from launch import pretrain

    parallel_state.destroy_model_parallel()
    quiet = [f"checkpoint.{key}=null" for key in ("load_dir", "save_dir", "save_interval")]
    run = pretrain.setup(config, [*overrides, *quiet, "logging.tensorboard_dir=null"])
    assert load_checkpoint(checkpoint, run.model, run.optimizer) is not None
    mbs = run.cfg.train.micro_batch_size
    source = microbatch_iterator(run.data.train, mbs, dp_rank=run.dp_rank, dp_size=run.dp_size)
    batches = [next(source) for _ in range(run.num_microbatches)]
    schedule = dict(
        num_microbatches=run.num_microbatches,
        seq_length=run.cfg.model.seq_length,
        micro_batch_size=mbs,
    )
    args = (run.model, run.optimizer, forward_step, batches)
    out = {"taus": sharpness_composition(*args, h=1e-3, central=True, **schedule)}
    if hessian:
        metrics = hessian_metrics(*args, h=1e-3, seed=0, **hessian, **schedule)
        out["lambda_max"], out["samples_ggn"] = metrics.lambda_max, metrics.samples_ggn
    return out


# diagnose.py's numbers against those computed in-process on the same checkpoint: the same
# deterministic passes on the same weights and batches, so equal (measured: bit for bit).
SAME_RUN = 1e-9


def _same_taus(record: dict, here: dict) -> None:
    for key in (*TAU_KEYS, "grad_norm", "curvature_logit", "curvature_func"):
        assert record["results"][key] == pytest.approx(here["taus"][key], rel=SAME_RUN), key


def _same_hessian(record: dict, here: dict) -> None:
    results = record["results"]
    assert results["lambda_max"] == pytest.approx(here["lambda_max"], rel=SAME_RUN)
    assert results["samples_ggn"] == pytest.approx(here["samples_ggn"], rel=SAME_RUN)


def _cli_run(rank: int, world: int, work: str) -> dict:
    """Train the tiny config with two checkpoints, then diagnose and plot them; the taus of
    both checkpoints and the Hessian metrics of the last computed again in-process."""
    from launch import diagnose, plot, pretrain

    config = str(Path(__file__).resolve().parents[1] / "configs" / "tiny_test.yaml")
    common = [f"data.cache_dir={work}/cache"]
    saving = [f"checkpoint.save_dir={work}/ckpt", "checkpoint.save_interval=3"]
    assert pretrain.main(["--config", config, *common, *saving]) == 0
    commands = {
        "taus": ["--all-iterations", "taus", "--central"],
        "hessian": ["hessian", "--trace-samples", "2", "--lanczos-iters", "3"],
        "prune": ["prune", "--sparsities", "0,0.5", "--eval-steps", "1", "--plot", f"{work}/p.png"],
    }
    for name, args in commands.items():
        parallel_state.destroy_model_parallel()
        log = ["--json", f"{work}/{name}.jsonl"]
        where = ["--config", config, "--checkpoint", f"{work}/ckpt", *log]
        assert diagnose.main([*where, *args, *common]) == 0
    plot.plot_taus([f"{work}/taus.jsonl"], f"{work}/t.png")
    records = {name: plot.read_jsonl(f"{work}/{name}.jsonl", name) for name in commands}
    lanczos = dict(lanczos_iters=3, trace_samples=2)
    records["in_process"] = {
        iteration: _in_process(
            config, common, f"{work}/ckpt/iter_{iteration:07d}", lanczos if iteration == 6 else {}
        )
        for iteration in (3, 6)
    }
    return records


def test_command_line_tools(tmp_path):
    records = run_ranks(_cli_run, 1, str(tmp_path))[0]
    assert [r["iteration"] for r in records["taus"]] == [3, 6]
    here = records["in_process"]
    assert here[3]["taus"]["tau_logit"] != here[6]["taus"]["tau_logit"]  # two distinct weights
    for record in records["taus"]:
        _same_taus(record, here[record["iteration"]])
    assert records["hessian"][0]["iteration"] == 6
    _same_hessian(records["hessian"][0], here[6])
    assert len(records["hessian"][0]["results"]["samples_ggn"]) == 2
    points = records["prune"][0]["results"]["points"]
    assert [p["pruned_fraction"] for p in points] == [0.0, pytest.approx(0.5, abs=1e-3)]
    assert (tmp_path / "p.png").stat().st_size > 0 and (tmp_path / "t.png").stat().st_size > 0


def test_angle_taus_split_the_gradient_the_angle_follows():
    """sin(phi) delta_logit + cos(phi) delta_func, split like the plain taus."""
    logit_sq, func_sq, cross = 4.0, 1.0, -0.5
    plain = composition(logit_sq, func_sq, cross)
    assert sum(plain.values()) == pytest.approx(1.0)
    assert composition(logit_sq, func_sq, cross, angle=0.0) == {
        "angle_tau_logit": 0.0, "angle_tau_func": 1.0, "angle_tau_cross": 0.0
    }  # fmt: skip
    assert composition(logit_sq, func_sq, cross, angle=90.0)["angle_tau_logit"] == 1.0
    at_45 = composition(logit_sq, func_sq, cross, angle=45.0)  # SAM: both paths, equal weight
    assert [at_45[f"angle_{k}"] for k in plain] == pytest.approx(list(plain.values()))
    sin, cos = math.sin(math.radians(30)), math.cos(math.radians(30))
    a, b = torch.tensor([2.0, 0.0]), torch.tensor([-0.25, 0.9682458365518543])  # |a|^2=4, |b|^2=1
    mixed = sin * a + cos * b
    at_30 = composition(logit_sq, func_sq, cross, angle=30.0)
    assert at_30["angle_tau_logit"] == pytest.approx(
        (sin * a).square().sum().item() / mixed.square().sum().item(), rel=1e-6
    )


# ----- mixture of experts: two ranks ----------------------------------------------------------

MOE_SMALL = dataclasses.replace(
    SMALL,
    num_experts=4,
    moe_router_topk=2,
    moe_ffn_hidden_size=8,
    moe_router_score_function="sigmoid",
    moe_router_enable_expert_bias=True,
    moe_aux_loss_coeff=1e-2,
    moe_z_loss_coeff=1e-3,
    mtp_num_layers=1,
)
NO_ROUTER_LOSSES = dataclasses.replace(MOE_SMALL, moe_aux_loss_coeff=0.0, moe_z_loss_coeff=None)
MOE_LAYOUTS = {
    "ep1": ParallelConfig(),  # DP 2, every rank holds every expert: the reference
    "ep2": ParallelConfig(expert_parallel=2),  # dense and expert stats groups differ
    "ep2_distopt": ParallelConfig(expert_parallel=2, distributed_optimizer=True),
}
MOE_H = 3e-4


def _moe_build(parallel: ParallelConfig, full: dict, model: GPTConfig = MOE_SMALL):
    reset_loss_trackers()  # megatron-core's trackers are sized by the first model's depth
    config = transformer_config(model, parallel)
    chunks = build_model_chunks(model, config, parallel)
    load_full_state(chunks, full)
    wrapped = wrap_model(chunks, config, parallel)
    optimizer = dict(name="adam", lr=1e-3, distributed_optimizer=parallel.distributed_optimizer)
    return wrapped, build_optimizer(wrapped, **optimizer)


def _setexpert_biases(model) -> None:
    """A bias that changes routing, the same on every rank and in every layout."""
    routers = [
        m for chunk in model for m in chunk.modules() if getattr(m, "expert_bias", None) is not None
    ]
    for i, router in enumerate(routers):
        values = torch.tensor([0.02, -0.01, 0.0, 0.01]).roll(i)
        router.expert_bias.copy_(values)


def _moe_diagnose(model, optimizer, batches: list) -> dict:
    schedule = dict(
        num_microbatches=len(batches), seq_length=SMALL.seq_length, micro_batch_size=MICRO_BATCH
    )
    biases = expert_biases(model)
    before, rng = _snapshot(model), torch.get_rng_state()
    out = {
        "taus": sharpness_composition(
            model, optimizer, forward_step, batches, h=MOE_H, central=True, **schedule
        ),
        "hessian": hessian_metrics(
            model, optimizer, forward_step, batches, h=H_HESSIAN, lanczos_iters=4,
            trace_samples=2, **schedule,
        ),
        "pruning": pruning_curve(model, optimizer, forward_step, batches, SPARSITIES, **schedule),
    }  # fmt: skip
    with ModelShards(model, optimizer) as shards:
        out["thresholds"] = magnitude_thresholds(shards, SPARSITIES)
        out["groups"] = len(shards.backend.stats_groups)
    out["untouched"] = _untouched(model, before, rng)
    out["bias_kept"] = all(
        torch.equal(a, b) for a, b in zip(expert_biases(model), biases, strict=True)
    )
    out["bias_moves"] = any(b.abs().sum() > 0 for b in biases)
    return out


def _products_along_a_fixed_vector(model, optimizer, batches: list) -> dict:
    """H v and GGN v (central differences) along one Rademacher vector, on this rank."""
    schedule = dict(
        num_microbatches=len(batches), seq_length=SMALL.seq_length, micro_batch_size=MICRO_BATCH
    )
    with GradientProbe(model, optimizer, forward_step, batches, **schedule) as probe:
        v = probe.random(seed=7)
        (norm_sq,) = probe.dots([(v, v)])
        hv, ggn_v = _products(probe, v, math.sqrt(norm_sq), H_HESSIAN, ggn=True)
        return {"hessian": hv, "ggn": ggn_v}


def _moe_cli(rank: int, work: str) -> dict:
    """launch/pretrain.py trains the MoE demo shape for 2 steps; diagnose.py runs on it."""
    from launch import diagnose, pretrain

    config = str(Path(__file__).resolve().parents[1] / "configs" / "moe_demo_cpu.yaml")
    small = [
        "model.hidden_size=32", "model.ffn_hidden_size=64", "model.moe_ffn_hidden_size=32",
        "model.seq_length=32", "data.vocab_size=512", "data.max_documents=8",
        "train.micro_batch_size=2", "train.global_batch_size=8", "train.train_steps=2",
        "train.eval_iters=1", "optimizer.lr_warmup_steps=1", "sam.rho_warmup_steps=1",
        "diagnostics.sharpness_interval=null", "logging.tensorboard_dir=null",
        f"data.cache_dir={work}/cache",
    ]  # fmt: skip
    saving = [f"checkpoint.save_dir={work}/ckpt", "checkpoint.save_interval=null"]
    assert pretrain.main(["--config", config, *small, *saving]) == 0
    commands = {
        "taus": ["taus", "--central"],
        "hessian": ["hessian", "--trace-samples", "2", "--lanczos-iters", "2"],
        "prune": ["prune", "--sparsities", "0,0.5", "--eval-steps", "1"],
    }
    out = {}
    for name, args in commands.items():
        parallel_state.destroy_model_parallel()
        log = f"{work}/{name}.jsonl"
        where = ["--config", config, "--checkpoint", f"{work}/ckpt", "--json", log]
        assert diagnose.main([*where, *args, *small]) == 0
        if rank == 0:
            from launch import plot

            out[name] = plot.read_jsonl(log, name)
    lanczos = dict(lanczos_iters=2, trace_samples=2)
    here = _in_process(config, small, f"{work}/ckpt/iter_0000002", lanczos)
    if rank == 0:
        out["in_process"] = here
    return out


def _moe_two_ranks(rank: int, world: int, work: str) -> dict:
    use_layout(ParallelConfig())
    reset_loss_trackers()
    one = ParallelConfig()
    full = full_state(build_model_chunks(MOE_SMALL, transformer_config(MOE_SMALL, one), one))
    batches = my_batches(_batches(MICROBATCHES))
    report: dict = {}
    for name, parallel in MOE_LAYOUTS.items():
        use_layout(parallel)
        model, optimizer = _moe_build(parallel, full)
        _setexpert_biases(model)
        report[name] = _moe_diagnose(model, optimizer, batches)
    # A pass that back-propagates a chosen logit cotangent gives J^T c alone: GGN v is the
    # same with and without router losses, H v is not (it has their curvature). Two stats
    # groups here.
    use_layout(MOE_LAYOUTS["ep2"])
    products = {}
    for label, model_cfg in (("with", MOE_SMALL), ("without", NO_ROUTER_LOSSES)):
        model, optimizer = _moe_build(MOE_LAYOUTS["ep2"], full, model_cfg)
        _setexpert_biases(model)
        products[label] = _products_along_a_fixed_vector(model, optimizer, batches)
    report["router_losses"] = {}
    for key in ("hessian", "ggn"):
        with_, without = (torch.cat(products[label][key]) for label in ("with", "without"))
        report["router_losses"][key] = ((with_ - without).norm() / without.norm()).item()
    parallel_state.destroy_model_parallel()
    report["cli"] = _moe_cli(rank, work)
    return report


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    return run_ranks(_moe_two_ranks, 2, str(tmp_path_factory.mktemp("moe")))


@pytest.mark.parametrize("layout", ["ep2", "ep2_distopt"])
def test_moe_diagnostics_equal_in_every_expert_layout(moe, layout):
    for rank_report in moe:
        got, want = rank_report[layout], rank_report["ep1"]
        assert _same_composition(got["taus"], want["taus"]), (got["taus"], want["taus"])
        hessian, reference = got["hessian"], want["hessian"]
        assert hessian.lambda_max == pytest.approx(reference.lambda_max, rel=LAYOUT_TOLERANCE)
        assert hessian.samples_hessian == pytest.approx(
            reference.samples_hessian, rel=LAYOUT_TOLERANCE
        )
        assert hessian.samples_ggn == pytest.approx(reference.samples_ggn, rel=LAYOUT_TOLERANCE)
        assert [t.value for t in got["thresholds"]] == [t.value for t in want["thresholds"]]
        for point, ref in zip(got["pruning"], want["pruning"], strict=True):
            assert point.pruned_fraction == ref.pruned_fraction
            assert point.loss == pytest.approx(ref.loss, rel=1e-5)
    assert [r["ep2"]["groups"] for r in moe] == [2, 2]  # experts sum over their own group
    assert [r["ep2_distopt"]["groups"] for r in moe] == [1, 1]


@pytest.mark.parametrize("layout", list(MOE_LAYOUTS))
def test_moe_diagnostics_leave_weights_and_expert_bias_untouched(moe, layout):
    for rank_report in moe:
        report = rank_report[layout]
        assert report["untouched"] and report["bias_kept"] and report["bias_moves"]


def test_moe_logit_pass_leaves_out_the_router_losses(moe):
    for rank_report in moe:
        differences = rank_report["router_losses"]
        assert differences["ggn"] < 1e-6, differences
        assert differences["hessian"] > 1e-5, differences  # their curvature is there


def test_moe_diagnose_command_line_on_a_pretrain_checkpoint(moe):
    cli = moe[0]["cli"]
    (taus,) = cli["taus"]
    assert taus["iteration"] == 2
    _same_taus(taus, cli["in_process"])
    (hessian,) = cli["hessian"]
    assert math.isfinite(hessian["results"]["lambda_max"])
    _same_hessian(hessian, cli["in_process"])
    assert len(hessian["results"]["samples_ggn"]) == 2
    (prune,) = cli["prune"]
    fractions = [p["pruned_fraction"] for p in prune["results"]["points"]]
    assert fractions == [0.0, pytest.approx(0.5, abs=1e-3)]
