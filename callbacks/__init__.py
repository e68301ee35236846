"""Lightning callbacks: reconstruction grid, DRAW-sequence strip, fly-through video, throughput, progress,
the non-finite loss guard and the graceful stop on SIGINT/SIGTERM."""

from callbacks.images import DrawSequence, ReconstructionGrid
from callbacks.progress import LineProgress, StepProgressBar
from callbacks.throughput import Throughput

__all__ = ["DrawSequence", "LineProgress", "ReconstructionGrid", "StepProgressBar", "Throughput"]

from callbacks.flythrough import FlyThrough  # noqa: E402
from callbacks.guards import GracefulStop, NonFiniteGuard  # noqa: E402

__all__ += ["FlyThrough", "GracefulStop", "NonFiniteGuard"]
