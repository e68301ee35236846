"""Lightning callbacks: reconstruction grid, DRAW-sequence strip, fly-through video, progress lines.

Throughput is Lightning's own ``ThroughputMonitor`` (``conf/callbacks/default.yaml``), counting scenes with
:func:`callbacks.throughput.scenes_in_batch`.
"""

from callbacks.flythrough import FlyThrough
from callbacks.images import DrawSequence, ReconstructionGrid
from callbacks.progress import LineProgress
from callbacks.throughput import scenes_in_batch

__all__ = ["DrawSequence", "FlyThrough", "LineProgress", "ReconstructionGrid", "scenes_in_batch"]
