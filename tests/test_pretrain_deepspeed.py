"""launch/pretrain_deepspeed.py under the deepspeed launcher, and trainer/models/hf.py.

Launcher runs (2 CPU ranks, configs/tiny_test.yaml, 6 steps) are shared between tests: the
Nanodo model at ZeRO-2, saving every 3 steps, and its resume from step 3; a Llama (untied) at
ZeRO-3, saving every step, and its resume from step 3; a GPT-2 (tied) at ZeRO-2. A resumed run
must log the same losses and end with the same checkpoint (fp32 masters, Adam state, model
params), bit for bit, as the run that never stopped. The Hugging Face models' weights depend on
the seed alone, with or without ZeRO-3's zero.Init (checked on 2 gloo ranks). DeepSpeed's comm
starts without its CPU shared-memory allreduce: no op build, nothing in /dev/shm.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megatron_fsam.gate import LogitGate
from megatron_fsam.trainer.models.gpt import GPTConfig
from megatron_fsam.trainer.run_config import embedding_params, non_embedding_params
from tests.spawn import rendezvous, run_ranks, start_deepspeed_comm

# Not importorskip: importing deepspeed here would set PYTORCH_NVML_BASED_CUDA_CHECK in this
# process's environment, which the Megatron-LM tests' subprocesses then inherit (with a CUDA
# build of torch on a machine without a driver, their torch.compile'd kernels then fail).
# deepspeed is imported in the spawned ranks and launched processes only.
# The DeepSpeed stack; megatron-core only builds its datasets, which test_data.py and
# test_pretrain.py check in every environment.
pytestmark = pytest.mark.one_env
needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed"
)
needs_transformers = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None,
    reason="needs transformers (pip install megatron-fsam[hf])",
)

ROOT = Path(__file__).resolve().parents[1]
ZERO2 = ROOT / "configs" / "deepspeed_zero2.json"
ZERO3 = ROOT / "configs" / "deepspeed_zero3.json"
TIMING = ("step_time", "tokens_per_second", "time_")  # TensorBoard tags that may differ


# ----- the launcher ------------------------------------------------------------------------


def _command(
    tmp_path: Path,
    *overrides: str,
    meeting: dict[str, str],
    config: Path = ZERO2,
    cache: Path | None = None,
) -> list[str]:
    """The deepspeed launcher's command for launch/pretrain_deepspeed.py on 2 CPU ranks, which
    meet at `meeting`'s store (tests.spawn.rendezvous)."""
    return [
        sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--no_ssh",
        "--node_rank", "0", "--master_addr", meeting["MASTER_ADDR"],
        "--master_port", meeting["MASTER_PORT"],
        str(ROOT / "launch" / "pretrain_deepspeed.py"),
        "--config", str(ROOT / "configs" / "tiny_test.yaml"), "--deepspeed_config", str(config),
        f"data.cache_dir={cache or tmp_path / 'cache'}",
        f"logging.tensorboard_dir={tmp_path / 'tb'}", *overrides,
    ]  # fmt: skip


def _launched(
    tmp_path: Path, *overrides: str, config: Path = ZERO2, cache: Path | None = None
) -> subprocess.CompletedProcess:
    """launch/pretrain_deepspeed.py on 2 CPU ranks through the deepspeed launcher."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    with rendezvous() as meeting:
        return subprocess.run(
            _command(tmp_path, *overrides, meeting=meeting, config=config, cache=cache),
            cwd=tmp_path, capture_output=True, text=True, timeout=600, env=_launch_env(meeting),
    )  # fmt: skip


def _launch_env(meeting: dict[str, str]) -> dict[str, str]:
    return {**os.environ, "PYTHONWARNINGS": "ignore", **meeting}


def _ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def _error_line(result: subprocess.CompletedProcess) -> str:
    """The one error line a refused run prints (rank 0 only, no traceback)."""
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return errors[0]


def _steps(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("step ") and "/6 |" in line]


def _evals(out: str) -> list[float]:
    return [float(line.split()[-1]) for line in out.splitlines() if "eval loss" in line]


def _scalars(tb: Path) -> dict[tuple[str, int], float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb)).Reload()
    return {
        (tag, e.step): e.value
        for tag in events.Tags()["scalars"]
        if not any(part in tag for part in TIMING)
        for e in events.Scalars(tag)
    }


_CHECKPOINT_LEAVES = """
import hashlib, json, sys
from pathlib import Path
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

def leaves(obj, path, out):
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        digest = hashlib.sha256(t.view(torch.uint8).numpy()).hexdigest()
        out[path] = f"{t.dtype}{t.numel()}:{digest}"
    elif isinstance(obj, dict):
        for k, v in obj.items():
            leaves(v, f"{path}/{k}", out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            leaves(v, f"{path}/{i}", out)
    else:
        out[path] = repr(obj)
    return out

for tag_dir in map(Path, sys.argv[1:]):
    out = {}
    for f in sorted(tag_dir.glob("*.pt")):
        leaves(torch.load(f, map_location="cpu", weights_only=False), f.name, out)
    full = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    leaves(dict(full), "fp32", out)
    print("LEAVES " + json.dumps(out))
"""


def _checkpoint_leaves(*tag_dirs: Path) -> list[dict[str, str]]:
    """Every tensor (as a hash of its bytes) and value in each DeepSpeed checkpoint, plus the
    full fp32 params DeepSpeed's zero_to_fp32 rebuilds from its ZeRO partitions."""
    result = subprocess.run(
        [sys.executable, "-c", _CHECKPOINT_LEAVES, *map(str, tag_dirs)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line[7:] for line in result.stdout.splitlines() if line.startswith("LEAVES ")]
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One data cache (tokenizer, indices) for every launcher run of this module."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def zero2(tmp_path_factory, cache):
    """The Nanodo model at ZeRO-2 for 6 steps, saving at steps 3 and 6."""
    path = tmp_path_factory.mktemp("zero2")
    save = f"checkpoint.save_dir={path / 'ckpt'}"
    return path, _launched(path, save, "checkpoint.save_interval=3", cache=cache)


@pytest.fixture(scope="module")
def zero2_resumed(tmp_path_factory, cache, zero2):
    """Steps 4 to 6 of the same run, resumed from its step-3 checkpoint."""
    path = tmp_path_factory.mktemp("zero2_resumed")
    load = f"checkpoint.load_dir={zero2[0] / 'ckpt' / 'iter_0000003'}"
    return path, _launched(path, load, f"checkpoint.save_dir={path / 'ckpt'}", cache=cache)


PREVIOUS = "sam.ascent=previous"  # eps along the previous step's applied gradient


@pytest.fixture(scope="module")
def zero2_previous(tmp_path_factory, cache):
    """The ZeRO-2 run with the ascent direction kept between steps (saved per rank)."""
    path = tmp_path_factory.mktemp("zero2_previous")
    save = f"checkpoint.save_dir={path / 'ckpt'}"
    return path, _launched(path, PREVIOUS, save, "checkpoint.save_interval=3", cache=cache)


@pytest.fixture(scope="module")
def zero2_previous_resumed(tmp_path_factory, cache, zero2_previous):
    path = tmp_path_factory.mktemp("zero2_previous_resumed")
    load = f"checkpoint.load_dir={zero2_previous[0] / 'ckpt' / 'iter_0000003'}"
    return path, _launched(
        path, PREVIOUS, load, f"checkpoint.save_dir={path / 'ckpt'}", cache=cache
    )


@pytest.fixture(scope="module")
def llama(tmp_path_factory, cache):
    """A Llama with untied embeddings at ZeRO-3 (built under zero.Init), saving every step and
    keeping the last 4 checkpoints."""
    path = tmp_path_factory.mktemp("llama")
    return path, _launched(
        path, "model.family=llama", "model.tie_embeddings=false",
        f"checkpoint.save_dir={path / 'ckpt'}", "checkpoint.save_interval=1",
        "checkpoint.keep_last=4", config=ZERO3, cache=cache,
    )  # fmt: skip


@pytest.fixture(scope="module")
def llama_resumed(tmp_path_factory, cache, llama):
    """Steps 4 to 6 of the Llama run, resumed from its save_dir's step-3 checkpoint."""
    path = tmp_path_factory.mktemp("llama_resumed")
    return path, _launched(
        path, "model.family=llama", "model.tie_embeddings=false",
        f"checkpoint.load_dir={llama[0] / 'ckpt' / 'iter_0000003'}",
        f"checkpoint.save_dir={path / 'ckpt'}", config=ZERO3, cache=cache,
    )  # fmt: skip


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory, cache):
    """A GPT-2 (lm_head tied to wte) at ZeRO-2."""
    path = tmp_path_factory.mktemp("gpt2")
    return path, _launched(path, "model.family=gpt2", cache=cache)


@needs_deepspeed
def test_pretrain_deepspeed_trains_and_logs_under_the_launcher(zero2):
    path, result = zero2
    out = _ok(result)
    assert "model: TorchGPT (nanodo), 42,144 parameters" in out
    assert "ZeRO stage 2, DeepSpeedZeroOptimizer) x DP 2" in out
    steps = _steps(out)
    assert len(steps) == 6 and all("skipped 0.0000" in line for line in steps), out[-3000:]
    assert all("loss_perturbed" in line for line in steps[1:])  # step 1: rho 0, a plain step
    evals = _evals(out)
    assert len(evals) == 2 and evals[1] < evals[0]
    for step in (3, 6):
        assert (
            f"saved checkpoint {path / 'ckpt'}/iter_000000{step} (step {step}, ZeRO stage 2)" in out
        )
    assert (path / "ckpt" / "latest").read_text() == "iter_0000006"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(path / "tb")).Reload()
    for name in ("loss_clean", "loss_perturbed", "eps_norm", "rho", "lr", "time_pass2"):
        values = [e.value for e in events.Scalars(f"train/{name}")]
        assert values and all(math.isfinite(v) for v in values), name
    assert len(events.Scalars("eval/loss")) == 2
    assert [e.step for e in events.Tensors("checkpoint/text_summary")] == [3, 6]


@needs_deepspeed
def test_pretrain_deepspeed_refuses_a_json_that_contradicts_the_run_file(tmp_path):
    config = json.loads(ZERO2.read_text())
    config["train_micro_batch_size_per_gpu"] = 3
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    error = _error_line(_launched(tmp_path, config=path))
    assert "train_micro_batch_size_per_gpu=3, but the run file gives 2" in error


def _assert_resumed_bitwise(straight, resumed, stage: int) -> None:
    """Steps 4-6 after a resume from step 3 log the same losses and end in the same
    checkpoint as the run that never stopped."""
    (path, result), (resumed_path, resumed_result) = straight, resumed
    _ok(result)
    out = _ok(resumed_result)
    first = f"resumed from {path / 'ckpt' / 'iter_0000003'} at step 3 (24 samples consumed, "
    assert first + f"ZeRO stage {stage})" in out
    assert [line.split("|")[:4] for line in _steps(out)] == [
        line.split("|")[:4] for line in _steps(result.stdout)[3:]
    ]
    logged, relogged = _scalars(path / "tb"), _scalars(resumed_path / "tb")
    later = {key: value for key, value in logged.items() if key[1] > 3}
    assert later and relogged == later  # every train/ and eval/ scalar of steps 4-6, exactly
    assert ("train/loss_perturbed", 6) in later and ("eval/loss", 6) in later
    want, got = _checkpoint_leaves(
        path / "ckpt" / "iter_0000006", resumed_path / "ckpt" / "iter_0000006"
    )
    fp32 = [key for key in want if key.startswith("fp32/")]
    assert len(fp32) > 10 and got == want
    (at_step_3,) = _checkpoint_leaves(path / "ckpt" / "iter_0000003")
    assert all(at_step_3[key] != want[key] for key in fp32)  # every param trained


@needs_deepspeed
def test_resume_at_zero_2_is_bitwise_the_straight_run(zero2, zero2_resumed):
    _assert_resumed_bitwise(zero2, zero2_resumed, stage=2)


@needs_deepspeed
def test_resume_with_the_previous_gradient_as_direction_is_bitwise(
    zero2_previous, zero2_previous_resumed
):
    """The kept direction is each rank's own file in the checkpoint: without it step 4 would
    be a plain step, and steps 4-6 would differ from the straight run."""
    _assert_resumed_bitwise(zero2_previous, zero2_previous_resumed, stage=2)
    saved = zero2_previous[0] / "ckpt" / "iter_0000003"
    assert sorted(p.name for p in saved.glob("megatron_fsam_rank*.pt")) == [
        "megatron_fsam_rank00000.pt", "megatron_fsam_rank00001.pt"
    ]  # fmt: skip
    kept = torch.load(saved / "megatron_fsam_rank00000.pt", weights_only=True)["kept"]
    assert kept and all(torch.isfinite(t).all() and t.abs().sum() > 0 for t in kept)


@needs_deepspeed
@needs_transformers
def test_resume_at_zero_3_is_bitwise_the_straight_run(llama, llama_resumed):
    _assert_resumed_bitwise(llama, llama_resumed, stage=3)
    path = llama[0] / "ckpt"  # keep_last 4 of the 6 saved
    assert sorted(p.name for p in path.glob("iter_*")) == [f"iter_000000{i}" for i in (3, 4, 5, 6)]


@needs_deepspeed
@needs_transformers
@pytest.mark.parametrize(
    "run, stage, described",
    [
        ("llama", 3, "LlamaForCausalLM (llama), 65,696 parameters"),
        ("gpt2", 2, "GPT2LMHeadModel (gpt2), 42,880 parameters"),
    ],
)
def test_hugging_face_models_train_and_log(request, run, stage, described):
    path, result = request.getfixturevalue(run)
    out = _ok(result)
    assert f"model: {described}" in out and f"(ZeRO stage {stage}, " in out
    steps = _steps(out)
    assert len(steps) == 6 and all("skipped 0.0000" in line for line in steps), out[-3000:]
    evals = _evals(out)
    assert len(evals) == 2 and evals[1] < evals[0] - 0.02, evals
    scalars = _scalars(path / "tb")
    for name in ("loss_clean", "loss_perturbed", "eps_norm", "grad_norm", "lr"):
        steps_logged = [s for tag, s in scalars if tag == f"train/{name}"]
        first = 2 if name in ("loss_perturbed", "grad_norm") else 1  # step 1: rho 0, plain
        assert steps_logged == list(range(first, 7)), name
        assert all(math.isfinite(v) for (tag, _), v in scalars.items() if tag == f"train/{name}")
    assert [s for tag, s in scalars if tag == "eval/loss"] == [3, 6]


@needs_deepspeed
@needs_transformers
@pytest.mark.parametrize(
    "config, overrides, expected",
    [
        (ZERO3, [], "was saved at ZeRO stage 2; this run is at stage 3"),
        (ZERO2, ["model.family=gpt2"], "holds a TorchGPT (nanodo, 42,144 parameters), not this "
         "run's GPT2LMHeadModel (gpt2, 42,880 parameters)"),
    ],
)  # fmt: skip
def test_a_checkpoint_of_another_stage_or_model_is_refused(
    tmp_path, cache, zero2, config, overrides, expected
):
    load = f"checkpoint.load_dir={zero2[0] / 'ckpt'}"  # its latest: iter_0000006
    error = _error_line(_launched(tmp_path, load, *overrides, config=config, cache=cache))
    assert f"error: {zero2[0] / 'ckpt' / 'iter_0000006'} " in error and expected in error


@needs_deepspeed
def test_a_save_dir_of_megatron_checkpoints_is_refused(tmp_path):
    save_dir = tmp_path / "megatron"
    (save_dir / "iter_0000060").mkdir(parents=True)
    (save_dir / "latest").write_text("60")  # launch/pretrain.py's
    error = _error_line(_launched(tmp_path, f"checkpoint.save_dir={save_dir}"))
    assert f"checkpoint.save_dir {save_dir} holds checkpoints of another kind" in error
    assert (save_dir / "iter_0000060").is_dir() and not (save_dir / "iter_0000006").exists()


@needs_deepspeed
@needs_transformers
def test_a_bad_hf_config_is_refused_in_one_line(tmp_path, cache):
    hf_config = tmp_path / "llama.json"
    hf_config.write_text(json.dumps({"model_type": "llama", "vocab_size": 100}))
    result = _launched(tmp_path, f"model.hf_config={hf_config}", cache=cache)
    assert "vocab_size 100 is smaller than the tokenizer's" in _error_line(result)


def test_launch_pretrain_refuses_hugging_face_models(capsys):
    from launch.pretrain import main

    tiny = str(ROOT / "configs" / "tiny_test.yaml")
    assert main(["--config", tiny, "model.family=llama"]) == 2
    (error,) = capsys.readouterr().err.splitlines()
    assert error.startswith("error: model.family 'llama' is a Hugging Face model, trained by ")
    assert main(["--config", tiny, "model.hf_config=llama.json"]) == 2
    assert "model.hf_config is a Hugging Face model" in capsys.readouterr().err


# ----- DeepSpeed's comm without its shared-memory allreduce (compat/deepspeed_cpu.py) -------


@needs_deepspeed
def test_a_launcher_run_builds_no_shm_op_and_leaves_nothing_in_dev_shm(zero2):
    out = _ok(zero2[1]) + zero2[1].stderr
    port = zero2[1].args[zero2[1].args.index("--master_port") + 1]
    assert list(Path("/dev/shm").glob(f"deepspeed_*_127.0.0.1_{port}_*")) == []
    assert "deepspeed_shm_comm" not in out  # DeepSpeed names the op when it builds or loads it


def _comm_without_shm(rank: int, world: int) -> dict:
    from deepspeed import comm

    start_deepspeed_comm()
    sums = []
    for size in (1000, 300_000):  # under and over the 1 MB that split DeepSpeed's shm kernels
        values = torch.arange(size, dtype=torch.float32) * (rank + 1)
        comm.inference_all_reduce(values)
        sums.append(torch.equal(values, torch.arange(size, dtype=torch.float32) * 3))
    return {
        "port": os.environ["MASTER_PORT"],
        "shm_op": comm.comm.cdb.shm_comm_op,
        "op_loaded": "deepspeed_shm_comm" in sys.modules,
        "sums": sums,
    }


@needs_deepspeed
def test_deepspeeds_comm_starts_without_the_shm_allreduce():
    """Under the deepspeed launcher's LOCAL_SIZE (which makes DeepSpeed's shm allreduce create
    its /dev/shm buffers) the comm starts without the op: none loaded, no buffer, and the one
    call that would use it, inference_all_reduce, still sums through torch.distributed."""
    for report in run_ranks(_comm_without_shm, 2, timeout=600, env={"LOCAL_SIZE": "2"}):
        assert report["shm_op"] is None and not report["op_loaded"]
        assert list(Path("/dev/shm").glob(f"deepspeed_*_127.0.0.1_{report['port']}_*")) == []
        assert report["sums"] == [True, True]


# ----- models/hf.py ------------------------------------------------------------------------


def _model(family: str, **fields) -> GPTConfig:
    shape = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64)
    return GPTConfig(**{**shape, "vocab_size": 0, "seq_length": 16, "family": family, **fields})


def _hf_config(model: GPTConfig):
    from megatron_fsam.trainer.models import hf

    return hf.model_config(model, tokenizer_vocab_size=100, padded_vocab_size=128, seq_length=16)


@needs_transformers
@pytest.mark.parametrize("family, tie", [("llama", False), ("gpt2", True), ("gpt2", False)])
def test_the_same_seed_builds_the_same_weights(family, tie):
    from megatron_fsam.trainer.models import hf

    model = _model(family, tie_embeddings=tie)
    config = _hf_config(model)
    assert model.vocab_size == 128  # 'auto' took the padded vocabulary
    first = hf.build_model(config, seed=3)
    again = hf.build_model(_hf_config(_model(family, tie_embeddings=tie)), seed=3)
    other = hf.build_model(config, seed=4)
    weights = dict(first.named_parameters())
    assert weights.keys() == dict(again.named_parameters()).keys()
    for name, param in again.named_parameters():
        assert torch.equal(param, weights[name]), name
        if param.dim() == 2:  # drawn, not constant
            assert not torch.equal(dict(other.named_parameters())[name], param), name
    head, embedding = first.get_output_embeddings(), first.get_input_embeddings()
    assert (head.weight is embedding.weight) == tie
    unique = sum(p.numel() for p in first.parameters())  # tied tensors counted once
    assert unique == non_embedding_params(model) + embedding_params(model)
    if family == "gpt2":  # GPT-2's residual projections are scaled by 1 / sqrt(2 layers)
        std = first.transformer.h[0].attn.c_proj.weight.std().item()
        assert abs(std - 0.02 / 2) < 0.002 and abs(embedding.weight.std().item() - 0.02) < 0.002


@needs_transformers
def test_causal_lm_loss_is_the_masked_mean_token_cross_entropy():
    from megatron_fsam.trainer.models import hf

    model = hf.build_model(_hf_config(_model("llama")), seed=1)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 100, (2, 16), generator=generator)
    labels = torch.randint(0, 100, (2, 16), generator=generator)
    mask = (torch.rand(2, 16, generator=generator) > 0.3).float()
    positions = torch.arange(16).expand(2, 16)
    batch = dict(tokens=tokens, labels=labels, loss_mask=mask, position_ids=positions)
    logits = model(input_ids=tokens).logits
    per_token = torch.stack(
        [F.cross_entropy(logits[b], labels[b], reduction="none") for b in range(2)]
    )
    want = (per_token * mask).sum() / mask.sum()
    assert torch.allclose(hf.causal_lm_loss(model, batch), want, rtol=1e-6, atol=0)


@needs_transformers
def test_an_hf_config_json_is_filled_from_and_checked_against_the_run(tmp_path):
    from megatron_fsam.trainer.models import hf

    def built(raw: dict, **fields):
        path = tmp_path / "config.json"
        path.write_text(json.dumps(raw))
        return _hf_config(_model("nanodo", hf_config=str(path), **fields))

    config = built({"model_type": "qwen2", "num_key_value_heads": 2})  # shape from the run file
    assert (config.vocab_size, config.max_position_embeddings) == (128, 16)
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (32, 2, 64)
    model = hf.build_model(config, seed=0)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (16, 32)  # 2 KV heads
    gpt2 = built({"model_type": "gpt2", "n_embd": 32, "n_positions": 64, "vocab_size": 100})
    assert (gpt2.n_positions, gpt2.vocab_size, gpt2.n_layer) == (64, 100, 2)

    def refused(raw: dict, **fields) -> str:
        with pytest.raises(ValueError) as info:
            built(raw, **fields)
        return str(info.value)

    assert "vocab_size 99 is smaller than the tokenizer's 100 tokens" in refused(
        {"model_type": "llama", "vocab_size": 99}
    )
    assert "gives vocab_size 100, the run file model.vocab_size 256" in refused(
        {"model_type": "llama", "vocab_size": 100}, vocab_size=256
    )
    assert "max_position_embeddings 8, shorter than data.seq_length 16" in refused(
        {"model_type": "llama", "max_position_embeddings": 8}
    )
    assert "gives n_embd 64, the run file model.hidden_size 32" in refused(
        {"model_type": "gpt2", "n_embd": 64}
    )
    assert "does not know model_type 'nonesuch'" in refused({"model_type": "nonesuch"})
    assert "model_type 't5' has no causal-LM head" in refused({"model_type": "t5"})
    assert "has no model_type" in refused({"hidden_size": 32})
    with pytest.raises(ValueError, match="cannot read"):
        _hf_config(_model("nanodo", hf_config=str(tmp_path / "missing.json")))


def test_missing_transformers_says_how_to_install_it(monkeypatch):
    from megatron_fsam.trainer.models import hf

    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install megatron-fsam\[hf\]"):
        hf.model_config(_model("llama"), tokenizer_vocab_size=100, padded_vocab_size=128,
                        seq_length=16)  # fmt: skip


def test_post_head_logit_transform_flags_soft_capping_only():
    from megatron_fsam.gate import post_head_logit_transform

    def module(**config) -> SimpleNamespace:
        return SimpleNamespace(config=SimpleNamespace(**config))

    gemma2 = post_head_logit_transform(
        module(model_type="gemma2", final_logit_softcapping=30.0, attn_logit_softcapping=50.0)
    )
    assert gemma2 and "gemma2 soft-caps the logits after lm_head" in gemma2
    assert "final_logit_softcapping=30.0" in gemma2
    assert None is post_head_logit_transform(
        module(model_type="gemma3", final_logit_softcapping=None)
    )
    vision = module(model_type="x", text_config=SimpleNamespace(final_logit_softcapping=30.0))
    assert "text_config.final_logit_softcapping" in post_head_logit_transform(vision)
    assert post_head_logit_transform(module(model_type="recurrent_gemma", logits_soft_cap=30.0))
    for passes in (
        module(model_type="llama", tie_word_embeddings=False),
        module(model_type="gpt2"),
        module(model_type="cohere", logit_scale=0.0625),  # constant scales: see below
        module(model_type="granite", logits_scaling=8.0),
        nn.Linear(2, 2),  # no config
    ):
        assert post_head_logit_transform(passes) is None


@needs_transformers
def test_post_head_logit_transform_on_transformers_configs():
    import transformers

    from megatron_fsam.gate import post_head_logit_transform

    gemma2 = SimpleNamespace(config=transformers.Gemma2Config())
    assert "final_logit_softcapping=30.0" in post_head_logit_transform(gemma2)
    for config in (transformers.LlamaConfig(), transformers.GPT2Config()):
        assert post_head_logit_transform(SimpleNamespace(config=config)) is None


def _gate_error(after_head) -> float:
    """|gate - Func-SAM| / |Func-SAM| for a model whose loss sees after_head(lm_head(h)).

    Func-SAM: J(theta + eps)^T c(theta) with c the cotangent at the logits the loss sees. The
    gate records and replays the cotangent at lm_head's output instead."""
    torch.manual_seed(0)
    body, lm_head = nn.Embedding(16, 8), nn.Linear(8, 16, bias=False)
    params = [body.weight, lm_head.weight]
    tokens, labels = torch.randint(0, 16, (4, 6)), torch.randint(0, 16, (4, 6))

    def logits() -> torch.Tensor:
        return after_head(lm_head(torch.tanh(body(tokens))) * 3.0)

    def loss(z: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(z.reshape(-1, 16), labels.reshape(-1))

    eps = [0.3 * torch.randn_like(p) for p in params]

    def perturb(sign: float) -> None:
        with torch.no_grad():
            for p, e in zip(params, eps, strict=True):
                p.add_(e, alpha=sign)

    z = logits()
    cotangent = torch.autograd.grad(loss(z), z)[0]
    perturb(1.0)
    want = torch.autograd.grad(logits(), params, grad_outputs=cotangent)
    perturb(-1.0)
    gate = LogitGate(lm_head)
    with gate.recording():
        loss(logits()).backward()
    for p in params:
        p.grad = None
    perturb(1.0)
    with gate.replaying():
        loss(logits()).backward()
    diff = sum((p.grad - w).square().sum() for p, w in zip(params, want, strict=True))
    return (diff / sum(w.square().sum() for w in want)).sqrt().item()


def test_the_logit_gate_follows_constant_scales_but_not_soft_caps():
    """Why post_head_logit_transform passes Cohere's / Granite's constant logit scales: the gate
    on lm_head is then Func-SAM exactly; a tanh soft-cap it is not."""
    assert _gate_error(lambda z: z) < 1e-6
    assert _gate_error(lambda z: z * 0.0625) < 1e-6  # Cohere's logit_scale
    assert _gate_error(lambda z: z / 8.0) < 1e-6  # Granite's logits_scaling
    assert _gate_error(lambda z: 2.0 * torch.tanh(z / 2.0)) > 1e-2  # a soft-cap


# ----- ZeRO-3's zero.Init ------------------------------------------------------------------


def _zero_init_weights(rank: int, world: int) -> dict[str, bool]:
    import deepspeed

    from megatron_fsam.trainer.models import hf

    start_deepspeed_comm()
    report = {}
    for family, tie in (("llama", False), ("gpt2", True)):
        config = _hf_config(_model(family, tie_embeddings=tie))
        plain = dict(hf.build_model(config, seed=5).named_parameters())
        for threshold, bf16 in ((0, False), (None, False), (0, True)):
            zero = {"stage": 3}
            if threshold is not None:  # 0: every param partitioned (default: small ones whole)
                zero["stage3_param_persistence_threshold"] = threshold
            ds_config = {
                "train_micro_batch_size_per_gpu": 1,
                "zero_optimization": zero,
                "bf16": {"enabled": bf16},
            }
            model = hf.build_model(config, seed=5, zero_init=ds_config)
            same = True
            for name, param in model.named_parameters():
                assert hasattr(param, "ds_id"), name
                with deepspeed.zero.GatheredParameters([param]):
                    want = plain[name].to(torch.bfloat16) if bf16 else plain[name]
                    same &= torch.equal(param.data, want)
            tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
            report[f"{family} threshold={threshold} bf16={bf16}"] = same and tied == tie
    return report


@needs_deepspeed
@needs_transformers
def test_zero_init_builds_the_same_weights_on_two_ranks():
    reports = run_ranks(_zero_init_weights, 2, timeout=600)
    for report in reports:
        assert len(report) == 6 and all(report.values()), report
