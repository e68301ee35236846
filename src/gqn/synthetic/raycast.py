"""A small vectorised ray caster (numpy): spheres, boxes, cylinders, cones, a room and Lambert light.

Every intersection routine takes ray origins ``O`` ``[N, 3]`` and unit directions ``D`` ``[N, 3]`` and
returns the hit distance ``t`` ``[N]`` (``inf`` for a miss) and the unit surface normal ``[N, 3]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

EPS = 1e-4
INF = np.inf


def _rot_z(v: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    out = v.copy()
    out[..., 0] = c * v[..., 0] - s * v[..., 1]
    out[..., 1] = s * v[..., 0] + c * v[..., 1]
    return out


def _may_hit(O: np.ndarray, D: np.ndarray, center: np.ndarray, radius: float) -> np.ndarray:
    """Indices of the rays that pass through a bounding sphere in front of their origin."""
    oc = O - center
    b = np.einsum("ij,ij->i", oc, D)
    c = np.einsum("ij,ij->i", oc, oc) - radius * radius
    return np.flatnonzero((b * b - c > 0) & ((b < 0) | (c < 0)))


@dataclass
class Sphere:
    center: np.ndarray
    radius: float
    color: np.ndarray

    def bound(self):
        return self.center, self.radius

    def intersect(self, O, D):
        oc = O - self.center
        b = np.einsum("ij,ij->i", oc, D)
        c = np.einsum("ij,ij->i", oc, oc) - self.radius**2
        disc = b * b - c
        root = np.sqrt(np.maximum(disc, 0))
        t0, t1 = -b - root, -b + root
        t = np.where(t0 > EPS, t0, t1)
        t = np.where((disc > 0) & (t > EPS), t, INF)
        hit = O + np.where(np.isfinite(t), t, 0)[:, None] * D
        return t, (hit - self.center) / self.radius


@dataclass
class Box:
    """A box with half extents ``half`` rotated by ``angle`` about the vertical axis through ``center``."""

    center: np.ndarray
    half: np.ndarray
    color: np.ndarray
    angle: float = 0.0

    def bound(self):
        return self.center, float(np.linalg.norm(self.half))

    def intersect(self, O, D):
        o = _rot_z(O - self.center, -self.angle)
        d = _rot_z(D, -self.angle)
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = 1.0 / np.where(np.abs(d) < 1e-12, 1e-12, d)
            t1 = (-self.half - o) * inv
            t2 = (self.half - o) * inv
        tmin_axes = np.minimum(t1, t2)
        tmax = np.maximum(t1, t2).min(axis=1)
        tmin = tmin_axes.max(axis=1)
        axis = tmin_axes.argmax(axis=1)
        inside = tmin <= EPS  # origin inside the box: take the exit point
        t = np.where(inside, tmax, tmin)
        t = np.where((tmax >= np.maximum(tmin, EPS)) & (t > EPS), t, INF)
        if np.any(inside):
            axis = np.where(inside, np.maximum(t1, t2).argmin(axis=1), axis)
        normal = np.zeros_like(o)
        rows = np.arange(len(o))
        normal[rows, axis] = -np.sign(d[rows, axis])
        return t, _rot_z(normal, self.angle)


@dataclass
class Cylinder:
    """A vertical cylinder standing on z = ``base`` with radius and height."""

    center: np.ndarray  # (x, y, base z)
    radius: float
    height: float
    color: np.ndarray

    def bound(self):
        return self.center + np.array([0, 0, self.height / 2]), float(np.hypot(self.radius, self.height / 2))

    def intersect(self, O, D):
        o = O - self.center
        a = D[:, 0] ** 2 + D[:, 1] ** 2
        b = o[:, 0] * D[:, 0] + o[:, 1] * D[:, 1]
        c = o[:, 0] ** 2 + o[:, 1] ** 2 - self.radius**2
        disc = b * b - a * c
        with np.errstate(divide="ignore", invalid="ignore"):
            t_side = (-b - np.sqrt(np.maximum(disc, 0))) / np.where(a < 1e-12, 1e-12, a)
            z = o[:, 2] + t_side * D[:, 2]
            t_side = np.where((disc > 0) & (t_side > EPS) & (z >= 0) & (z <= self.height), t_side, INF)
            t_top = (self.height - o[:, 2]) / np.where(np.abs(D[:, 2]) < 1e-12, 1e-12, D[:, 2])
        p = o + np.where(np.isfinite(t_top), t_top, 0)[:, None] * D
        t_top = np.where((t_top > EPS) & (p[:, 0] ** 2 + p[:, 1] ** 2 <= self.radius**2), t_top, INF)
        t = np.minimum(t_side, t_top)
        hit = o + np.where(np.isfinite(t), t, 0)[:, None] * D
        side_n = np.stack([hit[:, 0], hit[:, 1], np.zeros(len(o))], axis=1) / self.radius
        normal = np.where((t_top <= t_side)[:, None], np.array([0.0, 0.0, 1.0]), side_n)
        return t, normal


@dataclass
class Cone:
    """A vertical cone with its base disc on z = ``base`` and its apex ``height`` above."""

    center: np.ndarray  # (x, y, base z)
    radius: float
    height: float
    color: np.ndarray

    def bound(self):
        return self.center + np.array([0, 0, self.height / 2]), float(np.hypot(self.radius, self.height / 2))

    def intersect(self, O, D):
        o = O - self.center
        k2 = (self.radius / self.height) ** 2
        w = self.height - o[:, 2]
        a = D[:, 0] ** 2 + D[:, 1] ** 2 - k2 * D[:, 2] ** 2
        b = o[:, 0] * D[:, 0] + o[:, 1] * D[:, 1] + k2 * w * D[:, 2]
        c = o[:, 0] ** 2 + o[:, 1] ** 2 - k2 * w**2
        disc = b * b - a * c
        root = np.sqrt(np.maximum(disc, 0))
        a_safe = np.where(np.abs(a) < 1e-12, 1e-12, a)
        best = np.full(len(o), INF)
        for t in ((-b - root) / a_safe, (-b + root) / a_safe):
            z = o[:, 2] + t * D[:, 2]
            ok = (disc >= 0) & (t > EPS) & (z >= 0) & (z <= self.height)
            best = np.where(ok & (t < best), t, best)
        hit = o + np.where(np.isfinite(best), best, 0)[:, None] * D
        radial = np.sqrt(hit[:, 0] ** 2 + hit[:, 1] ** 2)
        normal = np.stack([hit[:, 0], hit[:, 1], np.sqrt(k2) * radial], axis=1)
        normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-12)
        return best, normal


@dataclass
class Room:
    """Floor z = 0 and four walls at x, y = +-half up to ``wall_height``; sky above."""

    half: float
    wall_height: float
    floor_color: np.ndarray
    wall_colors: np.ndarray  # [4, 3]: walls at +x, -x, +y, -y

    def intersect(self, O, D):
        with np.errstate(divide="ignore", invalid="ignore"):
            t_floor = np.where(D[:, 2] < -1e-9, -O[:, 2] / D[:, 2], INF)
            tx = np.where(D[:, 0] > 0, (self.half - O[:, 0]) / D[:, 0], (-self.half - O[:, 0]) / D[:, 0])
            ty = np.where(D[:, 1] > 0, (self.half - O[:, 1]) / D[:, 1], (-self.half - O[:, 1]) / D[:, 1])
        tx = np.where(np.abs(D[:, 0]) < 1e-12, INF, tx)
        ty = np.where(np.abs(D[:, 1]) < 1e-12, INF, ty)
        t_wall = np.minimum(tx, ty)
        wall_z = O[:, 2] + t_wall * D[:, 2]
        t_wall = np.where((wall_z <= self.wall_height) & (wall_z >= 0), t_wall, INF)
        t = np.minimum(t_floor, t_wall)
        is_floor = t_floor <= t_wall
        on_x = tx <= ty
        wall_index = np.where(on_x, np.where(D[:, 0] > 0, 0, 1), np.where(D[:, 1] > 0, 2, 3))
        normal = np.zeros_like(O)
        normal[is_floor, 2] = 1.0
        wall = ~is_floor
        normal[wall & on_x, 0] = -np.sign(D[wall & on_x, 0])
        normal[wall & ~on_x, 1] = -np.sign(D[wall & ~on_x, 1])
        color = np.where(is_floor[:, None], self.floor_color, self.wall_colors[wall_index])
        return t, normal, color


@dataclass
class World:
    objects: list = field(default_factory=list)
    room: Room | None = None
    light: np.ndarray = field(default_factory=lambda: np.array([0.3, 0.5, 0.8]))  # direction to the light
    ambient: float = 0.35
    background: np.ndarray = field(default_factory=lambda: np.array([0.0, 0.0, 0.0]))
    sky: bool = False  # light-blue gradient instead of a plain background
    shadows: bool = True

    def _nearest_object(self, O, D):
        t = np.full(len(O), INF)
        normal = np.zeros_like(O)
        color = np.zeros_like(O)
        for obj in self.objects:
            idx = _may_hit(O, D, *obj.bound())  # only rays through the bounding sphere are traced
            if idx.size == 0:
                continue
            ti, ni = obj.intersect(O[idx], D[idx])
            closer = ti < t[idx]
            sel = idx[closer]
            t[sel] = ti[closer]
            normal[sel] = ni[closer]
            color[sel] = obj.color
        return t, normal, color

    def render(self, O: np.ndarray, D: np.ndarray) -> np.ndarray:
        """Colours ``[N, 3]`` in [0, 1] for rays ``O``, ``D`` ``[N, 3]``."""
        t, normal, color = self._nearest_object(O, D)
        if self.room is not None:
            tr, nr, cr = self.room.intersect(O, D)
            closer = tr < t
            t = np.where(closer, tr, t)
            normal[closer], color[closer] = nr[closer], cr[closer]
        hit = np.isfinite(t)
        light = self.light / np.linalg.norm(self.light)
        lambert = np.clip(normal @ light, 0, 1)
        if self.shadows and self.objects and hit.any():
            P = O[hit] + t[hit, None] * D[hit] + normal[hit] * 1e-3
            ts, _, _ = self._nearest_object(P, np.broadcast_to(light, P.shape).copy())
            lambert[hit] *= np.where(np.isfinite(ts), 0.25, 1.0)
        shade = self.ambient + (1 - self.ambient) * lambert
        out = color * shade[:, None]
        if self.sky:
            bg = np.array([0.55, 0.75, 0.95]) + np.clip(D[:, 2:3], 0, 1) * np.array([-0.25, -0.2, 0.0])
        else:
            bg = np.broadcast_to(self.background, O.shape)
        return np.clip(np.where(hit[:, None], out, bg), 0, 1)
