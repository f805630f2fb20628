"""Single-process reference for one SAM step, computed straight from the paper.

Uses `torch.func.functional_call` to evaluate the model at any parameter values
and `torch.autograd.grad` for vector-Jacobian products (Megatron's custom autograd
functions reject torch.func transforms). Mirrors the paper's Listing 1: fsam is the
VJP at theta + eps of the clean cotangent dL/dlogits(theta); sam the gradient at
theta + eps; ANGLE-SAM (App. D) mixes both VJPs of both cotangents.

Mixture-of-experts and multi-token prediction models: the logits are those of every call of
the output layer (the MTP heads, then the main head), each with its own loss computed here
(the MTP heads' cross entropy on labels shifted by their depth, as megatron-core defines it),
so each call has its own cotangent. The router's load-balancing and z-losses are loss terms
whose cotangent is a constant: their gradient A(params) is taken separately (megatron-core's
autoscaler injects it; it is switched off everywhere else), and enters every mode as the
paper's formulas give it for such a term: sam and fsam A(theta + eps), ANGLE-SAM
cos(phi) A(theta + eps) + (1 - cos(phi)) A(theta).

Hugging Face `transformers` causal LMs are called with keywords (`input_ids`, `position_ids`)
and give their logits as `.logits`; `logits_at` is the one place that tells them apart. A tied
lm_head / embedding is one parameter: its name appears once in `named_parameters()`, and
`functional_call` (tie_weights=True) substitutes the one tensor everywhere it is used.
"""

from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler
from torch.func import functional_call

Params = dict[str, torch.Tensor]


def logits_at(model: torch.nn.Module, params: Params, batch: dict) -> torch.Tensor:
    """[b, s, V] logits of an unwrapped single-process Megatron GPTModel (or TorchGPT), or of
    a Hugging Face causal LM."""
    if _is_hf(model):
        inputs = {"input_ids": batch["tokens"], "position_ids": batch["position_ids"]}
        return functional_call(model, params, (), inputs).logits
    return functional_call(model, params, (batch["tokens"], batch["position_ids"], None))


def _is_hf(model: torch.nn.Module) -> bool:
    """A `transformers` model (which is only built where transformers is imported already)."""
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def loss_of_logits(logits: torch.Tensor, batch: dict, num_microbatches: int) -> torch.Tensor:
    """The micro-batch's share of the global loss: masked mean token CE / #micro-batches."""
    ce = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1), reduction="none"
    )
    mask = batch["loss_mask"].reshape(-1).float()
    return (ce * mask).sum() / mask.sum() / num_microbatches


def heads_at(model: torch.nn.Module, params: Params, batch: dict) -> list[torch.Tensor]:
    """[b, s, V] logits of every call of the output layer: the multi-token prediction heads
    (depth 1, 2, ...) then the main head; just the main head's without MTP."""
    if not _setting(model, "mtp_num_layers"):
        return [logits_at(model, params, batch)]
    captured = []

    def keep(module, args, output):
        captured.append(output[0].transpose(0, 1))
        return (output[0].clone(), *output[1:])  # the model's own loss edits its copy in place

    handle = model.output_layer.register_forward_hook(keep)
    try:
        with _loss_scales(aux=0.0, mtp=0.0):
            functional_call(
                model,
                params,
                (batch["tokens"], batch["position_ids"], None),
                {"labels": batch["labels"], "loss_mask": batch["loss_mask"]},
            )
    finally:
        handle.remove()
    return captured


def loss_of_heads(
    model: torch.nn.Module, heads: list[torch.Tensor], batch: dict, num_microbatches: int
) -> torch.Tensor:
    """The micro-batch's share of the global loss over all heads: the main head's masked mean
    CE, plus for MTP depth k the masked mean CE against the labels k tokens further on (the
    last k positions masked), weighted mtp_loss_scaling_factor / mtp_num_layers."""
    loss = loss_of_logits(heads[-1], batch, num_microbatches)
    labels, mask = batch["labels"], batch["loss_mask"].float()
    for logits in heads[:-1]:
        labels, mask = _shifted(labels), _shifted(mask)
        ce = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none"
        )
        weight = _setting(model, "mtp_loss_scaling_factor") / _setting(model, "mtp_num_layers")
        loss = loss + weight * (ce * mask.reshape(-1)).sum() / mask.sum() / num_microbatches
    return loss


def _shifted(tensor: torch.Tensor) -> torch.Tensor:
    """One token further on; the last position (nothing to predict) is zero."""
    out = torch.roll(tensor, shifts=-1, dims=-1)
    out[..., -1] = 0
    return out


def aux_gradient(model: torch.nn.Module, at: Params, batches: list[dict]) -> Params | None:
    """The gradient of the router losses (load balancing, z-loss) of the global batch at
    `at`, or None for a model without experts."""
    if not _setting(model, "num_moe_experts"):
        return None
    params, total = _leaves(at), None
    for batch in batches:
        with _loss_scales(aux=1.0 / len(batches), mtp=0.0):
            heads = heads_at(model, params, batch)
            zeros = [torch.zeros_like(h) for h in heads]
            total = _accumulate(total, _grad(heads, params, zeros))
    return total


def _setting(model: torch.nn.Module, name: str):
    """A megatron-core model's TransformerConfig field (None for other models)."""
    return getattr(getattr(model, "config", None), name, None)


@contextmanager
def _loss_scales(aux: float, mtp: float):
    """The backward scales megatron-core's autoscalers inject into the router and MTP losses."""
    saved = (
        MoEAuxLossAutoScaler.main_loss_backward_scale,
        MTPLossAutoScaler.main_loss_backward_scale,
    )
    MoEAuxLossAutoScaler.main_loss_backward_scale = torch.tensor(aux)
    MTPLossAutoScaler.main_loss_backward_scale = torch.tensor(mtp)
    try:
        yield
    finally:
        MoEAuxLossAutoScaler.main_loss_backward_scale = saved[0]
        MTPLossAutoScaler.main_loss_backward_scale = saved[1]


def _plus(total: Params, part: Params | None, weight: float = 1.0) -> Params:
    return total if part is None else {n: total[n] + weight * part[n] for n in total}


def _grad(outputs, params: Params, grad_outputs=None) -> Params:
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
        with _loss_scales(aux=0.0, mtp=0.0):
            loss = loss_of_heads(model, heads_at(model, params, batch), batch, len(batches))
            total = _accumulate(total, _grad(loss, params))
    return _plus(total, aux_gradient(model, theta, batches))


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


def _cotangents(
    model: torch.nn.Module, params: Params, batch: dict, count: int
) -> list[torch.Tensor]:
    """dL/dlogits of one micro-batch at `params`, one per call of the output layer."""
    heads = [h.detach().requires_grad_(True) for h in heads_at(model, params, batch)]
    return list(torch.autograd.grad(loss_of_heads(model, heads, batch, count), heads))


def _vjp(model: torch.nn.Module, params: Params, batch: dict, cotangents: list) -> Params:
    """J(params)^T cotangents over every head of one micro-batch (router losses off)."""
    with _loss_scales(aux=0.0, mtp=0.0):
        return _grad(heads_at(model, params, batch), params, cotangents)


def sam_gradient(
    model: torch.nn.Module, theta: Params, batches: list[dict], *, mode: str, **ascent
) -> Params:
    """The gradient a SAM step hands to the optimizer (paper Eq. 2 and 11): sam is the
    gradient at theta + eps, fsam the VJP at theta + eps of the clean cotangent."""
    _, at_eps = perturbed_weights(model, theta, batches, **ascent)
    return _gradient_at(model, theta, at_eps, batches, mode)


def _gradient_at(
    model: torch.nn.Module, theta: Params, at_eps: Params, batches: list[dict], mode: str
) -> Params:
    """sam's gradient at theta + eps, or fsam's J(theta + eps)^T c(theta)."""
    perturbed, clean = _leaves(at_eps), _leaves(theta)
    if mode not in ("sam", "fsam"):
        raise ValueError(mode)
    total = None
    for batch in batches:
        at = perturbed if mode == "sam" else clean
        cotangents = _cotangents(model, at, batch, len(batches))
        total = _accumulate(total, _vjp(model, perturbed, batch, cotangents))
    return _plus(total, aux_gradient(model, at_eps, batches))


def angle_gradient(
    model: torch.nn.Module, theta: Params, batches: list[dict], *, degrees: float, **ascent
) -> Params:
    """ANGLE-SAM's gradient, App. D Eq. 19, taken exactly:

    g + sin(phi) [J(theta)^T c(theta+eps) - g] + cos(phi) [J(theta+eps)^T c(theta) - g],

    with the router losses' constant cotangent in both c: their share of the bracketed terms
    is A(theta) - A(theta) and A(theta + eps) - A(theta).
    """
    g, at_eps = perturbed_weights(model, theta, batches, **ascent)
    sin, cos = math.sin(math.radians(degrees)), math.cos(math.radians(degrees))
    logit_term = func_term = None
    for batch in batches:
        clean, perturbed = _leaves(theta), _leaves(at_eps)
        c_clean = _cotangents(model, clean, batch, len(batches))
        c_perturbed = _cotangents(model, perturbed, batch, len(batches))
        logit_term = _accumulate(logit_term, _vjp(model, clean, batch, c_perturbed))
        func_term = _accumulate(func_term, _vjp(model, perturbed, batch, c_clean))
    aux_clean, aux_perturbed = (
        aux_gradient(model, theta, batches),
        aux_gradient(model, at_eps, batches),
    )
    logit_term, func_term = _plus(logit_term, aux_clean), _plus(func_term, aux_perturbed)
    return {n: g[n] + sin * (logit_term[n] - g[n]) + cos * (func_term[n] - g[n]) for n in g}


def angle_first_order_gradient(
    model: torch.nn.Module, theta: Params, batches: list[dict], *, degrees: float, **ascent
) -> Params:
    """ANGLE-SAM's two-pass form, which replaces J(theta)^T c(theta+eps) in Eq. 19 by
    J(theta+eps)^T c(theta+eps):

    (1 - cos) g + J(theta+eps)^T [sin c(theta+eps) + (cos - sin) c(theta)],

    the router losses' constant cotangent mixed alike (cos A(theta + eps)), so that their
    share is Eq. 19's exactly: cos A(theta + eps) + (1 - cos) A(theta).
    """
    g, at_eps = perturbed_weights(model, theta, batches, **ascent)
    sin, cos = math.sin(math.radians(degrees)), math.cos(math.radians(degrees))
    total = None
    for batch in batches:
        clean, perturbed = _leaves(theta), _leaves(at_eps)
        c_clean = _cotangents(model, clean, batch, len(batches))
        c_perturbed = _cotangents(model, perturbed, batch, len(batches))
        mixed = [sin * p + (cos - sin) * c for p, c in zip(c_perturbed, c_clean, strict=True)]
        total = _accumulate(total, _vjp(model, perturbed, batch, mixed))
    total = _plus(total, aux_gradient(model, at_eps, batches), cos)
    return {n: total[n] + (1.0 - cos) * g[n] for n in g}


# The SAM settings a direction known before the step is checked in, in every layout.
KNOWN_DIRECTION_FORMS = {
    "sam": dict(mode="sam"),
    "fsam": dict(mode="fsam"),
    "precond sam": dict(mode="sam", precond=True, precond_floor=0.0),
    "precond fsam": dict(mode="fsam", precond=True, precond_floor=0.0),
}
KNOWN_DIRECTIONS = ("previous", "momentum")


def known_direction_run(
    model: torch.nn.Module,
    theta: Params,
    steps: list[list[dict]],
    *,
    mode: str,
    ascent: str,
    rho: float,
    precond: bool,
    lr: float | Callable[[int], float],
    betas: tuple[float, float],
    adam_eps: float,
    clip: float | None = None,
) -> list[Params]:
    """The gradient each step of an AdamW run hands its optimizer when eps follows a direction
    d known before the step: "previous", the gradient applied at the step before; "momentum",
    Adam's first moment. The first step has no d and is a plain step. In float64, with this
    run's own AdamW (no weight decay; `lr` a number or a function of the step): P = 1 /
    (sqrt(v / (1 - beta2^t)) + adam_eps) from v before the step's update (no floor), eps =
    rho * P d / ||P d||. With `clip`, the gradient is rescaled to at most that global norm
    before the update (as torch's clip_grad_norm_: clip / (norm + 1e-6), at most 1), which
    changes no direction."""
    theta = {n: v.detach().double() for n, v in theta.items()}  # the model computes in float64
    beta1, beta2 = betas
    m = {n: torch.zeros_like(v) for n, v in theta.items()}
    v = {n: torch.zeros_like(t) for n, t in theta.items()}
    applied: list[Params] = []
    for t, batches in enumerate(steps):  # t optimizer steps taken before this one
        d = applied[-1] if ascent == "previous" and applied else (m if t else None)
        if d is None:
            grad = gradient(model, theta, batches)
        else:
            if precond:
                d = {n: d[n] / ((v[n] / (1.0 - beta2**t)).sqrt() + adam_eps) for n in d}
            scale = rho / torch.sqrt(sum(x.square().sum() for x in d.values()))
            at_eps = {n: theta[n] + scale * d[n] for n in theta}
            grad = _gradient_at(model, theta, at_eps, batches, mode)
        grad = {n: x.detach() for n, x in grad.items()}
        if clip is not None:
            norm = torch.sqrt(sum(x.square().sum() for x in grad.values()))
            grad = {n: x * min(1.0, clip / (norm.item() + 1e-6)) for n, x in grad.items()}
        applied.append(grad)
        step_lr = lr(t) if callable(lr) else lr
        for n in theta:
            m[n] = beta1 * m[n] + (1.0 - beta1) * grad[n]
            v[n] = beta2 * v[n] + (1.0 - beta2) * grad[n].square()
            m_hat = m[n] / (1.0 - beta1 ** (t + 1))
            denom = (v[n] / (1.0 - beta2 ** (t + 1))).sqrt() + adam_eps
            theta[n] = theta[n] - step_lr * m_hat / denom
    return applied


def uniform_draw(seed: int, step: int) -> float:
    """The draw that decides a sam_probability step, re-derived from its definition (the
    run's seed and the step alone, so every rank and a resumed run agree): the 64-bit
    BLAKE2b digest of "seed:step" read as a big-endian integer, its top 53 bits over 2^53.
    Written with hexdigest and a float power of two instead of the plugin's byte arithmetic."""
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).hexdigest()
    return (int(digest, 16) >> 11) * 2.0**-53
