"""The SAM step on a DeepSpeed engine: ZeRO stages 0 to 3 on two gloo ranks.

Two 2-rank spawns (stages 0-2; the ZeRO-3 cases: persistence threshold default and 0, with
and without zero.Init) build engines from the same TorchGPT weights and check the gradient
the engine's optimizer receives against the single-process torch.func reference
(tests/reference.py), bf16 params against cast(master) after every step, a non-finite pass 2
(skip and fallback) bit for bit, and DeepSpeed's gradient clipping on the SAM gradient.
"""

from __future__ import annotations

import importlib.util
from contextlib import nullcontext
from dataclasses import dataclass

import pytest
import torch

from megatron_fsam import SAMConfig
from megatron_fsam.trainer.models.torch_gpt import TorchGPT, micro_batch_loss
from tests import reference
from tests.received import Received, clipping_errors, relative_error, stepwise
from tests.sam_harness import GLOBAL_MICROBATCHES, TINY, make_batches
from tests.spawn import run_ranks, start_deepspeed_comm

# Not importorskip: importing deepspeed here would set PYTORCH_NVML_BASED_CUDA_CHECK in this
# process's environment, which the Megatron-LM tests' subprocesses then inherit (with a CUDA
# build of torch on a machine without a driver, their torch.compile'd kernels then fail).
# deepspeed is imported in the spawned ranks and launched processes only.
pytestmark = [
    pytest.mark.one_env,  # the DeepSpeed stack: no megatron-core in what it tests
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed"),
]

TOLERANCE = 1e-5
SPAWN_TIMEOUT = 900
ACCUMULATION = GLOBAL_MICROBATCHES // 2  # per rank: DP = 2
LR, ADAM_EPS = 1e-3, 1e-3
PRECOND = dict(precond=True, precond_floor=0.0, rho_schedule="linear_warmup", rho_warmup_steps=1)
MODES = ("sam", "fsam", "precond sam", "precond fsam", "angle 30 exact")


@dataclass(frozen=True)
class Case:
    """An engine layout: the ZeRO stage, extra zero_optimization keys, and whether the model
    is built under deepspeed.zero.Init (partitioned as it is made)."""

    stage: int
    zero: tuple[tuple[str, int], ...] = ()
    zero_init: bool = False


CASES = {
    "zero0": Case(0),
    "zero1": Case(1),
    "zero2": Case(2),
    # ZeRO-3 keeps params under stage3_param_persistence_threshold (by default every param of
    # the tiny model) whole on every rank besides their partitions; 0 partitions them all,
    # 100 only the layer norms.
    "zero3": Case(3),
    "zero3 persistence 0": Case(3, (("stage3_param_persistence_threshold", 0),)),
    "zero3 persistence 100": Case(3, (("stage3_param_persistence_threshold", 100),)),
    "zero3 zero.Init": Case(3, zero_init=True),
    "zero3 persistence 0 zero.Init": Case(3, (("stage3_param_persistence_threshold", 0),), True),
}
STAGES_0_TO_2 = ("zero0", "zero1", "zero2")
# A direction known before the step (SAMConfig.ascent), over consecutive steps, at ZeRO-2 and
# fully partitioned ZeRO-3; beta1 0.9 so that the momentum is not the previous gradient.
KNOWN_DIRECTION_CASES = ("zero2", "zero3 persistence 0")
ASCENT_FORMS, ASCENTS = reference.KNOWN_DIRECTION_FORMS, reference.KNOWN_DIRECTIONS
ASCENT_STEPS = 3  # the first has no direction yet
ASCENT_BETAS = (0.9, 0.98)
ZERO3 = tuple(name for name, case in CASES.items() if case.stage == 3)


def _ds_config(case: Case, *, bf16: bool = False, clipping: float = 0.0, betas=(0.0, 0.98)) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": ACCUMULATION,
        "optimizer": {
            "type": "Adam",
            "params": {
                "lr": LR,
                "betas": list(betas),
                "eps": ADAM_EPS,
                "weight_decay": 0.0,
                "torch_adam": True,
            },
        },  # fmt: skip
        "zero_optimization": {"stage": case.stage, **dict(case.zero)},
        "bf16": {"enabled": bf16},
        "gradient_clipping": clipping,
        "steps_per_print": 10**9,
    }


def _engine(case: Case, **ds):
    import deepspeed

    config = _ds_config(case, **ds)
    with deepspeed.zero.Init(config_dict_or_path=config) if case.zero_init else nullcontext():
        model = TorchGPT(TINY)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=None, config=config)
    return engine


def _mine(batches: list[dict]) -> list[dict]:
    rank = torch.distributed.get_rank()
    return batches[rank * ACCUMULATION : (rank + 1) * ACCUMULATION]


def _step(case: Case, cfg: SAMConfig, batches, *, steps: int = 1, **ds):
    from megatron_fsam.deepspeed import FuncSAM

    engine = _engine(case, **ds)
    sam = FuncSAM(cfg, engine)
    received = Received(engine.basic_optimizer)
    for _ in range(steps):
        sam.train_step(_mine(batches), micro_batch_loss)
    return sam, received


def _params(engine) -> dict[str, torch.Tensor]:
    """The model's params as the forward sees them (ZeRO-3: gathered from the partitions)."""
    import deepspeed

    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {n: p.detach().clone() for n, p in params.items()}


def _two_ranks(rank: int, world: int, names: tuple[str, ...], directory: str) -> dict:
    start_deepspeed_comm()
    torch.manual_seed(0)
    batches = make_batches(GLOBAL_MICROBATCHES)
    reference_model = TorchGPT(TINY)
    theta = {n: p.detach().clone() for n, p in reference_model.named_parameters()}
    report: dict = {}
    for name in names:
        case = CASES[name]
        report.update(_against_the_reference(name, case, batches, reference_model, theta))
        report[f"{name}/bf16"] = _bf16_is_cast_of_master(case, batches)
        report[f"{name}/nonfinite"] = _nonfinite(case, batches)
        report[f"{name}/clipping"] = _clipping(case, batches, reference_model, theta)
        report[f"{name}/checkpoint"] = _checkpoint_holds_theta(case, batches, f"{directory}/{name}")
        if name in KNOWN_DIRECTION_CASES:
            report[f"{name}/ascent"] = _known_direction(case, batches, reference_model, theta)
    return report


def _known_direction(case: Case, batches, reference_model, theta) -> dict[str, dict]:
    """Each step of every (ascent, form) against the float64 reference, and the backwards
    through the network per step."""
    from megatron_fsam.deepspeed import FuncSAM

    out = {}
    for ascent in ASCENTS:
        for name, form in ASCENT_FORMS.items():
            cfg = SAMConfig(rho=0.05, ascent=ascent, **form)
            want = reference.known_direction_run(
                reference_model, theta, [batches] * ASCENT_STEPS, mode=form["mode"],
                ascent=ascent, rho=0.05, precond=cfg.precond, lr=LR, betas=ASCENT_BETAS,
                adam_eps=ADAM_EPS,
            )  # fmt: skip
            engine = _engine(case, betas=ASCENT_BETAS)
            sam = FuncSAM(cfg, engine)
            out[f"{ascent}/{name}"] = stepwise(
                sam, engine.basic_optimizer, engine.module.layers[0],
                lambda sam=sam: sam.train_step(_mine(batches), micro_batch_loss), want,
            )  # fmt: skip
    return out


def _against_the_reference(name: str, case: Case, batches, reference_model, theta) -> dict:
    """The relative error of the optimizer's gradient in each mode."""
    report = {}
    g0 = reference.gradient(reference_model, theta, batches)
    precond = {n: 1.0 / (g0[n].abs() + ADAM_EPS) for n in g0}
    after_first = _params(_step(case, SAMConfig(mode="adamw"), batches)[0].engine)
    for mode in ("sam", "fsam"):
        want = reference.sam_gradient(reference_model, theta, batches, mode=mode, rho=0.05)
        sam, received = _step(case, SAMConfig(mode=mode, rho=0.05), batches)
        report[f"{name}/{mode}"] = relative_error(sam, received, want)
        # Preconditioned: a plain Adam step (rho 0) first; P from its second moment.
        sam, received = _step(case, SAMConfig(mode=mode, **PRECOND), batches, steps=2)
        want = reference.sam_gradient(
            reference_model, after_first, batches, mode=mode, rho=0.05, precond=precond
        )
        report[f"{name}/precond {mode}"] = relative_error(sam, received, want)
    # ANGLE-SAM's exact form: a third pass at theta and the mix of Eq. 19.
    want = reference.angle_gradient(reference_model, theta, batches, degrees=30.0, rho=0.05)
    cfg = SAMConfig(mode="angle", angle=30.0, angle_impl="exact", rho=0.05)
    report[f"{name}/angle 30 exact"] = relative_error(*_step(case, cfg, batches), want)
    return report


def _model_is_cast_of_master(sam) -> bool:
    """Every rank's model reads cast(fp32 master): this rank's shards, and under ZeRO-3 also
    every gathered param (persistent ones included) against the gathered fp32 master."""
    from deepspeed.utils import safe_get_full_fp32_param

    shards = all(
        torch.equal(entry.target, entry.theta.to(entry.target.dtype))
        for entry in sam.backend._entries()
    )
    if sam.engine.zero_optimization_stage() < 3:
        return shards
    gathered = _params(sam.engine)
    return shards and all(
        torch.equal(gathered[n], safe_get_full_fp32_param(p).to(gathered[n].dtype))
        for n, p in sam.engine.module.named_parameters()
    )


def _bf16_is_cast_of_master(case: Case, batches) -> list[bool]:
    """After each of 3 bf16 SAM steps the model holds cast(theta), never cast(theta + eps)."""
    from megatron_fsam.deepspeed import FuncSAM

    sam = FuncSAM(SAMConfig(mode="fsam", **PRECOND), _engine(case, bf16=True))
    after_each = []
    for _ in range(3):
        sam.train_step(_mine(batches), micro_batch_loss)
        after_each.append(_model_is_cast_of_master(sam))
    return after_each


def _poisoned(engine, calls_to_poison: range):
    """NaN hidden states on the given forward calls of the first block (pass 2: M..2M-1)."""
    count = [0]

    def hook(module, args, output):
        hit = count[0] in calls_to_poison
        count[0] += 1
        return output * float("nan") if hit else None

    return engine.module.layers[0].register_forward_hook(hook)


def _state(sam) -> list[torch.Tensor]:
    """The optimizer's fp32 masters (this rank's partitions) and Adam's state."""
    inner = sam.engine.basic_optimizer
    tensors = [t.clone() for s in inner.state.values() for t in s.values() if torch.is_tensor(t)]
    mains = {id(e.main): e.main for e in sam.backend._entries()}
    return tensors + [m.detach().clone() for m in mains.values()]


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _nonfinite(case: Case, batches) -> dict[str, bool]:
    """NaN in pass 2 on rank 0 only: skip leaves everything bit-identical; fallback is
    bit for bit a plain Adam step."""
    from megatron_fsam.deepspeed import FuncSAM

    out = {}
    poison_rank0 = (
        range(ACCUMULATION, 2 * ACCUMULATION) if torch.distributed.get_rank() == 0 else range(0)
    )
    for on_nonfinite in ("skip", "fallback"):
        cfg = SAMConfig(mode="fsam", on_nonfinite=on_nonfinite, **PRECOND)
        sam = FuncSAM(cfg, _engine(case, bf16=True))
        sam.train_step(_mine(batches), micro_batch_loss)  # rho 0: a plain step, creates Adam state
        params, state = _params(sam.engine), _state(sam)
        handle = _poisoned(sam.engine, poison_rank0)
        sam.train_step(_mine(batches), micro_batch_loss)
        handle.remove()
        metrics = sam.metrics
        if on_nonfinite == "skip":
            out["skip_counted"] = metrics["skipped"] == 1.0
            out["skip_params"] = _same(params, _params(sam.engine))
            out["skip_state"] = _same(state, _state(sam))
            out["skip_model_is_cast"] = _model_is_cast_of_master(sam)
        else:
            plain = FuncSAM(SAMConfig(mode="adamw"), _engine(case, bf16=True))
            for _ in range(2):
                plain.train_step(_mine(batches), micro_batch_loss)
            out["fallback_counted"] = metrics["fallback"] == 1.0 and metrics["skipped"] == 0.0
            out["fallback_params"] = _same(_params(plain.engine), _params(sam.engine))
            out["fallback_state"] = _same(_state(plain), _state(sam))
    return out


def _clipping(case: Case, batches, model, theta) -> dict[str, float]:
    """gradient_clipping acts on the SAM gradient: the optimizer receives it rescaled to the
    clip norm, in the SAM gradient's direction (not g's)."""
    clip = 1e-3
    sam, received = _step(case, SAMConfig(mode="fsam", rho=0.05), batches, clipping=clip)
    return clipping_errors(sam, received, model, theta, batches, clip, rho=0.05)


def _checkpoint_holds_theta(case: Case, batches, directory: str) -> dict[str, bool]:
    """engine.save_checkpoint right after a SAM step (bf16), with the SAM state as client
    state; a new engine loading it holds the same model params, fp32 masters and Adam state,
    and those are theta: the model is cast(master)."""
    from megatron_fsam.deepspeed import FuncSAM

    sam = FuncSAM(SAMConfig(mode="fsam", **PRECOND), _engine(case, bf16=True))
    for _ in range(2):
        sam.train_step(_mine(batches), micro_batch_loss)
    sam.engine.save_checkpoint(directory, tag="step2", client_state={"sam": sam.state_dict()})
    loaded = FuncSAM(SAMConfig(mode="fsam", **PRECOND), _engine(case, bf16=True))
    _, client_state = loaded.engine.load_checkpoint(directory, tag="step2")
    loaded.load_state_dict(client_state["sam"])
    return {
        "saved_model_is_theta": _model_is_cast_of_master(sam),
        "params": _same(_params(sam.engine), _params(loaded.engine)),
        "state": _same(_state(sam), _state(loaded)),
        "sam_state": loaded.state_dict()
        == sam.state_dict()
        == {"iteration": 2, "fallback_steps": 0},
    }


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[str, list[dict]]:
    """One 2-rank spawn for ZeRO stages 0-2, one for the ZeRO-3 cases: each case's report."""
    directory = str(tmp_path_factory.mktemp("checkpoints"))
    spawns = [
        run_ranks(_two_ranks, 2, names, directory, timeout=SPAWN_TIMEOUT)
        for names in (STAGES_0_TO_2, ZERO3)
    ]
    return {
        name: [report for spawn in spawns for report in spawn if f"{name}/sam" in report]
        for name in CASES
    }


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode", MODES)
def test_update_equals_the_reference(reports, case, mode):
    assert len(reports[case]) == 2
    for report in reports[case]:
        assert report[f"{case}/{mode}"] <= TOLERANCE


@pytest.mark.parametrize("case", KNOWN_DIRECTION_CASES)
@pytest.mark.parametrize("ascent", ASCENTS)
@pytest.mark.parametrize("form", ASCENT_FORMS)
def test_a_known_direction_steps_as_the_reference_with_one_backward(reports, case, ascent, form):
    assert len(reports[case]) == 2
    for report in reports[case]:
        run = report[f"{case}/ascent"][f"{ascent}/{form}"]
        assert max(run["errors"]) <= TOLERANCE, run["errors"]
        assert run["backwards"] == [ACCUMULATION] * ASCENT_STEPS


@pytest.mark.parametrize("case", CASES)
def test_bf16_model_is_cast_of_master_after_every_step(reports, case):
    for report in reports[case]:
        assert report[f"{case}/bf16"] == [True, True, True]


@pytest.mark.parametrize("case", CASES)
def test_nonfinite_pass2_is_skipped_or_falls_back_bit_for_bit(reports, case):
    for report in reports[case]:
        assert all(report[f"{case}/nonfinite"].values()), report[f"{case}/nonfinite"]


@pytest.mark.parametrize("case", CASES)
def test_checkpoint_after_a_sam_step_holds_theta_and_the_sam_state(reports, case):
    for report in reports[case]:
        assert all(report[f"{case}/checkpoint"].values()), report[f"{case}/checkpoint"]


@pytest.mark.parametrize("case", CASES)
def test_gradient_clipping_acts_on_the_sam_gradient(reports, case):
    for report in reports[case]:
        clipping = report[f"{case}/clipping"]
        assert clipping["vs_sam"] <= TOLERANCE and clipping["vs_g"] > 1e-2, clipping
