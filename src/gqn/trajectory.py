"""Camera trajectories for fly-throughs, in the 7-d pose convention of the batch contract."""

from __future__ import annotations

import math

import torch


def pose_from_camera(x, y, z, yaw, pitch) -> list[float]:
    """Raw camera ``[x, y, z, yaw, pitch]`` -> ``[x, y, z, sin yaw, cos yaw, sin pitch, cos pitch]``."""
    return [x, y, z, math.sin(yaw), math.cos(yaw), math.sin(pitch), math.cos(pitch)]


def camera_from_pose(pose: torch.Tensor) -> torch.Tensor:
    """``[..., 7]`` pose -> ``[..., 5]`` raw camera (yaw/pitch recovered with atan2)."""
    yaw = torch.atan2(pose[..., 3], pose[..., 4])
    pitch = torch.atan2(pose[..., 5], pose[..., 6])
    return torch.cat([pose[..., :3], yaw[..., None], pitch[..., None]], dim=-1)


def orbit(
    context_poses: torch.Tensor,
    frames: int = 36,
    radius: float | None = None,
    height: float | None = None,
    pitch: float | None = None,
    center: tuple[float, float] = (0.0, 0.0),
) -> torch.Tensor:
    """Poses ``[frames, 7]`` on a horizontal ring around ``center``, looking inwards.

    Unset radius, height and pitch default to the context cameras' mean distance from the centre, mean
    height and mean pitch, so the orbit stays where the data's cameras are.
    """
    if frames < 1:
        raise ValueError(f"trajectory needs at least 1 frame, got {frames}")
    cams = camera_from_pose(context_poses.reshape(-1, 7).double())
    cx, cy = center
    if radius is None:
        radius = float(torch.hypot(cams[:, 0] - cx, cams[:, 1] - cy).mean())
    if height is None:
        height = float(cams[:, 2].mean())
    if pitch is None:
        pitch = float(cams[:, 4].mean())
    start = float(torch.atan2(cams[0, 1] - cy, cams[0, 0] - cx))  # begin at the first context camera
    poses = []
    for k in range(frames):
        theta = start + 2 * math.pi * k / frames
        x, y = cx + radius * math.cos(theta), cy + radius * math.sin(theta)
        poses.append(pose_from_camera(x, y, height, theta + math.pi, pitch))  # facing the centre
    return torch.tensor(poses, dtype=context_poses.dtype)
