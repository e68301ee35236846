"""Lightning callbacks: reconstruction grid, DRAW-sequence strip, fly-through video, progress lines, the
non-finite loss guard, the weights' moving average, ``last.ckpt`` at the stop and the graceful stop on SIGINT/SIGTERM.

Throughput is Lightning's own ``ThroughputMonitor`` (``conf/callbacks/default.yaml``), counting scenes with
:func:`callbacks.throughput.scenes_in_batch`. The names below load on first use (PEP 562): importing one of the
package's light modules does not import Lightning.
"""

from __future__ import annotations

import importlib

_WHERE = {name: module for module, names in {
    "callbacks.images": ["DrawSequence", "ReconstructionGrid"],
    "callbacks.progress": ["LineProgress", "StepProgressBar"],
    "callbacks.throughput": ["scenes_in_batch"],
    "callbacks.averaging": ["WeightEMA"],
    "callbacks.flythrough": ["FlyThrough"],
    "callbacks.guards": ["GracefulStop", "LastCheckpoint", "NonFiniteGuard", "ValidateAtLastStep"],
}.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'callbacks' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value  # once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
