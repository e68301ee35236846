"""The table of DeepMind GQN datasets, and dataset cards for generated ones."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from data_modules.errors import GQNDataError

PUBLIC_BUCKET = "gs://gqn-dataset"
CARD = "dataset.json"


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    image_size: int
    frames_per_scene: int
    train_files: int | None = None
    test_files: int | None = None


DATASETS: dict[str, DatasetInfo] = {
    d.name: d
    for d in [
        DatasetInfo("jaco", 64, 11, 3600, 400),
        DatasetInfo("mazes", 84, 300, 1080, 120),
        DatasetInfo("rooms_free_camera_with_object_rotations", 128, 10, 2034, 226),
        DatasetInfo("rooms_ring_camera", 64, 10, 2160, 240),
        DatasetInfo("rooms_free_camera_no_object_rotations", 64, 10, 2160, 240),
        DatasetInfo("shepard_metzler_5_parts", 64, 15, 900, 100),
        DatasetInfo("shepard_metzler_7_parts", 64, 15, 900, 100),
    ]
}


def read_card(directory: str | Path) -> dict | None:
    """The dataset card (``dataset.json``) of a generated dataset directory, or None if it has none."""
    card = Path(directory) / CARD
    return json.loads(card.read_text()) if card.is_file() else None


def write_card(directory: str | Path, card: dict) -> Path:
    """Write ``card`` as ``{directory}/dataset.json`` (what :func:`dataset_info` reads back)."""
    path = Path(directory) / CARD
    path.write_text(json.dumps(card, indent=2) + "\n")
    return path


def how_to_get(data_dir: str | Path, name: str) -> str:
    if name in DATASETS:
        return f"download it: gsutil -m cp -r {PUBLIC_BUCKET}/{name} {data_dir}/"
    return f"generate it: gqn-data synth --family rooms --out {Path(data_dir) / name}"


def dataset_info(data_dir: str | Path, name: str) -> DatasetInfo:
    """Info for one of the seven DeepMind datasets, or from the card of a generated one."""
    if name in DATASETS:
        return DATASETS[name]
    meta = read_card(Path(data_dir) / name)
    if meta is not None:
        return DatasetInfo(name, int(meta["image_size"]), int(meta["frames_per_scene"]))
    if (Path(data_dir) / name).is_dir():
        raise GQNDataError(
            f"{Path(data_dir) / name} has no {CARD} and {name!r} is not a DeepMind dataset; "
            f"valid names: {', '.join(DATASETS)} (or a directory written by gqn-data synth)"
        )
    raise GQNDataError(
        f"unknown dataset {name!r} and no directory {Path(data_dir) / name}; valid names: "
        f"{', '.join(DATASETS)}, or generate one: gqn-data synth --family rooms --out {Path(data_dir) / name}"
    )
