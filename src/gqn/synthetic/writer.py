"""Write procedural scenes as DeepMind-format TFRecords plus a dataset card (``dataset.json``).

Each record is a ``tf.train.Example`` with ``frames`` (a bytes list of JPEG images) and ``cameras``
(``views * 5`` floats ``[x, y, z, yaw, pitch]``). Files are ``{i}-of-{n}.tfrecord`` in ``train/`` and
``test/``. Output is byte-identical for a seed, whatever the number of processes.

With ``objects`` the writer also puts, *beside* the records (the record format stays DeepMind's), one
:data:`data_modules.objects.SIDECAR_DIR` file per record file: every view's object coverage and the exact
render of the view with the objects taken out (see :mod:`data_modules.objects` for the layout). Evaluation
uses them for the object-pixel metric.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import simplejpeg
from tfrecord import example_pb2
from tfrecord.writer import TFRecordWriter

from data_modules.datasets import write_card
from data_modules.objects import SIDECAR_DIR, SIDECAR_SUFFIX, sidecar_path, write_sidecar
from data_modules.records import record_files
from gqn.synthetic.scenes import RING_RADIUS, make_scene

JPEG_QUALITY = 95
SPLITS = {"train": 0, "test": 1}


def encode_example(frames: np.ndarray, cameras: np.ndarray) -> bytes:
    """Serialize one scene as a ``tf.train.Example`` in the DeepMind layout."""
    example = example_pb2.Example()
    feats = example.features.feature
    feats["frames"].bytes_list.value.extend(
        simplejpeg.encode_jpeg(np.ascontiguousarray(f), quality=JPEG_QUALITY, colorspace="RGB") for f in frames
    )
    feats["cameras"].float_list.value.extend(cameras.reshape(-1).astype(np.float32).tolist())
    return example.SerializeToString()


def shard_name(index: int, count: int) -> str:
    """``0001-of-2160.tfrecord``: 1-based, both padded to the width of ``count`` (at least 3)."""
    width = max(3, len(str(count)))
    return f"{index + 1:0{width}d}-of-{count:0{width}d}.tfrecord"


def _write_file(job) -> int:
    path, family, seed, split, first, count, views, size, parts, samples, objects, fov, scale, radius, camera = job
    masks, empty, offsets, offset = [], [], [], 0
    with open(path, "wb") as fh:
        for scene in range(first, first + count):
            rng = np.random.default_rng([seed, SPLITS[split], scene])
            frames, cameras, *extra = make_scene(family, rng, views, size, parts, samples, objects, fov, scale, radius,
                                           camera)
            record = _framed(encode_example(frames, cameras))
            fh.write(record)
            if objects:
                masks.append(extra[0]["masks"])
                empty.append(extra[0]["empty"])
                offsets.append(offset)
            offset += len(record)
    if objects:
        write_sidecar(sidecar_path(path), np.asarray(offsets), np.stack(masks), np.stack(empty), record=Path(path).name)
    return count


def _framed(record: bytes) -> bytes:
    """TFRecord framing: length, masked CRC32C of the length, data, masked CRC32C of the data."""
    length = len(record).to_bytes(8, "little")
    return length + TFRecordWriter.masked_crc(length) + record + TFRecordWriter.masked_crc(record)


def synthesize(
    out: str | Path,
    family: str = "rooms",
    train_scenes: int = 2000,
    test_scenes: int = 200,
    seed: int = 0,
    image_size: int = 64,
    views: int = 10,
    scenes_per_file: int = 100,
    parts: int = 7,
    workers: int | None = None,
    samples: int = 2,
    objects: bool = True,
    fov_degrees: float = 60.0,
    object_scale: float = 1.0,
    camera_radius: float = RING_RADIUS,
    camera: str = "ring",
    log=print,
) -> dict:
    """Render and write a dataset; returns its card (also written to ``out/dataset.json``).

    ``samples``: anti-aliasing, ``samples x samples`` rays per pixel (1 = one ray, aliased edges).
    ``objects``: also write the object masks and empty-room renders beside the records.
    ``fov_degrees``: the cameras' full field of view (the public datasets do not publish theirs).
    ``object_scale``, ``camera_radius`` (rooms): larger objects, a ring of cameras closer to them.
    ``camera`` (rooms): ``"ring"`` (looking at the centre) or ``"free"`` (anywhere in the square of half-width
    ``camera_radius``, any heading).
    """
    out = Path(out)
    if image_size % 4:
        raise ValueError(f"--image-size must be divisible by 4, got {image_size}")
    if samples < 1:
        raise ValueError(f"--samples must be >= 1 (rays per pixel along each axis), got {samples}")
    if not 0 < fov_degrees < 180:
        raise ValueError(f"--fov must be in (0, 180) degrees, got {fov_degrees}")
    if views < 2:
        raise ValueError(f"--views must be >= 2 (context + query), got {views}")
    jobs = []
    for split, total in (("train", train_scenes), ("test", test_scenes)):
        (out / split).mkdir(parents=True, exist_ok=True)
        for old in [*record_files(out / split), *(out / SIDECAR_DIR / split).glob("*" + SIDECAR_SUFFIX)]:
            old.unlink()
        n_files = max(1, math.ceil(total / scenes_per_file))
        for i in range(n_files):
            first = i * scenes_per_file
            count = min(scenes_per_file, total - first)
            if count > 0:
                jobs.append((out / split / shard_name(i, n_files), family, seed, split, first, count, views,
                             image_size, parts, samples, objects, np.deg2rad(fov_degrees), object_scale,
                             camera_radius, camera))
    start = time.perf_counter()
    workers = workers or min(2, len(jobs)) or 1
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            written = sum(pool.map(_write_file, jobs))
    else:
        written = sum(map(_write_file, jobs))
    seconds = time.perf_counter() - start
    card = {
        "name": out.name,
        "generator": f"gqn.synthetic ({family})",
        "family": family,
        "seed": seed,
        "image_size": image_size,
        "frames_per_scene": views,
        "train_scenes": train_scenes,
        "test_scenes": test_scenes,
        "scenes_per_file": scenes_per_file,
        "sampling": f"{samples}x{samples} rays per pixel on a regular grid, box-filtered"
        if samples > 1 else "1 ray per pixel (aliased)",
        "objects": f"{SIDECAR_DIR}/{{split}}/*{SIDECAR_SUFFIX}: object coverage and empty-room renders per view"
        if objects else None,
        "pose": "x, y, z, yaw, pitch (radians); z up, yaw from +x towards +y",
        "field_of_view_degrees": fov_degrees,
    }
    if family == "rooms":
        card.update(object_scale=object_scale, camera_ring_radius=camera_radius)
        if camera != "ring":
            card.update(camera=camera)
    if family == "shepard_metzler":
        card["parts"] = parts
    card["settings"] = dict(family=family, train_scenes=train_scenes, test_scenes=test_scenes, seed=seed,
                            image_size=image_size, views=views, scenes_per_file=scenes_per_file, parts=parts,
                            samples=samples, objects=objects, fov_degrees=fov_degrees)
    if (object_scale, camera_radius) != (1.0, RING_RADIUS):  # only when set: default datasets' cards stay as they were
        card["settings"].update(object_scale=object_scale, camera_radius=camera_radius)
    if camera != "ring":
        card["settings"].update(camera=camera)
    write_card(out, card)
    log(f"wrote {written} scenes to {out} in {seconds:.1f} s ({written / max(seconds, 1e-9):.0f} scenes/s)")
    return card
