"""Callbacks that keep a run's checkpoints sound: stop on a non-finite loss, save on SIGINT/SIGTERM."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from gqn.cli import UserError, non_finite_tensors


class NonFiniteLossError(UserError):
    """The loss (or the weights) became NaN or inf: the run stopped without saving them."""

    fix = ("lower schedule.lr_init, set trainer.gradient_clip_val (e.g. 1.0), or let the run skip such steps "
           "with callbacks.nonfinite_guard.max_skipped_steps=N")


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """Where this run writes ``last.ckpt``: the directory of its ModelCheckpoint (else the run's checkpoints/)."""
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.save_last and cb.dirpath:
            return Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}"
    return Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"


class LastCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint``, and ``last.ckpt`` also at the step where training stops.

    With ``every_n_train_steps=N`` Lightning writes ``last.ckpt`` only at multiples of N (and at the end only if
    it wrote none before), so a run that ``trainer.max_time`` or a ``max_steps`` off the grid stopped between two
    saves left ``last.ckpt`` up to N - 1 steps behind its trained weights, and ``make train`` evaluated and
    rendered the older ones (session 14: step 2900 of 2938). This one also saves at the end of training, and
    saves again there when a validation came after the last save at that very step (the default's 3300 steps: saved
    at step 3300 by the every-50 schedule, then validated by :class:`ValidateAtLastStep`), so that ``last.ckpt``
    holds the best-checkpoint choice that validation made (else a resume tracked a deleted ``best-*.ckpt``).
    """

    _validated_at_save: int | None = None  # the step of the last save, if a validation followed it there

    @property
    def state_key(self) -> str:
        # a plain ModelCheckpoint's key: checkpoints written before this class existed restore its state (else
        # last_model_path starts empty and the version counter writes last-v1.ckpt beside the old last.ckpt)
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if not trainer.sanity_checking and self._last_global_step_saved == trainer.global_step:
            self._validated_at_save = trainer.global_step

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        if not self.save_last:
            return
        stale = self._validated_at_save == self._last_global_step_saved == trainer.global_step
        if not self._should_skip_saving_checkpoint(trainer) or (stale and not trainer.fast_dev_run):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class ValidateAtLastStep(L.Callback):
    """Validate at the step ``trainer.max_steps`` ends training, also off the ``val_check_interval`` grid.

    Lightning validates every ``val_check_interval`` steps and when something asks the trainer to stop (the
    ``max_time`` cap, early stopping), but not when ``max_steps`` ends the run: the default's 3300 steps with a
    validation every 500 ended with its last 300 steps unvalidated (no final ``val/*``, no image grid, the best
    checkpoint chosen without them). At the last step this asks the trainer to stop, which Lightning answers with
    one validation after that step (once, also where the step is on the grid); every DDP rank decides alike.
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True


class NonFiniteGuard(L.Callback):
    """Stop at the first non-finite training loss, before its update reaches the weights.

    With ``max_skipped_steps=N`` the first N such steps are skipped instead (their gradients are dropped, so
    the optimizer leaves the weights alone) and the run stops at the next one. Every checkpoint is checked
    before it is written: non-finite weights are never saved, so ``last.ckpt`` stays the last good one. The
    run ends with a :class:`NonFiniteLossError` naming the step and that checkpoint (gqn-train: one line,
    exit 2).
    """

    def __init__(self, max_skipped_steps: int = 0):
        if isinstance(max_skipped_steps, bool) or not isinstance(max_skipped_steps, int) or max_skipped_steps < 0:
            raise UserError(f"callbacks.nonfinite_guard.max_skipped_steps must be an int >= 0, "
                            f"got {max_skipped_steps!r}")
        self.max_skipped_steps = max_skipped_steps
        self.skipped: list[int] = []  # steps whose update was skipped
        self.last_good: tuple[int, str] | None = None  # (step, path) of the last checkpoint written
        self._bad_loss: float | None = None

    def _stop(self, trainer, what: str) -> NonFiniteLossError:
        saved = (f"the last good checkpoint is {self.last_good[1]} (step {self.last_good[0]})" if self.last_good
                 else "no checkpoint was written before it")
        skipped = f" after skipping {len(self.skipped)} such step(s)" if self.skipped else ""
        return NonFiniteLossError(f"{what} at step {trainer.global_step}{skipped}; stopped without saving it: {saved}")

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        self._bad_loss = None
        if not bool(torch.isfinite(loss.detach()).all()):
            self._bad_loss = float(loss.detach().float().mean())
            if len(self.skipped) >= self.max_skipped_steps:
                raise self._stop(trainer, f"the training loss is {self._bad_loss}")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self._bad_loss is None:
            return
        for group in optimizer.param_groups:  # no gradient, no update: the weights stay as they were
            for p in group["params"]:
                p.grad = None
        self.skipped.append(trainer.global_step)
        print(f"{Path(sys.argv[0]).name}: warning: the training loss is {self._bad_loss} at step "
              f"{trainer.global_step}; update skipped ({len(self.skipped)} of at most {self.max_skipped_steps})",
              file=sys.stderr)
        self._bad_loss = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        bad = non_finite_tensors(checkpoint.get("state_dict", {}))
        if bad:
            more = f" and {len(bad) - 1} more tensors" if len(bad) > 1 else ""
            raise self._stop(trainer, f"the weights are not finite ({bad[0]}{more})")
        self.last_good = (trainer.global_step, str(last_checkpoint_path(trainer)))

    def state_dict(self) -> dict:
        return {"skipped": list(self.skipped)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = list(state_dict.get("skipped", []))


class GracefulStop(L.Callback):
    """SIGINT (Ctrl-C) and SIGTERM (``kill``, SLURM preemption) end the run at the end of the current step
    with a resumable ``checkpoints/last.ckpt``: ``gqn-train ckpt_path=auto`` continues at that exact step.

    Lightning already stops at a step boundary on SIGTERM (and makes every DDP rank stop at the same one);
    this callback makes SIGINT do the same, saves the checkpoint there, and records the signal so that
    gqn-train exits with 128 + its number (130, 143). A second signal stops at once, without saving.
    """

    def __init__(self):
        self.signum: int | None = None
        self.saved: tuple[int, str] | None = None  # (step, path) written on the way out
        self._trainer = None
        self._previous: dict[int, object] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        # after Lightning registered its own SIGTERM handler (which this one calls) and took its snapshot of
        # the handlers to restore, so that the run ends with the handlers it started with
        if threading.current_thread() is not threading.main_thread():
            return
        self._trainer, self.signum, self.saved = trainer, None, None
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if not self._previous:  # no longer training: the usual behaviour
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        if self.signum is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum
        previous = self._previous.get(signum)
        if signum == signal.SIGTERM and callable(previous):
            previous(signum, frame)  # Lightning's: passes SIGTERM on to DDP processes it launched
        connector = getattr(self._trainer, "_signal_connector", None)
        if connector is not None:
            connector.received_sigterm = True  # Lightning stops at the end of the step (all DDP ranks alike)
        if self._trainer is None or self._trainer.is_global_zero:
            print(f"\n{Path(sys.argv[0]).name}: {signal.Signals(signum).name} received: stopping at the end of this "
                  f"step and saving a checkpoint (send it again to quit at once without saving)", file=sys.stderr)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt) and self.signum is None:
            self.signum = signal.SIGINT  # a Ctrl-C before training started: exit 130, nothing to save
        self._restore()
        if self.signum is None or not isinstance(exception, SIGTERMException) or trainer.global_step == 0:
            return
        path = last_checkpoint_path(trainer)
        # Lightning raised SIGTERMException between steps or between validation batches (then callbacks.WeightEMA
        # writes its two weight sets the right way round)
        trainer.save_checkpoint(path)
        self.saved = (trainer.global_step, str(path))

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._restore()

    def _restore(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig, handler in self._previous.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def exit_code(self, exc: BaseException) -> int | None:
        """128 + the signal's number if ``exc`` is how a signal ended ``trainer.fit``, else None."""
        if self.signum is None or not isinstance(exc, (SIGTERMException, SystemExit, KeyboardInterrupt)):
            return None
        return 128 + int(self.signum)

    def summary(self) -> str:
        name = signal.Signals(self.signum).name if self.signum else "signal"
        if self.saved:
            return (f"stopped by {name} at step {self.saved[0]}; saved {self.saved[1]}; resume with "
                    f"gqn-train ckpt_path=auto (or ckpt_path={self.saved[1]})")
        return f"stopped by {name} before a step ended; nothing new saved"
