"""Single-process reference for one SAM step, computed straight from the paper.

Uses `torch.func.functional_call` to evaluate the model at any parameter values
and `torch.autograd.grad` for vector-Jacobian products (Megatron's custom autograd
functions reject torch.func transforms). Mirrors the paper's Listing 1: fsam is the
VJP at theta + eps of the clean cotangent dL/dlogits(theta); sam the gradient at
theta + eps.
"""

from __future__ import annotations

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


def sam_gradient(
    model: torch.nn.Module,
    theta: Params,
    batches: list[dict],
    *,
    mode: str,
    rho: float,
    precond: Params | None = None,
    precond_norm: str = "perturbation",
) -> Params:
    """The gradient a SAM step hands to the optimizer (paper Eq. 2, 11 and 12).

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
    perturbed = _leaves({n: theta[n] + scale * pg[n] for n in theta})
    clean = _leaves(theta)
    total = None
    for batch in batches:
        logits = logits_at(model, perturbed, batch)
        if mode == "sam":
            part = _grad(loss_of_logits(logits, batch, len(batches)), perturbed)
        elif mode == "fsam":
            clean_logits = logits_at(model, clean, batch).detach().requires_grad_(True)
            loss = loss_of_logits(clean_logits, batch, len(batches))
            (cotangent,) = torch.autograd.grad(loss, clean_logits)
            part = _grad(logits, perturbed, cotangent)
        else:
            raise ValueError(mode)
        total = _accumulate(total, part)
    return total
