"""Callbacks that show what the model does: reconstruction grids and DRAW-sequence strips.

Both use a fixed validation batch (the first of the validation loader), so that images are comparable
over training; they only read the batch and call the module's public ``reconstruct``/``sample``.
"""

from __future__ import annotations

import lightning as L
import torch

from callbacks.media import grid, log_image


class _FixedBatch(L.Callback):
    def __init__(self, num_scenes: int = 4):
        self.num_scenes = num_scenes
        self._batch = None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0:
            self._batch = {k: v[: self.num_scenes] for k, v in batch.items()}

    def _active(self, trainer) -> bool:
        return bool(self._batch) and not trainer.sanity_checking and not trainer.fast_dev_run and (
            trainer.is_global_zero
        )


class ReconstructionGrid(_FixedBatch):
    """Per scene, a row: context views | target | posterior reconstruction | prior mean | prior samples."""

    def __init__(self, num_scenes: int = 4, num_samples: int = 2):
        super().__init__(num_scenes)
        self.num_samples = num_samples

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer, pl_module):
        if not self._active(trainer):
            return
        b = self._batch
        recon = pl_module.reconstruct(b)
        prior_mean = pl_module.sample(b, mean=True, seed=0)
        samples = [pl_module.sample(b, seed=s + 1) for s in range(self.num_samples)]
        rows = []
        for i in range(len(b["query_images"])):
            rows.append([*b["context_images"][i], b["query_images"][i], recon[i], prior_mean[i],
                         *(s[i] for s in samples)])
        caption = "context views | target | posterior reconstruction | prior mean | prior samples"
        log_image(trainer, "images/reconstructions", grid(rows), caption)


class DrawSequence(_FixedBatch):
    """The image after each DRAW step (prior mean), one row per scene, target at the end."""

    def __init__(self, num_scenes: int = 2):
        super().__init__(num_scenes)

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer, pl_module):
        if not self._active(trainer):
            return
        _, seq = pl_module.sample(self._batch, mean=True, seed=0, return_sequence=True)
        rows = [[*seq[i], self._batch["query_images"][i]] for i in range(len(seq))]
        log_image(trainer, "images/draw_sequence", grid(rows), "canvas after each DRAW step | target")
