"""Log a short fly-through video of a validation scene (W&B video, TensorBoard video, GIF on disk)."""

from __future__ import annotations

import numpy as np
import torch

from callbacks.images import _FixedBatch
from callbacks.media import log_video, to_uint8
from gqn.metrics import nearest_context_view
from gqn.trajectory import orbit


class FlyThrough(_FixedBatch):
    """Orbit around the first validation scene, rendered from its context views (prior mean); each frame
    shows the render beside the context view nearest to its pose."""

    def __init__(self, frames: int = 24, fps: int = 8, every_n_validations: int = 1):
        super().__init__(num_scenes=1)
        self.frames, self.fps, self.every = frames, fps, every_n_validations
        self._count = 0

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer, pl_module):
        if not self._active(trainer):
            return
        self._count += 1
        if (self._count - 1) % self.every:
            return
        b = self._batch
        poses = orbit(b["context_poses"][0].cpu(), frames=self.frames)
        views = pl_module.render_views(b["context_images"][0], b["context_poses"][0], poses)
        ctx, ctx_poses = b["context_images"][0].cpu(), b["context_poses"][0].cpu()
        n = len(poses)  # per frame, the context view closest in pose (the same baseline the metrics use)
        nearest = nearest_context_view(ctx.expand(n, *ctx.shape), ctx_poses.expand(n, *ctx_poses.shape), poses)
        frames = np.stack([np.concatenate([to_uint8(v), to_uint8(c)], axis=1) for v, c in zip(views, nearest)])
        log_video(trainer, "video/flythrough", frames, fps=self.fps)
