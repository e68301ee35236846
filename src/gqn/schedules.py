"""Linear annealing as a function of the global step: pixel sigma, loss weights, and the LR scheduler."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LinearAnneal:
    """``start`` held for ``delay`` steps, then linear to ``end`` over ``steps`` steps, then held."""

    start: float
    end: float
    steps: float
    delay: float = 0

    def __call__(self, step: int) -> float:
        if self.steps <= 0:
            return float(self.end if step >= self.delay else self.start)
        frac = min(max((step - self.delay) / self.steps, 0.0), 1.0)
        return float(self.start + (self.end - self.start) * frac)


class LinearToHorizon:
    """An LR factor for ``LambdaLR``: 1 linearly to ``final`` at step ``horizon`` (at most ``steps``), then held;
    with ``warmup`` > 0, scaled by ``min(1, (step + 1) / warmup)`` (a linear warm-up over the first steps).

    ``retarget(step, horizon)`` bends the line at ``step`` (the factor there kept, so the LR is continuous) to
    reach ``final`` at the new horizon instead; a run that the wall-clock cap will stop early still ends its
    anneal. A callable object, not a function: ``LambdaLR.state_dict`` saves its attributes, so a resumed run
    continues the bent line.
    """

    def __init__(self, final: float, steps: float, warmup: float = 0):
        self.final = float(final)
        self.warmup = float(warmup)
        self.steps = float(steps)  # the configured length of the anneal: a retarget never goes beyond it
        self.horizon = float(steps)
        self.anchor_step, self.anchor = 0.0, 1.0

    def __call__(self, step: int) -> float:
        return self.line(step) * (min(1.0, (step + 1) / self.warmup) if self.warmup > 0 else 1.0)

    def line(self, step: int) -> float:
        """The factor without the warm-up."""
        if step >= self.horizon:
            return self.final
        if step <= self.anchor_step:
            return self.anchor
        frac = (step - self.anchor_step) / (self.horizon - self.anchor_step)
        return self.anchor + (self.final - self.anchor) * frac

    def retarget(self, step: int, horizon: float) -> float:
        """Reach ``final`` at ``min(horizon, steps)`` from ``step`` on; returns the horizon taken."""
        horizon = max(min(float(horizon), self.steps), float(step))
        self.anchor, self.anchor_step, self.horizon = self.line(step), float(step), horizon
        return horizon


def max_time_left(trainer) -> float | None:
    """Seconds left on ``trainer.max_time`` (Lightning's ``Timer`` callback), or None when there is no cap."""
    from lightning.pytorch.callbacks import Timer

    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    return None if timer is None else timer.time_remaining("train")


def linear_lr(optimizer: torch.optim.Optimizer, lr_init: float, lr_final: float,
              steps: float, warmup_steps: float = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """The LR from ``lr_init`` linearly to ``lr_final`` over ``steps`` optimizer steps, then held; with
    ``warmup_steps`` > 0 the LR of the first steps is scaled from ``1 / warmup_steps`` up to 1 (linear warm-up).

    A ``LambdaLR`` over a :class:`LinearToHorizon` (its step count and line are saved in checkpoints, so a
    resumed run continues the line; ``schedule.lr_fit_max_time`` may end the line earlier). The
    optimizer must start at ``lr_init`` (a parameter group with an ``lr_scale``, ``module.lr_scales``: at ``lr_init``
    times it): the LR lives in one place, the schedule group (``schedule.lr_init``),
    and ``module.optimizer.lr`` only refers to it; an optimizer set to another LR is refused, not overwritten.
    """
    from gqn.cli import UserError

    for group in optimizer.param_groups:  # a group of module.lr_scales starts at lr_init times its "lr_scale"
        lr = group["lr"] / group.get("lr_scale", 1.0)
        if not math.isclose(lr, lr_init, rel_tol=1e-9):
            raise UserError(
                f"module.optimizer.lr={lr:g} but the LR schedule starts at schedule.lr_init={lr_init:g}: "
                f"the LR lives in the schedule group, set schedule.lr_init (and schedule.lr_final) instead"
            )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LinearToHorizon(lr_final / lr_init, steps, warmup_steps))
