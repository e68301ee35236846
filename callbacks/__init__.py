"""Lightning callbacks: reconstruction grid, DRAW-sequence strip, fly-through video, progress lines, the
non-finite loss guard, the weights' moving average, ``last.ckpt`` at the stop and the graceful stop on SIGINT/SIGTERM.

Throughput is Lightning's own ``ThroughputMonitor`` (``conf/callbacks/default.yaml``), counting scenes with
:func:`callbacks.throughput.scenes_in_batch`. The names below load on first use (:func:`gqn.lazy.lazy_names`):
importing one of the package's light modules does not import Lightning.
"""

from gqn.lazy import lazy_names

__all__, __getattr__, __dir__ = lazy_names(__name__, {
    "callbacks.images": ["DrawSequence", "ReconstructionGrid"],
    "callbacks.progress": ["LineProgress", "StepProgressBar"],
    "callbacks.throughput": ["scenes_in_batch"],
    "callbacks.averaging": ["WeightEMA"],
    "callbacks.flythrough": ["FlyThrough"],
    "callbacks.guards": ["GracefulStop", "LastCheckpoint", "NonFiniteGuard", "ValidateAtLastStep"],
})
