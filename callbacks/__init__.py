"""Lightning callbacks: reconstruction grid, DRAW-sequence strip, fly-through video, progress lines, the
non-finite loss guard, the weights' moving average, ``last.ckpt`` at the stop and the graceful stop on SIGINT/SIGTERM.

Throughput is Lightning's own ``ThroughputMonitor`` (``conf/callbacks/default.yaml``), counting scenes with
:func:`callbacks.throughput.scenes_in_batch`.
"""

from callbacks.images import DrawSequence, ReconstructionGrid
from callbacks.progress import LineProgress, StepProgressBar
from callbacks.throughput import scenes_in_batch

__all__ = ["DrawSequence", "LineProgress", "ReconstructionGrid", "StepProgressBar", "scenes_in_batch"]

from callbacks.averaging import WeightEMA  # noqa: E402
from callbacks.flythrough import FlyThrough  # noqa: E402
from callbacks.guards import GracefulStop, LastCheckpoint, NonFiniteGuard, ValidateAtLastStep  # noqa: E402

__all__ += ["FlyThrough", "GracefulStop", "LastCheckpoint", "NonFiniteGuard", "ValidateAtLastStep", "WeightEMA"]
