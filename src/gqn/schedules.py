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


def linear_lr(optimizer: torch.optim.Optimizer, lr_init: float, lr_final: float,
              steps: float) -> torch.optim.lr_scheduler.LambdaLR:
    """The LR from ``lr_init`` linearly to ``lr_final`` over ``steps`` optimizer steps, then held.

    A ``LambdaLR`` (its step count is saved in checkpoints, so a resumed run continues the line). The
    optimizer must start at ``lr_init``: the LR lives in one place, the schedule group (``schedule.lr_init``),
    and ``module.optimizer.lr`` only refers to it; an optimizer set to another LR is refused, not overwritten.
    """
    from gqn.cli import UserError

    for group in optimizer.param_groups:
        if not math.isclose(group["lr"], lr_init, rel_tol=1e-9):
            raise UserError(
                f"module.optimizer.lr={group['lr']:g} but the LR schedule starts at schedule.lr_init={lr_init:g}: "
                f"the LR lives in the schedule group, set schedule.lr_init (and schedule.lr_final) instead"
            )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LinearAnneal(1.0, lr_final / lr_init, steps))
