"""Shared pieces of the SAM step tests: a tiny GPT, its data, layouts, comparisons."""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
from megatron.core import parallel_state
from megatron.core.optimizer import ChainedOptimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params
from megatron.core.utils import get_model_config, unwrap_model

from megatron_fsam import FuncSAM, SAMConfig
from megatron_fsam.backends.megatron import reset_loss_trackers
from megatron_fsam.backends.megatron_weights import (
    full_state,
    global_param_names,
    load_full_state,
    tp_slice,
)
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
    initialize_distributed,
    wrap_model,
)

TINY = GPTConfig(
    num_layers=4,
    hidden_size=32,
    num_attention_heads=4,
    ffn_hidden_size=None,
    vocab_size=64,
    seq_length=16,
)
MICRO_BATCH = 2
GLOBAL_MICROBATCHES = 8
ADAM = dict(name="adam", lr=1e-3, adam_beta1=0.0, adam_beta2=0.98, adam_eps=1e-3)
SGD = dict(name="sgd", lr=1.0)


def refusal_without_finalize(model: list, optimizer) -> str | None:
    """FuncSAM's error for `model` once its config has no finalize_model_grads_func (None where
    it is accepted)."""
    get_model_config(model[0]).finalize_model_grads_func = None
    try:
        FuncSAM(SAMConfig(), model, optimizer)
    except ValueError as error:
        return str(error)
    return None


def make_batches(count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Random token micro-batches with next-token labels and a few masked positions."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        stream = torch.randint(
            0, TINY.vocab_size, (MICRO_BATCH, TINY.seq_length + 1), generator=generator
        )
        mask = (torch.rand(MICRO_BATCH, TINY.seq_length, generator=generator) > 0.1).float()
        batches.append(
            {
                "tokens": stream[:, :-1].contiguous(),
                "labels": stream[:, 1:].contiguous(),
                "loss_mask": mask,
                "position_ids": torch.arange(TINY.seq_length).expand(MICRO_BATCH, -1).contiguous(),
            }
        )
    return batches


def use_layout(parallel: ParallelConfig) -> None:
    """(Re)build Megatron's process groups for this layout on the running ranks."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    initialize_distributed(parallel)


def one_process_model(model: GPTConfig = TINY):
    """One process: its layout, the global batch, a GPT and its weights (for references)."""
    parallel = ParallelConfig()
    use_layout(parallel)
    reset_loss_trackers()
    batches = make_batches(GLOBAL_MICROBATCHES)
    gpt = build_model_chunks(model, transformer_config(model, parallel), parallel)[0]
    return parallel, batches, gpt, full_state([gpt])


def build(
    parallel: ParallelConfig,
    full: dict[str, torch.Tensor],
    optimizer: dict,
    *,
    bf16: bool = False,
    model: GPTConfig = TINY,
):
    """DDP chunks of `model` holding `full` and a Megatron optimizer over them."""
    reset_loss_trackers()
    config = transformer_config(model, parallel, bf16=bf16)
    chunks = build_model_chunks(model, config, parallel)
    load_full_state(chunks, full)
    model = wrap_model(chunks, config, parallel)
    opt = build_optimizer(
        model, bf16=bf16, distributed_optimizer=parallel.distributed_optimizer, **optimizer
    )
    return model, opt


def my_batches(batches: list[dict]) -> list[dict]:
    """This data-parallel rank's contiguous share of the global batch."""
    size = parallel_state.get_data_parallel_world_size()
    rank = parallel_state.get_data_parallel_rank()
    share = len(batches) // size
    return batches[rank * share : (rank + 1) * share]


def data_iterator(model: list, batches: list[dict]):
    """One iterator per model chunk (interleaved schedule) or a single one."""
    if len(model) > 1:
        return [iter(batches) for _ in model]
    return iter(batches)


def sam_step(sam: FuncSAM, batches: list[dict], **step_kwargs):
    mine = my_batches(batches)
    return sam.train_step(
        forward_step,
        data_iterator(sam.model, mine),
        num_microbatches=len(mine),
        seq_length=TINY.seq_length,
        micro_batch_size=MICRO_BATCH,
        **step_kwargs,
    )


def received_gradients(model: list, optimizer) -> dict[str, torch.Tensor]:
    """The gradient each optimizer param received in its last step, under global names.

    Megatron leaves it in `.grad` of the optimizer's (main) params. Returned as
    {global name: (model param, flat range or None, gradient)}.
    """
    names = {id(p): n for n, p in global_param_names(model).items()}
    leaves = (
        optimizer.chained_optimizers if isinstance(optimizer, ChainedOptimizer) else [optimizer]
    )
    out = {}
    for opt in leaves:
        if isinstance(opt, DistributedOptimizer):
            pairs = [
                (mp, main)
                for groups in (
                    (opt.model_float16_groups, opt.shard_fp32_from_float16_groups),
                    (opt.model_fp32_groups, opt.shard_fp32_groups),
                )
                for mg, sg in zip(*groups, strict=True)
                for mp, main in zip(mg, sg, strict=True)
            ]
            for mp, main in pairs:
                if id(mp) not in names:
                    continue  # a weight the model never reads (see global_param_names)
                r = opt._get_model_param_range_map(mp)["param"]
                out.setdefault(names[id(mp)], []).append((mp, (r.start, r.end), main.grad))
        elif isinstance(opt, Float16OptimizerWithFloat16Params):
            for groups in (
                (opt.float16_groups, opt.fp32_from_float16_groups),
                (opt.fp32_from_fp32_groups, opt.fp32_from_fp32_groups),
            ):
                for mg, sg in zip(*groups, strict=True):
                    for mp, main in zip(mg, sg, strict=True):
                        if id(mp) in names:
                            out.setdefault(names[id(mp)], []).append((mp, None, main.grad))
        else:
            for group in opt.optimizer.param_groups:
                for p in group["params"]:
                    if id(p) in names:
                        out.setdefault(names[id(p)], []).append((p, None, p.grad))
    return out


def gradient_difference(got: dict, want: dict) -> tuple[float, bool]:
    """||got - want|| / ||want|| over this rank's pieces of two `received_gradients`, and
    whether they are bit-equal (two runs in the same layout)."""
    diff_sq = ref_sq = 0.0
    bitwise = True
    for name, pieces in want.items():
        for (_, _, grad_want), (_, _, grad_got) in zip(pieces, got[name], strict=True):
            diff_sq += (grad_got.double() - grad_want.double()).square().sum().item()
            ref_sq += grad_want.double().square().sum().item()
            bitwise &= torch.equal(grad_got, grad_want)
    return (diff_sq / ref_sq) ** 0.5, bitwise


def model_is_cast_of_main(model, opt) -> bool:
    """bf16 params equal cast(fp32 main params) exactly: nothing of eps remains."""
    pieces = received_gradients(model, opt)  # gives each model param's flat range
    for param_pieces in pieces.values():
        for param, flat_range, _ in param_pieces:
            main = param.main_param
            model_values = param.detach().reshape(-1)
            if flat_range is not None:
                model_values = model_values[flat_range[0] : flat_range[1]]
            if not torch.equal(model_values, main.detach().reshape(-1).to(param.dtype)):
                return False
    return True


def relative_error(received: dict, reference: dict[str, torch.Tensor]) -> float:
    """||received - reference|| / ||reference|| over this rank's shards of every tensor."""
    diff_sq, ref_sq = 0.0, 0.0
    for name, pieces in received.items():
        for param, flat_range, grad in pieces:
            want = tp_slice(reference[name], param).reshape(-1).double()
            if flat_range is not None:
                want = want[flat_range[0] : flat_range[1]]
            got = grad.reshape(-1).double()
            diff_sq += (got - want).square().sum().item()
            ref_sq += want.square().sum().item()
    return (diff_sq / ref_sq) ** 0.5


def sam_config(
    mode: str,
    precond: bool,
    precond_norm: str = "perturbation",
    rho: float = 0.05,
    kernels: str = "auto",
) -> SAMConfig:
    """Precond runs take one plain step first (warm-up from rho 0) to create Adam state; their
    P is the paper's, without a floor (as the references compute it)."""
    if precond:
        return SAMConfig(
            mode=mode,
            rho=rho,
            precond=True,
            precond_norm=precond_norm,
            precond_floor=0.0,
            rho_schedule="linear_warmup",
            rho_warmup_steps=1,
            kernels=kernels,
        )
    return SAMConfig(mode=mode, rho=rho, kernels=kernels)


def params_of(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in global_param_names(model).items()}


def optimizer_state(opt) -> list[torch.Tensor]:
    state = copy.deepcopy(opt.optimizer.state_dict()["state"])
    tensors = [t for s in state.values() for t in s.values() if torch.is_tensor(t)]
    mains = [p.detach().clone() for g in opt.optimizer.param_groups for p in g["params"]]
    return tensors + mains


def same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@contextmanager
def poisoned(model, calls_to_poison: range):
    """NaN hidden states on the given forward calls of the first layer (pass 1: 0..M-1).

    Poisoning activations rather than the loss reaches pass 2 of fsam too, whose backward
    starts from the recorded clean cotangent and never reads the perturbed loss.
    """
    count = [0]

    def hook(module, args, output):
        hit = count[0] in calls_to_poison
        count[0] += 1
        if hit:
            return (output[0] * float("nan"), *output[1:])
        return None

    gpt = unwrap_model(model[0])
    handle = gpt.decoder.layers[0].register_forward_hook(hook) if gpt.pre_process else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


def step_collectives(
    parallel: ParallelConfig,
    full: dict[str, torch.Tensor],
    batches: list[dict],
    configs: dict[str, SAMConfig],
    model: GPTConfig = TINY,
) -> dict[str, list[int]]:
    """Per config, the sizes of the all-reduces one step issues outside its forward-backward
    passes (Adam, fresh model from `full` each time)."""
    sizes: dict[str, list[int]] = {}
    original = torch.distributed.all_reduce
    in_pass = [True]

    def counting_all_reduce(tensor, *args, **kwargs):
        if not in_pass[0]:
            sizes[current].append(tensor.numel())
        return original(tensor, *args, **kwargs)

    def passes(**kwargs):
        in_pass[0] = True
        try:
            return forward_backward_func()(**kwargs)
        finally:
            in_pass[0] = False

    torch.distributed.all_reduce = counting_all_reduce
    try:
        for current, config in configs.items():
            in_pass[0] = True  # construction is not part of the step
            chunks, opt = build(parallel, full, ADAM, model=model)
            sam = FuncSAM(config, chunks, opt, forward_backward_func=passes)
            in_pass[0] = False
            sizes[current] = []
            sam_step(sam, batches)
    finally:
        torch.distributed.all_reduce = original
    return sizes


def beyond(sizes: list[int], baseline: list[int]) -> list[int]:
    """`sizes` without one occurrence of each of `baseline`'s, sorted."""
    extra = list(sizes)
    for size in baseline:
        extra.remove(size)
    return sorted(extra)


def plain_step(model: list, opt, batches: list[dict]) -> None:
    """One plain Megatron step (no SAM) on this rank's share of `batches`."""
    for chunk in model:
        chunk.zero_grad_buffer()
    opt.zero_grad()
    mine = my_batches(batches)
    forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=data_iterator(model, mine),
        model=model,
        num_microbatches=len(mine),
        seq_length=TINY.seq_length,
        micro_batch_size=MICRO_BATCH,
        forward_only=False,
    )
    opt.step()


def expert_biases(model: list) -> list[torch.Tensor]:
    """Copies of the MoE routers' expert biases on this rank, in module order."""
    return [
        m.expert_bias.detach().clone()
        for chunk in model
        for m in chunk.modules()
        if getattr(m, "expert_bias", None) is not None
    ]
