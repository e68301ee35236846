"""gqn-eval: evaluate a checkpoint on the test split (or the validation split); writes metrics.json in the run
directory.

    gqn-eval ckpt_path=outputs/latest/checkpoints/last.ckpt
    gqn-eval ckpt_path=... split=val          # the run's validation split (carved from the training files), its views
    gqn-eval ckpt_path=... data=rooms_ring_camera context_size=3
    gqn-eval ckpt_path=... draws=5            # average every scene over 5 draws of its context views
    gqn-eval ckpt_path=A baseline_ckpt_path=B split=val   # A - B on the same scenes and views, paired
    gqn-eval ckpt_path=A baseline_ckpt_path=A baseline_weights=trained split=val  # what the weights' average buys
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from gqn import CONF_DIR
from gqn.cli import (
    UserError,
    check_config_types,
    check_options,
    checked_overrides,
    finite_or_none,
    load_checkpoint,
    non_finite_tensors,
    one_line_errors,
    require_ckpt_path,
    resolve_ckpt,
)
from gqn.precision import flush_denormals

if TYPE_CHECKING:  # torch, Lightning and the model load where they are used: `gqn-eval --help` answers in ~1 s
    import torch

    from gqn.gqn_module import GQNModule

#: gqn-eval weights=... / baseline_weights=...: a checkpoint's ``state_dict`` (where the run kept a moving average of
#: its weights, ``callbacks.ema``, that average), or the trained weights it keeps beside it (``current_model_state``)
WEIGHTS = ("average", "trained")


def check_weights(weights, key: str = "weights") -> None:
    if weights not in WEIGHTS:
        raise UserError(f"{key} must be one of {', '.join(WEIGHTS)} (average: the checkpoint's state_dict, a moving "
                        f"average where the run kept one; trained: the weights as trained), got {weights!r}")


def load_module(ckpt_path: str, output_dir: str = "outputs", key: str = "ckpt_path",
                weights: str = "average") -> GQNModule:
    """The GQNModule of a checkpoint, in eval mode, on the CPU, through Lightning's own
    ``GQNModule.load_from_checkpoint`` (rebuilt from the checkpoint's hyperparameters; a checkpoint
    written on a GPU loads on a CPU-only machine).

    ``ckpt_path`` is a path or ``"auto"`` (the latest run's ``last.ckpt``); a missing or unreadable file is
    a one-line :class:`UserError` naming the option ``key``. ``module.global_step_loaded`` holds the step the
    checkpoint was written at. ``weights="trained"``: the trained weights of a run that kept a moving average of them
    (``callbacks=ema``) instead of the average (a checkpoint without one holds only the trained weights).
    """
    check_weights(weights, key.replace("ckpt_path", "weights"))
    path = resolve_ckpt(ckpt_path, output_dir, key=key)
    if path is None:
        raise UserError(f"no checkpoint at {ckpt_path!r}; train first (make train) or give {key}=...")
    ckpt = load_checkpoint(path)
    state = ckpt["state_dict"]
    if weights == "trained" and isinstance(ckpt.get("current_model_state"), dict):
        state = ckpt["current_model_state"]
    bad = non_finite_tensors(state)
    if bad:  # a diverged run: its renders and metrics would be garbage
        more = f" and {len(bad) - 1} more tensors" if len(bad) > 1 else ""
        raise UserError(f"checkpoint {path} holds non-finite weights ({bad[0]}{more}): it comes from a diverged "
                        f"run; use an earlier checkpoint")
    from gqn.gqn_module import GQNModule

    try:
        module = GQNModule.load_from_checkpoint(path, map_location="cpu")
    except Exception as err:  # a file that is not a Lightning checkpoint of this model
        raise UserError(f"cannot load checkpoint {path}: {type(err).__name__}: {err}".splitlines()[0]) from None
    if state is not ckpt["state_dict"]:
        module.load_state_dict(state)
    return module.eval()


def check_sizes(module: GQNModule, datamodule) -> None:
    if module.model.image_size != datamodule.image_size:
        raise UserError(
            f"the model renders {module.model.image_size}px images but data gives {datamodule.image_size}px; "
            f"set data.image_size={module.model.image_size}"
        )


SPLITS = ("test", "val")  # gqn-eval split=...: the test split, or the validation split carved from train

#: what defines a run's validation split (the data module saves them in every checkpoint)
VALIDATION_KEYS = ("val_files", "val_fraction", "split_seed", "val_scenes")


def split_settings(cfg: DictConfig, saved: dict | None,
                   overridden: set[str]) -> tuple[dict, int, int, str | None]:
    """The data settings, the seed, the context size and a line saying where they came from, for ``cfg.split``.
    The test split: ``seed`` (null: 0). The validation split: the training run's, as its checkpoint saved them
    (``saved``, the data module's state), so that its scores are the run's logged ``val/*``: the carve-out
    (``VALIDATION_KEYS``) and, with ``seed`` null, the seed that drew its views; a ``data.<key>=...`` on the
    command line (in ``overridden``) wins. A checkpoint without them (written before they were saved), or of
    another dataset: the configured ``data`` and seed 0, said in the line. With them, the context size is also
    the run's (``eval_context_size``) unless ``context_size`` is given on the command line."""
    seed = None if cfg.seed is None else int(cfg.seed)
    context = cfg.context_size
    if cfg.split != "val":
        return {}, 0 if seed is None else seed, context, None
    if saved is None or saved.get("dataset") != cfg.data.dataset:
        why = ("the checkpoint does not record its run's validation settings" if saved is None
               else f"the checkpoint was trained on {saved.get('dataset')}")
        return {}, 0 if seed is None else seed, context, f"validation split as data.* configures it ({why})"
    data = {k: saved[k] for k in VALIDATION_KEYS if k in saved and f"data.{k}" not in overridden}
    if seed is None:
        seed = int(saved["seed"])
    if "context_size" not in overridden and "eval_context_size" in saved:
        context = saved["eval_context_size"]
    used = ", ".join(f"{k}={v}" for k, v in data.items())
    return data, seed, context, (f"the training run's validation split ({used}), {context} context views drawn "
                                 f"with seed {seed}")


#: Gains reported per scene (the difference of two PSNRs on the same scene and views), name -> (a, b).
GAINS = {
    "psnr_gain_over_nearest_view_db": ("psnr_model", "psnr_nearest_view"),
    "psnr_gain_over_mean_view_db": ("psnr_model", "psnr_mean_view"),
    "object_psnr_gain_over_mean_view_db": ("object_psnr_model", "object_psnr_mean_view"),
    "object_psnr_gain_over_nearest_view_db": ("object_psnr_model", "object_psnr_nearest_view"),
    "object_psnr_gain_over_empty_room_db": ("object_psnr_model", "object_psnr_empty_room"),
}


def spread(values: torch.Tensor) -> dict:
    """Mean, standard error and normal 95% interval over scenes ``[S]`` (NaN scenes left out)."""
    v = values[~values.isnan()].double()
    n = int(v.numel())
    if n == 0:
        return {"mean": None, "se": None, "ci95": None, "n": 0}
    mean = float(v.mean())
    se = float(v.std(unbiased=True) / math.sqrt(n)) if n > 1 else None
    ci = [mean - 1.96 * se, mean + 1.96 * se] if se is not None else None
    return {"mean": mean, "se": se, "ci95": ci, "n": n}


#: metrics compared scene by scene against a baseline checkpoint (``baseline_ckpt_path``): this minus the baseline
PAIRED = ("psnr_model", "object_psnr_model", "ssim_model", "elbo")


def per_scene_metrics(module: GQNModule, loader, limit_batches: int | None, device: torch.device,
                      split: str = "test", baseline: GQNModule | None = None) -> dict:
    """``{metric: [S]}`` over the scenes of one pass of ``loader`` (see GQNModule.evaluation_metrics); with a
    ``baseline`` module, also its metrics on the same batches, as ``baseline/<metric>``."""
    import torch

    values: dict[str, list[torch.Tensor]] = {}
    scored = {"": module} if baseline is None else {"": module, "baseline/": baseline}
    with torch.inference_mode():
        for i, batch in enumerate(loader):
            if limit_batches is not None and i >= limit_batches:
                break
            batch = {k: v.to(device) for k, v in batch.items()}
            for prefix, m in scored.items():
                for key, value in m.evaluation_metrics(batch).items():
                    values.setdefault(prefix + key, []).append(value.float().cpu())
    if not values:
        raise UserError(f"the {split} split gave no scenes to evaluate (all of its scenes skipped as corrupt)")
    return {k: torch.cat(v) for k, v in values.items()}


def evaluate(cfg: DictConfig) -> dict:
    """Metrics of a checkpoint on the test split (``split=val``: the validation split carved from the training
    files, as training validates): the mean over scenes of each metric (per scene first averaged over ``draws``
    draws of the context views), with its standard error and 95% interval over scenes."""
    flush_denormals()  # first: the OpenMP threads torch starts later inherit the mode
    import lightning as L
    import torch

    from data_modules.datasets import dataset_info

    require_ckpt_path(cfg)
    if cfg.get("split") not in SPLITS:
        raise UserError(f"split must be one of {', '.join(SPLITS)} (val: the validation split carved from the "
                        f"training files), got {cfg.get('split')!r}")
    check_options(cfg, {"draws": (int, 1), "seed": ((int,), None), "limit_batches": ((int,), 1),
                        "num_workers": (int, 0)})
    for key in ("weights", "baseline_weights"):  # both before any checkpoint loads
        check_weights(cfg.get(key, "average"), key)
    overridden = {o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task}
    for key in ("data.eval_context_size", "data.context_size"):  # gqn-train's; gqn-eval would ignore them silently
        if key in overridden:
            use = (f"context_size={cfg.data.eval_context_size}" if key == "data.eval_context_size"
                   else "context_size=N, one number for every scene")
            raise UserError(f"gqn-eval sets the context views per scene with context_size=N (the same N for every "
                            f"scene), not {key} (gqn-train's setting, which gqn-eval does not read): use {use}")
    module = load_module(cfg.ckpt_path, cfg.paths.output_dir, weights=cfg.get("weights", "average"))
    data_settings, seed, n, origin = split_settings(cfg, getattr(module, "data_state_loaded", None), overridden)
    cfg.seed = seed  # the data group's seed interpolates it (null until resolved here)
    check_config_types(cfg, ("data",))
    L.seed_everything(seed)
    frames = dataset_info(cfg.data.data_dir, cfg.data.dataset).frames_per_scene
    # n: checked here, under the name the user sets (the data module calls it eval_context_size)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n < frames:
        raise UserError(f"context_size must be an int in [1, {frames - 1}] ({cfg.data.dataset} has {frames} views "
                        f"per scene, one is the query), got {n!r}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    module.to(device)
    baseline = None
    if cfg.get("baseline_ckpt_path") is not None:  # scored on the same batches: differences paired by scene
        baseline = load_module(cfg.baseline_ckpt_path, cfg.paths.output_dir, "baseline_ckpt_path",
                               cfg.get("baseline_weights", "average")).to(device)
    draws = []
    for draw in range(int(cfg.draws)):  # draw d: the views of every scene drawn with seed + d
        datamodule = hydra.utils.instantiate(
            cfg.data, eval_context_size=n, num_workers=cfg.num_workers, seed=seed + draw,
            **data_settings,
        )
        for m in (module, baseline) if baseline is not None else (module,):
            check_sizes(m, datamodule)
        loader = datamodule.test_dataloader() if cfg.split == "test" else datamodule.val_dataloader()
        draws.append(per_scene_metrics(module, loader, cfg.limit_batches, device, cfg.split, baseline))
    # the stream's scene order does not depend on the seed (only the views do): average each scene over draws
    if len({len(d["elbo"]) for d in draws}) != 1:
        raise UserError("the draws saw different numbers of scenes; evaluate with draws=1")
    scenes = {k: torch.stack([d[k] for d in draws], dim=1).nanmean(dim=1) for k in draws[0]}
    for gain, (a, b) in GAINS.items():
        if a in scenes:
            scenes[gain] = scenes[a] - scenes[b]
    for key in PAIRED:
        if f"baseline/{key}" in scenes:
            scenes[f"paired/{key}"] = scenes[key] - scenes[f"baseline/{key}"]
    stats = {k: spread(v) for k, v in scenes.items()}
    report = {
        "checkpoint": str(Path(cfg.ckpt_path)), "weights": cfg.get("weights", "average"),
        "dataset": datamodule.dataset, "split": cfg.split,
        "context_size": n, "seed": seed, "draws": int(cfg.draws), "split_settings": origin,
        "scenes": len(draws[0]["elbo"]), "global_step": module.global_step_loaded,
        "baseline": None if baseline is None else {"checkpoint": str(Path(cfg.baseline_ckpt_path)),
                                                   "weights": cfg.get("baseline_weights", "average"),
                                                   "global_step": baseline.global_step_loaded},
        "metrics": {k: s["mean"] for k, s in stats.items()},
        "spread": {k: {"se": s["se"], "ci95": s["ci95"], "n": s["n"]} for k, s in stats.items()},
    }
    out = Path(HydraConfig.get().runtime.output_dir) / "metrics.json"
    non_finite = []
    report = finite_or_none(report, bad=non_finite)  # strict JSON: NaN/inf become null, and are listed
    report["non_finite"] = non_finite
    out.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    if origin:
        print(origin)
    for line in summary_lines(stats, report):
        print(line)
    print(f"wrote {out}")
    return report


def summary_lines(stats: dict, report: dict) -> list[str]:
    def f(key, digits=2):
        s = stats.get(key, {"mean": None})
        if s["mean"] is None:
            return "n/a"
        sign = "+" if "gain" in key or key.startswith("paired/") else ""
        return f"{s['mean']:{sign}.{digits}f}" + (f" ±{s['se']:.{digits}f}" if s["se"] is not None else "")

    trained = " (the checkpoint's trained weights, not their average)" if report.get("weights") == "trained" else ""
    lines = [f"{report['scenes']} {report['split']} scenes x {report['draws']} context draw(s), "
             f"{report['context_size']} context views; mean ± standard error over scenes{trained}",
             f"PSNR  model {f('psnr_model')} dB | nearest view {f('psnr_nearest_view')} | mean view "
             f"{f('psnr_mean_view')}  (gain over nearest {f('psnr_gain_over_nearest_view_db')}, over mean view "
             f"{f('psnr_gain_over_mean_view_db')})",
             f"SSIM  model {f('ssim_model', 3)} | nearest view {f('ssim_nearest_view', 3)} | "
             f"mean view {f('ssim_mean_view', 3)}"]
    if "object_psnr_model" in stats:
        lines.append(
            f"object-pixel PSNR ({stats['object_psnr_model']['n']} scenes with objects in view)  model "
            f"{f('object_psnr_model')} dB | nearest view {f('object_psnr_nearest_view')} | mean view "
            f"{f('object_psnr_mean_view')} | empty room {f('object_psnr_empty_room')}  (gain over mean view "
            f"{f('object_psnr_gain_over_mean_view_db')})")
    lines.append(f"-ELBO {f('elbo', 1)} nats = NLL {f('nll', 1)} + KL {f('kl', 1)}; "
                 f"{f('bits_per_pixel', 3)} bits/pixel")
    if report.get("baseline"):
        base = report["baseline"]
        which = " (trained weights)" if base.get("weights") == "trained" else ""
        lines.append(f"baseline {base['checkpoint']}{which} (step {base['global_step']}): PSNR "
                     f"{f('baseline/psnr_model')} dB | object pixels {f('baseline/object_psnr_model')} | "
                     f"SSIM {f('baseline/ssim_model', 3)} | -ELBO {f('baseline/elbo', 1)}")
        lines.append(f"this - baseline, paired by scene: PSNR {f('paired/psnr_model')} dB | object pixels "
                     f"{f('paired/object_psnr_model')} | SSIM {f('paired/ssim_model', 3)} | -ELBO "
                     f"{f('paired/elbo', 1)} nats")
    return lines


@checked_overrides(CONF_DIR, "eval", "gqn-eval")
@hydra.main(config_path=str(CONF_DIR), config_name="eval", version_base="1.3")
@one_line_errors("gqn-eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
