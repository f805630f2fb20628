"""The SAM step in a plain PyTorch loop: one process, DDP and FSDP2 on two gloo ranks.

The gradient `optimizer.step()` receives is checked against the single-process torch.func
reference (tests/reference.py) for sam, fsam, precond sam / fsam and the exact ANGLE-SAM 30,
in one process (4 micro-batches), under DDP and under FSDP2's fully_shard (2 ranks, 2
micro-batches each, with the rows of some params split unevenly). A non-finite pass 2 is
skipped with params and optimizer state bit-identical, or falls back bit for bit to a plain
step; `clip_grad_norm` clips the SAM gradient; refusals are one clear error each.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from megatron_fsam import SAMConfig
from megatron_fsam.backends.shards import local
from megatron_fsam.trainer.models.torch_gpt import TorchGPT, micro_batch_loss
from tests import reference
from tests.received import Received, clipping_errors, relative_error, stepwise
from tests.sam_harness import TINY, make_batches
from tests.spawn import run_ranks

pytestmark = pytest.mark.one_env  # plain PyTorch: no megatron-core

TOLERANCE = 1e-5
RHO, LR, ADAM_EPS = 0.05, 1e-3, 1e-3
PRECOND = dict(precond=True, precond_floor=0.0, rho_schedule="linear_warmup", rho_warmup_steps=1)
GLOBAL_MICROBATCHES = 4  # 2 per rank on two ranks
MODES = ("sam", "fsam", "precond sam", "precond fsam", "angle 30 exact")
# vocab 65: the embedding's and lm_head's rows split 33 / 32 over two FSDP2 ranks.
MODEL = replace(TINY, vocab_size=65)
# A direction known before the step (SAMConfig.ascent), over consecutive steps; beta1 0.9 so
# that the momentum is not the previous gradient.
ASCENT_FORMS, ASCENTS = reference.KNOWN_DIRECTION_FORMS, reference.KNOWN_DIRECTIONS
ASCENT_STEPS = 3  # the first has no direction yet
ASCENT_BETAS = (0.9, 0.98)
_known_direction_references: dict = {}


def _wrapped(layout: str) -> torch.nn.Module:
    model = TorchGPT(MODEL)
    if layout == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    if layout == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def _sam(layout: str, cfg: SAMConfig, betas=(0.0, 0.98), **kwargs):
    from megatron_fsam.pytorch import FuncSAM

    model = _wrapped(layout)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=LR, betas=betas, eps=ADAM_EPS, weight_decay=0.0
    )
    return FuncSAM(cfg, model, optimizer, **kwargs)


def _mine(batches: list[dict]) -> list[dict]:
    if not torch.distributed.is_initialized():
        return batches
    share = len(batches) // torch.distributed.get_world_size()
    rank = torch.distributed.get_rank()
    return batches[rank * share : (rank + 1) * share]


def _steps(sam, batches, steps: int = 1, poison: range = range(0)):
    received = Received(sam.optimizer)
    handle = _poisoned(sam.model, poison) if poison else None
    for _ in range(steps):
        sam.train_step(_mine(batches), micro_batch_loss)
    if handle:
        handle.remove()
    return received


def _poisoned(model: torch.nn.Module, calls: range):
    """NaN hidden states on the given forward calls of the first block."""
    count = [0]
    block = (model.module if hasattr(model, "module") else model).layers[0]

    def hook(module, args, output):
        hit = count[0] in calls
        count[0] += 1
        return output * float("nan") if hit else None

    return block.register_forward_hook(hook)


def _snapshot(sam) -> list[torch.Tensor]:
    """This rank's params and optimizer state."""
    params = [local(p).detach().clone() for p in sam.model.parameters()]
    state = [local(t).clone() for s in sam.optimizer.state.values() for t in s.values()]
    return params + state


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def run_layout(layout: str) -> dict:
    """Every check on one layout (in this process, or on each spawned rank)."""
    torch.manual_seed(0)
    batches = make_batches(GLOBAL_MICROBATCHES)
    model = TorchGPT(MODEL)
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    g0 = reference.gradient(model, theta, batches)
    precond = {n: 1.0 / (g0[n].abs() + ADAM_EPS) for n in g0}
    plain = _sam(layout, SAMConfig(mode="adamw"))
    _steps(plain, batches)
    after_first = {n.removeprefix("module."): p for n, p in _full(plain.model).items()}
    report = {}
    for mode in ("sam", "fsam"):
        want = reference.sam_gradient(model, theta, batches, mode=mode, rho=RHO)
        sam = _sam(layout, SAMConfig(mode=mode, rho=RHO))
        report[mode] = relative_error(sam, _steps(sam, batches), want)
        sam = _sam(layout, SAMConfig(mode=mode, **PRECOND))
        received = _steps(sam, batches, steps=2)  # a plain step (rho 0) first: P from it
        want = reference.sam_gradient(
            model, after_first, batches, mode=mode, rho=RHO, precond=precond
        )
        report[f"precond {mode}"] = relative_error(sam, received, want)
    want = reference.angle_gradient(model, theta, batches, degrees=30.0, rho=RHO)
    sam = _sam(layout, SAMConfig(mode="angle", angle=30.0, angle_impl="exact", rho=RHO))
    report["angle 30 exact"] = relative_error(sam, _steps(sam, batches), want)
    report["nonfinite"] = _nonfinite(layout, batches)
    report["ascent"] = _known_direction(layout, batches, model, theta)
    report["clipping"] = _clipping(layout, batches, model, theta)
    return report


def _known_direction(layout: str, batches, model, theta) -> dict[str, dict]:
    """Each step of every (ascent, form) against the float64 reference, and the backwards
    through the network per step."""
    out = {}
    for ascent in ASCENTS:
        for name, form in ASCENT_FORMS.items():
            cfg = SAMConfig(rho=RHO, ascent=ascent, **form)
            if (ascent, name) not in _known_direction_references:
                _known_direction_references[ascent, name] = reference.known_direction_run(
                    model, theta, [batches] * ASCENT_STEPS, mode=form["mode"], ascent=ascent,
                    rho=RHO, precond=cfg.precond, lr=LR, betas=ASCENT_BETAS, adam_eps=ADAM_EPS,
                )  # fmt: skip
            want = _known_direction_references[ascent, name]
            sam = _sam(layout, cfg, betas=ASCENT_BETAS)
            inner = sam.model.module if hasattr(sam.model, "module") else sam.model
            out[f"{ascent}/{name}"] = stepwise(
                sam, sam.optimizer, inner.layers[0],
                lambda sam=sam: sam.train_step(_mine(batches), micro_batch_loss), want,
            )  # fmt: skip
            out[f"{ascent}/{name}"]["micro_batches"] = len(_mine(batches))
    return out


def _full(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full param values (FSDP2: gathered from the shards)."""
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for n, p in model.named_parameters()
    }


def _nonfinite(layout: str, batches) -> dict[str, bool]:
    """NaN in pass 2 (on the first rank only): skip leaves params and optimizer state
    bit-identical; fallback is bit for bit a plain AdamW step."""
    count = len(_mine(batches))
    first = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    poison = range(count + 1, count + 2) if first else range(0)  # a pass-2 micro-batch
    out = {}
    for on_nonfinite in ("skip", "fallback"):
        sam = _sam(layout, SAMConfig(mode="fsam", on_nonfinite=on_nonfinite, **PRECOND))
        _steps(sam, batches)  # rho 0: a plain step, creates Adam state
        before = _snapshot(sam)
        _steps(sam, batches, poison=poison)
        if on_nonfinite == "skip":
            out["skip_counted"] = sam.metrics["skipped"] == 1.0
            out["skip_bit_identical"] = _same(before, _snapshot(sam))
        else:
            plain = _sam(layout, SAMConfig(mode="adamw"))
            _steps(plain, batches, steps=2)
            out["fallback_counted"] = sam.metrics["fallback"] == 1.0
            out["fallback_is_plain_step"] = _same(_snapshot(plain), _snapshot(sam))
    return out


def _clipping(layout: str, batches, model, theta) -> dict[str, float]:
    """clip_grad_norm acts on the SAM gradient, not on g."""
    clip = 1e-3
    sam = _sam(layout, SAMConfig(mode="fsam", rho=RHO), clip_grad_norm=clip)
    received = _steps(sam, batches)
    return {
        **clipping_errors(sam, received, model, theta, batches, clip, rho=RHO),
        "reported_norm_is_unclipped": sam.metrics["applied_grad_norm"] > clip,
    }


def _two_ranks(rank: int, world: int) -> dict:
    torch.distributed.init_process_group("gloo")
    return {layout: run_layout(layout) for layout in ("ddp", "fsdp2")}


@pytest.fixture(scope="module")
def reports() -> dict[str, list[dict]]:
    spawned = run_ranks(_two_ranks, 2, timeout=900)
    return {
        "one process": [run_layout("one process")],
        **{layout: [r[layout] for r in spawned] for layout in ("ddp", "fsdp2")},
    }


LAYOUTS = ("one process", "ddp", "fsdp2")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
def test_update_equals_the_reference(reports, layout, mode):
    for report in reports[layout]:
        assert report[mode] <= TOLERANCE, report[mode]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_nonfinite_pass2_is_skipped_or_falls_back_bit_for_bit(reports, layout):
    for report in reports[layout]:
        assert all(report["nonfinite"].values()), report["nonfinite"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_clip_grad_norm_acts_on_the_sam_gradient(reports, layout):
    for report in reports[layout]:
        clipping = report["clipping"]
        assert clipping["vs_sam"] <= TOLERANCE and clipping["vs_g"] > 1e-2, clipping
        assert clipping["reported_norm_is_unclipped"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("ascent", ASCENTS)
@pytest.mark.parametrize("form", ASCENT_FORMS)
def test_a_known_direction_steps_as_the_reference_with_one_backward(reports, layout, ascent, form):
    for report in reports[layout]:
        run = report["ascent"][f"{ascent}/{form}"]
        assert max(run["errors"]) <= TOLERANCE, run["errors"]
        assert run["backwards"] == [run["micro_batches"]] * ASCENT_STEPS


def test_refusals_are_one_clear_error_each():
    from megatron_fsam.pytorch import FuncSAM

    model = TorchGPT(MODEL)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="reads the optimizer's Adam second moment.*SGD"):
        FuncSAM(SAMConfig(mode="fsam", precond=True), model, sgd)
    half = TorchGPT(MODEL).half()
    with pytest.raises(ValueError, match="fp16 params"):
        FuncSAM(SAMConfig(mode="fsam"), half, torch.optim.AdamW(half.parameters()))
    with pytest.raises(ValueError, match="without trainable params"):
        frozen = TorchGPT(MODEL).requires_grad_(False)
        FuncSAM(SAMConfig(mode="fsam"), frozen, torch.optim.AdamW(frozen.parameters()))


def test_soft_capped_logits_are_refused_where_the_mode_needs_the_logit_gate():
    transformers = pytest.importorskip("transformers")
    from megatron_fsam.pytorch import FuncSAM

    config = transformers.Gemma2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, head_dim=8, final_logit_softcapping=30.0,
    )  # fmt: skip
    model = transformers.Gemma2ForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters())
    for cfg in (SAMConfig(mode="fsam"), SAMConfig(mode="angle", angle=30.0)):
        with pytest.raises(ValueError, match="soft-caps the logits after lm_head"):
            FuncSAM(cfg, model, optimizer)
    assert FuncSAM(SAMConfig(mode="sam"), model, optimizer).gate is None  # no gate needed
