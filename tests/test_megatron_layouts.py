"""Every parallel layout computes the single-process model's loss and SGD update.

The single-process (TP=1, PP=1) model takes one plain Megatron SGD step (lr 1, four
micro-batches); its weights are then loaded into each layout, which must reproduce
the loss and, on every rank, its slice of the update (fp32, relative error 1e-5).
Megatron's distributed optimizer only supports Adam, so layouts using it are compared
with an Adam step instead, with lr = eps = 1e3: its first update -lr g / (|g| + eps)
is then close to -g, as sensitive to gradient errors as SGD (a plain first Adam step
is about -lr sign(g) and would hide them). Layouts of one world size share one spawn:
starting ranks costs seconds.
"""

import pytest
import torch
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.utils import unwrap_model

from megatron_fsam import enable_cpu_emulation
from megatron_fsam.trainer.models import (
    GPTConfig,
    build_model_chunks,
    forward_step,
    full_state,
    global_param_names,
    load_full_state,
    tp_slice,
    transformer_config,
)
from megatron_fsam.trainer.parallel import (
    ParallelConfig,
    build_optimizer,
    forward_backward_func,
    initialize_distributed,
    wrap_model,
)
from tests.spawn import run_ranks

MODEL = dict(num_layers=4, hidden_size=32, num_attention_heads=4, vocab_size=64, seq_length=16)
MICRO_BATCH, NUM_MICRO_BATCHES = 2, 4
TOLERANCE = 1e-5
OPTIMIZERS = {"sgd": dict(name="sgd", lr=1.0), "adam": dict(name="adam", lr=1e3, adam_eps=1e3)}

LAYOUTS_2 = {
    "tp2": dict(tensor_parallel=2),
    "pp2": dict(pipeline_parallel=2),
    "dp2_distopt": dict(distributed_optimizer=True),
    "pp2_vp2": dict(pipeline_parallel=2, virtual_pipeline=2),
    "tp2_sp": dict(tensor_parallel=2, sequence_parallel=True),
    "dp2_overlap": dict(
        distributed_optimizer=True, overlap_grad_reduce=True, overlap_param_gather=True
    ),
}
LAYOUTS_4 = {
    "tp2_pp2": dict(tensor_parallel=2, pipeline_parallel=2),
    "tp2_dp2_distopt": dict(tensor_parallel=2, distributed_optimizer=True),
}


def _batches(count: int) -> list[dict[str, torch.Tensor]]:
    """The global batch as micro-batches; about a fifth of the tokens are masked out."""
    g = torch.Generator().manual_seed(0)
    s, v = MODEL["seq_length"], MODEL["vocab_size"]
    batches = []
    for _ in range(count):
        tokens = torch.randint(0, v, (MICRO_BATCH, s + 1), generator=g)
        batches.append(
            dict(
                tokens=tokens[:, :-1],
                labels=tokens[:, 1:],
                loss_mask=(torch.rand(MICRO_BATCH, s, generator=g) > 0.2).float(),
                position_ids=torch.arange(s).expand(MICRO_BATCH, s),
            )
        )
    return batches


def _train_step(
    parallel_kwargs: dict,
    full: dict | None,
    optimizer_kwargs: dict,
    *,
    bf16=False,
    steps=1,
    seed=1234,
):
    """Build a layout, optionally load ``full``, take ``steps`` steps on this rank's data.

    Returns the model chunks, the weights before the step, this rank's global loss (None
    off the last stage) and whether every step was applied. Chunks that are neither the
    first nor the last pipeline stage get no data, as in Megatron-LM.
    """
    parallel = ParallelConfig(**parallel_kwargs)
    initialize_distributed(parallel)
    model = GPTConfig(**MODEL)
    config = transformer_config(model, parallel, bf16=bf16)
    chunks = build_model_chunks(model, config, parallel, seed=seed)
    ddp = wrap_model(chunks, config, parallel)
    if full is not None:
        load_full_state(chunks, full)
    optimizer = build_optimizer(
        ddp, **optimizer_kwargs, bf16=bf16, distributed_optimizer=parallel.distributed_optimizer
    )
    before = {n: p.detach().float().clone() for n, p in global_param_names(chunks).items()}

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per_rank = NUM_MICRO_BATCHES // dp
    batches = _batches(NUM_MICRO_BATCHES)[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    needs_data = [unwrap_model(c).pre_process or unwrap_model(c).post_process for c in ddp]
    losses, applied = [], []
    for _ in range(steps):
        for chunk in ddp:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        reported = forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=[iter(batches) if needs else None for needs in needs_data],
            model=ddp,
            num_microbatches=per_rank,
            seq_length=MODEL["seq_length"],
            micro_batch_size=MICRO_BATCH,
        )
        applied.append(optimizer.step()[0])
        if parallel.overlap_param_gather:  # else the all-gather waits for the next forward
            for chunk in ddp:
                chunk.start_param_sync(force_sync=True)
        if reported:
            loss = torch.stack([r["lm loss"] for r in reported]).mean()
            torch.distributed.all_reduce(loss, group=ps.get_data_parallel_group())
            losses.append(loss.item() / dp)
    return chunks, before, losses or None, all(applied)


def _reference(rank: int, world_size: int) -> dict:
    """Initial weights, loss and the update of each optimizer in the single-process model."""
    reference = dict(update={})
    for optimizer, optimizer_kwargs in OPTIMIZERS.items():
        chunks, before, losses, _ = _train_step({}, None, optimizer_kwargs)
        after = full_state(chunks)
        reference.update(full=before, loss=losses[0])
        reference["update"][optimizer] = {n: after[n] - before[n] for n in after}
        ps.destroy_model_parallel()
    reference["weight_decay"] = _weight_decay_by_ndim()
    reference["emulation"] = _emulation_facts()
    return reference


def _weight_decay_by_ndim() -> dict[int, set[float]]:
    """The weight decay each parameter gets, by its number of dimensions."""
    parallel = ParallelConfig()
    initialize_distributed(parallel)
    model = GPTConfig(**MODEL)
    config = transformer_config(model, parallel)
    ddp = wrap_model(build_model_chunks(model, config, parallel), config, parallel)
    optimizer = build_optimizer(ddp, name="adam", lr=1e-3, weight_decay=0.1)
    by_ndim: dict[int, set[float]] = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            by_ndim.setdefault(param.dim(), set()).add(group["weight_decay"])
    ps.destroy_model_parallel()
    return by_ndim


def _emulation_facts() -> dict:
    enable_cpu_emulation()  # a second call is a no-op
    x = torch.ones(2)
    facts = dict(
        devices={
            torch.empty(2, device="cuda").device.type,
            x.cuda().device.type,
            x.to("cuda").device.type,
            x.to(torch.device("cuda", 0)).device.type,
        },
        types={x.type(), x.bfloat16().type()},
    )
    facts["rng"] = _cuda_rng_facts()
    available = torch.cuda.is_available
    torch.cuda.is_available = lambda: True
    try:
        enable_cpu_emulation()
    except RuntimeError:
        facts["refuses_gpu"] = True
    finally:
        torch.cuda.is_available = available
    return facts


def _cuda_draws() -> list[torch.Tensor]:
    """One draw of each kind a GPU takes from its CUDA generator: factories on "cuda" and on
    `torch.cuda.current_device()`, dropout, in-place and parameter init on a CUDA tensor, and
    dropout inside Megatron's tensor-parallel RNG tracker."""
    weight = torch.nn.Parameter(torch.empty(4, 4)).cuda()
    with tensor_parallel.get_cuda_rng_tracker().fork():
        in_tracker = torch.nn.functional.dropout(torch.ones(64, device="cuda"), 0.5)
    return [
        torch.rand(8, device="cuda"),
        torch.randn(8, device=torch.cuda.current_device()),
        torch.nn.functional.dropout(torch.ones(64, device="cuda"), 0.5),
        torch.zeros(8, device="cuda").normal_(),
        torch.nn.init.normal_(weight).detach().clone(),
        in_tracker,
    ]


def _cuda_rng_facts() -> dict[str, bool]:
    """Under the emulation the "cuda" draws come from a generator of their own, seeded, read
    and restored as CUDA's, and CPU draws stay on the CPU generator."""

    def seed(cpu_seed: int, cuda_seed: int) -> None:
        torch.manual_seed(cpu_seed)
        torch.cuda.manual_seed(cuda_seed)
        tensor_parallel.model_parallel_cuda_manual_seed(cuda_seed, tp_rank=0, ep_rank=0, etp_rank=0)

    def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
        return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))

    facts = {}
    seed(1, 5)
    cpu_state = torch.get_rng_state()
    first = _cuda_draws()
    facts["cpu_untouched"] = torch.equal(cpu_state, torch.get_rng_state())
    for name, seeds, equal in [
        ("reproducible", (1, 5), True),
        ("independent_of_cpu_seed", (2, 5), True),
        ("depends_on_cuda_seed", (1, 6), False),
    ]:
        seed(*seeds)
        facts[name] = same(_cuda_draws(), first) == equal
    cuda_state = torch.cuda.get_rng_state()
    later = torch.rand(8, device="cuda")
    torch.cuda.set_rng_state(cuda_state)
    facts["cuda_state_restores"] = torch.equal(torch.rand(8, device="cuda"), later)
    torch.manual_seed(5)  # seeds CUDA's generators too, as on a GPU
    facts["seeded_by_manual_seed"] = torch.equal(torch.rand(8, device="cuda"), first[0])
    cuda_state, cpu_state = torch.cuda.get_rng_state(), torch.get_rng_state()
    torch.nn.init.normal_(torch.nn.Parameter(torch.empty(4, 4)))  # a CPU tensor's draw
    facts["cpu_draw_stays_on_cpu"] = torch.equal(
        cuda_state, torch.cuda.get_rng_state()
    ) and not torch.equal(cpu_state, torch.get_rng_state())
    cpu_state = torch.get_rng_state()
    torch.empty(4, 4, dtype=torch.bfloat16).float()[:2].normal_()  # computed from a CPU tensor
    facts["derived_cpu_draw_stays_on_cpu"] = torch.equal(
        cuda_state, torch.cuda.get_rng_state()
    ) and not torch.equal(cpu_state, torch.get_rng_state())
    (generator,) = torch.cuda.default_generators
    facts["one_default_generator"] = torch.equal(generator.get_state(), cuda_state)
    return facts


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm().clamp(min=1e-30)).item()


def _layouts(rank: int, world_size: int, layouts: dict, reference: dict) -> dict:
    """Each layout's loss and per-parameter update errors on this rank."""
    results = {}
    for name, parallel_kwargs in layouts.items():
        optimizer = "adam" if parallel_kwargs.get("distributed_optimizer") else "sgd"
        chunks, before, losses, applied = _train_step(
            parallel_kwargs, reference["full"], OPTIMIZERS[optimizer], seed=7
        )
        expected = reference["update"][optimizer]
        errors = {}
        for pname, param in global_param_names(chunks).items():
            update = param.detach() - before[pname]
            errors[pname] = _relative_error(update, tp_slice(expected[pname], param))
        results[name] = dict(loss=losses and losses[0], errors=errors, applied=applied)
        ps.destroy_model_parallel()
    return results


def _bf16_distopt() -> dict:
    """Two Adam steps with bf16 parameters, TP=2 and the distributed optimizer."""
    chunks, before, losses, applied = _train_step(
        dict(tensor_parallel=2, distributed_optimizer=True),
        None,
        dict(name="adam", lr=1e-2),
        bf16=True,
        steps=2,
    )
    params = global_param_names(chunks)
    changed = all(not torch.equal(params[n].float(), before[n]) for n in params)
    dtypes = {str(p.dtype) for p in params.values()}
    return dict(losses=losses, applied=applied, changed=changed, dtypes=dtypes)


@pytest.fixture(scope="module")
def reference() -> dict:
    return run_ranks(_reference, 1)[0]


def _two_ranks(rank: int, world_size: int, reference: dict) -> dict:
    return dict(layouts=_layouts(rank, world_size, LAYOUTS_2, reference), bf16=_bf16_distopt())


@pytest.fixture(scope="module")
def world2(reference: dict) -> list[dict]:
    return run_ranks(_two_ranks, 2, reference)


@pytest.fixture(scope="module")
def world4(reference: dict) -> list[dict]:
    return run_ranks(_layouts, 4, LAYOUTS_4, reference)


def _check(results: list[dict], layout: str, reference: dict) -> None:
    seen: set[str] = set()
    for rank, by_layout in enumerate(results):
        result = by_layout[layout]
        assert result["applied"], f"rank {rank}: optimizer step skipped"
        if result["loss"] is not None:
            assert result["loss"] == pytest.approx(reference["loss"], rel=TOLERANCE), rank
        worst = max(result["errors"].items(), key=lambda kv: kv[1])
        assert worst[1] < TOLERANCE, f"rank {rank}: update of {worst[0]} off by {worst[1]:.2e}"
        seen |= result["errors"].keys()
    assert seen == reference["full"].keys(), "some parameters are held by no rank"
    assert any(r[layout]["loss"] is not None for r in results), "no rank reported the loss"


@pytest.mark.parametrize("layout", LAYOUTS_2)
def test_two_ranks_match_single_process(world2: list[dict], reference: dict, layout: str):
    _check([r["layouts"] for r in world2], layout, reference)


@pytest.mark.parametrize("layout", LAYOUTS_4)
def test_four_ranks_match_single_process(world4: list[dict], reference: dict, layout: str):
    _check(world4, layout, reference)


def test_cpu_emulation(reference: dict):
    facts = reference["emulation"]
    assert facts["devices"] == {"cpu"}
    assert facts["types"] == {"torch.cuda.FloatTensor", "torch.cuda.BFloat16Tensor"}
    assert facts.get("refuses_gpu")


def test_cpu_emulation_draws_cuda_random_numbers_from_their_own_generator(reference: dict):
    facts = reference["emulation"]["rng"]
    assert facts == dict.fromkeys(facts, True) and len(facts) == 9, facts


def test_no_weight_decay_on_norms(reference: dict):
    assert reference["weight_decay"] == {1: {0.0}, 2: {0.1}}


def test_bf16_distributed_optimizer_trains(world2: list[dict]):
    for rank, result in enumerate(r["bf16"] for r in world2):
        assert result["applied"], rank
        assert result["changed"], rank
        assert result["dtypes"] == {"torch.bfloat16"}, rank
        assert all(torch.isfinite(torch.tensor(result["losses"]))), rank
