"""Runs a Megatron-LM script on CPU ranks for the integration tests (one rank per process).

    python tests/megatron_lm_driver.py [options] SCRIPT ARGS...

Without --no-diff the script runs as it is (a plain or a patched tree) under the CPU
emulation alone; with it, through `python -m megatron_fsam.integrations.megatron_lm`'s main.

--record PATH       after every train_step this rank saves its losses, skipped flags, learning
                    rates, parameters and MoE routers' expert bias (a buffer: before the first
                    iteration and after each) to PATH.rank<R>.pt
--nan-pass2-at K    at iteration K (0-based) rank 0 writes NaN into one weight right after the
                    SAM perturbation, so that only pass 2 sees it
--direct-sam-at K   iteration K first calls FuncSAM.train_step itself on the same model,
                    optimizer, data and RNG state, puts all of them back, then runs Megatron-LM's
                    train_step as usual; the record's "direct" and "route" hold each one's update
                    of the optimizer's main parameters and its SAM metrics (needs --record)
--parse-cases PATH  no training: PATH is a JSON list of extra argument lists; each goes, after
                    ARGS, through the no-diff route's main in this one process, which is
                    expected to stop at argument parsing; writes the detected Megatron-LM layout
                    and each case's exit status and stderr to PATH.out.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import itertools
import json
import os
import sys
import traceback

import torch

from megatron_fsam.integrations import megatron_lm

# The SAM metrics both routes report the same way (the route also measures eps_top_share on
# log steps, and the phase times differ).
COMPARED_METRICS = (
    "rho", "grad_norm", "eps_norm", "loss_clean", "loss_perturbed", "loss_pass2_clean",
    "skipped", "sam_step", "passes", "fallback",
)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--no-diff", action="store_true")
    parser.add_argument("--record")
    parser.add_argument("--nan-pass2-at", type=int)
    parser.add_argument("--direct-sam-at", type=int)
    parser.add_argument("--parse-cases")
    options, rest = parser.parse_known_args()
    script, script_args = os.path.abspath(rest[0]), rest[1:]
    if options.parse_cases:
        _parse_cases(options.parse_cases, script, script_args)
        return
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
        direct = iteration == options.direct_sam_at
        if direct:
            history["direct"] = _direct_sam_step(forward_step_func, data_iterator, model, optimizer)
            main_before = _flat(_main_params(optimizer))
        result = train_step(forward_step_func, data_iterator, model, optimizer, *args, **kwargs)
        if direct:
            history["route"] = {
                "update": _flat(_main_params(optimizer)) - main_before,
                "metrics": _compared(megatron_lm._session.metrics),
            }
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


def _direct_sam_step(forward_step_func, data_iterator, model, optimizer) -> dict:
    """FuncSAM.train_step on Megatron-LM's own model, optimizer and data, as a user would call
    it, from where this iteration starts; then everything it moved is put back, so that
    Megatron-LM's train_step runs the very same iteration next. Returns the update of the
    optimizer's main parameters and the step's metrics."""
    from megatron.core.num_microbatches_calculator import get_num_microbatches
    from megatron.core.rerun_state_machine import get_rerun_state_machine
    from megatron.training.global_vars import get_args

    from megatron_fsam import FuncSAM

    args = get_args()
    sam = FuncSAM(megatron_lm.sam_config_from_args(args), model, optimizer)
    if megatron_lm._session is not None:  # the run's SAM state so far (e.g. a kept direction)
        sam.load_state_dict(megatron_lm._session.sam.state_dict())
        sam.load_rank_state_dict(copy.deepcopy(megatron_lm._session.sam.rank_state_dict()))
    sam.iteration = args.curr_iteration
    start = _StepStart(model, optimizer, sam)
    data = _ReplayedMicrobatches(data_iterator)
    # Megatron-LM's loss function validates its results, which it allows only inside this loop.
    rerun_state_machine = get_rerun_state_machine()
    while rerun_state_machine.should_run_forward_backward(data_iterator):
        ok, _, _, metrics = sam.train_step(
            forward_step_func,
            data_iterator,
            num_microbatches=get_num_microbatches(),
            seq_length=args.seq_length,
            micro_batch_size=args.micro_batch_size,
        )
    assert ok
    update = _flat(_main_params(optimizer)) - start.main
    if sam.gate is not None:
        sam.gate.remove()  # Megatron-LM's own session keeps its hooks; this one goes
    start.restore()
    data.rewind()
    return {"update": update, "metrics": _compared(metrics)}


class _StepStart:
    """What a train_step moves, taken before one: the model's parameters, the optimizer's main
    parameters, state and group settings, the RNG states and what the plugin replays between
    its passes (logged router / MTP losses, the expert bias), the rerun state machine's count."""

    def __init__(self, model: list, optimizer, sam) -> None:
        from megatron.core.rerun_state_machine import get_rerun_state_machine

        from megatron_fsam.replay import RNGState

        self.model_params = [p for chunk in model for p in chunk.parameters()]
        self.main_params = _main_params(optimizer)
        self.torch_optimizers = [opt.optimizer for opt in _megatron_optimizers(optimizer)]
        with torch.no_grad():
            self.saved_params = [p.clone() for p in self.model_params + self.main_params]
        self.main = _flat(self.main_params)
        self.groups = [
            [
                {k: copy.deepcopy(v) for k, v in group.items() if k != "params"}
                for group in opt.param_groups
            ]
            for opt in self.torch_optimizers
        ]
        self.states = [
            {param: _cloned(state) for param, state in opt.state.items()}
            for opt in self.torch_optimizers
        ]
        self.replayed = [capture() for capture in (RNGState.capture, *sam.backend.replayed_state())]
        self.rerun_iteration = get_rerun_state_machine().current_iteration

    def restore(self) -> None:
        from megatron.core.rerun_state_machine import get_rerun_state_machine

        with torch.no_grad():
            params = self.model_params + self.main_params
            for param, saved in zip(params, self.saved_params, strict=True):
                param.copy_(saved)
        for opt, groups, states in zip(
            self.torch_optimizers, self.groups, self.states, strict=True
        ):
            for group, saved in zip(opt.param_groups, groups, strict=True):
                group.update(copy.deepcopy(saved))
            for param in list(opt.state):
                if param not in states:
                    del opt.state[param]
            for param, saved in states.items():
                _restore_state(opt.state[param], saved)
        for saved in self.replayed:
            saved.restore()
        get_rerun_state_machine().current_iteration = self.rerun_iteration


def _cloned(state: dict) -> dict:
    return {k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in state.items()}


def _restore_state(state: dict, saved: dict) -> None:
    """In place, so that whatever holds a reference to a moment tensor reads the restored
    values."""
    for key in [k for k in state if k not in saved]:
        del state[key]
    for key, value in saved.items():
        if torch.is_tensor(value) and torch.is_tensor(state.get(key)):
            with torch.no_grad():
                state[key].copy_(value)
        else:
            state[key] = value.clone() if torch.is_tensor(value) else copy.deepcopy(value)


class _ReplayedMicrobatches:
    """Keeps the micro-batches a step reads from Megatron-LM's data iterators
    (RerunDataIterator, one per virtual stage or None) and hands them out again, in order,
    before the iterators' next ones."""

    def __init__(self, data_iterator) -> None:
        from megatron.core.rerun_state_machine import RerunDataIterator

        from megatron_fsam.replay import RecordingIterator

        iterators = data_iterator if isinstance(data_iterator, list) else [data_iterator]
        self.recorded = []
        for iterator in iterators:
            if iterator is None:
                continue
            assert isinstance(iterator, RerunDataIterator), type(iterator)
            recorder = RecordingIterator(iterator.iterable)
            iterator.iterable = recorder
            self.recorded.append((iterator, recorder))

    def rewind(self) -> None:
        for iterator, recorder in self.recorded:
            iterator.iterable = itertools.chain(recorder.batches, recorder.source)


def _megatron_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _main_params(optimizer) -> list[torch.Tensor]:
    """The parameters the optimizer updates: fp32 main copies (bf16), this rank's shards
    (distributed optimizer) or the model's own parameters (fp32)."""
    return [
        param
        for opt in _megatron_optimizers(optimizer)
        for group in opt.optimizer.param_groups
        for param in group["params"]
    ]


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().float().flatten() for t in tensors])


def _compared(metrics: dict) -> dict:
    return {name: metrics.get(name) for name in COMPARED_METRICS}


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


def _parse_cases(path: str, script: str, script_args: list[str]) -> None:
    """Each case through the no-diff route's main, in this process (one import of Megatron-LM
    for all); each should stop at parsing with exit status 2 and one error line."""
    layout = megatron_lm.install(os.path.dirname(script))
    with open(path) as f:
        cases = json.load(f)
    results = []
    for case in cases:
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                megatron_lm.main([script, *script_args, *case])
            status = "returned"
        except SystemExit as stop:
            status = stop.code
        except Exception:
            status = "raised"
            stderr.write(traceback.format_exc())
        results.append({"args": case, "status": status, "stderr": stderr.getvalue()})
    layout_fields = {
        "tag": layout.tag,
        "parse_args_module": layout.parse_args_module,
        "train_step_args": list(layout.train_step_args),
    }
    with open(f"{path}.out.json", "w") as f:
        json.dump({"layout": layout_fields, "results": results}, f)


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
