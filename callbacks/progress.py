"""Plain progress lines for logs that are not a terminal (SLURM, nohup, CI), where a live bar shows nothing."""

from __future__ import annotations

import sys
import time

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.utilities import rank_zero_only

from gqn.schedules import max_time_left


class LineProgress(L.Callback):
    """Every ``every_n_steps`` training steps print ``step N/MAX``, the latest logged metrics, it/s, the
    training time so far and the time left (to ``max_steps`` at this pace, or on ``trainer.max_time`` when
    that cap comes first), as one line on stdout. With ``only_if_not_terminal`` it stays
    silent when stdout is a terminal (the Rich bar is shown there)."""

    def __init__(self, every_n_steps: int = 100, only_if_not_terminal: bool = True,
                 keys: tuple[str, ...] = ("train/loss", "val/psnr_model", "val/psnr_nearest_view")):
        self.every, self.keys = every_n_steps, tuple(keys)
        self.enabled = not (only_if_not_terminal and sys.stdout.isatty())
        self._mark: tuple[float, int] | None = None

    def on_train_start(self, trainer, pl_module):
        self._mark = (time.perf_counter(), trainer.global_step)

    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if not self.enabled or step % self.every or self._mark is None:
            return
        now = time.perf_counter()
        start, first = self._mark
        rate = (step - first) / max(now - start, 1e-9)
        parts = [f"step {step}/{trainer.max_steps}" if trainer.max_steps > 0 else f"step {step}"]
        metrics = trainer.callback_metrics
        parts += [f"{k} {float(metrics[k]):.4g}" for k in self.keys if k in metrics]
        parts.append(f"{rate:.2f} it/s")
        elapsed = now - start
        parts.append(f"elapsed {int(elapsed // 60)}m{int(elapsed % 60):02d}s")
        left, why = ((trainer.max_steps - step) / rate, "") if trainer.max_steps > 0 and rate > 0 else (None, "")
        capped = max_time_left(trainer)
        if capped is not None and (left is None or capped < left):  # trainer.max_time stops the run first
            left, why = capped, " (trainer.max_time)"
        if left is not None:  # past the cap (a step that ends after it): 0, not "-1m59s"
            left = max(left, 0.0)
            parts.append(f"left {int(left // 60)}m{int(left % 60):02d}s{why}")
        print("  ".join(parts), flush=True)


class StepProgressBar(RichProgressBar):
    """The Rich bar counting optimizer steps towards ``trainer.max_steps``.

    GQN training is one endless epoch bounded by ``max_steps``; Lightning's bar counts batches of the current
    epoch against the steps left, so a resumed run read e.g. ``15/4`` and ``Epoch 0/-2``. This bar shows
    ``step/max_steps`` (``Step`` as its label) and starts where a resumed run starts.
    """

    def _by_steps(self) -> bool:
        trainer = self.trainer
        return trainer.max_epochs in (None, -1) and trainer.max_steps is not None and trainer.max_steps > 0

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if self._by_steps() else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        if not self._by_steps():
            return super()._get_train_description(current_epoch)
        return f"{'Step':{len(self.validation_description)}}"

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if self._by_steps() and self.progress is not None and self.train_progress_bar_id is not None:
            self._update(self.train_progress_bar_id, trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._by_steps():
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self.is_disabled and self.train_progress_bar_id is None:  # resumed mid-epoch
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()
