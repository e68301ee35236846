"""Procedural scene families: `rooms` (ring camera, in the spirit of rooms_ring_camera; or a free camera, in
the spirit of rooms_free_camera) and `shepard_metzler` (N unit cubes joined by a random walk, camera on a
sphere)."""

from __future__ import annotations

import colorsys
import dataclasses

import numpy as np

from gqn.synthetic.camera import FIELD_OF_VIEW, look_at, ray_directions
from gqn.synthetic.raycast import Box, Cone, Cylinder, Room, Sphere, World

FAMILIES = ("rooms", "shepard_metzler")
CAMERAS = ("ring", "free")  # rooms: on a ring looking at the centre, or anywhere looking anywhere

ROOM_HALF = 1.5  # walls at x, y = +-1.5
WALL_HEIGHT = 1.2
RING_RADIUS = 1.3  # camera ring inside the room, outside the objects
CAMERA_HEIGHT = 0.55


def _colour(rng: np.random.Generator, saturation=(0.5, 0.95), value=(0.55, 1.0)) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(*saturation), rng.uniform(*value)))


def _rooms_world(rng: np.random.Generator, object_scale: float = 1.0,
                 camera_radius: float = RING_RADIUS) -> tuple[World, list]:
    """The room and its objects, and the objects' ``(xy, size)`` footprints (where free cameras must not stand)."""
    wall = _colour(rng, (0.15, 0.6), (0.5, 0.9))
    walls = np.stack([np.clip(wall * f, 0, 1) for f in (1.0, 0.9, 0.8, 0.7)])  # a shade per wall
    room = Room(ROOM_HALF, WALL_HEIGHT, _colour(rng, (0.1, 0.5), (0.35, 0.75)), walls)
    objects, placed = [], []
    for _ in range(int(rng.integers(1, 4))):
        size = rng.uniform(0.12, 0.34) * object_scale
        # objects stay inside the camera ring (with room to spare); 0.6 for the default sizes and ring
        spread = float(np.clip(camera_radius - size - 0.2, 0.0, 0.6))
        for _attempt in range(20):  # rejection sampling: objects do not overlap
            xy = rng.uniform(-spread, spread, size=2)
            if all(np.linalg.norm(xy - p) > size + s + 0.05 for p, s in placed):
                break
        placed.append((xy, size))
        colour = _colour(rng)
        kind = rng.integers(4)
        if kind == 0:
            objects.append(Sphere(np.array([*xy, size]), size, colour))
        elif kind == 1:
            objects.append(Box(np.array([*xy, size]), np.full(3, size), colour, rng.uniform(0, np.pi / 2)))
        elif kind == 2:
            objects.append(Cylinder(np.array([*xy, 0.0]), size, 2 * size * rng.uniform(0.8, 1.4), colour))
        else:
            objects.append(Cone(np.array([*xy, 0.0]), size, 2.5 * size, colour))
    azimuth = rng.uniform(0, 2 * np.pi)
    light = np.array([np.cos(azimuth), np.sin(azimuth), rng.uniform(1.2, 2.0)])
    return World(objects=objects, room=room, light=light, ambient=0.4, sky=True), placed


def _rooms_cameras(rng: np.random.Generator, views: int, radius: float = RING_RADIUS) -> np.ndarray:
    cams = []
    for _ in range(views):
        angle = rng.uniform(0, 2 * np.pi)
        pos = np.array([radius * np.cos(angle), radius * np.sin(angle), CAMERA_HEIGHT])
        yaw, pitch = look_at(pos, np.array([0.0, 0.0, 0.15]))
        cams.append([*pos, yaw, pitch + rng.uniform(-0.05, 0.05)])
    return np.array(cams)


def _free_cameras(rng: np.random.Generator, views: int, placed: list, extent: float = RING_RADIUS) -> np.ndarray:
    """Cameras anywhere in the square ``|x|, |y| <= extent`` outside the objects, at a varied height, looking
    in any direction (yaw uniform) and a little up or down: views of one scene often share little."""
    cams = []
    for _ in range(views):
        for _attempt in range(50):  # rejection sampling: not inside (or touching) an object
            xy = rng.uniform(-extent, extent, size=2)
            if all(np.linalg.norm(xy - p) > s + 0.15 for p, s in placed):
                break
        pos = np.array([*xy, CAMERA_HEIGHT + rng.uniform(-0.2, 0.2)])
        cams.append([*pos, rng.uniform(-np.pi, np.pi), rng.uniform(-0.45, 0.15)])
    return np.array(cams)


def _shepard_metzler_world(rng: np.random.Generator, parts: int) -> World:
    steps = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]])
    cells = [np.zeros(3, int)]
    while len(cells) < parts:
        nxt = cells[-1] + steps[rng.integers(6)]
        if not any((nxt == c).all() for c in cells):
            cells.append(nxt)
    cells = np.array(cells, float)
    cells -= cells.mean(axis=0)
    scale = 0.3
    objects = [Box(c * scale, np.full(3, scale / 2), _colour(rng, (0.6, 1.0), (0.7, 1.0))) for c in cells]
    return World(objects=objects, light=np.array([0.4, 0.3, 0.9]), ambient=0.45, shadows=False)


def _sphere_cameras(rng: np.random.Generator, views: int, distance: float = 1.7) -> np.ndarray:
    cams = []
    for _ in range(views):
        yaw_pos, elev = rng.uniform(0, 2 * np.pi), rng.uniform(-np.pi / 6, np.pi / 3)
        pos = distance * np.array([np.cos(elev) * np.cos(yaw_pos), np.cos(elev) * np.sin(yaw_pos), np.sin(elev)])
        cams.append([*pos, *look_at(pos, np.zeros(3))])
    return np.array(cams)


def _box_filter(x: np.ndarray, size: int, samples: int) -> np.ndarray:
    """``[V, size*k, size*k, ...]`` -> ``[V, size, size, ...]``: the mean of each k x k block of sub-pixels."""
    v, rest = x.shape[0], x.shape[3:]
    return x.reshape(v, size, samples, size, samples, *rest).mean(axis=(2, 4))


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return (x * 255 + 0.5).astype(np.uint8)


def render_views(world: World, cameras: np.ndarray, size: int, samples: int = 1, return_objects: bool = False,
                 fov: float = FIELD_OF_VIEW):
    """uint8 frames ``[V, size, size, 3]`` of ``world`` seen by ``cameras`` ``[V, 5]``.

    ``samples`` anti-aliases: ``samples x samples`` rays on a regular grid inside every pixel, averaged (a box
    filter), as a real renderer's multisampling would. With ``return_objects`` also the object coverage of
    each pixel, uint8 ``[V, size, size]`` (255: every sub-pixel ray first hits an object).
    """
    if samples < 1:
        raise ValueError(f"samples (rays per pixel along each axis) must be >= 1, got {samples}")
    fine = size * samples
    directions = ray_directions(cameras, fine, fov).reshape(len(cameras), fine * fine, 3)
    rgb, objects = world.render(cameras[:, :3], directions, return_objects=True)
    frames = _to_uint8(_box_filter(rgb.reshape(len(cameras), fine, fine, 3), size, samples))
    if not return_objects:
        return frames
    coverage = _box_filter(objects.reshape(len(cameras), fine, fine).astype(np.float32), size, samples)
    return frames, _to_uint8(coverage)


def make_scene(family: str, rng: np.random.Generator, views: int, size: int, parts: int = 7, samples: int = 1,
               objects: bool = False, fov: float = FIELD_OF_VIEW, object_scale: float = 1.0,
               camera_radius: float = RING_RADIUS, camera: str = "ring"):
    """One scene: (frames uint8 ``[V, S, S, 3]``, cameras float32 ``[V, 5]`` = x, y, z, yaw, pitch).

    ``fov``: the cameras' full field of view, radians. Rooms only: ``object_scale`` multiplies the objects' sizes,
    ``camera_radius`` is the radius of the camera ring (the walls are at 1.5; objects stay inside the ring);
    ``camera="free"`` puts the cameras anywhere in the square of that half-width, looking in any direction.
    With ``objects`` a third item: ``{"masks": uint8 [V, S, S] object coverage, "empty": uint8 [V, S, S, 3]}``,
    the exact render of each view with the objects (and so their shadows) taken out of the scene.
    """
    if family == "rooms":
        if not 0 < camera_radius < ROOM_HALF:
            raise ValueError(f"camera_radius must be in (0, {ROOM_HALF}) (inside the walls), got {camera_radius}")
        if object_scale <= 0:
            raise ValueError(f"object_scale must be > 0, got {object_scale}")
        if camera not in CAMERAS:
            raise ValueError(f"unknown camera {camera!r}; choose one of {CAMERAS}")
        world, placed = _rooms_world(rng, object_scale, camera_radius)
        cameras = (_rooms_cameras(rng, views, camera_radius) if camera == "ring"
                   else _free_cameras(rng, views, placed, camera_radius))
    elif family == "shepard_metzler":
        world, cameras = _shepard_metzler_world(rng, parts), _sphere_cameras(rng, views)
    else:
        raise ValueError(f"unknown scene family {family!r}; choose one of {FAMILIES}")
    cameras = cameras.astype(np.float32)
    if not objects:
        return render_views(world, cameras, size, samples, fov=fov), cameras
    frames, masks = render_views(world, cameras, size, samples, return_objects=True, fov=fov)
    empty = render_views(dataclasses.replace(world, objects=[]), cameras, size, samples, fov=fov)
    return frames, cameras, {"masks": masks, "empty": empty}
