"""Training throughput in scenes per second (logged as ``perf/scenes_per_s``)."""

from __future__ import annotations

import time

import lightning as L


class Throughput(L.Callback):
    def __init__(self, window: int = 20):
        self.window = window
        self._start = None
        self._scenes = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._start is None:
            self._start, self._scenes = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._scenes += batch["query_images"].shape[0] * trainer.world_size
        if batch_idx % self.window == self.window - 1:
            rate = self._scenes / max(time.perf_counter() - self._start, 1e-9)
            pl_module.log("perf/scenes_per_s", rate, batch_size=1)
            self._start = None
