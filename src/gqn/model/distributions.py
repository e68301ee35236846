"""Gaussian helpers for the ELBO: parameter heads, KL between diagonal Gaussians, pixel NLL."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: Lower bound on the standard deviation of the latent Gaussians (numerical safety).
MIN_STD = 1e-4


def split_gaussian(params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a head's output ``[B, 2z, s, s]`` into mean and standard deviation (softplus)."""
    mean, raw = params.chunk(2, dim=1)
    return mean, F.softplus(raw) + MIN_STD


def fp32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in at least float32: loss terms stay fp32 under bf16/fp16 autocast (float64 is kept)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def kl_gaussian(mq: torch.Tensor, sq: torch.Tensor, mp: torch.Tensor, sp: torch.Tensor) -> torch.Tensor:
    """KL(N(mq, sq^2) || N(mp, sp^2)) elementwise, in at least float32."""
    mq, sq, mp, sp = fp32(mq), fp32(sq), fp32(mp), fp32(sp)
    ratio = (sq / sp) ** 2
    return 0.5 * (ratio + ((mq - mp) / sp) ** 2 - 1.0 - torch.log(ratio))


def gaussian_nll(x: torch.Tensor, mean: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """-log N(x | mean, sigma^2) summed over all but the batch dimension -> ``[B]`` (nats), in at least float32."""
    x, mean = fp32(x), fp32(mean)
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    nll = 0.5 * ((x - mean) / sigma) ** 2 + torch.log(sigma) + 0.5 * math.log(2 * math.pi)
    return nll.flatten(1).sum(dim=1)


def mixture_nll(x: torch.Tensor, weights: torch.Tensor, colours: torch.Tensor, sigma: float,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """-log of ``x`` ``[B, C, H, W]`` under a per-pixel mixture of Gaussians: component ``j`` of pixel ``p`` has
    mean ``colours[:, j, :, p]`` (``[B, n, C, H, W]``), standard deviation ``sigma`` in every channel and weight
    ``weights[:, j, p]`` (``[B, n, H, W]``, summing to 1 over ``j``); summed over the pixels -> ``[B]`` (nats), in
    float32. ``mask`` ``[B, H, W]`` (optional) weighs each pixel's term (0: left out)."""
    x, weights, colours = fp32(x), fp32(weights), fp32(colours)
    log_normal = (-0.5 * ((x[:, None] - colours) / sigma) ** 2).sum(dim=2) - x.shape[1] * (
        math.log(sigma) + 0.5 * math.log(2 * math.pi))  # [B, n, H, W]
    nll = -torch.logsumexp(weights.clamp(min=1e-30).log() + log_normal, dim=1)  # [B, H, W]
    if mask is not None:
        nll = nll * fp32(mask)
    return nll.flatten(1).sum(dim=1)
