"""The table of DeepMind GQN datasets, and dataset cards for generated ones."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from data_modules.errors import CorruptRecordError, GQNDataError
from data_modules.records import RECORD_NAMES
from data_modules.remote import is_url, join, local_path, read_bytes

log = logging.getLogger(__name__)

PUBLIC_BUCKET = "gs://gqn-dataset"
CARD = "dataset.json"


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    image_size: int
    frames_per_scene: int
    train_files: int | None = None
    test_files: int | None = None
    #: read from the first record (another writer's dataset, no card): only its frame size binds the other records
    from_records: bool = False


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


#: Generated datasets that have a config in conf/data/ (name -> ``gqn-data synth --family``).
SYNTHETIC = {"synthetic_rooms": "rooms", "synthetic_shepard_metzler": "shepard_metzler"}


def parse_card(text: str | bytes, where) -> dict:
    """A dataset card's JSON text -> its dict; a damaged card (truncated, not JSON, not an object, no image size
    or frame count) is a one-line :class:`GQNDataError` naming it and how to remake it."""
    fix = ("fix: replace that file" if is_url(str(where))
           else f"fix: remove {Path(where).parent} and write it again with gqn-data synth --out {Path(where).parent}")
    try:
        card = json.loads(text)
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise GQNDataError(f"{where} is not valid JSON ({str(err).splitlines()[0]}); {fix}") from None
    if not isinstance(card, dict):
        raise GQNDataError(f"{where} holds {type(card).__name__}, not a dataset card (a JSON object); {fix}")
    for key in ("image_size", "frames_per_scene"):
        value = card.get(key)
        whole = (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, float)
                                                                           and value.is_integer())
        if not whole or value < 1:
            raise GQNDataError(f"{where} has no valid {key!r} (a whole number >= 1; got {value!r}); {fix}")
    return card


def read_card(directory: str | Path) -> dict | None:
    """The dataset card (``dataset.json``) of a generated dataset directory, or None if it has none."""
    card = Path(directory) / CARD
    return parse_card(card.read_bytes(), card) if card.is_file() else None


def write_card(directory: str | Path, card: dict) -> Path:
    """Write ``card`` as ``{directory}/dataset.json`` (what :func:`dataset_info` reads back)."""
    path = Path(directory) / CARD
    path.write_text(json.dumps(card, indent=2) + "\n")
    return path


def how_to_get(data_dir: str | Path, name: str) -> str:
    if is_url(data_dir):
        return f"check the URL: expected {join(str(data_dir), name)}/{{train,test}}/{RECORD_NAMES}"
    if name in DATASETS:
        return (f"download it: gqn-data download {name} --out {local_path(data_dir)} "
                f"(or stream it: data.data_dir={PUBLIC_BUCKET})")
    family = SYNTHETIC.get(name, "rooms")
    return f"generate it: gqn-data synth --family {family} --out {Path(local_path(data_dir)) / name}"


def _card(data_dir: str | Path, name: str) -> dict | None:
    if is_url(data_dir):
        text = read_bytes(join(str(data_dir), name, CARD))
        return None if text is None else parse_card(text, join(str(data_dir), name, CARD))
    return read_card(Path(local_path(data_dir)) / name)


def valid_names(data_dir: str | Path) -> str:
    """The dataset names to choose from: the DeepMind ones, the generated ones with a config, and any
    generated dataset (a directory with a card) under ``data_dir``."""
    generated = dict.fromkeys(SYNTHETIC)
    root = Path(data_dir)
    if "://" not in str(data_dir) and root.is_dir():
        generated.update(dict.fromkeys(sorted(p.parent.name for p in root.glob(f"*/{CARD}"))))
    return f"{', '.join(DATASETS)}; generated (gqn-data synth): {', '.join(generated)}"


def check_local_dir(data_dir: str | Path, name: str) -> None:
    """A local ``data_dir`` (or its dataset directory) that is a file, not a directory, said as such."""
    if "://" in str(data_dir):
        return
    for path, what in ((Path(data_dir), "paths.data_dir (GQN_DATA_DIR)"), (Path(data_dir) / name, "the dataset")):
        if path.exists() and not path.is_dir():
            raise GQNDataError(f"{path} is a file, not a directory: {what} must be the directory that holds "
                               f"{name}/{{train,test}}/{RECORD_NAMES}")


def record_paths(data_dir: str | Path, name: str) -> Iterator[str]:
    """The dataset's record files, train/ first, then test/ (paths or URLs), listed as they are asked for."""
    from data_modules.records import record_files
    from data_modules.remote import list_files

    for split in ("train", "test"):
        if is_url(data_dir):
            yield from (url for url, _ in list_files(join(str(data_dir), name, split)))
        elif (Path(local_path(data_dir)) / name / split).is_dir():
            yield from (str(p) for p in record_files(Path(local_path(data_dir)) / name / split))


def info_from_records(data_dir: str | Path, name: str) -> DatasetInfo | None:
    """A dataset of DeepMind-format records that is neither one of the seven nor written by gqn-data synth (no
    card; e.g. another renderer's rooms): its frame size and frames per scene read from its first record (train/,
    else test/). None when it has no record files; a first record that cannot say (damaged, not square frames) is
    a one-line :class:`GQNDataError`."""
    from data_modules.records import frame_size, iter_records, parse_scene

    empty = 0
    for path in record_paths(data_dir, name):
        try:
            for offset, data in iter_records(path):
                frames, _ = parse_scene(data, path, offset)
                if not frames:
                    raise CorruptRecordError(path, offset, "a scene with no frames")
                height, width = frame_size(frames[0], path, offset, 0)
                break
            else:
                empty += 1  # an empty file: the next one
                continue
        except CorruptRecordError as err:
            raise GQNDataError(f"{name} has no {CARD} and is not a DeepMind dataset, so its frame size and frames per "
                               f"scene come from its first record, which cannot be read: {err}") from None
        if height != width:
            raise GQNDataError(f"{path}: frames are {width}x{height}; the GQN reads square frames (the DeepMind "
                               f"format's): crop or pad them to a square")
        log.info("%s: no %s; frames %dx%d, %d per scene (from the first record of %s)", name, CARD, width, height,
                 len(frames), path)
        return DatasetInfo(name, int(height), len(frames), from_records=True)
    if empty:
        raise GQNDataError(f"{name}: its record files hold no scenes ({empty} file(s), all empty)")
    return None


def dataset_info(data_dir: str | Path, name: str) -> DatasetInfo:
    """Info for one of the seven DeepMind datasets, from the card of a generated one, or else from the first record
    of any other dataset of DeepMind-format records (:func:`info_from_records`)."""
    check_local_dir(data_dir, name)
    if name in DATASETS:
        return DATASETS[name]
    meta = _card(data_dir, name)
    if meta is not None:
        return DatasetInfo(name, int(meta["image_size"]), int(meta["frames_per_scene"]))
    if is_url(data_dir):
        info = info_from_records(data_dir, name)
        if info is not None:
            return info
        raise GQNDataError(
            f"unknown dataset {name!r}: no {join(str(data_dir), name, CARD)} and no record files in "
            f"{join(str(data_dir), name)}/{{train,test}}/; valid names: {', '.join(DATASETS)} (or a directory of "
            f"DeepMind-format records)"
        )
    if name in SYNTHETIC and not (Path(data_dir) / name).is_dir():
        raise GQNDataError(f"dataset {name!r} not found: no directory {Path(data_dir) / name}; "
                           f"{how_to_get(data_dir, name)} (or set paths.data_dir / GQN_DATA_DIR to where it is)")
    data_dir = local_path(data_dir)
    if (Path(data_dir) / name).is_dir():
        info = info_from_records(data_dir, name)
        if info is not None:
            return info
        raise GQNDataError(
            f"{Path(data_dir) / name} holds no record files in train/ or test/ ({RECORD_NAMES}) and "
            f"{name!r} is not a DeepMind dataset; valid names: {valid_names(data_dir)} (or a directory of "
            f"DeepMind-format records, {name}/{{train,test}}/{RECORD_NAMES})"
        )
    raise GQNDataError(
        f"unknown dataset {name!r} and no directory {Path(data_dir) / name}; valid names: "
        f"{valid_names(data_dir)}; or {how_to_get(data_dir, name)}"
    )
