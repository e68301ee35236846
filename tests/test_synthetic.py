"""Procedural scenes: determinism, camera geometry consistent with pixels, DeepMind format read back."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from data_modules import GQNDataModule
from data_modules.records import iter_records, parse_scene
from gqn.synthetic import make_scene, synthesize
from gqn.synthetic.camera import look_at, project
from gqn.synthetic.raycast import Sphere, World
from gqn.synthetic.scenes import RING_RADIUS, render_views


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.tfrecord")):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("family", ["rooms", "shepard_metzler"])
def test_same_seed_same_bytes_whatever_the_workers(tmp_path, family):
    kw = dict(family=family, train_scenes=6, test_scenes=2, image_size=32, views=4, scenes_per_file=3,
              log=lambda *_: None)
    synthesize(tmp_path / "a", seed=5, workers=1, **kw)
    synthesize(tmp_path / "b", seed=5, workers=2, **kw)
    synthesize(tmp_path / "c", seed=6, workers=1, **kw)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    names = sorted(p.name for p in (tmp_path / "a" / "train").iterdir())
    assert names == ["001-of-002.tfrecord", "002-of-002.tfrecord"]
    card = json.loads((tmp_path / "a" / "dataset.json").read_text())
    assert card["seed"] == 5 and card["frames_per_scene"] == 4 and card["image_size"] == 32


@pytest.mark.parametrize("yaw,pitch", [(0.3, -0.2), (2.5, 0.1), (-1.2, 0.0)])
def test_a_known_point_renders_where_the_pose_predicts(yaw, pitch):
    """A small red sphere on a black background appears at the pixel that `project` predicts."""
    size = 64
    cam_pos = np.array([0.4, -0.3, 0.5])
    forward = np.array([np.cos(pitch) * np.cos(yaw), np.cos(pitch) * np.sin(yaw), np.sin(pitch)])
    right = np.array([np.sin(yaw), -np.cos(yaw), 0.0])
    point = cam_pos + 2.0 * forward + 0.4 * right + 0.25 * np.cross(right, forward)  # off-centre
    world = World(objects=[Sphere(point, 0.04, np.array([1.0, 0.0, 0.0]))], ambient=1.0, shadows=False)
    camera = np.array([*cam_pos, yaw, pitch])
    image = render_views(world, camera[None], size)[0]
    rows, cols = np.nonzero(image[..., 0] > 128)
    assert len(rows) > 0
    centroid = np.array([rows.mean() + 0.5, cols.mean() + 0.5])  # pixel centres
    predicted = project(point, camera, size)
    assert np.abs(centroid - predicted).max() < 1.0
    assert predicted[1] > size / 2 and predicted[0] < size / 2  # right of and above the centre


def test_look_at_points_the_camera_at_the_target():
    yaw, pitch = look_at(np.array([1.0, 1.0, 1.0]), np.zeros(3))
    assert yaw == pytest.approx(-3 * np.pi / 4) and pitch == pytest.approx(-np.arctan(1 / np.sqrt(2)))
    row, col = project(np.zeros(3), np.array([1.0, 1.0, 1.0, yaw, pitch]), 64)
    assert (row, col) == (pytest.approx(32), pytest.approx(32))


def test_rooms_have_structure_and_objects_are_visible():
    rng = np.random.default_rng(0)
    frames, cameras = make_scene("rooms", rng, views=10, size=32)
    assert frames.shape == (10, 32, 32, 3) and cameras.shape == (10, 5)
    assert all(f.std() > 10 for f in frames)  # not blank
    assert np.allclose(np.hypot(cameras[:, 0], cameras[:, 1]), RING_RADIUS, atol=1e-5)  # on the ring
    inward = np.arctan2(-cameras[:, 1], -cameras[:, 0])
    assert np.allclose(np.cos(cameras[:, 3] - inward), 1, atol=1e-4)  # looking at the centre


def test_records_are_deepmind_format_and_read_back(tmp_path):
    root = tmp_path / "synthetic_rooms"
    synthesize(root, "rooms", train_scenes=4, test_scenes=4, seed=1, image_size=32, views=6, scenes_per_file=2,
               workers=1, log=lambda *_: None)
    (path,) = sorted((root / "test").glob("*.tfrecord"))[:1]
    offset, data = next(iter_records(path))
    frames, cameras = parse_scene(data)
    assert len(frames) == 6 and all(f[:2] == b"\xff\xd8" for f in frames) and cameras.shape == (6, 5)
    dm = GQNDataModule(tmp_path, "synthetic_rooms", batch_size=2, context_size=3, num_workers=0)
    batch = next(iter(dm.test_dataloader()))
    assert batch["context_images"].shape == (2, 3, 3, 32, 32)
    assert batch["query_poses"].shape == (2, 7)


def test_field_of_view_is_a_setting_of_the_renderer(tmp_path):
    """--fov renders the same scene through another lens: the centre pixel stays, the rest zooms."""
    import json

    wide = make_scene("rooms", np.random.default_rng(5), views=2, size=32, fov=np.deg2rad(90))[0]
    normal = make_scene("rooms", np.random.default_rng(5), views=2, size=32)[0]
    assert np.median(np.abs(wide[:, 15:17, 15:17].astype(int) - normal[:, 15:17, 15:17])) <= 12
    assert np.abs(wide.astype(int) - normal).mean() > 5
    card = synthesize(tmp_path / "r", "rooms", train_scenes=1, test_scenes=1, image_size=16, views=2,
                      fov_degrees=45, objects=False, log=lambda *_: None)
    assert card["field_of_view_degrees"] == 45 and card["settings"]["fov_degrees"] == 45
    assert json.loads((tmp_path / "r" / "dataset.json").read_text())["field_of_view_degrees"] == 45
    from gqn.data_cli import main

    with pytest.raises(SystemExit) as exc:  # the CLI: argparse's one-line usage error, exit 2
        main(["synth", "--out", str(tmp_path / "cli"), "--fov", "200"])
    assert exc.value.code == 2
    with pytest.raises(ValueError, match="--fov must be in"):
        synthesize(tmp_path / "bad", "rooms", train_scenes=1, test_scenes=1, image_size=16, fov_degrees=180)


def test_object_scale_and_camera_radius_change_the_rooms_and_keep_the_default(tmp_path):
    """--object-scale / --camera-radius: bigger objects seen from closer (more object pixels); the defaults render
    exactly what they did before, and the card records the settings only when they are not the defaults."""
    rng = lambda: np.random.default_rng(7)  # noqa: E731
    plain, _, plain_obj = make_scene("rooms", rng(), views=4, size=16, objects=True)
    same, _, same_obj = make_scene("rooms", rng(), views=4, size=16, objects=True, object_scale=1.0,
                                   camera_radius=1.3)
    assert np.array_equal(plain, same) and np.array_equal(plain_obj["masks"], same_obj["masks"])
    big, cams, big_obj = make_scene("rooms", rng(), views=4, size=16, objects=True, object_scale=1.6,
                                    camera_radius=1.0)
    assert np.allclose(np.linalg.norm(cams[:, :2], axis=1), 1.0, atol=1e-5)
    assert big_obj["masks"].mean() > 1.5 * plain_obj["masks"].mean()
    with pytest.raises(ValueError, match="camera_radius"):
        make_scene("rooms", rng(), views=2, size=16, camera_radius=1.6)
    card = synthesize(tmp_path / "r", "rooms", train_scenes=1, test_scenes=1, image_size=16, views=2,
                      object_scale=1.6, camera_radius=1.0, objects=False, log=lambda *_: None)
    assert card["settings"]["object_scale"] == 1.6 and card["camera_ring_radius"] == 1.0
    card = synthesize(tmp_path / "d", "rooms", train_scenes=1, test_scenes=1, image_size=16, views=2,
                      objects=False, log=lambda *_: None)
    assert "object_scale" not in card["settings"]


def test_free_camera_rooms_look_anywhere_from_anywhere(tmp_path):
    """--camera free: cameras anywhere in the square inside the walls, outside the objects, any heading (not the
    ring's look at the centre); same scene (objects, palette) as the ring camera draws with the same seed; the
    CLI and the card carry the choice, and an unknown camera is a clear error."""
    from gqn.synthetic.scenes import _rooms_world, render_views

    cams = np.concatenate([make_scene("rooms", np.random.default_rng(s), views=10, size=8, camera="free")[1]
                           for s in range(20)])
    assert np.abs(cams[:, :2]).max() <= 1.3 + 1e-6
    assert np.linalg.norm(cams[:, :2], axis=1).std() > 0.2  # not a ring
    to_centre = np.arctan2(-cams[:, 1], -cams[:, 0])
    off = np.abs(np.angle(np.exp(1j * (cams[:, 3] - to_centre))))
    assert off.mean() > 1.0  # headings spread around the circle (a ring camera's are all ~0 off the centre)
    world, placed = _rooms_world(np.random.default_rng(3))
    frames, free = make_scene("rooms", np.random.default_rng(3), views=10, size=8, camera="free")
    assert np.array_equal(frames, render_views(world, free, 8))  # the ring camera's scene for this seed
    for xy, size in placed:
        assert (np.linalg.norm(free[:, :2] - xy, axis=1) > size).all()
    with pytest.raises(ValueError, match="unknown camera 'orbit'"):
        make_scene("rooms", np.random.default_rng(0), views=2, size=8, camera="orbit")
    from gqn.data_cli import main

    assert main(["synth", "--out", str(tmp_path / "f"), "--camera", "free", "--train-scenes", "1", "--test-scenes",
                 "1", "--image-size", "16", "--views", "3", "--no-objects"]) == 0
    card = json.loads((tmp_path / "f" / "dataset.json").read_text())
    assert card["camera"] == "free" and card["settings"]["camera"] == "free"
    ring = synthesize(tmp_path / "r", "rooms", train_scenes=1, test_scenes=1, image_size=16, views=2,
                      objects=False, log=lambda *_: None)
    assert "camera" not in ring and "camera" not in ring["settings"]
