"""SAMConfig: every knob of the SAM step, validated before any work is done."""

from __future__ import annotations

import math
from dataclasses import dataclass

MODES = ("adamw", "sam", "fsam", "angle", "logit")
ANGLE_IMPLS = ("first_order", "exact")
PRECOND_NORMS = ("grad", "perturbation", "dual")
RHO_SCHEDULES = ("constant", "linear_warmup", "cosine_warmup")
KERNEL_BACKENDS = ("auto", "torch", "triton")
ON_NONFINITE = ("skip", "fallback")
COTANGENT_MEMORIES = ("device", "offload", "recompute", "auto")
ASCENTS = ("gradient", "previous", "momentum")
PHASE_BOUNDS = ("sam_start_step", "sam_end_step")  # entry points: steps, or fractions of the run
CHOICES = {
    "mode": MODES,
    "angle_impl": ANGLE_IMPLS,
    "precond_norm": PRECOND_NORMS,
    "rho_schedule": RHO_SCHEDULES,
    "kernels": KERNEL_BACKENDS,
    "on_nonfinite": ON_NONFINITE,
    "cotangent_memory": COTANGENT_MEMORIES,
    "ascent": ASCENTS,
}


@dataclass
class SAMConfig:
    """Settings of the SAM step (names follow the paper, Singh et al. 2025).

    mode: "adamw" (plain step, the baseline), "sam" (Eq. 2: gradient at theta+eps),
        "fsam" (Eq. 11: J(theta+eps)^T c(theta), the clean logit cotangent replayed),
        "angle" (App. D, Eq. 19: the functional and logit sharpness paths mixed at
        `angle`), "logit" (angle 90: only the logit path, LOGIT-SAM).
    angle: phi in degrees (0..90) for mode "angle": 0 is fsam, 90 is logit, 45 is SAM to
        first order (at radius rho / sqrt 2).
    angle_impl: "first_order" (two passes, the cost of SAM; agrees with Eq. 19 up to
        O(rho^2)) or "exact" (Eq. 19 with a third pass at theta).
    rho: perturbation radius after warm-up.
    precond: precondition the ascent direction with the optimizer's own Adam
        second moment, P = 1 / (max(sqrt(v_hat), floor) + adam_eps).
    precond_norm: how eps = rho * P g / N is normalised: N = ||g|| ("grad", Eq. 12
        read literally), ||P g|| ("perturbation": ||eps|| = rho exactly), or
        sqrt(g.P g) ("dual": steepest ascent in the optimizer's norm).
    precond_floor: the floor on sqrt(v_hat) in P, as a fraction of the root-mean-square of
        sqrt(v_hat) over the whole model (recomputed every SAM step), so that coordinates
        whose second moment decayed to ~0 (rare-token embedding rows) cannot take most of
        the radius; relative, because gradient scales differ across models and steps.
    ascent: the direction d that eps = rho * P d / N follows. "gradient" (the paper): this
        step's pass-1 gradient g, which costs a forward-backward at theta. "previous": the
        gradient the optimizer applied at the previous step (the SAM gradient after a SAM
        step, g after a plain one; one fp32 gradient shard kept between steps). "momentum":
        Adam's first moment exp_avg (no extra memory). With a direction known before the
        step, sam is one forward-backward at theta + eps, and fsam's pass 1 is a forward at
        theta that only records c(theta) (4/3 of a plain step's FLOPs instead of 2). A step
        with no direction yet (the first one; for "previous" also the one after a skipped
        step) is a plain step. Modes whose gradient mixes in g (the first-order angle form
        at angles other than 0, the exact form at angles other than 0 and 90) need
        "gradient", and so does on_nonfinite="fallback" (it applies g).
    rho_schedule / rho_warmup_steps: rho ramps from 0 over the first steps (of the SAM
        phase, from sam_start_step).
    sam_start_step / sam_end_step: SAM steps only in the phase [sam_start_step,
        sam_end_step) (None: to the end); plain optimizer steps outside it.
    sam_interval: a SAM step every sam_interval-th step of the phase (start, start + k, ...),
        plain steps between.
    sam_probability: each step is a SAM step with this probability (randomized sharpness
        training), drawn from (seed, step): every rank draws the same without talking.
    seed: seed of the sam_probability draws; None takes the run's seed where an entry point
        knows it (launch/pretrain.py's train.seed, Megatron-LM's --seed), else 0.
    on_nonfinite: a step whose SAM gradient is not finite while g is: "skip" it (nothing
        changes) or "fallback" (apply g as a plain optimizer step).
    logits_module: name (or dotted suffix) of the module whose output is the logits;
        None finds Megatron's `output_layer` (on a DeepSpeed engine: `lm_head`, then
        `output_layer`).
    kernels: "auto", "torch" or "triton" implementation of norm/perturb/restore.
    cotangent_memory: where Func-SAM's clean logit cotangents c(theta) (sequence x
        micro-batch x vocab/TP per micro-batch, gigabytes at scale) live between the passes:
        "device" (kept where they are), "offload" (pinned host memory, copied asynchronously),
        "recompute" (keep the logits module's input, hidden/vocab as large, and recompute the
        clean logits in pass 2: one logits-module forward per micro-batch; pass 2's loss is
        then the clean one, logged as loss_pass2_clean), or "auto" (recompute where the
        logits module and the mode allow it, else device).
    cotangent_offload: the older spelling of cotangent_memory="offload".

    Mixture-of-experts models: pass 2 routes its own tokens at theta + eps. The router's
    load-balancing and z-losses do not pass through the logits: their cotangent is a
    constant, so Func-SAM's formula gives their gradient at theta + eps (as SAM does); ANGLE-SAM
    weights them as Eq. 19 does (cos(phi) at theta + eps, 1 - cos(phi) at theta). The expert
    bias moves once per step, by pass 1's token counts, as in a plain step. With multi-token
    prediction each call of the logits module (every MTP head, then the main head) replays
    its own clean cotangent.
    """

    mode: str = "fsam"
    angle: float = 45.0
    angle_impl: str = "first_order"
    rho: float = 0.05
    precond: bool = False
    precond_norm: str = "perturbation"
    precond_floor: float = 0.1
    rho_schedule: str = "constant"
    rho_warmup_steps: int = 0
    sam_interval: int = 1
    sam_probability: float = 1.0
    seed: int | None = None
    on_nonfinite: str = "skip"
    logits_module: str | None = None
    kernels: str = "auto"
    cotangent_memory: str = "device"
    cotangent_offload: bool = False
    ascent: str = "gradient"
    sam_start_step: int = 0
    sam_end_step: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name, allowed in CHOICES.items():
            _one_of(name, getattr(self, name), allowed)
        _number("rho", self.rho, low=0.0)
        _number("angle", self.angle, low=0.0, high=90.0)
        _number("precond_floor", self.precond_floor, low=0.0)
        _number("sam_probability", self.sam_probability, low=0.0, high=1.0)
        if self.rho_schedule != "constant" and (
            not isinstance(self.rho_warmup_steps, int) or self.rho_warmup_steps <= 0
        ):
            raise ValueError(
                f"SAMConfig.rho_warmup_steps must be a positive integer for "
                f"rho_schedule={self.rho_schedule!r}, got {self.rho_warmup_steps!r}"
            )
        if not isinstance(self.sam_interval, int) or self.sam_interval < 1:
            raise ValueError(
                f"SAMConfig.sam_interval must be a positive integer, got {self.sam_interval!r}"
            )
        if self.sam_interval > 1 and self.sam_probability < 1.0:
            raise ValueError(
                "SAMConfig: sam_interval and sam_probability both thin out SAM steps; set one "
                f"(got sam_interval={self.sam_interval}, sam_probability={self.sam_probability})"
            )
        _step("sam_start_step", self.sam_start_step)
        if self.sam_end_step is not None:
            _step("sam_end_step", self.sam_end_step)
            if self.sam_end_step <= self.sam_start_step:
                raise ValueError(
                    f"SAMConfig.sam_end_step ({self.sam_end_step}) must be after sam_start_step "
                    f"({self.sam_start_step})"
                )
        if self.stale_ascent and self.needs_clean_gradient:
            raise ValueError(
                f"SAMConfig: ascent={self.ascent!r} with mode={self.mode!r} at angle "
                f"{self.angle_degrees:g} ({self.angle_impl}): that gradient mixes in g, which a "
                "step with a known direction never computes; use ascent='gradient'"
            )
        if self.stale_ascent and self.on_nonfinite == "fallback":
            raise ValueError(
                f"SAMConfig: ascent={self.ascent!r} with on_nonfinite='fallback': the fallback "
                "applies g, which a step with a known direction never computes; use "
                "on_nonfinite='skip'"
            )
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"SAMConfig.seed must be an integer, got {self.seed!r}")
        if self.cotangent_offload and self.cotangent_memory in ("device", "offload"):
            self.cotangent_memory = "offload"
        elif self.cotangent_offload:
            raise ValueError(
                "SAMConfig: cotangent_offload=True is cotangent_memory='offload', but "
                f"cotangent_memory={self.cotangent_memory!r}; set only cotangent_memory"
            )
        if self.cotangent_memory == "recompute" and self.mixes_cotangents:
            raise ValueError(
                f"SAMConfig: cotangent_memory='recompute' with mode={self.mode!r} at angle "
                f"{self.angle_degrees:g} and angle_impl='first_order': that form back-propagates "
                "a mix of c(theta+eps) and c(theta) in one pass, which needs both stored; use "
                "angle_impl='exact' (a third pass) or cotangent_memory='device'/'offload'"
            )

    @property
    def sam_enabled(self) -> bool:
        """Whether SAM steps happen at all (mode is not the plain baseline)."""
        return self.mode != "adamw"

    def describe(self) -> str:
        """One line for the logs: what a step does and how often."""
        if not self.sam_enabled:
            return "mode adamw (plain optimizer steps)"
        parts = [f"mode {self.mode}", f"rho {self.rho:g}"]
        if self.mode in ("angle", "logit"):
            parts.append(f"angle {self.angle_degrees:g} deg ({self.angle_impl})")
        if self.precond:
            parts.append(
                f"precond {self.precond_norm}, floor {self.precond_floor:g} x RMS sqrt(v_hat)"
            )
        if self.stale_ascent:
            parts.append(f"ascent along the {ASCENT_WORDS[self.ascent]}")
        if self.sam_start_step or self.sam_end_step is not None:
            end = "the end" if self.sam_end_step is None else f"step {self.sam_end_step}"
            parts.append(f"SAM from step {self.sam_start_step} to {end}")
        if self.sam_interval > 1:
            parts.append(f"SAM every {self.sam_interval} steps")
        if self.sam_probability < 1.0:
            parts.append(f"SAM with probability {self.sam_probability:g}")
        if self.mode != "sam":
            parts.append(f"cotangent memory {self.cotangent_memory}")
        parts.append(f"non-finite SAM gradient: {self.on_nonfinite}")
        return ", ".join(parts)

    @property
    def stale_ascent(self) -> bool:
        """Whether eps follows a direction known before the step (no backward at theta)."""
        return self.sam_enabled and self.ascent != "gradient"

    @property
    def needs_clean_gradient(self) -> bool:
        """Whether the mode's update mixes in g = J(theta)^T c(theta) (Eq. 19's (1 - cos) g or
        (1 - sin - cos) g): every angle form but phi = 0, and phi = 90 taken exactly."""
        if self.mode not in ("angle", "logit") or self.angle_degrees == 0.0:
            return False
        return not (self.angle_impl == "exact" and self.angle_degrees == 90.0)

    @property
    def mixes_cotangents(self) -> bool:
        """Whether pass 2 back-propagates a mix of c(theta+eps) and c(theta): the first-order
        angle form at every angle but 0 (at 90 degrees the mix is c(theta+eps) - c(theta))."""
        return (
            self.mode in ("angle", "logit")
            and self.angle_impl == "first_order"
            and self.angle_degrees != 0.0
        )

    @property
    def angle_degrees(self) -> float:
        """phi of the step, in degrees: fsam 0, logit 90, angle its setting, sam 45."""
        return {"fsam": 0.0, "logit": 90.0, "angle": float(self.angle)}.get(self.mode, 45.0)


ASCENT_WORDS = {
    "previous": "previous step's applied gradient",
    "momentum": "optimizer's first moment",
}


def _step(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"SAMConfig.{name} must be a step number >= 0, got {value!r}")


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"SAMConfig.{name} must be one of {allowed}, got {value!r}")


def _number(name: str, value: object, low: float, high: float = math.inf) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or not low <= value <= high:
        bounds = f">= {low:g}" if high == math.inf else f"in [{low:g}, {high:g}]"
        raise ValueError(f"SAMConfig.{name} must be a finite number {bounds}, got {value!r}")
