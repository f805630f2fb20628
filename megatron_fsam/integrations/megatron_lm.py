"""Megatron-LM integration: `--sam-*` flags and the SAM step inside Megatron-LM's train_step.

Two routes, one code path:

- a patched tree (patches/megatron-lm-*.patch) calls `add_sam_arguments` from
  `parse_args` and `install_training_hooks` at the end of `megatron/training/training.py`;
- the no-diff route, ``python -m megatron_fsam.integrations.megatron_lm PATH/pretrain_gpt.py
  ARGS...``, installs the same two hooks into an unmodified tree and runs the script.

Megatron-LM's `train_step` stays whole. When SAM is on, it is handed two stand-ins: a
`forward_backward_func` that runs the whole SAM step (both passes and the real
`optimizer.step()`, which restores theta before anything can read the model) and returns
pass 1's losses, and an optimizer whose `step()` returns that step's result. Everything
after the step (update/grad-norm reduction, LR schedule, `skipped_iter`, loss averaging,
`num_zeros_in_grad`, the rerun state machine) is Megatron-LM's own code. Without a
`--sam-mode` flag every hook calls straight through to Megatron-LM.

Megatron-LM versions (`megatron_lm_layout`): core_v0.16.1 parses its arguments inside
`initialize_megatron` (`initialize.parse_args`) and its `train_step` takes `iteration` last;
core_v0.19.0 parses them in `pretrain_gpt.py`'s `parse_and_validate_args`
(`arguments.parse_args`), its `train_step` also takes `pg_collection` and `p2p_communicator`,
and its FLOP count takes packed-sequence statistics. The hooks bind Megatron-LM's own
signatures by name, so both run the same code.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import os
import runpy
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

from megatron_fsam.config import CHOICES, PHASE_BOUNDS, SAMConfig
from megatron_fsam.schedules import phase_step

FLAG_PREFIX = "--sam-"
_HOOKED = "_megatron_fsam_hooked"


# ----- flags ----------------------------------------------------------------------------


def add_sam_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add one `--sam-<field>` flag per SAMConfig field; invalid values stop parsing.

    SAM is on when `--sam-mode` is given. Values and combinations are checked right
    after parsing (`parser.error`: one line, exit code 2). Idempotent.
    """
    if FLAG_PREFIX + "mode" in parser._option_string_actions:
        return parser
    group = parser.add_argument_group("megatron_fsam", "Func-SAM step (off without --sam-mode)")
    for field in dataclasses.fields(SAMConfig):
        flag = FLAG_PREFIX + field.name.replace("_", "-")
        default = field.default
        if field.type == "bool":
            group.add_argument(flag, action="store_true", default=None, help=f"(default {default})")
            continue
        kind = {"int": int, "float": float}.get(field.type.removesuffix(" | None"), str)
        if field.name in PHASE_BOUNDS:
            kind = _step_or_fraction
        group.add_argument(
            flag, type=kind, choices=CHOICES.get(field.name), default=None,
            help=f"(default {default})",
        )  # fmt: skip
    parse_known_args = parser.parse_known_args

    @functools.wraps(parse_known_args)
    def parse_and_check(*args: Any, **kwargs: Any):
        namespace, extras = parse_known_args(*args, **kwargs)
        try:
            sam_config_from_args(namespace)
        except ValueError as error:
            parser.error(str(error))
        return namespace, extras

    parser.parse_known_args = parse_and_check
    return parser


def sam_config_from_args(args: argparse.Namespace) -> SAMConfig | None:
    """The run's SAMConfig (None when SAM is off); ValueError for what cannot work."""
    given = {
        field.name: getattr(args, "sam_" + field.name)
        for field in dataclasses.fields(SAMConfig)
        if getattr(args, "sam_" + field.name, None) is not None
    }
    if "mode" not in given:
        if given:
            flags = ", ".join(FLAG_PREFIX + name.replace("_", "-") for name in given)
            raise ValueError(f"{flags} given without --sam-mode, which turns SAM on")
        return None
    given.setdefault("seed", getattr(args, "seed", None))  # sam_probability draws: the run's seed
    for name in PHASE_BOUNDS:  # fractions of --train-iters
        if isinstance(given.get(name), float):
            given[name] = phase_step(given[name], getattr(args, "train_iters", None) or 0)
    config = SAMConfig(**given)
    if config.sam_enabled:
        reason = _unsupported(args)
        if reason:
            raise ValueError(f"--sam-mode {config.mode} does not work with {reason}")
    return config


def _step_or_fraction(text: str) -> int | float:
    """A phase bound: a step number, or a fraction of --train-iters ("0.75")."""
    return float(text) if any(c in text for c in ".eE") else int(text)


def _unsupported(args: argparse.Namespace) -> str | None:
    """The first Megatron-LM setting SAM cannot run with, said as the user wrote it."""

    def on(name: str) -> bool:
        return bool(getattr(args, name, False))

    rerun_mode = str(getattr(args, "rerun_mode", "validate_results"))
    cuda_graph = str(getattr(args, "cuda_graph_impl", "none"))
    checks = [
        (
            on("fp16"),
            "--fp16: dynamic loss scaling is not supported; use --bf16",
        ),
        (
            rerun_mode.endswith("report_stats"),
            "--rerun-mode report_stats: it re-runs every iteration, and the SAM step "
            "has already updated the weights",
        ),
        (
            on("check_for_spiky_loss") or on("check_for_large_grads"),
            "--check-for-spiky-loss / --check-for-large-grads: a non-fatal validation re-runs "
            "an iteration whose SAM update is already applied",
        ),
        (
            float(getattr(args, "error_injection_rate", 0) or 0) > 0,
            "--error-injection-rate: injected validation failures re-run SAM steps",
        ),
        (
            cuda_graph != "none" or on("enable_cuda_graph") or on("external_cuda_graph"),
            "CUDA graphs (--cuda-graph-impl): a captured iteration cannot run two passes",
        ),
        (
            on("use_megatron_fsdp") or on("use_torch_fsdp2") or on("use_custom_fsdp"),
            "FSDP: SAM reads the distributed optimizer's or the plain optimizer's shards",
        ),
        (
            on("fp8_param_gather") or on("fp4_param") or on("fp4_param_gather"),
            "--fp8-param-gather / --fp4-param-gather: perturbed weights are written as bf16/fp32",
        ),
        (
            (on("fp8") and getattr(args, "fp8_recipe", None) == "custom")
            or (on("fp4") and getattr(args, "fp4_recipe", None) == "custom"),
            "--fp8-recipe custom / --fp4-recipe custom: a quantizer factory's state is out of "
            "the SAM step's sight, so pass 2 would move it too; use --fp8-recipe delayed (its "
            "amax history is replayed), tensorwise, blockwise, mxfp8 or --fp4-recipe nvfp4",
        ),
        (
            on("optimizer_cuda_graph"),
            "--optimizer-cuda-graph: a captured optimizer step cannot report or undo a SAM step",
        ),
        (
            int(getattr(args, "tensor_parallel_num_weight_shards", None) or 1)
            > int(getattr(args, "tensor_model_parallel_size", 1) or 1),
            "--tensor-parallel-num-weight-shards above the tensor-parallel size (GTP weight "
            "rematerialization): untested with SAM",
        ),
        (
            int(getattr(args, "expert_tensor_parallel_num_weight_shards", None) or 1)
            > int(
                getattr(args, "expert_tensor_parallel_size", None)
                or getattr(args, "tensor_model_parallel_size", 1)
                or 1
            ),
            "--expert-tensor-parallel-num-weight-shards above the expert tensor-parallel size "
            "(GTP weight rematerialization of the experts): untested with SAM",
        ),
        (
            "quantile_balancing" in _names(getattr(args, "moe_router_load_balancing_type", None)),
            "--moe-router-load-balancing-type quantile_balancing: its per-expert bias (qb_beta) "
            "moves at the end of every forward-backward pass, so twice per SAM step; SAM holds "
            "back only --moe-router-enable-expert-bias's bias",
        ),
        (
            on("use_precision_aware_optimizer"),
            "--use-precision-aware-optimizer: it hides the fp32 main params",
        ),
    ]
    return next((reason for failed, reason in checks if failed), None)


def _names(value: str | list[str] | None) -> list[str]:
    """A flag that takes one name or several (core_v0.19's `nargs="+"`) as a list."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


# ----- Megatron-LM versions -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MegatronLMLayout:
    """Where a Megatron-LM tree keeps what the hooks wrap.

    `tag`: the release line ("core_v0.16" or "core_v0.19"); `parse_args_module`: the module
    whose global `parse_args` builds the parser at run time (core_v0.16: `initialize`,
    which imported it by name; core_v0.19: `arguments`, called by `parse_and_validate_args`);
    `train_step_args`: the parameters of its `train_step` (core_v0.19 adds `pg_collection`
    and `p2p_communicator`), which the hook binds by name.
    """

    tag: str
    parse_args_module: str
    train_step_args: tuple[str, ...]


def megatron_lm_layout(training: ModuleType | None = None) -> MegatronLMLayout:
    """Detect the Megatron-LM version in use from `megatron.training` itself."""
    if training is None:
        from megatron.training import training
    from megatron.training import arguments

    step = getattr(training.train_step, "__wrapped__", training.train_step)
    parameters = tuple(inspect.signature(step).parameters)
    if hasattr(arguments, "parse_and_validate_args"):
        return MegatronLMLayout("core_v0.19", "arguments", parameters)
    return MegatronLMLayout("core_v0.16", "initialize", parameters)


# ----- hooks ----------------------------------------------------------------------------


def install_training_hooks(training: ModuleType) -> None:
    """Route Megatron-LM's train_step, training_log and FLOP count through SAM (idempotent).

    `training` is `megatron.training.training`; `train()` looks these up as module globals
    at each call, so wrapping the globals is enough.
    """
    if getattr(training, _HOOKED, False):
        return
    training.train_step = _sam_train_step(training.train_step)
    training.training_log = _sam_training_log(training, training.training_log)
    training.num_floating_point_operations = _all_passes(training.num_floating_point_operations)
    setattr(training, _HOOKED, True)


class _Session:
    """FuncSAM for one Megatron-LM run, built at its first train_step (after `train()` has
    set the model config's `finalize_model_grads_func`)."""

    def __init__(self, config: SAMConfig, model: list, optimizer: Any, schedule: Callable):
        from megatron_fsam.integrations.megatron_core import FuncSAM

        self.sam = FuncSAM(config, model, optimizer, forward_backward_func=schedule)
        self.metrics: dict[str, float | None] = {}
        self.passes = 1.0  # the last step's FLOPs over a plain step's

    def step_stand_ins(self, optimizer: Any) -> tuple[Callable, _SteppedOptimizer]:
        """A forward_backward_func that runs the SAM step, and the optimizer that reports it."""
        stepped = _SteppedOptimizer(optimizer)

        def forward_backward(
            *,
            forward_step_func: Callable,
            data_iterator: Any,
            model: list,
            num_microbatches: int,
            seq_length: int,
            micro_batch_size: int,
            decoder_seq_length: int | None = None,
            forward_only: bool = False,
            **schedule_kwargs: Any,
        ) -> list:
            if forward_only:
                raise RuntimeError("megatron_fsam: train_step asked for a forward-only pass")
            from megatron.training.global_vars import get_args

            args = get_args()  # training_log reports the iteration after this one's increment
            ok, grad_norm, losses, metrics = self.sam.train_step(
                forward_step_func,
                data_iterator,
                num_microbatches=num_microbatches,
                seq_length=seq_length,
                micro_batch_size=micro_batch_size,
                decoder_seq_length=decoder_seq_length,
                log_step=(args.curr_iteration + 1) % args.log_interval == 0,
                **schedule_kwargs,
            )
            stepped.result = (ok, grad_norm, metrics.pop("num_zeros_in_grad"))
            self.metrics = metrics
            self.passes = metrics["passes"]
            return losses

        return forward_backward, stepped


class _SteppedOptimizer:
    """Megatron-LM's optimizer, except that `step()` reports the SAM step already taken."""

    def __init__(self, optimizer: Any) -> None:
        self._optimizer = optimizer
        self.result: tuple[bool, float | None, int | None] | None = None

    def step(self) -> tuple[bool, float | None, int | None]:
        if self.result is None:
            raise RuntimeError("megatron_fsam: optimizer.step() before the SAM step ran")
        return self.result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._optimizer, name)


_session: _Session | None = None


def _sam_train_step(train_step: Callable) -> Callable:
    """train_step with the SAM stand-ins for `optimizer` and `forward_backward_func`.

    Arguments are bound to Megatron-LM's own signature, so the extra ones of a version
    (core_v0.19's `pg_collection`, `p2p_communicator`) pass through untouched.
    """
    signature = inspect.signature(train_step)

    @functools.wraps(train_step)
    def sam_train_step(*args, **kwargs):
        global _session
        from megatron.training.global_vars import get_args

        megatron_args = get_args()
        sam_config = sam_config_from_args(megatron_args)
        if sam_config is None:
            return train_step(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        step_args = bound.arguments
        _refuse_cross_grid(step_args)
        model, optimizer = step_args["model"], step_args["optimizer"]
        if _session is None:
            _session = _Session(sam_config, model, optimizer, step_args["forward_backward_func"])
        # The schedule position is Megatron-LM's iteration: resume continues the warm-up.
        _session.sam.iteration = megatron_args.curr_iteration
        sam_forward_backward, stepped = _session.step_stand_ins(optimizer)
        step_args["optimizer"], step_args["forward_backward_func"] = stepped, sam_forward_backward
        return train_step(*bound.args, **bound.kwargs)

    return sam_train_step


def _refuse_cross_grid(step_args: dict[str, Any]) -> None:
    """core_v0.19's cross-grid schedules (multi-module process groups) are not SAM's."""
    for name in ("pg_collection", "p2p_communicator"):
        if step_args.get(name) is not None:
            raise RuntimeError(
                f"megatron_fsam: train_step got a {name} (a cross-grid / multi-module "
                "schedule); the SAM step reduces over Megatron's default process groups only"
            )


def _all_passes(num_floating_point_operations: Callable) -> Callable:
    """Megatron-LM's FLOPs of one iteration, times the step's FLOPs over a plain step's
    (`passes`; core_v0.19 also passes packed-sequence statistics, by keyword)."""

    @functools.wraps(num_floating_point_operations)
    def counted(args, batch_size, *more, **kwargs):
        passes = _session.passes if _session is not None else 1
        return num_floating_point_operations(args, batch_size, *more, **kwargs) * passes

    return counted


def _sam_training_log(training: ModuleType, training_log: Callable) -> Callable:
    """On log iterations, add the SAM scalars to TensorBoard and to the console line."""
    signature = inspect.signature(training_log)

    @functools.wraps(training_log)
    def sam_training_log(*args, **kwargs):
        from megatron.training.global_vars import get_args, get_tensorboard_writer

        iteration = signature.bind(*args, **kwargs).arguments["iteration"]
        if _session is None or iteration % get_args().log_interval != 0:
            return training_log(*args, **kwargs)
        # A collective (every rank logs here), and the one read of the phase timers.
        scalars = _sam_scalars({**_session.metrics, **_session.sam.phase_times()})
        writer = get_tensorboard_writer()
        if writer is not None:
            for name, value in scalars.items():
                writer.add_scalar(f"sam/{name}", value, iteration)
        print_rank_last = training.print_rank_last

        def print_with_sam(message: str) -> None:
            if " iteration " in message and "consumed samples" in message:
                message += "".join(f" sam {k}: {_fmt(v)} |" for k, v in scalars.items())
            print_rank_last(message)

        training.print_rank_last = print_with_sam
        try:
            return training_log(*args, **kwargs)
        finally:
            training.print_rank_last = print_rank_last

    return sam_training_log


def _sam_scalars(metrics: dict[str, float | None]) -> dict[str, float]:
    """This iteration's SAM metrics averaged over the ranks that have them (losses: the last
    pipeline stage's DP ranks)."""
    from megatron_fsam.backends.shards import mean_over_ranks

    return mean_over_ranks({**metrics, "num_zeros_in_grad": None})


def _fmt(value: float) -> str:
    return f"{value:.4f}" if value == 0 or 1e-3 <= abs(value) < 1e5 else f"{value:.3e}"


# ----- the no-diff route ----------------------------------------------------------------


def install(tree: str) -> MegatronLMLayout:
    """Make the Megatron-LM tree at `tree` importable and install the flags and hooks.

    Returns the detected layout; the flags go into the `parse_args` its version calls.
    """
    add_to_path(tree)
    import importlib

    from megatron.training import training

    layout = megatron_lm_layout(training)
    module = importlib.import_module(f"megatron.training.{layout.parse_args_module}")
    parse_args = module.parse_args
    if not getattr(parse_args, _HOOKED, False):

        @functools.wraps(parse_args)
        def parse_args_with_sam(extra_args_provider=None, *args, **kwargs):
            def provider(parser):
                if extra_args_provider is not None:
                    parser = extra_args_provider(parser)
                return add_sam_arguments(parser)

            return parse_args(provider, *args, **kwargs)

        setattr(parse_args_with_sam, _HOOKED, True)
        module.parse_args = parse_args_with_sam
    install_training_hooks(training)
    return layout


def add_to_path(tree: str) -> None:
    """Make the tree's Megatron-LM importable as `python pretrain_gpt.py` would: ahead of
    everything, so its `megatron.training` (patched or not) is the one that runs; megatron-core
    wheels from 0.17 on ship a `megatron/training` of their own, which would otherwise shadow it.
    `megatron.core` stays the installed megatron-core: it is imported before the tree joins
    the path (a full Megatron-LM checkout has its own `megatron/core`, with unbuilt helpers).
    """
    if tree in sys.path:
        return
    try:
        import megatron.core  # noqa: F401
    except ImportError:  # no megatron-core installed: the tree's own, if it has one
        pass
    sys.path.insert(0, tree)


def run_script(script: str, args: list[str]) -> None:
    """Run a Megatron-LM script (`pretrain_gpt.py`) as `__main__` in this process."""
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


def main(argv: list[str] | None = None) -> int:
    """python -m megatron_fsam.integrations.megatron_lm PATH/pretrain_gpt.py ARGS..."""
    argv = _take_local_rank(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0].startswith("-"):
        print(
            "usage: python -m megatron_fsam.integrations.megatron_lm PATH/pretrain_gpt.py "
            "[Megatron-LM and --sam-* arguments]",
            file=sys.stderr,
        )
        return 2
    script = os.path.abspath(argv[0])
    if not os.path.isfile(script):
        print(f"error: no Megatron-LM script at {script}", file=sys.stderr)
        return 2
    install(os.path.dirname(script))
    if not torch.cuda.is_available():
        from megatron_fsam.compat.megatron_lm_cpu import enable_megatron_lm_cpu_emulation

        enable_megatron_lm_cpu_emulation()
    run_script(script, argv[1:])
    return 0


def _take_local_rank(argv: list[str]) -> list[str]:
    """Drop the deepspeed launcher's --local_rank=N (Megatron-LM reads LOCAL_RANK)."""
    kept, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg.startswith("--local_rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg == "--local_rank" and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            skip = True
        else:
            kept.append(arg)
    return kept


if __name__ == "__main__":
    sys.exit(main())
