"""Pinhole camera of the DeepMind GQN datasets' convention: a pose is ``[x, y, z, yaw, pitch]``.

World axes: x and y horizontal, z up. ``yaw`` is the heading of the view direction in the x-y plane,
measured from +x towards +y; ``pitch`` is its elevation (positive looks up). Both in radians.
"""

from __future__ import annotations

import numpy as np

#: Full field of view (horizontal = vertical) of the synthetic cameras, radians.
FIELD_OF_VIEW = np.deg2rad(60.0)


def camera_basis(yaw: np.ndarray, pitch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Forward, right and up unit vectors ``[..., 3]`` for yaw/pitch arrays."""
    cy, sy, cp, sp = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch)
    forward = np.stack([cp * cy, cp * sy, sp], axis=-1)
    right = np.stack([sy, -cy, np.zeros_like(yaw)], axis=-1)
    up = np.cross(right, forward)
    return forward, right, up


def ray_directions(cameras: np.ndarray, size: int, fov: float = FIELD_OF_VIEW) -> np.ndarray:
    """Unit ray directions ``[V, size, size, 3]`` through pixel centres for cameras ``[V, 5]``."""
    half = np.tan(fov / 2)
    coords = (np.arange(size) + 0.5) / size * 2 - 1  # -1..1, left->right / top->bottom
    u, v = np.meshgrid(coords * half, -coords * half)  # [size, size]: u along the rows, v down the columns
    # forward + u * right + v * up, normalised: the basis is orthonormal, so its length is sqrt(1 + u^2 + v^2)
    weights = np.stack([np.ones_like(u), u, v]).reshape(3, -1) / np.sqrt(1 + u * u + v * v).reshape(-1)
    basis = np.stack(camera_basis(cameras[:, 3], cameras[:, 4]), axis=-1)  # [V, 3 (x, y, z), 3 (f, r, u)]
    directions = np.einsum("vxc,cp->vxp", basis, weights)  # not matmul: BLAS may round differently per thread
    return np.moveaxis(directions, 1, -1).reshape(len(cameras), size, size, 3)


def project(points: np.ndarray, camera: np.ndarray, size: int, fov: float = FIELD_OF_VIEW) -> np.ndarray:
    """Pixel coordinates ``[..., 2]`` (row, col; continuous, pixel centres at +0.5) of world points."""
    forward, right, up = camera_basis(np.asarray(camera[3]), np.asarray(camera[4]))
    d = np.asarray(points, dtype=np.float64) - camera[:3]
    depth = d @ forward
    half = np.tan(fov / 2)
    u = (d @ right) / depth / half
    v = (d @ up) / depth / half
    col = (u + 1) / 2 * size
    row = (1 - v) / 2 * size
    return np.stack([row, col], axis=-1)


def look_at(position: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """Yaw and pitch of a camera at ``position`` looking at ``target``."""
    d = np.asarray(target, float) - np.asarray(position, float)
    yaw = np.arctan2(d[1], d[0])
    pitch = np.arctan2(d[2], np.hypot(d[0], d[1]))
    return float(yaw), float(pitch)
