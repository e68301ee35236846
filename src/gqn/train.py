"""gqn-train: compose the config, instantiate data, model, callbacks, loggers and trainer; fit.

    gqn-train                                  # the embedded default (experiment=default: procedural rooms)
    gqn-train experiment=rooms_ring_camera trainer=gpu   # the paper's model, schedule and run length
    gqn-train model/encoder=pool model.num_steps=8 -m seed=1,2,3
    gqn-train ckpt_path=auto                   # resume the latest run
"""

from __future__ import annotations

import functools
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from gqn import CONF_DIR
from gqn.cli import (
    UserError,
    _override_text,
    check_config_types,
    check_resume,
    checked_overrides,
    checkpoint_roots,
    find_last_checkpoints,
    finish_wandb,
    load_checkpoint,
    loss_defaults,
    loss_settings,
    lr_line_differs,
    mark_latest,
    one_line_errors,
    resolve_ckpt,
    resume_defaults,
    resume_differences,
)
from gqn.precision import flush_denormals

# Lightning, torch and the callbacks are imported where training starts, not here: `gqn-train --help` and `--cfg job`
# answer without them (~1 s instead of ~7-10 s on a 2-core CPU)
CHECKED = ("trainer", "data", "model", "module", "callbacks", "logger")  # config sections with typed targets
#: schedule=fast was tuned on short CPU runs of model=small (<= 28k steps); past this many steps say so.
FAST_SCHEDULE_MAX_STEPS = 100_000


def rank_zero_only(fn):
    """Lightning's ``rank_zero_only``, imported at the call: ``fn`` runs on the process of global rank 0 only."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from lightning.pytorch.utilities import rank_zero_only as on_rank_zero

        return on_rank_zero(fn)(*args, **kwargs)

    return wrapper


def instantiate_dict(cfg: DictConfig | None) -> list:
    """Instantiate every ``_target_`` entry of a dict config (callbacks, loggers)."""
    return [hydra.utils.instantiate(v) for v in (cfg or {}).values() if v is not None and "_target_" in v]


def check_run(cfg: DictConfig) -> None:
    """Refuse a run without a length; warn (one line) about the fast CPU schedule on paper-scale runs."""
    if OmegaConf.is_missing(cfg.trainer, "max_steps"):
        raise UserError("trainer.max_steps is not set: an experiment sets the run length (e.g. experiment=default), "
                        "or give trainer.max_steps=N")
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    steps, model = int(cfg.trainer.max_steps), choices.get("model")
    if steps == 0 or steps < -1:  # 0 would exit 0 with no checkpoint, and make train would evaluate an older run
        raise UserError(f"trainer.max_steps must be >= 1 (or -1: no limit, then trainer.max_epochs or "
                        f"trainer.max_time ends the run), got {steps}")
    interval = cfg.trainer.get("val_check_interval")
    if interval is not None and (isinstance(interval, bool) or not isinstance(interval, (int, float))
                                 or not interval > 0 or (isinstance(interval, float) and interval > 1)):
        raise UserError(f"trainer.val_check_interval must be a whole number >= 1 (validate every N training steps) or "
                        f"a fraction in (0, 1] of an epoch, got {interval!r}")
    if choices.get("schedule") == "fast" and (steps > FAST_SCHEDULE_MAX_STEPS or model in ("paper", "tf_gqn")):
        _warn(f"schedule=fast (tuned for short CPU runs of model=small) with model={model} for {steps} steps; "
              "the paper's setup is experiment=<dataset>, e.g. gqn-train experiment=rooms_ring_camera trainer=gpu")


@rank_zero_only
def _say_precision(name: str) -> None:
    """One line: the precision training runs in, and on a CPU with bf16 units what the probe measured."""
    from gqn import precision

    why = ""
    if precision.cpu_bf16_speedup.cache_info().currsize:  # ${gqn_precision:} measured (or read) it in this run
        why = f" (bf16 autocast measured {precision.cpu_bf16_speedup():.2f}x the fp32 speed on this CPU)"
    _say(f"precision {name}{why}")


@rank_zero_only
def _say(message: str) -> None:
    print(f"gqn-train: {message}", flush=True)  # stdout: stderr is for the one-line errors


@rank_zero_only
def _warn(message: str) -> None:
    print(f"gqn-train: warning: {message}", file=sys.stderr, flush=True)


def train(cfg: DictConfig, extra_callbacks: list | None = None) -> float | None:
    """Fit (and optionally test) the model described by ``cfg``; returns ``cfg.optimized_metric``.

    ``extra_callbacks`` are added to the configured ones (programmatic use, tests). A run stopped by
    SIGINT/SIGTERM saves ``last.ckpt`` and raises ``SystemExit(130 / 143)``.
    """
    flush_denormals()  # first: the OpenMP threads torch starts later inherit the mode
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelSummary

    from callbacks.averaging import WeightEMA
    from callbacks.guards import GracefulStop
    from callbacks.throughput import FlopsSummary

    check_config_types(cfg, CHECKED)
    check_run(cfg)
    ckpt = resolve_ckpt(cfg.get("ckpt_path"), checkpoint_roots(cfg), announce="gqn-train")
    if ckpt is not None:  # a different architecture would fail in load_state_dict with a raw size dump
        saved, model_cfg = load_checkpoint(ckpt), OmegaConf.to_container(cfg.model, resolve=True)
        check_resume(saved, model_cfg, ckpt)
        for key, value in resume_defaults(saved, model_cfg).items():
            print(f"gqn-train: {ckpt} is older than {key}: resuming with {key}={_override_text(value)}, as it was "
                  f"trained")
            OmegaConf.update(cfg, key, value, merge=False)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = hydra.utils.instantiate(cfg.data)
    if cfg.trainer.get("gradient_clip_val") and (cfg.module.get("optimizer") or {}).get("fused") \
            and "mixed" in str(cfg.trainer.get("precision")):
        # Lightning refuses to clip a fused optimizer's gradients under mixed precision (it would unscale them
        # itself); the unfused Adam makes the same update. Full precision clips the fused one.
        _say("trainer.gradient_clip_val is set under mixed precision, so module.optimizer runs unfused (the same "
             "update)")
        OmegaConf.update(cfg, "module.optimizer.fused", False, merge=False)
    module = hydra.utils.instantiate(cfg.module, _recursive_=False)
    if ckpt is not None:  # a resume with other data or loss settings, or another LR line, trains on, and says so
        before, now = saved["hyper_parameters"].get("lr_scales") or None, module.hparams.get("lr_scales") or None
        if before != now:  # ... but not with other LR scales: the optimizer's groups and LRs load from the file
            # (a dict override merges into the config's dict, so the hint clears it first)
            again = "module.lr_scales=null" + (f" '++module.lr_scales={_override_text(before)}'" if before else "")
            raise UserError(f"{ckpt} was trained with module.lr_scales={_override_text(before)}, here "
                            f"{_override_text(now)}: the optimizer's parameter groups come from the checkpoint; "
                            f"resume with {again}")
        stream = {"dataset": datamodule.dataset, "seed": datamodule.seed, **datamodule.stream_settings()}
        for differs in (
            resume_differences(saved.get("GQNDataModule") or {}, stream, "data settings", "the run's own stream",
                               prefix="data"),
            resume_differences(loss_settings(saved["hyper_parameters"], loss_defaults(type(module))),
                               loss_settings(module.hparams), "loss settings", "the run's own loss"),
            lr_line_differs(saved, cfg.schedule.get("lr_steps")),
        ):
            if differs:
                _warn(differs)
    callbacks = instantiate_dict(cfg.get("callbacks")) + list(extra_callbacks or [])
    if cfg.trainer.get("enable_model_summary", True) and not any(isinstance(c, ModelSummary) for c in callbacks):
        callbacks.append(FlopsSummary())  # Lightning's summary, its "Total FLOPs" counted (not 0)
    if ckpt is not None and isinstance(saved.get("current_model_state"), dict) \
            and not any(isinstance(c, WeightEMA) for c in callbacks):  # its state_dict is the average
        raise UserError(f"{ckpt} was trained with a moving average of its weights (callbacks=ema): resume it with "
                        f"callbacks=ema, or it would train on from the average")
    stop = next((c for c in callbacks if isinstance(c, GracefulStop)), None)
    if stop is None:  # Ctrl-C / SIGTERM save a checkpoint whatever the callbacks group
        callbacks.append(stop := GracefulStop())
    loggers = instantiate_dict(cfg.get("logger"))
    if not loggers:  # logger=none: nothing to send learning rates to
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    _say_precision(trainer.precision)
    resolved = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "hydra"}
    for logger in loggers:
        logger.log_hyperparams(resolved)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
        if cfg.get("test_after_fit"):
            trainer.test(module, datamodule=datamodule)
    except BaseException as exc:
        code = stop.exit_code(exc)
        if code is None:
            raise
        if trainer.is_global_zero:
            print(f"gqn-train: {stop.summary()}", file=sys.stderr)
        raise SystemExit(code) from None
    finally:
        run_dir = HydraConfig.get().runtime.output_dir
        # outputs/latest names the newest run that has a checkpoint: a run that failed before saving one
        # (a bad override, a crash at step 0) leaves it at the last run that gqn-eval/gqn-render can read
        if trainer.is_global_zero and not trainer.fast_dev_run and find_last_checkpoints([(run_dir, 0)]):
            mark_latest(run_dir, cfg.paths.output_dir)
        finish_wandb()
    metric = trainer.callback_metrics.get(cfg.get("optimized_metric") or "")
    return None if metric is None else float(metric)


@checked_overrides(CONF_DIR, "train", "gqn-train")
@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
@one_line_errors("gqn-train")
def main(cfg: DictConfig) -> float | None:
    return train(cfg)


if __name__ == "__main__":
    main()
