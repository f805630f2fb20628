"""Diagnostics of sharpness: Eq. 9's tau composition, Hessian metrics, magnitude pruning.

All of them run through Megatron's own schedules in any TP/PP/DP layout, by finite
differences of gradients and logit cotangents (no double backward), and leave the model
exactly as they found it.
"""

from megatron_fsam.diagnostics.hessian import HessianMetrics, hessian_metrics
from megatron_fsam.diagnostics.probe import GradientProbe, ModelShards
from megatron_fsam.diagnostics.pruning import (
    PruningPoint,
    Threshold,
    evaluate_loss,
    magnitude_thresholds,
    pruning_curve,
)
from megatron_fsam.diagnostics.sharpness import sharpness_composition

__all__ = [
    "GradientProbe",
    "HessianMetrics",
    "ModelShards",
    "PruningPoint",
    "Threshold",
    "evaluate_loss",
    "hessian_metrics",
    "magnitude_thresholds",
    "pruning_curve",
    "sharpness_composition",
]
