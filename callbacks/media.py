"""Logger-agnostic image/video logging: W&B, TensorBoard, or files in the run directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """``[3, H, W]`` float in [0, 1] -> ``[H, W, 3]`` uint8."""
    return (img.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)


def grid(rows: list[list[torch.Tensor]], pad: int = 2) -> np.ndarray:
    """Tile rows of ``[3, H, W]`` images (rows may differ in length) into one uint8 image."""
    H, W = rows[0][0].shape[-2:]
    cols = max(len(r) for r in rows)
    out = np.full((len(rows) * (H + pad) + pad, cols * (W + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            y, x = pad + i * (H + pad), pad + j * (W + pad)
            out[y : y + H, x : x + W] = to_uint8(img)
    return out


def media_dir(trainer) -> Path:
    d = Path(trainer.default_root_dir) / "media"
    d.mkdir(parents=True, exist_ok=True)
    return d


def log_image(trainer, key: str, image: np.ndarray, caption: str = "") -> Path:
    """Send an image to every logger that takes images; always also save it as a PNG under media/."""
    step = trainer.global_step
    path = media_dir(trainer) / f"{key.replace('/', '_')}_{step:07d}.png"
    Image.fromarray(image).save(path)
    for logger in trainer.loggers:
        name = type(logger).__name__
        if name == "WandbLogger":
            logger.log_image(key=key, images=[image], caption=[caption] if caption else None, step=step)
        elif name == "TensorBoardLogger":
            logger.experiment.add_image(key, image, step, dataformats="HWC")
    return path


def log_video(trainer, key: str, frames: np.ndarray, fps: int = 10) -> Path:
    """Frames ``[T, H, W, 3]`` uint8 -> GIF under media/ and a W&B/TensorBoard video where available."""
    import imageio.v3 as iio

    step = trainer.global_step
    path = media_dir(trainer) / f"{key.replace('/', '_')}_{step:07d}.gif"
    iio.imwrite(path, frames, duration=1000 / fps, loop=0)
    for logger in trainer.loggers:
        name = type(logger).__name__
        if name == "WandbLogger":
            import wandb

            logger.experiment.log({key: wandb.Video(str(path), format="gif"), "trainer/global_step": step})
        elif name == "TensorBoardLogger":
            video = torch.from_numpy(frames).permute(0, 3, 1, 2)[None]
            logger.experiment.add_video(key, video, step, fps=fps)
    return path
