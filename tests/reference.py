"""Single-process reference for one SAM step, computed straight from the paper.

Uses `torch.func.functional_call` to evaluate the model at any parameter values
and `torch.autograd.grad` for vector-Jacobian products (Megatron's custom autograd
functions reject torch.func transforms). Mirrors the paper's Listing 1: fsam is the
VJP at theta + eps of the clean cotangent dL/dlogits(theta); sam the gradient at
theta + eps; ANGLE-SAM (App. D) mixes both VJPs of both cotangents.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.func import functional_call

Params = dict[str, torch.Tensor]


def logits_at(model: torch.nn.Module, params: Params, batch: dict) -> torch.Tensor:
    """[b, s, V] logits of an unwrapped single-process Megatron GPTModel."""
    return functional_call(model, params, (batch["tokens"], batch["position_ids"], None))


def loss_of_logits(logits: torch.Tensor, batch: dict, num_microbatches: int) -> torch.Tensor:
    """The micro-batch's share of the global loss: masked mean token CE / #micro-batches."""
    ce = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1), reduction="none"
    )
    mask = batch["loss_mask"].reshape(-1).float()
    return (ce * mask).sum() / mask.sum() / num_microbatches


def _grad(outputs: torch.Tensor, params: Params, grad_outputs=None) -> Params:
    names = list(params)
    grads = torch.autograd.grad(outputs, [params[n] for n in names], grad_outputs)
    return dict(zip(names, grads, strict=True))


def _accumulate(total: Params | None, part: Params) -> Params:
    return part if total is None else {n: total[n] + part[n] for n in total}


def _leaves(values: Params) -> Params:
    return {n: v.detach().clone().requires_grad_(True) for n, v in values.items()}


def gradient(model: torch.nn.Module, theta: Params, batches: list[dict]) -> Params:
    """g = grad of the global loss at theta."""
    params, total = _leaves(theta), None
    for batch in batches:
        loss = loss_of_logits(logits_at(model, params, batch), batch, len(batches))
        total = _accumulate(total, _grad(loss, params))
    return total


def perturbed_weights(
    model: torch.nn.Module,
    theta: Params,
    batches: list[dict],
    *,
    rho: float,
    precond: Params | None = None,
    precond_norm: str = "perturbation",
) -> tuple[Params, Params]:
    """g and theta + eps, eps = rho * P g / N (paper Eq. 12; N per precond_norm).

    precond: P per parameter (1 / (sqrt(v_hat) + adam_eps)), or None for P = 1.
    """
    g = gradient(model, theta, batches)
    pg = {n: g[n] * precond[n] for n in g} if precond is not None else g
    sums = {
        "grad": sum((g[n] * g[n]).sum() for n in g),
        "perturbation": sum((pg[n] * pg[n]).sum() for n in g),
        "dual": sum((g[n] * pg[n]).sum() for n in g),
    }
    scale = rho / sums[precond_norm].sqrt()
    return g, {n: theta[n] + scale * pg[n] for n in theta}


def _cotangent(model: torch.nn.Module, params: Params, batch: dict, count: int) -> torch.Tensor:
    """dL/dlogits of one micro-batch at `params`."""
    logits = logits_at(model, params, batch).detach().requires_grad_(True)
    (cotangent,) = torch.autograd.grad(loss_of_logits(logits, batch, count), logits)
    return cotangent


def sam_gradient(
    model: torch.nn.Module, theta: Params, batches: list[dict], *, mode: str, **ascent
) -> Params:
    """The gradient a SAM step hands to the optimizer (paper Eq. 2 and 11): sam is the
    gradient at theta + eps, fsam the VJP at theta + eps of the clean cotangent."""
    _, at_eps = perturbed_weights(model, theta, batches, **ascent)
    perturbed, clean = _leaves(at_eps), _leaves(theta)
    total = None
    for batch in batches:
        logits = logits_at(model, perturbed, batch)
        if mode == "sam":
            part = _grad(loss_of_logits(logits, batch, len(batches)), perturbed)
        elif mode == "fsam":
            part = _grad(logits, perturbed, _cotangent(model, clean, batch, len(batches)))
        else:
            raise ValueError(mode)
        total = _accumulate(total, part)
    return total


def angle_gradient(
    model: torch.nn.Module, theta: Params, batches: list[dict], *, degrees: float, **ascent
) -> Params:
    """ANGLE-SAM's gradient, App. D Eq. 19, taken exactly:

    g + sin(phi) [J(theta)^T c(theta+eps) - g] + cos(phi) [J(theta+eps)^T c(theta) - g].
    """
    g, at_eps = perturbed_weights(model, theta, batches, **ascent)
    sin, cos = math.sin(math.radians(degrees)), math.cos(math.radians(degrees))
    logit_term = func_term = None
    for batch in batches:
        clean, perturbed = _leaves(theta), _leaves(at_eps)
        c_clean = _cotangent(model, clean, batch, len(batches))
        c_perturbed = _cotangent(model, perturbed, batch, len(batches))
        logit_term = _accumulate(
            logit_term, _grad(logits_at(model, clean, batch), clean, c_perturbed)
        )
        func_term = _accumulate(
            func_term, _grad(logits_at(model, perturbed, batch), perturbed, c_clean)
        )
    return {n: g[n] + sin * (logit_term[n] - g[n]) + cos * (func_term[n] - g[n]) for n in g}
