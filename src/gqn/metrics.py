"""Image metrics: PSNR with a floored per-image MSE, SSIM (torchmetrics), the context baselines and PSNR on
object pixels."""

from __future__ import annotations

import torch
from torchmetrics.functional.image import structural_similarity_index_measure

OBJECT_COVERAGE = 0.5  # a pixel is an object pixel when objects cover at least half of it (data_modules.objects)

MSE_FLOOR = 1e-4  # caps PSNR at 40 dB so that a perfect image does not dominate the average


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) for images in [0, 1] ``[B, 3, H, W]`` -> ``[B]``."""
    mse = (pred - target).pow(2).flatten(1).mean(dim=1).clamp_min(MSE_FLOOR)
    return -10.0 * torch.log10(mse)


def ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM ``[B]``."""
    return structural_similarity_index_measure(pred, target, data_range=1.0, reduction="none")


def nearest_context_view(context_images, context_poses, query_poses) -> torch.Tensor:
    """The context image whose 7-d pose (position and sin/cos of the angles) is closest to the query's."""
    dist = (context_poses - query_poses[:, None]).pow(2).sum(dim=-1)  # [B, M]
    idx = dist.argmin(dim=1)
    return context_images[torch.arange(len(idx), device=idx.device), idx]


def mean_context_view(context_images) -> torch.Tensor:
    return context_images.mean(dim=1)


def masked_psnr(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) over the pixels where ``mask`` ``[B, 1, H, W]`` (bool) holds -> ``[B]``.

    The MSE is averaged over those pixels' channels and floored like :func:`psnr` (so the cap is the same);
    images without a masked pixel give NaN (callers average over the others).
    """
    mask = mask.to(pred.dtype)
    count = mask.flatten(1).sum(dim=1) * pred.shape[1]
    sq = ((pred - target).pow(2) * mask).flatten(1).sum(dim=1)
    mse = (sq / count.clamp_min(1)).clamp_min(MSE_FLOOR)
    return torch.where(count > 0, -10.0 * torch.log10(mse), torch.full_like(mse, float("nan")))


def object_pixels(coverage: torch.Tensor) -> torch.Tensor:
    """Object pixels ``[B, 1, H, W]`` (bool) from object coverage in [0, 1] (see data_modules.objects)."""
    return coverage >= OBJECT_COVERAGE
