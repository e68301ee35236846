"""Linear annealing schedules as functions of the global step (LR factor and pixel sigma)."""

from __future__ import annotations

from dataclasses import dataclass


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
