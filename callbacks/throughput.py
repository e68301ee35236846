"""What Lightning's ``ThroughputMonitor`` counts as a sample: a scene (one query view and its context)."""

from __future__ import annotations


def scenes_in_batch(batch: dict) -> int:
    """The number of scenes in a batch of the batch contract (``query_images`` ``[B, 3, H, W]``)."""
    return int(batch["query_images"].shape[0])
