"""A small vectorised ray caster (numpy, float32): spheres, boxes, cylinders, cones, a room and Lambert light.

Rays are kept as separate float32 component arrays (a structure of arrays): an origin ``o = (ox, oy, oz)``
and a unit direction ``d = (dx, dy, dz)``, whose components broadcast against each other: camera rays share
one origin per view (``[V, 1]`` against ``[V, P]`` directions), shadow rays share the light direction (scalars
against ``[M]`` origins). A shape's ``intersect(o, d)`` returns the nearest hit distance ``t`` (``inf`` for a
miss) and its ``normal(p)`` the unit outward normal at surface points ``p``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

EPS = 1e-4  # nearest accepted hit distance
TINY = 1e-12  # divisors closer to zero are replaced by this
SHADOW_OFFSET = 1e-3  # shadow rays start this far off the surface, along its normal
SHADOW_FACTOR = 0.25  # what is left of the direct light in a shadow
INF = np.inf
SKY = np.array([0.55, 0.75, 0.95], np.float32)  # at the horizon
SKY_GRADIENT = np.array([-0.25, -0.2, 0.0], np.float32)  # times the sine of the elevation


def _safe(x):
    return np.where(np.abs(x) < TINY, TINY, x)


def _floats(v) -> list[float]:
    """Python floats, so that arithmetic with them keeps the float32 of the ray arrays."""
    return [float(x) for x in np.asarray(v).reshape(-1)]


def _shift(o, center):
    return tuple(oi - ci for oi, ci in zip(o, _floats(center)))


def _flat(a: np.ndarray) -> np.ndarray:
    """A flat view of a contiguous array (per-ray arrays indexed by flat ray indices)."""
    return a.reshape(-1)


def _rot_z(v, angle: float):
    """``v`` rotated by ``angle`` about the vertical axis."""
    c, s = float(np.cos(angle)), float(np.sin(angle))
    return c * v[0] - s * v[1], s * v[0] + c * v[1], v[2]


@dataclass
class Sphere:
    center: np.ndarray
    radius: float
    color: np.ndarray

    def bound(self):
        return self.center, self.radius

    def intersect(self, o, d):
        ox, oy, oz = _shift(o, self.center)
        b = ox * d[0] + oy * d[1] + oz * d[2]
        c = ox * ox + oy * oy + oz * oz - float(self.radius) ** 2
        disc = b * b - c
        root = np.sqrt(np.maximum(disc, 0))
        t = -b - root
        t = np.where(t > EPS, t, t + 2 * root)  # the far root when the near one is behind the origin
        return np.where((disc > 0) & (t > EPS), t, INF)

    def normal(self, p):
        r = float(self.radius)
        return tuple(pi / r for pi in _shift(p, self.center))


@dataclass
class Box:
    """A box with half extents ``half`` rotated by ``angle`` about the vertical axis through ``center``."""

    center: np.ndarray
    half: np.ndarray
    color: np.ndarray
    angle: float = 0.0

    def bound(self):
        return self.center, float(np.linalg.norm(self.half))

    def _local(self, v):
        return _rot_z(v, -self.angle) if self.angle else v

    def intersect(self, o, d):
        o, d = self._local(_shift(o, self.center)), self._local(d)
        near, far = -INF, INF  # slab test: the ray is inside every slab between near and far
        for oi, di, hi in zip(o, d, _floats(self.half)):
            inv = 1 / _safe(di)
            mid, span = -oi * inv, hi * np.abs(inv)
            near, far = np.maximum(near, mid - span), np.minimum(far, mid + span)
        t = np.where(near > EPS, near, far)  # origin inside the box: take the exit point
        return np.where((far >= near) & (t > EPS), t, INF)

    def normal(self, p):
        q = self._local(_shift(p, self.center))
        gap = [h - np.abs(qi) for qi, h in zip(q, _floats(self.half))]  # distance to each pair of faces
        on_x = (gap[0] <= gap[1]) & (gap[0] <= gap[2])
        on_y = ~on_x & (gap[1] <= gap[2])
        on_z = ~on_x & ~on_y
        n = tuple(np.sign(qi) * on for qi, on in zip(q, (on_x, on_y, on_z)))
        return _rot_z(n, self.angle) if self.angle else n


@dataclass
class Cylinder:
    """A vertical cylinder standing on z = ``base`` with radius and height."""

    center: np.ndarray  # (x, y, base z)
    radius: float
    height: float
    color: np.ndarray

    def bound(self):
        return self.center + np.array([0, 0, self.height / 2]), float(np.hypot(self.radius, self.height / 2))

    def intersect(self, o, d):
        ox, oy, oz = _shift(o, self.center)
        r, h = float(self.radius), float(self.height)
        a = d[0] * d[0] + d[1] * d[1]
        b = ox * d[0] + oy * d[1]
        c = ox * ox + oy * oy - r * r
        disc = b * b - a * c
        t_side = (-b - np.sqrt(np.maximum(disc, 0))) / np.maximum(a, TINY)
        z = oz + t_side * d[2]
        t_side = np.where((disc > 0) & (t_side > EPS) & (z >= 0) & (z <= h), t_side, INF)
        t_top = (h - oz) / _safe(d[2])
        x, y = ox + t_top * d[0], oy + t_top * d[1]
        t_top = np.where((t_top > EPS) & (x * x + y * y <= r * r), t_top, INF)
        return np.minimum(t_side, t_top)

    def normal(self, p):
        x, y, z = _shift(p, self.center)
        r = float(self.radius)
        top = np.abs(float(self.height) - z) <= np.abs(r - np.sqrt(x * x + y * y))  # the nearer surface
        return np.where(top, 0, x / r), np.where(top, 0, y / r), top.astype(x.dtype)


@dataclass
class Cone:
    """A vertical cone with its base disc on z = ``base`` and its apex ``height`` above."""

    center: np.ndarray  # (x, y, base z)
    radius: float
    height: float
    color: np.ndarray

    def bound(self):
        return self.center + np.array([0, 0, self.height / 2]), float(np.hypot(self.radius, self.height / 2))

    def intersect(self, o, d):
        ox, oy, oz = _shift(o, self.center)
        h = float(self.height)
        k2 = (float(self.radius) / h) ** 2
        w = h - oz
        a = d[0] * d[0] + d[1] * d[1] - k2 * d[2] * d[2]
        b = ox * d[0] + oy * d[1] + k2 * w * d[2]
        c = ox * ox + oy * oy - k2 * w * w
        disc = b * b - a * c
        root = np.sqrt(np.maximum(disc, 0))
        a = _safe(a)
        best = INF
        for t in ((-b - root) / a, (-b + root) / a):
            z = oz + t * d[2]
            best = np.where((disc >= 0) & (t > EPS) & (z >= 0) & (z <= h) & (t < best), t, best)
        return best

    def normal(self, p):
        x, y, _ = _shift(p, self.center)
        slope = float(self.radius) / float(self.height)
        radial = np.sqrt(x * x + y * y)
        length = np.maximum(radial * math.hypot(1, slope), TINY)  # |(x, y, slope * radial)|
        return x / length, y / length, slope * radial / length


@dataclass
class Room:
    """Floor z = 0 and four walls at x, y = +-half up to ``wall_height``; sky above. Seen from inside."""

    half: float
    wall_height: float
    floor_color: np.ndarray
    wall_colors: np.ndarray  # [4, 3]: walls at +x, -x, +y, -y

    #: The room's surfaces, in the order of ``intersect``'s part index, and their inward normals.
    NORMALS = ((0.0, 0.0, 1.0), (-1.0, 0.0, 0.0), (1.0, 0.0, 0.0), (0.0, -1.0, 0.0), (0.0, 1.0, 0.0))

    def colors(self) -> np.ndarray:
        """``[5, 3]``: floor, then the walls at +x, -x, +y, -y."""
        return np.concatenate([np.reshape(self.floor_color, (1, 3)), self.wall_colors])

    def intersect(self, o, d):
        """Hit distance and part index: 0 floor, 1..4 the walls at +x, -x, +y, -y (see ``NORMALS``)."""
        ox, oy, oz = o
        dx, dy, dz = d
        half = float(self.half)
        with np.errstate(divide="ignore", invalid="ignore"):  # a zero component: no hit on those walls (inf)
            t_floor = np.where(dz < -1e-9, -oz / dz, INF)
            tx = (np.copysign(half, dx) - ox) / dx
            ty = (np.copysign(half, dy) - oy) / dy
            on_x = tx <= ty
            t_wall = np.where(on_x, tx, ty)
            wall_z = oz + t_wall * dz
        t_wall = np.where((wall_z <= float(self.wall_height)) & (wall_z >= 0), t_wall, INF)
        floor, wall_px, wall_mx, wall_py, wall_my = (np.int8(i) for i in range(5))  # int8: small part arrays
        wall = np.where(on_x, np.where(dx > 0, wall_px, wall_mx), np.where(dy > 0, wall_py, wall_my))
        return np.minimum(t_floor, t_wall), np.where(t_floor <= t_wall, floor, wall)


def _may_hit(o, d, center, radius: float) -> np.ndarray:
    """Flat indices of the rays that pass through a bounding sphere ahead of their origin."""
    w, radius = _shift(o, center), float(radius)
    b = w[0] * d[0] + w[1] * d[1] + w[2] * d[2]  # minus the distance along the ray to the point nearest the centre
    c = w[0] * w[0] + w[1] * w[1] + w[2] * w[2] - radius * radius  # < 0: the origin is inside
    return np.flatnonzero(b < np.where(c < 0, INF, -np.sqrt(np.maximum(c, 0))))  # b < 0 and b^2 > c


@dataclass
class World:
    objects: list = field(default_factory=list)
    room: Room | None = None
    light: np.ndarray = field(default_factory=lambda: np.array([0.3, 0.5, 0.8]))  # direction to the light
    ambient: float = 0.35
    background: np.ndarray = field(default_factory=lambda: np.array([0.0, 0.0, 0.0]))
    sky: bool = False  # light-blue gradient instead of a plain background
    shadows: bool = True

    def render(self, origins: np.ndarray, directions: np.ndarray, return_objects: bool = False):
        """Colours ``[V, P, 3]`` in [0, 1] of the rays from one origin per view ``origins`` ``[V, 3]`` along the
        unit ``directions`` ``[V, P, 3]``. With ``return_objects`` also a bool ``[V, P]``: the ray's first hit
        is one of the objects (not the room or the background)."""
        f32 = np.float32
        o = tuple(np.asarray(origins, f32)[:, None, i] for i in range(3))  # [V, 1] each
        d = tuple(np.ascontiguousarray(directions[..., i], f32) for i in range(3))  # [V, P] each
        t, surface, n = self._trace(o, d)
        hit = t < INF
        light = tuple(f32(x) for x in np.asarray(self.light) / np.linalg.norm(self.light))
        lambert = np.clip(n[0] * light[0] + n[1] * light[1] + n[2] * light[2], 0, 1)
        if self.shadows and self.objects:
            lit = np.flatnonzero(hit & (lambert > 0))  # a shadow on an unlit point changes nothing
            with np.errstate(invalid="ignore"):  # inf * 0 on the misses
                start = tuple(_flat(oi + t * di + SHADOW_OFFSET * ni)[lit] for oi, di, ni in zip(o, d, n))
            _flat(lambert)[lit[self._in_shadow(start, light)]] *= SHADOW_FACTOR
        shade = np.where(hit, self.ambient + (1 - self.ambient) * lambert, 1)  # the background is not shaded
        palette = self._palette()
        out = np.empty((*t.shape, 3), f32)
        for c in range(3):
            np.multiply(palette[:, c].take(surface), shade, out=out[..., c])
        if self.sky:  # a gradient instead of the background colour
            miss = np.flatnonzero(~hit)
            out.reshape(-1, 3)[miss] = SKY + np.clip(_flat(d[2])[miss], 0, 1)[:, None] * SKY_GRADIENT
        out = np.clip(out, 0, 1, out=out)
        return (out, surface < len(self.objects)) if return_objects else out

    def _palette(self) -> np.ndarray:
        """Colours ``[S, 3]`` of the surfaces: the objects, the room's parts (if any), the background."""
        room = [] if self.room is None else list(self.room.colors())
        return np.asarray([*(obj.color for obj in self.objects), *room, self.background], np.float32)

    def _trace(self, o, d):
        """Distance ``t``, surface (a row of ``_palette``) and unit normal of the nearest hit of the camera rays."""
        t = np.full(d[0].shape, INF, np.float32)
        surface = np.full(t.shape, len(self._palette()) - 1, np.intp)  # the background
        n = tuple(np.zeros_like(t) for _ in range(3))
        if self.room is not None:
            t, part = self.room.intersect(o, d)
            part = part.astype(np.intp)
            np.copyto(surface, len(self.objects) + part, where=t < INF)
            for i, ni in enumerate(n):
                np.asarray(Room.NORMALS, np.float32)[:, i].take(part, out=ni)
        for k, obj in enumerate(self.objects):  # only the rays through its bounding sphere
            idx = _may_hit(o, d, *obj.bound())
            ok, dk = tuple(oi.take(idx // t.shape[1]) for oi in o), tuple(_flat(di)[idx] for di in d)
            tk = obj.intersect(ok, dk)
            closer = tk < _flat(t)[idx]
            idx, tk = idx[closer], tk[closer]
            _flat(t)[idx], _flat(surface)[idx] = tk, k
            normal = obj.normal(tuple(oi[closer] + tk * di[closer] for oi, di in zip(ok, dk)))
            for ni, vi in zip(n, normal):
                _flat(ni)[idx] = vi
        return t, surface, n

    def _in_shadow(self, p, light) -> np.ndarray:
        """Whether the rays from points ``p`` (components ``[M]``) towards the ``light`` hit an object."""
        blocked = np.zeros(p[0].shape, bool)
        for obj in self.objects:
            idx = _may_hit(p, light, *obj.bound())
            blocked[idx[obj.intersect(tuple(pi[idx] for pi in p), light) < INF]] = True
        return blocked
