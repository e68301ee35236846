"""Reading GQN TFRecords written independently of the project (see records_helper): framing, Example
parsing, JPEG pixels, poses, and every DeepMind layout end to end through GQNDataModule."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from records_helper import (
    LAYOUTS,
    camera,
    check_contract,
    colour,
    encode_jpeg,
    expected_pose,
    frame_jpeg,
    make_example,
    record_offsets,
    scenes_views,
    write_dataset,
    write_file,
)

from data_modules import DATASETS, GQNDataModule
from data_modules.records import camera_to_pose, decode_frame, iter_records, parse_scene


def test_dataset_table_matches_deepmind():
    for name, (size, frames, train, test) in LAYOUTS.items():
        info = DATASETS[name]
        assert (info.image_size, info.frames_per_scene, info.train_files, info.test_files) == (
            size, frames, train, test,
        ), name
    assert set(DATASETS) == set(LAYOUTS)


def test_iter_records_offsets_and_bytes(tmp_path):
    records = [b"", b"x" * 3, bytes(range(256)) * 5, b"last record"]
    path = write_file(tmp_path / "a.tfrecord", records)
    got = list(iter_records(path))
    assert [data for _, data in got] == records
    assert [off for off, _ in got] == [off for off, _ in record_offsets(path)] == [0, 16, 35, 1331]


def test_parse_scene_frames_and_cameras(tmp_path):
    jpegs = [frame_jpeg(7, v, 64) for v in range(11)]
    cams = [c for v in range(11) for c in camera(7, v)]
    path = write_file(tmp_path / "s.tfrecord", [make_example(jpegs, cams)])
    (offset, data), = iter_records(path)
    frames, cameras = parse_scene(data, path, offset)
    assert frames == jpegs
    assert cameras.dtype == np.float32 and cameras.shape == (11, 5)
    np.testing.assert_allclose(cameras, np.array(cams, np.float32).reshape(11, 5))


@pytest.mark.parametrize("size", [64, 84, 128])
def test_decode_frame_pixels_and_orientation(size):
    # four solid quadrants: a transposed, flipped or channel-swapped decode lands on the wrong colour
    quads = [(230, 20, 20), (20, 230, 20), (20, 20, 230), (230, 230, 20)]  # TL, TR, BL, BR
    h = size // 2
    image = np.zeros((size, size, 3), np.uint8)
    image[:h, :h], image[:h, h:], image[h:, :h], image[h:, h:] = quads
    out = decode_frame(encode_jpeg(image), size)
    assert out.dtype == np.uint8 and out.shape == (size, size, 3)
    q = size // 8  # compare quadrant interiors, away from the JPEG ringing at the edges
    for (r, c), want in zip([(0, 0), (0, 1), (1, 0), (1, 1)], quads):
        block = out[r * h + q: (r + 1) * h - q, c * h + q: (c + 1) * h - q].astype(float)
        assert np.abs(block - want).mean() < 3, (r, c, block.mean(axis=(0, 1)))


def test_decode_solid_colour_error_is_small():
    want = np.array(colour(13, 137))
    out = decode_frame(frame_jpeg(13, 137, 84), 84).astype(float)
    assert np.abs(out - want).mean() < 3


def test_camera_to_pose_order_and_values():
    cams = np.array([camera(s, v) for s in (0, 5) for v in (0, 3, 9)], np.float32).reshape(2, 3, 5)
    pose = camera_to_pose(cams)
    assert pose.dtype == np.float32 and pose.shape == (2, 3, 7)
    want = np.array([expected_pose(s, v) for s in (0, 5) for v in (0, 3, 9)]).reshape(2, 3, 7)
    np.testing.assert_allclose(pose, want, atol=1e-6)
    # spelled out once: sin comes before cos, yaw before pitch
    x, y, z, yw, pt = 1.0, -2.0, 0.5, 0.3, -1.1
    np.testing.assert_allclose(
        camera_to_pose(np.array([x, y, z, yw, pt], np.float32)),
        [x, y, z, math.sin(yw), math.cos(yw), math.sin(pt), math.cos(pt)], atol=1e-6,
    )


# name, context size, batch, train files (scene ids per file), test files, first train/test file names
LAYOUT_CASES = [
    ("jaco", 7, 3, [[0, 1, 2], [3, 4]], [[100, 101, 102]], "0001-of-3600.tfrecord", "001-of-400.tfrecord"),
    ("mazes", 20, 1, [[0], [1]], [[100]], "0001-of-1080.tfrecord", "001-of-120.tfrecord"),
    ("rooms_free_camera_with_object_rotations", 5, 2, [[0, 1], [2, 3]], [[100], [101, 102]],
     "0001-of-2034.tfrecord", "001-of-226.tfrecord"),
    ("rooms_ring_camera", 5, 3, [[0, 1, 2], [3, 4, 5]], [[100, 101, 102, 103]],
     "0001-of-2160.tfrecord", "001-of-240.tfrecord"),
    ("shepard_metzler_7_parts", 14, 2, [[0, 1], [2]], [[100, 101], [102]],
     "001-of-900.tfrecord", "001-of-100.tfrecord"),
]


@pytest.mark.parametrize("name,m,b,train,test,first_train,first_test", LAYOUT_CASES,
                         ids=[c[0] for c in LAYOUT_CASES])
def test_every_layout_end_to_end(tmp_path, name, m, b, train, test, first_train, first_test):
    size, frames, _, _ = LAYOUTS[name]
    written = write_dataset(tmp_path, name, train, test)
    (tmp_path / name / "train" / "README.txt").write_text("not a record file")  # must be ignored
    assert written["train"][0].name == first_train and written["test"][0].name == first_test

    dm = GQNDataModule(str(tmp_path), name, batch_size=b, context_size=m, num_workers=0, val_files=1)
    dm.setup("fit")
    assert dm.files("train") == [str(p) for p in written["train"]]
    (val_file,) = dm.validation_split.val_files  # one whole train file held out for validation
    val_ids = {s for path, scenes in zip(written["train"], train) if str(path) == val_file for s in scenes}
    assert dm.files("test") == [str(p) for p in written["test"]]

    batch = next(iter(dm.train_dataloader()))
    check_contract(batch, b, m, size)
    train_ids = {s for f in train for s in f} - val_ids
    for scene, views in scenes_views(batch):  # checks every frame's pixels against its own pose
        assert scene in train_ids
        assert all(0 <= v < frames for v in views)

    test_ids = [s for f in test for s in f]
    seen = []
    for batch in dm.test_dataloader():
        check_contract(batch, batch["query_poses"].shape[0], m, size)
        seen += [s for s, _ in scenes_views(batch)]
    assert sorted(seen) == test_ids

    val = list(dm.val_dataloader())
    assert sorted(s for batch in val for s, _ in scenes_views(batch)) == sorted(val_ids)


def test_frames_with_structure_reach_the_batch_channels_first(tmp_path):
    # one scene whose every frame has a distinct colour per quadrant; the batch must be [3, H, W]
    quads = [(230, 20, 20), (20, 230, 20), (20, 20, 230), (230, 230, 20)]
    image = np.zeros((64, 64, 3), np.uint8)
    image[:32, :32], image[:32, 32:], image[32:, :32], image[32:, 32:] = quads
    jpeg = encode_jpeg(image)
    cams = [c for v in range(10) for c in camera(0, v)]
    for split in ("train", "test"):
        write_file(tmp_path / "rooms_ring_camera" / split / "0001-of-2160.tfrecord", [make_example([jpeg] * 10, cams)])
    dm = GQNDataModule(str(tmp_path), "rooms_ring_camera", batch_size=1, context_size=3, num_workers=0)
    batch = next(iter(dm.test_dataloader()))
    for img in [*batch["context_images"][0], batch["query_images"][0]]:
        assert img.shape == (3, 64, 64)
        for (r, c), want in zip([(0, 0), (0, 1), (1, 0), (1, 1)], quads):
            block = img[:, r * 32 + 6: r * 32 + 26, c * 32 + 6: c * 32 + 26] * 255
            assert (block.mean(dim=(1, 2)) - torch.tensor(want, dtype=torch.float32)).abs().max() < 3, (r, c)


def test_partial_download_uses_the_files_present(tmp_path):
    # only files 3 and 7 of 2160 downloaded: the glob finds exactly those, in order
    root = tmp_path / "rooms_ring_camera"
    layout = {"train": ["0007-of-2160.tfrecord", "0003-of-2160.tfrecord"], "test": ["001-of-240.tfrecord"]}
    for split, names in layout.items():
        for i, n in enumerate(names):
            write_file(root / split / n, [make_example([frame_jpeg(i, v, 64) for v in range(10)],
                                                       [c for v in range(10) for c in camera(i, v)])])
    dm = GQNDataModule(str(tmp_path), "rooms_ring_camera", batch_size=2, context_size=2, num_workers=0)
    assert [Path(f).name for f in dm.files("train")] == ["0003-of-2160.tfrecord", "0007-of-2160.tfrecord"]
