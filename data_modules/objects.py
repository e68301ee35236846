"""Object masks and empty-room renders kept *beside* a dataset's records (never inside them).

For a record file ``{root}/{split}/NAME.tfrecord`` the sidecar is ``{root}/objects/{split}/NAME.npz``, a numpy
archive with, for the N records of the file in order:

* ``offsets`` int64 ``[N]``: the byte offset of each record in the ``.tfrecord`` file (records are matched by
  offset, so a reader that skips a corrupt record still pairs the others correctly);
* ``masks`` uint8 ``[N, V, S, S]``: per view, the fraction of each pixel covered by an object, times 255
  (255: the pixel shows only objects; 0: only the room or the sky); evaluation counts a pixel as an object
  pixel when at least half of it is covered (``gqn.metrics.OBJECT_COVERAGE``);
* ``empty`` uint8 ``[N, V, S, S, 3]``: per view, the exact render of the scene with the objects (and their
  shadows) taken out: what a model that draws the room perfectly and no objects would draw.

``S`` is the frame size of the records (resized with the frames when a reader asks for another size).
``gqn-data synth`` writes them; any other renderer can, for ``gqn-eval``'s object-pixel metrics.
"""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np

from data_modules.remote import is_url, local_path, read_bytes

SIDECAR_DIR = "objects"
SIDECAR_SUFFIX = ".npz"


def sidecar_path(record_file: str | Path) -> Path | str:
    """``{root}/{split}/NAME.tfrecord`` -> ``{root}/objects/{split}/NAME.npz`` (a URL for a remote file)."""
    if is_url(record_file):
        base, split, name = str(record_file).rsplit("/", 2)
        return f"{base}/{SIDECAR_DIR}/{split}/{name.rsplit('.', 1)[0]}{SIDECAR_SUFFIX}"
    record_file = Path(local_path(record_file))
    split_dir = record_file.parent
    return split_dir.parent / SIDECAR_DIR / split_dir.name / (record_file.stem + SIDECAR_SUFFIX)


def write_sidecar(path: str | Path, offsets: np.ndarray, masks: np.ndarray, empty: np.ndarray) -> None:
    n = len(offsets)
    if masks.shape[0] != n or empty.shape[0] != n or masks.shape != empty.shape[:-1] or empty.shape[-1] != 3:
        raise ValueError(f"sidecar arrays disagree: offsets {offsets.shape}, masks {masks.shape}, "
                         f"empty {empty.shape} (want [N], [N, V, S, S], [N, V, S, S, 3])")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.savez_compressed(fh, offsets=offsets.astype(np.int64), masks=masks.astype(np.uint8),
                            empty=empty.astype(np.uint8))
    tmp.replace(path)


@functools.lru_cache(maxsize=8)
def load_sidecar(record_file: str) -> dict[int, tuple[np.ndarray, np.ndarray]] | None:
    """``{offset: (masks [V, S, S], empty [V, S, S, 3])}`` for a record file, or None without a sidecar."""
    path = sidecar_path(record_file)
    if is_url(path):
        data = read_bytes(path)
        if data is None:
            return None
        source = io.BytesIO(data)
    elif not Path(path).is_file():
        return None
    else:
        source = path
    with np.load(source) as z:
        offsets, masks, empty = z["offsets"], z["masks"], z["empty"]
    return {int(o): (m, e) for o, m, e in zip(offsets, masks, empty)}


