"""SAMConfig validation, rho schedules and the ascent scale: no Megatron needed."""

import math

import pytest
import torch

from megatron_fsam import SAMConfig
from megatron_fsam.gate import LogitGate
from megatron_fsam.perturbation import NormSums, ascent
from megatron_fsam.schedules import rho_at


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
    stored_on = {c.device.type for c in gate.cotangents.values()}
    assert stored_on == {"cpu" if offload else device}
    recorded = {i: c.to(device) for i, c in gate.cotangents.items()}
    assert sorted(recorded) == [0, 1, 2]
    for i in range(3):  # the recorded cotangent is dL/dlogits of micro-batch i
        logits = net(inputs[i]).detach()
        assert torch.allclose(recorded[i], 2 * (logits - targets[i]))

    # Replay with forwards in order and backwards in reverse: each gets its own cotangent.
    net.zero_grad()
    with gate.rewriting(gate.replay_recorded):
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
