"""Representation networks f(x, v) -> r of the paper (Fig. S1): tower, pool and pyramid.

Every encoder maps images ``[N, 3, H, W]`` and poses ``[N, 7]`` to ``[N, C, s, s]`` where ``s`` is either
``H / 4`` (the latent grid of the generator) or 1 (a pooled code). The GQN sums them over context views.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: The generator's latent grid is the image downsampled by this factor.
GRID_SCALE = 4


def _check_image_size(image_size: int) -> None:
    if image_size % GRID_SCALE != 0:
        raise ValueError(f"image_size must be divisible by {GRID_SCALE}, got {image_size}")


def check_widths(prefix: str, least: int = 1, **widths: int) -> None:
    """A ValueError naming the config key (``{prefix}.{name}``) of the first width below ``least``: a layer of
    zero channels would only fail later, in a convolution, with a traceback."""
    for name, value in widths.items():
        if value is not None and value < least:
            raise ValueError(f"{prefix}.{name} must be an integer >= {least}, got {value}")


def tile_pose(pose: torch.Tensor, size: int) -> torch.Tensor:
    """Broadcast a pose ``[N, P]`` over a ``size x size`` grid -> ``[N, P, size, size]``."""
    return pose[:, :, None, None].expand(-1, -1, size, size)


class Tower(nn.Module):
    """The 'tower' representation: residual convs down to the latent grid, pose joined at 1/4 size."""

    def __init__(self, image_size: int = 64, pose_dim: int = 7, channels: int = 256, image_channels: int = 3):
        super().__init__()
        _check_image_size(image_size)
        check_widths("model.encoder", 2, channels=channels)  # (the tower's middle layers have half of them)
        half = channels // 2
        self.image_size, self.pose_dim, self.out_channels = image_size, pose_dim, channels
        self.out_size = image_size // GRID_SCALE
        self.conv1 = nn.Conv2d(image_channels, channels, 2, stride=2)
        self.conv2 = nn.Conv2d(channels, channels, 2, stride=2)
        self.conv3 = nn.Conv2d(channels, half, 3, padding=1)
        self.conv4 = nn.Conv2d(half, channels, 2, stride=2)
        self.conv5 = nn.Conv2d(channels + pose_dim, channels, 3, padding=1)
        self.conv6 = nn.Conv2d(channels + pose_dim, half, 3, padding=1)
        self.conv7 = nn.Conv2d(half, channels, 3, padding=1)
        self.conv8 = nn.Conv2d(channels, channels, 1)

    def forward(self, images: torch.Tensor, poses: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(images))  # [N, C, H/2, W/2]
        skip = F.relu(self.conv2(x))  # [N, C, H/4, W/4]
        x = F.relu(self.conv3(x))
        x = F.relu(self.conv4(x)) + skip
        x = torch.cat([x, tile_pose(poses, x.shape[-1])], dim=1)
        skip = F.relu(self.conv5(x))
        x = F.relu(self.conv6(x))
        x = F.relu(self.conv7(x)) + skip
        return F.relu(self.conv8(x))  # [N, C, H/4, W/4]


class AttentionTower(Tower):
    """The tower, whose per-view outputs are also kept as patches for an attention GQN (Rosenbaum et al. 2018).

    The GQN still sums the views into ``r``; with this encoder the generator also reads, at every DRAW step,
    an attention summary of the ``M x (H/4)^2`` context patches (each carries its view's pose, joined inside
    the tower), queried from the query pose, the grid position and the generator state
    (:class:`gqn.model.generator.ViewAttention`). ``key_channels``, ``value_channels`` and ``heads`` size it.
    With ``pixel_values`` every patch also carries its own pixels (the ``4 x 4`` block of the view it covers,
    space-to-depth), so that the generator can copy detail from the context views.
    """

    keeps_views = True

    def __init__(self, image_size: int = 64, pose_dim: int = 7, channels: int = 256, image_channels: int = 3,
                 key_channels: int = 32, value_channels: int = 32, heads: int = 4, pixel_values: bool = False):
        super().__init__(image_size, pose_dim, channels, image_channels)
        check_widths("model.encoder", key_channels=key_channels, value_channels=value_channels, heads=heads)
        if key_channels % heads or value_channels % heads:
            raise ValueError(f"key_channels ({key_channels}) and value_channels ({value_channels}) must be "
                             f"divisible by heads ({heads})")
        self.attention = {"key_channels": key_channels, "value_channels": value_channels, "heads": heads}
        self.pixel_values = pixel_values
        #: channels of one patch as the generator reads it: tower features (+ the patch's pixels)
        self.patch_channels = channels + (image_channels * GRID_SCALE**2 if pixel_values else 0)


class Pool(Tower):
    """The 'pool' representation: the tower followed by a global average -> ``[N, C, 1, 1]``."""

    def __init__(self, image_size: int = 64, pose_dim: int = 7, channels: int = 256, image_channels: int = 3):
        super().__init__(image_size, pose_dim, channels, image_channels)
        self.out_size = 1

    def forward(self, images: torch.Tensor, poses: torch.Tensor) -> torch.Tensor:
        return super().forward(images, poses).mean(dim=(2, 3), keepdim=True)


class Pyramid(nn.Module):
    """The 'pyramid' representation: pose joined at the input, 2x2/2 convs, one last conv to 1x1."""

    #: its last convolution spans the whole remaining map: built for one image size (schedule.coarse_steps refuses it)
    size_agnostic = False

    def __init__(self, image_size: int = 64, pose_dim: int = 7, channels: int = 256, image_channels: int = 3):
        super().__init__()
        _check_image_size(image_size)
        check_widths("model.encoder", channels=channels)
        self.image_size, self.pose_dim, self.out_channels, self.out_size = image_size, pose_dim, channels, 1
        widths = [32, 64, 128]
        layers, cin, size = [], image_channels + pose_dim, image_size
        for w in widths:
            layers += [nn.Conv2d(cin, w, 2, stride=2), nn.ReLU()]
            cin, size = w, size // 2
        layers += [nn.Conv2d(cin, channels, size, stride=size), nn.ReLU()]  # 8x8/8 for 64x64 images
        self.net = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor, poses: torch.Tensor) -> torch.Tensor:
        x = torch.cat([images, tile_pose(poses, images.shape[-1])], dim=1)
        return self.net(x)  # [N, C, 1, 1]
