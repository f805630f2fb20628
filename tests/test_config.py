"""SAMConfig validation, rho schedules, the ascent scale and the logit gate: no Megatron needed."""

import math
from contextlib import contextmanager, nullcontext

import pytest
import torch

from megatron_fsam import SAMConfig
from megatron_fsam.gate import CudaOps, LogitGate
from megatron_fsam.modes import recipe_for
from megatron_fsam.perturbation import NormSums, ascent
from megatron_fsam.schedules import is_sam_step, rho_at


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rho": -0.1}, "rho must be a finite number >= 0"),
        ({"rho": float("nan")}, "rho must be a finite number >= 0"),
        ({"rho": float("inf")}, "rho must be a finite number >= 0"),
        ({"mode": "asam"}, "mode must be one of"),
        ({"rho_schedule": "step"}, "rho_schedule must be one of"),
        ({"precond_norm": "l1"}, "precond_norm must be one of"),
        ({"kernels": "cuda"}, "kernels must be one of"),
        ({"rho_schedule": "linear_warmup", "rho_warmup_steps": 0}, "rho_warmup_steps"),
        ({"rho_schedule": "cosine_warmup", "rho_warmup_steps": -5}, "rho_warmup_steps"),
        ({"mode": "angle", "angle": 120.0}, r"angle must be a finite number in \[0, 90\]"),
        ({"angle": -1.0}, r"angle must be a finite number in \[0, 90\]"),
        ({"angle_impl": "second_order"}, "angle_impl must be one of"),
        ({"precond_floor": -1e-8}, "precond_floor must be a finite number >= 0"),
        ({"sam_interval": 0}, "sam_interval must be a positive integer"),
        ({"sam_interval": 2.5}, "sam_interval must be a positive integer"),
        ({"sam_probability": 1.5}, r"sam_probability must be a finite number in \[0, 1\]"),
        ({"sam_interval": 2, "sam_probability": 0.5}, "set one"),
        ({"on_nonfinite": "ignore"}, "on_nonfinite must be one of"),
        ({"seed": "7"}, "seed must be an integer"),
    ],
)
def test_bad_config_raises_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SAMConfig(**kwargs)


def test_rho_schedules():
    constant = SAMConfig(rho=0.1)
    assert [rho_at(constant, t) for t in (0, 5, 10_000)] == [0.1, 0.1, 0.1]
    linear = SAMConfig(rho=0.1, rho_schedule="linear_warmup", rho_warmup_steps=4)
    assert [rho_at(linear, t) for t in range(6)] == pytest.approx([0, 0.025, 0.05, 0.075, 0.1, 0.1])
    cosine = SAMConfig(rho=0.1, rho_schedule="cosine_warmup", rho_warmup_steps=4)
    values = [rho_at(cosine, t) for t in range(6)]
    assert values[0] == 0.0 and values[2] == pytest.approx(0.05) and values[4:] == [0.1, 0.1]
    assert all(a < b for a, b in zip(values[:4], values[1:5], strict=True))


def test_sam_step_schedules():
    every_third = SAMConfig(sam_interval=3)
    assert [is_sam_step(every_third, t) for t in range(7)] == [1, 0, 0, 1, 0, 0, 1]
    assert not any(is_sam_step(SAMConfig(mode="adamw"), t) for t in range(4))
    # Bernoulli(p) draws: a function of (seed, step) only, near p on average, seed-dependent.
    quarter = SAMConfig(sam_probability=0.25, seed=11)
    draws = [is_sam_step(quarter, t) for t in range(4000)]
    assert draws == [is_sam_step(quarter, t) for t in range(4000)]
    assert abs(sum(draws) / len(draws) - 0.25) < 0.03  # 4.5 standard deviations
    other_seed = [is_sam_step(SAMConfig(sam_probability=0.25, seed=12), t) for t in range(4000)]
    assert draws != other_seed
    assert not any(is_sam_step(SAMConfig(sam_probability=0.0), t) for t in range(100))


def test_angle_recipes():
    """What pass 2 back-propagates and how the gradient is mixed (modes.py's table)."""
    sin30, cos30 = 0.5, math.sqrt(3) / 2
    first_order = recipe_for(SAMConfig(mode="angle", angle=30.0))
    assert (first_order.perturbed, first_order.clean, first_order.grad) == pytest.approx(
        (sin30, cos30 - sin30, 1 - cos30), abs=1e-12
    )
    exact = recipe_for(SAMConfig(mode="angle", angle=30.0, angle_impl="exact"))
    assert (exact.pass2, exact.pass3, exact.grad) == pytest.approx(
        (cos30, sin30, 1 - sin30 - cos30), abs=1e-12
    )
    assert exact.passes == 3 and first_order.passes == 2
    # The special angles need no arithmetic on cotangents and no kept g.
    assert recipe_for(SAMConfig(mode="fsam")) == recipe_for(SAMConfig(mode="angle", angle=0.0))
    logit = recipe_for(SAMConfig(mode="logit"))
    assert (logit.perturbed, logit.clean, logit.grad) == (1.0, -1.0, 1.0)
    assert recipe_for(SAMConfig(mode="angle", angle=45.0)).clean == 0.0
    sam = recipe_for(SAMConfig(mode="sam"))
    assert not sam.needs_gate and (sam.perturbed, sam.clean, sam.grad) == (1.0, 0.0, 0.0)


def test_ascent_normalisations():
    # ||g||^2 = 4, ||P g||^2 = 16, g.P g = 8
    sums = NormSums(4.0, 16.0, 8.0)
    grad = ascent(sums, rho=0.5, precond_norm="grad")
    assert grad.scale == pytest.approx(0.25) and grad.eps_norm == pytest.approx(1.0)
    radius = ascent(sums, rho=0.5, precond_norm="perturbation")
    assert radius.eps_norm == pytest.approx(0.5)  # Euclidean radius exactly rho
    dual = ascent(sums, rho=0.5, precond_norm="dual")
    assert dual.scale == pytest.approx(0.5 / math.sqrt(8.0))
    assert ascent(NormSums(0.0, 0.0, 0.0), 0.5, "grad").scale == 0.0
    assert not NormSums(float("nan"), 1.0, 1.0).finite


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("offload", [False, True])
def test_gate_replays_recorded_cotangent_per_microbatch(device, offload):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    net = net.to(device)
    gate = LogitGate(net[2], offload=offload)
    inputs = [torch.randn(4, 5, device=device) for _ in range(3)]
    targets = [torch.randn(4, 3, device=device) for _ in range(3)]

    def loss(i):
        return ((net(inputs[i]) - targets[i]) ** 2).sum()

    with gate.recording():
        for i in range(3):
            loss(i).backward()
    if device == "cuda":
        torch.cuda.synchronize()
    stored_on = {c.device.type for c in gate.clean.cotangents.values()}
    assert stored_on == {"cpu" if offload else device}
    recorded = {i: c.to(device) for i, c in gate.clean.cotangents.items()}
    assert sorted(recorded) == [0, 1, 2]
    for i in range(3):  # the recorded cotangent is dL/dlogits of micro-batch i
        logits = net(inputs[i]).detach()
        assert torch.allclose(recorded[i], 2 * (logits - targets[i]))

    # Replay with forwards in order and backwards in reverse: each gets its own cotangent.
    net.zero_grad()
    with gate.replaying():
        outputs = [net(x) for x in inputs]
        for i in reversed(range(3)):
            (outputs[i] * 0.0).sum().backward()  # incoming cotangent is zero, replaced
    replayed = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    for i in range(3):
        net(inputs[i]).backward(recorded[i])
    expected = [p.grad for p in net.parameters()]
    for got, want in zip(replayed, expected, strict=True):
        assert torch.allclose(got, want, atol=1e-6)


def test_gate_mixes_cotangents_and_replays_the_perturbed_ones():
    """Pass 2: a * c(theta+eps) + b * c(theta), keeping c(theta+eps); pass 3 replays it."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    gate = LogitGate(net[2])
    inputs = [torch.randn(4, 5) for _ in range(3)]
    targets = [torch.randn(4, 3) for _ in range(3)]

    def cotangent(i):  # dL/dlogits of ((logits - target)^2).sum() at the current weights
        return 2 * (net(inputs[i]).detach() - targets[i])

    def vjp(cotangents):
        net.zero_grad()
        for i in range(3):
            net(inputs[i]).backward(cotangents[i])
        return [p.grad.clone() for p in net.parameters()]

    def passes(context):
        net.zero_grad()
        with context:
            for i in range(3):
                ((net(inputs[i]) - targets[i]) ** 2).sum().backward()
        return [p.grad.clone() for p in net.parameters()]

    clean = [cotangent(i) for i in range(3)]
    passes(gate.recording())
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    perturbed = [cotangent(i) for i in range(3)]
    mixed = passes(gate.mixing(perturbed=0.5, clean=-0.25, keep_perturbed=True))
    want = vjp([0.5 * perturbed[i] - 0.25 * clean[i] for i in range(3)])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(mixed, want, strict=True))
    assert all(torch.allclose(gate.perturbed.cotangents[i], perturbed[i]) for i in range(3))
    replayed = passes(gate.replaying_perturbed())
    assert all(
        torch.allclose(a, b, atol=1e-6) for a, b in zip(replayed, vjp(perturbed), strict=True)
    )
    own = passes(gate.mixing(perturbed=1.0, clean=0.0))  # SAM's pass 2: untouched
    assert all(torch.equal(a, b) for a, b in zip(own, passes(nullcontext()), strict=True))
    gate.clear()
    assert not gate.clean.cotangents and not gate.perturbed.cotangents


class _InPlaceCrossEntropy(torch.autograd.Function):
    """Summed cross entropy that, like Megatron's vocab-parallel one, overwrites its logits
    input with the softmax, saves that tensor and returns it (edited) as the gradient."""

    returned: list[int] = []  # data_ptr of each gradient handed to autograd

    @staticmethod
    def forward(ctx, logits, target):
        logits -= logits.max(dim=-1, keepdim=True)[0]
        torch.exp(logits, out=logits)
        logits.div_(logits.sum(dim=-1, keepdim=True))
        ctx.save_for_backward(logits, target)
        return -torch.log(logits.gather(-1, target[:, None])).sum()

    @staticmethod
    def backward(ctx, grad_output):
        softmax, target = ctx.saved_tensors
        softmax.scatter_add_(-1, target[:, None], -torch.ones_like(softmax[:, :1]))
        softmax.mul_(grad_output)
        _InPlaceCrossEntropy.returned.append(softmax.data_ptr())
        return softmax, None


def _clean_cotangent(logits, target):
    """dL/dlogits of the summed cross entropy, computed on a separate copy."""
    logits = logits.detach().clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(logits, target, reduction="sum").backward()
    return logits.grad


def _jvp_reference(net, inputs, cotangents):
    """sum_i J_i^T c_i at the net's current weights (what pass 2 should accumulate)."""
    net.zero_grad()
    for x, c in zip(inputs, cotangents, strict=True):
        net(x).backward(c)
    return [p.grad.clone() for p in net.parameters()]


def _allclose(got, want):
    return all(torch.allclose(g, w, atol=1e-6) for g, w in zip(got, want, strict=True))


def test_gate_copies_no_logits_under_an_in_place_cross_entropy():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 11))
    raw = []  # what the logits module itself returned (this hook runs before the gate's)
    net[2].register_forward_hook(lambda module, args, out: raw.append(out))
    gate = LogitGate(net[2])
    inputs = [torch.randn(4, 5) for _ in range(3)]
    targets = [torch.randint(0, 11, (4,)) for _ in range(3)]
    clean = [_clean_cotangent(net(x), t) for x, t in zip(inputs, targets, strict=True)]
    expected_clean = _jvp_reference(net, inputs, clean)

    net.zero_grad()
    raw.clear()
    _InPlaceCrossEntropy.returned.clear()
    with gate.recording():
        for x, t in zip(inputs, targets, strict=True):
            logits = net(x)
            assert logits is raw[-1]  # no forward copy: the loss edits the module's output
            _InPlaceCrossEntropy.apply(logits, t).backward()
    assert _allclose([p.grad for p in net.parameters()], expected_clean)
    for i in range(3):  # recorded as handed over: the loss's own gradient tensor, no copy
        assert gate.clean.cotangents[i].data_ptr() == _InPlaceCrossEntropy.returned[i]
        assert torch.allclose(gate.clean.cotangents[i], clean[i], atol=1e-6)

    # Pass 2 at perturbed weights: J(theta + eps)^T c(theta), with the loss again in place.
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    expected = _jvp_reference(net, inputs, clean)
    net.zero_grad()
    replayed = []

    def replay(index, incoming):
        replayed.append(gate.clean.load(index, incoming))
        return replayed[-1]

    with gate.rewriting(replay):
        outputs = [net(x) for x in inputs]
        for i in reversed(range(3)):  # backwards out of forward order, as interleaving may
            _InPlaceCrossEntropy.apply(outputs[i], targets[i]).backward()
    assert _allclose([p.grad for p in net.parameters()], expected)
    assert all(r is gate.clean.cotangents[i] for r, i in zip(replayed, (2, 1, 0), strict=True))


class _FakeEvent:
    def __init__(self, name):
        self.name = name


class _FakeStream:
    def __init__(self, name, log):
        self.name, self.log, self.events = name, log, 0

    def wait_stream(self, other):
        self.log.append(f"{self.name} waits {other.name}")

    def record_event(self):
        self.events += 1
        event = _FakeEvent(f"{self.name}#{self.events}")
        self.log.append(f"{self.name} records {event.name}")
        return event

    def wait_event(self, event):
        self.log.append(f"{self.name} waits {event.name}")


class _FakeCudaOps(CudaOps):
    """CPU tensors treated as CUDA ones; streams and pinned allocations logged."""

    def __init__(self):
        self.log = []
        self.compute = _FakeStream("compute", self.log)
        self.pinned = []

    def handles(self, tensor):
        return True

    def new_stream(self, device):
        self.log.append("new side stream")
        return _FakeStream("side", self.log)

    def current_stream(self, device):
        return self.compute

    @contextmanager
    def use_stream(self, stream):
        self.log.append(f"enter {stream.name}")
        yield
        self.log.append(f"leave {stream.name}")

    def pinned_empty(self, shape, dtype):
        self.pinned.append(torch.empty(shape, dtype=dtype))
        return self.pinned[-1]

    def record_stream(self, tensor, stream):
        self.log.append(f"record_stream {tuple(tensor.shape)} {stream.name}")


def test_offload_reuses_pinned_buffers_and_orders_its_side_stream():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 11))
    ops = _FakeCudaOps()
    gate = LogitGate(net[2], offload=True, cuda_ops=ops)

    def step(batch):
        inputs = [torch.randn(batch, 5) for _ in range(3)]
        targets = [torch.randint(0, 11, (batch,)) for _ in range(3)]
        clean = [_clean_cotangent(net(x), t) for x, t in zip(inputs, targets, strict=True)]
        ops.log.clear()
        with gate.recording():
            for x, t in zip(inputs, targets, strict=True):
                _InPlaceCrossEntropy.apply(net(x), t).backward()
        record_log = list(ops.log)
        for i in range(3):
            assert gate.clean.cotangents[i] is gate.clean.host.buffers[i]  # the host copy is kept
            assert torch.allclose(gate.clean.cotangents[i], clean[i], atol=1e-6)
        expected = _jvp_reference(net, inputs, clean)
        net.zero_grad()
        ops.log.clear()
        with gate.replaying():
            outputs = [net(x) for x in inputs]
            for i in range(3):  # backwards in micro-batch order, as 1F1B runs them
                _InPlaceCrossEntropy.apply(outputs[i], targets[i]).backward()
        assert _allclose([p.grad for p in net.parameters()], expected)
        replay_log = list(ops.log)
        gate.clear()
        return record_log, replay_log

    record_log, replay_log = step(batch=4)
    assert len(ops.pinned) == gate.clean.host.allocations == 3
    first_buffers = dict(gate.clean.host.buffers)
    shape = (4, 11)
    one_copy_out = [
        "side waits compute",  # the cotangent is complete before the side stream reads it
        "enter side",
        "leave side",
        f"record_stream {shape} side",  # its memory is not reused before that read
    ]
    assert record_log == ["new side stream", *one_copy_out * 3]
    assert replay_log == [
        # Micro-batch 0's copy starts with pass 2, before its forwards.
        *("enter side", "side records side#1", "leave side"),
        # Each backward waits for its own copy, then starts the next micro-batch's.
        *("compute waits side#1", f"record_stream {shape} compute"),
        *("enter side", "side records side#2", "leave side"),
        *("compute waits side#2", f"record_stream {shape} compute"),
        *("enter side", "side records side#3", "leave side"),
        *("compute waits side#3", f"record_stream {shape} compute"),
    ]

    record_log, _ = step(batch=4)  # same shapes: the same pinned buffers, no new stream
    assert len(ops.pinned) == gate.clean.host.allocations == 3
    assert all(gate.clean.host.buffers[i] is first_buffers[i] for i in range(3))
    assert record_log == one_copy_out * 3

    step(batch=6)  # new shapes: new buffers, once
    assert len(ops.pinned) == gate.clean.host.allocations == 6
    step(batch=6)
    assert len(ops.pinned) == gate.clean.host.allocations == 6


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA device: the offload's side-stream copies only run on CUDA tensors",
)
def test_offloaded_cotangent_replays_bit_exactly_on_cuda():
    torch.manual_seed(0)
    device, vocab, tokens, count = "cuda", 32_000, 512, 4
    net = torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, vocab)
    )
    net = net.to(device)
    gate = LogitGate(net[2], offload=True)
    incoming, replayed = {}, {}
    record, load = gate._record_clean, gate.clean.host.load

    def keep_incoming(index, cotangent):
        incoming[index] = cotangent.clone()  # on the compute stream, before the copy out
        return record(index, cotangent)

    def keep_replayed(index):
        replayed[index] = load(index).clone()  # after the compute stream waited for it
        return replayed[index]

    gate._record_clean, gate.clean.host.load = keep_incoming, keep_replayed
    busy = torch.randn(4096, 4096, device=device)
    for _ in range(2):  # the second step reuses the pinned buffers
        inputs = [torch.randn(tokens, 64, device=device) for _ in range(count)]
        targets = [torch.randint(0, vocab, (tokens,), device=device) for _ in range(count)]
        incoming.clear()
        replayed.clear()
        with gate.recording():
            for x, t in zip(inputs, targets, strict=True):
                _InPlaceCrossEntropy.apply(net(x), t).backward()
                busy = busy @ busy / 64  # keep the compute stream ahead of the copies
        net.zero_grad()
        with gate.replaying():
            outputs = [net(x) for x in inputs]
            for i in range(count):
                _InPlaceCrossEntropy.apply(outputs[i], targets[i]).backward()
                busy = busy @ busy / 64
        torch.cuda.synchronize()
        assert sorted(replayed) == list(range(count))
        for i in range(count):
            assert torch.equal(replayed[i], incoming[i])
            assert torch.equal(gate.clean.cotangents[i], incoming[i].cpu())
        replay_grads = [p.grad.clone() for p in net.parameters()]
        assert _allclose(
            replay_grads, _jvp_reference(net, inputs, [incoming[i] for i in range(count)])
        )
        gate.clear()
    assert gate.clean.host.allocations == count
