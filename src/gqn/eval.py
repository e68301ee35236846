"""gqn-eval: evaluate a checkpoint on the test split; writes metrics.json in the run directory.

    gqn-eval ckpt_path=outputs/latest/checkpoints/last.ckpt
    gqn-eval ckpt_path=... data=rooms_ring_camera context_size=3
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from gqn import CONF_DIR
from gqn.cli import UserError, one_line_errors, resolve_ckpt
from gqn.gqn_module import GQNModule


def load_module(ckpt_path: str, output_dir: str = "outputs") -> GQNModule:
    """The GQNModule of a checkpoint, in eval mode, on the CPU, through Lightning's own
    ``GQNModule.load_from_checkpoint`` (rebuilt from the checkpoint's hyperparameters; a checkpoint
    written on a GPU loads on a CPU-only machine).

    ``ckpt_path`` is a path or ``"auto"`` (the latest run's ``last.ckpt``); a missing or unreadable file is
    a one-line :class:`UserError`. ``module.global_step_loaded`` holds the step the checkpoint was written at.
    """
    path = resolve_ckpt(ckpt_path, output_dir)
    if path is None:
        raise UserError(f"no checkpoint at {ckpt_path!r}; train first (make train) or give ckpt_path=...")
    try:
        module = GQNModule.load_from_checkpoint(path, map_location="cpu")
    except Exception as err:  # a file that is not a Lightning checkpoint of this model
        raise UserError(f"cannot load checkpoint {path}: {type(err).__name__}: {err}".splitlines()[0]) from None
    return module.eval()


def check_sizes(module: GQNModule, datamodule) -> None:
    if module.model.image_size != datamodule.image_size:
        raise UserError(
            f"the model renders {module.model.image_size}px images but data gives {datamodule.image_size}px; "
            f"set data.image_size={module.model.image_size}"
        )


def evaluate(cfg: DictConfig) -> dict:
    L.seed_everything(cfg.seed)
    module = load_module(cfg.ckpt_path, cfg.paths.output_dir)
    datamodule = hydra.utils.instantiate(
        cfg.data, eval_context_size=cfg.context_size, num_workers=cfg.num_workers, seed=cfg.seed
    )
    check_sizes(module, datamodule)
    trainer = L.Trainer(accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                        limit_test_batches=cfg.limit_batches, default_root_dir=HydraConfig.get().runtime.output_dir,
                        enable_progress_bar=True)
    trainer.test(module, datamodule=datamodule, verbose=False)
    results = {k.removeprefix("test/"): float(v) for k, v in trainer.callback_metrics.items()}
    results["psnr_gain_over_nearest_view_db"] = results["psnr_model"] - results["psnr_nearest_view"]
    report = {
        "checkpoint": str(Path(cfg.ckpt_path)), "dataset": datamodule.dataset, "context_size": cfg.context_size,
        "seed": cfg.seed, "global_step": module.global_step_loaded,
        "metrics": results,
    }
    out = Path(HydraConfig.get().runtime.output_dir) / "metrics.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    m = results
    print(f"PSNR  model {m['psnr_model']:.2f} dB | nearest view {m['psnr_nearest_view']:.2f} dB | "
          f"mean view {m['psnr_mean_view']:.2f} dB  (gain {m['psnr_gain_over_nearest_view_db']:+.2f} dB)")
    print(f"SSIM  model {m['ssim_model']:.3f} | nearest view {m['ssim_nearest_view']:.3f} | "
          f"mean view {m['ssim_mean_view']:.3f}")
    print(f"-ELBO {m['elbo']:.1f} nats = NLL {m['nll']:.1f} + KL {m['kl']:.1f}; {m['bits_per_pixel']:.3f} bits/pixel")
    print(f"wrote {out}")
    return report


@hydra.main(config_path=str(CONF_DIR), config_name="eval", version_base="1.3")
@one_line_errors("gqn-eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
