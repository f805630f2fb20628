"""Runs a Megatron-LM script on CPU ranks for the integration tests (one rank per process).

    python tests/megatron_lm_driver.py [options] SCRIPT ARGS...

Without --no-diff the script runs as it is (a plain or a patched tree) under the CPU
emulation alone; with it, through `python -m megatron_fsam.integrations.megatron_lm`'s main.

--record PATH       after every train_step this rank saves its losses, skipped flags, learning
                    rates, parameters and MoE routers' expert bias (a buffer: before the first
                    iteration and after each) to PATH.rank<R>.pt
--nan-pass2-at K    at iteration K (0-based) rank 0 writes NaN into one weight right after the
                    SAM perturbation, so that only pass 2 sees it
--direct-sam-at K   iteration K bypasses Megatron-LM's train_step and calls
                    FuncSAM.train_step itself on the same model, optimizer and data; the run
                    stops after recording it
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from megatron_fsam.integrations import megatron_lm


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-diff", action="store_true")
    parser.add_argument("--record")
    parser.add_argument("--nan-pass2-at", type=int)
    parser.add_argument("--direct-sam-at", type=int)
    options, rest = parser.parse_known_args()
    script, script_args = os.path.abspath(rest[0]), rest[1:]
    if options.no_diff:
        megatron_lm.install(os.path.dirname(script))  # first, so the recorder sits outside it
    megatron_lm.add_to_path(os.path.dirname(script))
    from megatron.training import training

    from megatron_fsam.compat.megatron_lm_cpu import enable_megatron_lm_cpu_emulation

    if options.nan_pass2_at is not None:
        _inject_nan_after_perturbation(options.nan_pass2_at)
    if options.record:
        training.train_step = _recording(training.train_step, options)
    if options.no_diff:
        sys.exit(megatron_lm.main([script, *script_args]))
    enable_megatron_lm_cpu_emulation()
    megatron_lm.run_script(script, script_args)


def _recording(train_step, options):
    """Wraps train_step (outermost, so it sees the real optimizer) to record each iteration."""
    from megatron.training.global_vars import get_args

    history = {"losses": [], "skipped": [], "lr": [], "update_sq": [], "expert_bias": []}

    def record_step(forward_step_func, data_iterator, model, optimizer, *args, **kwargs):
        iteration = get_args().curr_iteration
        before = _parameters(model)
        if not history["expert_bias"]:
            history["expert_bias"].append(_expert_biases(model))
        if iteration == options.direct_sam_at:
            _direct_sam_step(forward_step_func, data_iterator, model, optimizer)
            _save(options.record, history, before, _parameters(model))
            sys.exit(0)
        result = train_step(forward_step_func, data_iterator, model, optimizer, *args, **kwargs)
        loss_dict, skipped = result[0], result[1]
        history["losses"].append({k: float(v) for k, v in loss_dict.items()})
        history["skipped"].append(int(skipped))
        history["lr"].append(float(optimizer.param_groups[0]["lr"]))
        after = _parameters(model)
        history["expert_bias"].append(_expert_biases(model))
        history["update_sq"].append(
            sum(float((after[k] - v).square().sum()) for k, v in before.items())
        )
        _save(options.record, history, before, after)
        return result

    return record_step


def _direct_sam_step(forward_step_func, data_iterator, model, optimizer) -> None:
    """FuncSAM.train_step on Megatron-LM's own model, optimizer and data, as a user would."""
    from megatron.core.num_microbatches_calculator import get_num_microbatches
    from megatron.core.rerun_state_machine import get_rerun_state_machine
    from megatron.training.global_vars import get_args

    from megatron_fsam import FuncSAM

    args = get_args()
    sam = FuncSAM(megatron_lm.sam_config_from_args(args), model, optimizer)
    sam.iteration = args.curr_iteration
    # Megatron-LM's loss function validates its results, which it allows only inside this loop.
    rerun_state_machine = get_rerun_state_machine()
    while rerun_state_machine.should_run_forward_backward(data_iterator):
        ok, _, _, _ = sam.train_step(
            forward_step_func,
            data_iterator,
            num_microbatches=get_num_microbatches(),
            seq_length=args.seq_length,
            micro_batch_size=args.micro_batch_size,
        )
    assert ok


def _inject_nan_after_perturbation(iteration: int) -> None:
    from megatron.training.global_vars import get_args

    from megatron_fsam.backends.megatron import MegatronBackend

    publish = MegatronBackend.publish_params
    injected = []

    def publish_then_inject(self) -> None:
        publish(self)
        if get_args().curr_iteration == iteration and not injected:
            injected.append(True)
            if torch.distributed.get_rank() == 0:
                weight = next(self.model_chunks[0].parameters())
                weight.data.fill_(float("nan"))

    MegatronBackend.publish_params = publish_then_inject


def _parameters(model) -> dict[str, torch.Tensor]:
    return {
        f"{i}.{name}": param.detach().float().clone()
        for i, chunk in enumerate(model)
        for name, param in chunk.named_parameters()
    }


def _expert_biases(model) -> dict[str, torch.Tensor]:
    """The routers' aux-loss-free expert bias (buffers, moved in finalize_model_grads)."""
    return {
        f"{i}.{name}": buffer.detach().clone()
        for i, chunk in enumerate(model)
        for name, buffer in chunk.named_buffers()
        if name.endswith("expert_bias")
    }


def _save(path: str, history: dict, before: dict, after: dict) -> None:
    rank = torch.distributed.get_rank()
    torch.save({**history, "before": before, "after": after}, f"{path}.rank{rank}.pt")


if __name__ == "__main__":
    main()
