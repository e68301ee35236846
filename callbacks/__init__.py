"""Lightning callbacks: reconstruction grid, DRAW-sequence strip, fly-through video, throughput."""

from callbacks.images import DrawSequence, ReconstructionGrid
from callbacks.throughput import Throughput

__all__ = ["DrawSequence", "ReconstructionGrid", "Throughput"]

from callbacks.flythrough import FlyThrough  # noqa: E402

__all__ += ["FlyThrough"]
