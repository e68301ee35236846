"""Lightning callbacks: reconstruction grid, DRAW-sequence strip, fly-through video, throughput, progress lines."""

from callbacks.images import DrawSequence, ReconstructionGrid
from callbacks.progress import LineProgress
from callbacks.throughput import Throughput

__all__ = ["DrawSequence", "LineProgress", "ReconstructionGrid", "Throughput"]

from callbacks.flythrough import FlyThrough  # noqa: E402

__all__ += ["FlyThrough"]
