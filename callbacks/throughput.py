"""What Lightning's ``ThroughputMonitor`` counts as a sample: a scene (one query view and its context); the model
summary's FLOPs of one such training step."""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.utilities import rank_zero_info


def scenes_in_batch(batch: dict) -> int:
    """The number of scenes in a batch of the batch contract (``query_images`` ``[B, 3, H, W]``)."""
    return int(batch["query_images"].shape[0])


class FlopsSummary(ModelSummary):
    """Lightning's model summary whose "Total FLOPs" is one training step of one scene -- forward, the auxiliary
    prior-mean render when it is on, backward -- at the model's full image size with the data's evaluation context
    size (its largest), counted by the module's own counter (``GQNModule._count_flops``, the one
    ``ThroughputMonitor`` reads). Lightning's own summary counts FLOPs only through an ``example_input_array``,
    whose forward would draw latents from the global RNG at the start of every fit and change every seeded run; this
    one counts on a copy of the model (nothing drawn from the training RNG). gqn-train adds it where
    ``trainer.enable_model_summary`` is on."""

    def on_fit_start(self, trainer, pl_module) -> None:
        self._flops = 0
        count = getattr(pl_module, "_count_flops", None)
        if self._max_depth and trainer.is_global_zero and count is not None:
            views = getattr(trainer.datamodule, "eval_context_size", None) or 1
            self._aux = bool(pl_module.hparams.get("prior_mean_weight", 0))
            self._views, self._size = int(views), pl_module.model.image_size
            self._flops = int(count(True, 1, self._views, self._aux))
        super().on_fit_start(trainer, pl_module)

    def summarize(self, summary_data, total_parameters, trainable_parameters, model_size, total_training_modes,
                  total_flops, **summarize_kwargs) -> None:
        super().summarize(summary_data, total_parameters, trainable_parameters, model_size, total_training_modes,
                          total_flops=self._flops or total_flops, **summarize_kwargs)
        if self._flops:
            aux = ", with the prior-mean render" if self._aux else ""
            rank_zero_info(f"Total FLOPs above: one training step of one scene ({self._views} context views, "
                           f"{self._size} px{aux}); ThroughputMonitor logs them per second")
