"""Write GQN-format TFRecords for the data-layer tests through a path independent of the project.

Examples are built by hand with ``tfrecord.example_pb2``, frames are JPEG-encoded with PIL and records
are framed here with ``struct`` + ``crc32c``, so a bug in the project's writer or reader cannot cancel
itself out. Every frame is a solid colour that encodes (view index, scene id mod 30), and every camera
carries the scene id in ``x`` and the view index in ``y``, so a test can tell which frame of which scene
came back and check that it still carries its own camera.
"""

from __future__ import annotations

import io
import math
import struct
from pathlib import Path

import crc32c
import numpy as np
import torch
from PIL import Image
from tfrecord import example_pb2

# name -> (frame size, frames per scene, train files, test files), as published by DeepMind
LAYOUTS = {
    "jaco": (64, 11, 3600, 400),
    "mazes": (84, 300, 1080, 120),
    "rooms_free_camera_with_object_rotations": (128, 10, 2034, 226),
    "rooms_ring_camera": (64, 10, 2160, 240),
    "rooms_free_camera_no_object_rotations": (64, 10, 2160, 240),
    "shepard_metzler_5_parts": (64, 15, 900, 100),
    "shepard_metzler_7_parts": (64, 15, 900, 100),
}

STEP = 8  # colour levels between neighbouring codes: far above the JPEG error on a solid colour
JPEG_QUALITY = 95


# ---------------------------------------------------------------------------------------- framing
def masked_crc32c(data: bytes) -> int:
    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) % (1 << 32)


def frame_record(data: bytes) -> bytes:
    """uint64 LE length | uint32 masked crc(length bytes) | data | uint32 masked crc(data)."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


def record_offsets(path) -> list[tuple[int, int]]:
    """(byte offset, data length) of every record of a well-formed file, read with struct only."""
    blob, out, pos = Path(path).read_bytes(), [], 0
    while pos < len(blob):
        (length,) = struct.unpack_from("<Q", blob, pos)
        out.append((pos, length))
        pos += 16 + length
    return out


# ---------------------------------------------------------------------------------------- content
def encode_jpeg(image: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), "RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def colour(scene: int, view: int) -> tuple[int, int, int]:
    """The solid colour of a frame: R and G code the view (< 300), B the scene id mod 30."""
    return (STEP * (view % 30) + 4, STEP * (view // 30) + 4, STEP * (scene % 30) + 4)


def yaw(view: int) -> float:
    return math.remainder(0.7 * view + 0.3, 2 * math.pi)  # in [-pi, pi], both signs


def pitch(view: int) -> float:
    return -1.2 + (0.37 * view) % 2.4


def camera(scene: int, view: int) -> list[float]:
    return [float(scene), float(view), 0.25 - 0.5 * (view % 3), yaw(view), pitch(view)]


def expected_pose(scene: int, view: int) -> np.ndarray:
    """[x, y, z, sin yaw, cos yaw, sin pitch, cos pitch] computed independently (float64)."""
    x, y, z, a, b = camera(scene, view)
    return np.array([x, y, z, math.sin(a), math.cos(a), math.sin(b), math.cos(b)])


def make_example(jpegs: list[bytes], cameras: list[float]) -> bytes:
    example = example_pb2.Example()
    feats = example.features.feature
    feats["frames"].bytes_list.value.extend(jpegs)
    feats["cameras"].float_list.value.extend(cameras)
    return example.SerializeToString()


def frame_jpeg(scene: int, view: int, size: int) -> bytes:
    key = (colour(scene, view), size)
    if key not in _JPEGS:  # the same solid colour always encodes to the same bytes
        _JPEGS[key] = encode_jpeg(np.broadcast_to(np.array(key[0], np.uint8), (size, size, 3)))
    return _JPEGS[key]


_JPEGS: dict = {}


def scene_example(scene: int, frames: int, size: int) -> bytes:
    jpegs = [frame_jpeg(scene, v, size) for v in range(frames)]
    return make_example(jpegs, [c for v in range(frames) for c in camera(scene, v)])


def shard_name(index: int, count: int) -> str:
    """DeepMind's names: 1-based, both numbers zero-padded to the width of the count."""
    width = len(str(count))
    return f"{index:0{width}d}-of-{count}.tfrecord"


def write_file(path, records: list[bytes]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(frame_record(r) for r in records))
    return path


def write_split(root, name: str, split: str, files: list[list[int]], size: int | None = None,
                frames: int | None = None, total: int | None = None) -> list[Path]:
    """Write ``{root}/{name}/{split}/{i}-of-{total}.tfrecord``, file ``i`` holding scenes ``files[i]``."""
    lay = LAYOUTS.get(name, (64, 10, 100, 100))
    size, frames = size or lay[0], frames or lay[1]
    total = total or (lay[2] if split == "train" else lay[3])
    out = []
    for i, scenes in enumerate(files, start=1):
        path = Path(root) / name / split / shard_name(i, total)
        out.append(write_file(path, [scene_example(s, frames, size) for s in scenes]))
    return out


def write_dataset(root, name: str, train: list[list[int]], test: list[list[int]], **kw) -> dict:
    return {"train": write_split(root, name, "train", train, **kw), "test": write_split(root, name, "test", test, **kw)}


# ---------------------------------------------------------------------------------------- checking
def identify(image: torch.Tensor) -> tuple[int, int]:
    """(view, scene id mod 30) of a float ``[3, H, W]`` frame from its mean colour."""
    r, g, b = (image.double().mean(dim=(1, 2)) * 255).tolist()
    return round((g - 4) / STEP) * 30 + round((r - 4) / STEP), round((b - 4) / STEP)


def check_frame(image: torch.Tensor, pose: torch.Tensor) -> tuple[int, int]:
    """Assert a returned frame is the JPEG of the frame its pose belongs to; return (scene, view)."""
    scene, view = int(round(pose[0].item())), int(round(pose[1].item()))
    assert pose[0].item() == scene and pose[1].item() == view, pose
    np.testing.assert_allclose(pose.double().numpy(), expected_pose(scene, view), atol=1e-5)
    assert identify(image) == (view, scene % 30), f"pixels of {identify(image)} carry the pose of {(view, scene)}"
    want = torch.tensor(colour(scene, view), dtype=torch.float64).view(3, 1, 1) / 255
    err = (image.double() - want).abs()
    assert err.mean() < 3 / 255 and err.max() < 8 / 255, (err.mean().item(), err.max().item())
    return scene, view


def check_contract(batch: dict, b: int, m: int, size: int) -> None:
    assert set(batch) >= {"context_images", "context_poses", "query_images", "query_poses"}
    ci, cp, qi, qp = (batch[k] for k in ("context_images", "context_poses", "query_images", "query_poses"))
    assert ci.dtype == cp.dtype == qi.dtype == qp.dtype == torch.float32
    assert tuple(ci.shape) == (b, m, 3, size, size), ci.shape
    assert tuple(cp.shape) == (b, m, 7), cp.shape
    assert tuple(qi.shape) == (b, 3, size, size), qi.shape
    assert tuple(qp.shape) == (b, 7), qp.shape
    for x in (ci, qi):
        assert x.min() >= 0.0 and x.max() <= 1.0


def scenes_views(batch: dict) -> list[tuple[int, list[int]]]:
    """Per item: (scene id, [context views..., query view]) from the poses, after checking every frame."""
    out = []
    for i in range(batch["query_poses"].shape[0]):
        views, scenes = [], set()
        for img, pose in [*zip(batch["context_images"][i], batch["context_poses"][i]),
                          (batch["query_images"][i], batch["query_poses"][i])]:
            s, v = check_frame(img, pose)
            scenes.add(s)
            views.append(v)
        assert len(scenes) == 1, f"one item mixes scenes {scenes}"
        assert len(set(views)) == len(views), f"a view repeats within a scene: {views}"
        out.append((scenes.pop(), views))
    return out
