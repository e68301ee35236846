"""Shared helpers of the Hydra entry points: one-line errors, W&B hygiene, run bookkeeping."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

from data_modules.errors import GQNDataError

os.environ.setdefault("WANDB_SILENT", "true")


class UserError(ValueError):
    """Bad user input to an entry point (missing checkpoint, malformed pose file, ...)."""


def one_line_errors(prog: str):
    """Turn data/user errors (also when re-raised from a DataLoader worker) into one line and exit 2."""

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                err = _user_cause(exc)
                if err is None:
                    raise
                lines = [ln for ln in str(err).splitlines() if ln.strip()]
                message = lines[-1] if lines else type(err).__name__
                for prefix in ("data_modules.errors.CorruptRecordError: ", "data_modules.errors.GQNDataError: "):
                    message = message.split(prefix, 1)[-1]
                print(f"{prog}: error: {message}", file=sys.stderr)
                sys.exit(2)

        return inner

    return wrap


def _user_cause(exc: BaseException | None) -> BaseException | None:
    """The user-facing error behind ``exc``, if any: a data or user error, or a ``ValueError`` that a
    constructor raised while Hydra instantiated it from the config (a bad config value, e.g.
    ``model.num_steps=0``; Hydra wraps it in an ``InstantiationException``)."""
    from hydra.errors import InstantiationException

    seen, instantiating = 0, False
    while exc is not None and seen < 10:
        if isinstance(exc, (GQNDataError, UserError)):
            return exc
        if isinstance(exc, InstantiationException):
            instantiating = True
        elif instantiating and isinstance(exc, ValueError) and (exc.__cause__ or exc.__context__) is None:
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def finish_wandb() -> None:
    """Close the W&B run so that the next multirun job starts a new one."""
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()


def latest_link(output_dir: str | Path) -> Path:
    return Path(output_dir) / "latest"


def mark_latest(run_dir: str | Path, output_dir: str | Path) -> None:
    """Point ``{output_dir}/latest`` at ``run_dir`` (relative symlink)."""
    link = latest_link(output_dir)
    run_dir = Path(run_dir).resolve()
    try:
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(run_dir, link.parent.resolve()))
    except OSError as err:  # e.g. a file system without symlinks: the run itself is fine
        print(f"note: could not point {link} at {run_dir}: {err}", file=sys.stderr)


def resolve_ckpt(ckpt_path: str | None, output_dir: str | Path) -> str | None:
    """``None`` | a path | ``"auto"`` (the latest run's ``checkpoints/last.ckpt``, if any)."""
    if ckpt_path in (None, "", "null"):
        return None
    if ckpt_path == "auto":
        last = latest_link(output_dir) / "checkpoints" / "last.ckpt"
        return str(last.resolve()) if last.exists() else None
    if not Path(ckpt_path).is_file():
        raise UserError(f"checkpoint not found: {ckpt_path} (give ckpt_path=<run>/checkpoints/last.ckpt)")
    return str(ckpt_path)
