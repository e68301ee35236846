"""Logger-agnostic image/video logging: W&B, TensorBoard, and always files in the run directory."""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
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
    """Send an image to every logger that takes images; always also save it as a PNG under media/.

    W&B: its logger's ``log_image``. TensorBoard: ``add_image`` (its logger has no ``log_image``). Other
    loggers (CSV) take no images: the PNG is their copy.
    """
    step = trainer.global_step
    path = media_dir(trainer) / f"{key.replace('/', '_')}_{step:07d}.png"
    Image.fromarray(image).save(path)
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[image], step=step, **({"caption": [caption]} if caption else {}))
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, image, step, dataformats="HWC")
    return path


def log_video(trainer, key: str, frames: np.ndarray, fps: int = 10) -> Path:
    """Frames ``[T, H, W, 3]`` uint8 -> an animated GIF under media/, sent to every logger that takes it.

    W&B: its logger's ``log_video`` (the GIF). TensorBoard: the same GIF as an animated image, the summary
    its ``add_video`` writes, encoded here with imageio (``add_video`` needs moviepy < 2, which this project
    does not install). Other loggers (CSV): the GIF file only.
    """
    step = trainer.global_step
    path = media_dir(trainer) / f"{key.replace('/', '_')}_{step:07d}.gif"
    iio.imwrite(path, frames, duration=1000 / fps, loop=0)
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_video(key=key, videos=[str(path)], step=step, format=["gif"])
        elif isinstance(logger, TensorBoardLogger):
            writer = logger.experiment
            writer._get_file_writer().add_summary(gif_summary(key, path.read_bytes(), frames.shape), step)
    return path


def gif_summary(tag: str, gif: bytes, shape: tuple[int, ...]):
    """A TensorBoard image summary holding an animated GIF (shown animated in the Images tab)."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    _, height, width, channels = shape
    image = Summary.Image(height=height, width=width, colorspace=channels, encoded_image_string=gif)
    return Summary(value=[Summary.Value(tag=tag, image=image)])
