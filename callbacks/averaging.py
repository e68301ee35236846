"""An exponential moving average of the weights: Lightning's ``WeightAveraging``, made sound for these runs."""

from __future__ import annotations

import copy

from lightning.pytorch.callbacks import WeightAveraging
from torch.optim.swa_utils import get_ema_multi_avg_fn

from callbacks.guards import NonFiniteLossError
from gqn.cli import UserError, non_finite_tensors


class WeightEMA(WeightAveraging):
    """Keep ``decay``-weighted running averages of the weights from step ``start_step`` on; validate, checkpoint
    (``state_dict``: what ``gqn-eval``, ``gqn-render`` and ``load_from_checkpoint`` read) and end training with them.

    Lightning's ``WeightAveraging`` as its ``EMAWeightAveraging`` sets it up, with these changes:

    - before its first update (``start_step``, e.g. the end of the coarse 16 px steps) it is not there: validation
      and checkpoints use the weights as they are (Lightning's swapped in the copy made at setup, the untrained
      initial weights, from step 0);
    - the buffers are not averaged but copied (``use_buffers=False``): integer index buffers and the geometry's
      ``cameras_measured`` flag stay what they are;
    - every checkpoint holds the average as ``state_dict`` and the trained weights as ``current_model_state``, also
      one written where training ends (Lightning's wrote the average as both, having copied it into the model) and
      one a SIGINT/SIGTERM writes in the middle of a validation, while the two are swapped (Lightning's wrote them
      the wrong way round), so a resume (with ``callbacks=ema``; gqn-train refuses one without) continues exactly.

    The averages are updated with one fused ``torch._foreach_lerp_`` per step (``get_ema_multi_avg_fn``).
    """

    def __init__(self, decay: float = 0.99, start_step: int = 0, every_n_steps: int = 1):
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 < decay < 1.0:
            raise UserError(f"callbacks.ema.decay must be a number between 0 and 1 (e.g. 0.99), got {decay!r}")
        for key, value, low in (("start_step", start_step, 0), ("every_n_steps", every_n_steps, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UserError(f"callbacks.ema.{key} must be an int >= {low}, got {value!r}")
        super().__init__(use_buffers=False, multi_avg_fn=get_ema_multi_avg_fn(float(decay)))
        self.start_step = start_step
        self.every_n_steps = every_n_steps
        self._trained_state: dict | None = None  # the trained weights, kept where training ends
        self._swapped = False  # whether the model holds the average (validation) and the average the trained weights

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        if step_idx is None or step_idx < self.start_step:
            return False
        return (step_idx - self.start_step) % self.every_n_steps == 0

    @property
    def started(self) -> bool:
        """Whether the average holds anything yet (its first update copies the weights)."""
        return self._average_model is not None and int(self._average_model.n_averaged) > 0

    def on_train_start(self, trainer, pl_module) -> None:
        self._trained_state, self._swapped = None, False

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if self.started:
            super().on_validation_epoch_start(trainer, pl_module)
            self._swapped = True

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._swapped:
            super().on_validation_epoch_end(trainer, pl_module)
            self._swapped = False

    def on_train_end(self, trainer, pl_module) -> None:
        if self.started:
            self._trained_state = copy.deepcopy(pl_module.state_dict())
            super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._average_model is None:
            return
        if not self.started:  # nothing averaged yet: the checkpoint's weights are the model's own
            checkpoint["state_dict"] = checkpoint["current_model_state"]
        elif self._swapped:  # saved mid-validation (SIGINT/SIGTERM stop there): the model holds the average
            checkpoint["state_dict"], checkpoint["current_model_state"] = (checkpoint["current_model_state"],
                                                                          checkpoint["state_dict"])
        elif self._trained_state is not None:  # after on_train_end copied the average into the model
            checkpoint["current_model_state"] = self._trained_state
        # NonFiniteGuard checked the model's weights before this hook replaced them: check what is written
        bad = non_finite_tensors(checkpoint["state_dict"]) + non_finite_tensors(checkpoint["current_model_state"])
        if bad:
            raise NonFiniteLossError(f"the weights or their average are not finite ({bad[0]}) at step "
                                     f"{trainer.global_step}; stopped without saving them")
