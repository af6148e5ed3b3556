"""Learning-rate schedule: linear warmup, then constant / linear / cosine / WSD.

One pure function of the iteration number, so that both execution paths (and a
resumed run) compute exactly the same value without carrying scheduler state:
the iteration stored in the checkpoint is the whole state.  The names follow
Megatron-LM's arguments (lr, min_lr, lr_warmup_iters, lr_decay_iters,
lr_decay_style, lr_wsd_decay_iters, lr_wsd_decay_style).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DECAY_STYLES = ("constant", "linear", "cosine", "WSD")
WSD_DECAY_STYLES = ("linear", "cosine", "exponential", "minus_sqrt")


@dataclass(frozen=True)
class LRSchedule:
    lr: float
    min_lr: float = 0.0
    warmup_iters: int = 0
    decay_iters: int = 0
    decay_style: str = "cosine"
    # WSD ("warmup-stable-decay"): the final `wsd_decay_iters` of the decay
    # window anneal from lr to min_lr; before that the rate stays at lr.
    wsd_decay_iters: int = 0
    wsd_decay_style: str = "linear"

    def __post_init__(self):
        if self.decay_style not in DECAY_STYLES:
            raise ValueError(f"lr_decay_style must be one of {DECAY_STYLES}, got {self.decay_style!r}")
        if self.wsd_decay_style not in WSD_DECAY_STYLES:
            raise ValueError(
                f"lr_wsd_decay_style must be one of {WSD_DECAY_STYLES}, got {self.wsd_decay_style!r}"
            )
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) is larger than lr ({self.lr})")
        if self.warmup_iters < 0 or self.decay_iters < 0 or self.wsd_decay_iters < 0:
            raise ValueError("lr_warmup_iters, lr_decay_iters and lr_wsd_decay_iters must be >= 0")

    def __call__(self, iteration: int) -> float:
        """Rate for the optimizer step that produces `iteration` (1-based)."""
        return learning_rate(iteration, self)


def learning_rate(iteration: int, s: LRSchedule) -> float:
    # Warmup reaches lr exactly at step warmup_iters (the first step is not 0,
    # which would waste a step on a zero update).
    if s.warmup_iters > 0 and iteration <= s.warmup_iters:
        return s.lr * iteration / s.warmup_iters
    if s.decay_style == "constant":
        return s.lr
    # No decay window: the rate stays at lr once warmup has finished.
    decay_end = max(s.decay_iters, s.warmup_iters)
    if iteration >= decay_end:
        return s.min_lr if decay_end > s.warmup_iters else s.lr
    delta = s.lr - s.min_lr
    if s.decay_style == "WSD":
        anneal_start = decay_end - s.wsd_decay_iters
        if iteration <= anneal_start:
            return s.lr
        ratio = (iteration - anneal_start) / max(1, s.wsd_decay_iters)
        if s.wsd_decay_style == "linear":
            coeff = 1.0 - ratio
        elif s.wsd_decay_style == "cosine":
            coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        elif s.wsd_decay_style == "exponential":
            coeff = (2.0 * math.pow(0.5, ratio)) - 1.0
        else:  # minus_sqrt
            coeff = 1.0 - math.sqrt(ratio)
        return s.min_lr + coeff * delta
    ratio = (iteration - s.warmup_iters) / (decay_end - s.warmup_iters)
    if s.decay_style == "linear":
        coeff = 1.0 - ratio
    else:  # cosine
        coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
    return s.min_lr + coeff * delta


def apply_lr(param_groups, lr: float, weight_decay: float) -> None:
    """Write the scheduled rate and weight decay into optimizer groups.

    Groups may carry Megatron's `lr_mult` / `wd_mult` keys (get_megatron_optimizer
    sets wd_mult=0 for biases and 1-D parameters); the CPU path builds groups
    with the same keys, so one function serves both optimizers.
    """
    for group in param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
        group["weight_decay"] = weight_decay * group.get("wd_mult", 1.0)
