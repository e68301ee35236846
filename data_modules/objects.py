"""Object masks and empty-room renders kept *beside* a dataset's records (never inside them).

For a record file ``{root}/{split}/NAME.tfrecord`` the sidecar is ``{root}/objects/{split}/NAME.npz``, a numpy
archive with, for the N records of the file in order:

* ``offsets`` int64 ``[N]``: the byte offset of each record in the ``.tfrecord`` file (records are matched by
  offset, so a reader that skips a corrupt record still pairs the others correctly);
* ``masks`` uint8 ``[N, V, S, S]``: per view, the fraction of each pixel covered by an object, times 255
  (255: the pixel shows only objects; 0: only the room or the sky); evaluation counts a pixel as an object
  pixel when at least half of it is covered (``gqn.metrics.OBJECT_COVERAGE``);
* ``empty`` uint8 ``[N, V, S, S, 3]``: per view, the exact render of the scene with the objects (and their
  shadows) taken out: what a model that draws the room perfectly and no objects would draw;
* ``record`` (optional) str: the name of the record file it was written for (``NAME.tfrecord``).

``S`` is the frame size of the records (resized with the frames when a reader asks for another size).
``gqn-data synth`` writes them; any other renderer can, for ``gqn-eval``'s object-pixel metrics.

A split that holds both ``NAME.tfrecord`` and ``NAME.tfrecords`` needs a sidecar each: ``NAME.tfrecord.npz`` and
``NAME.tfrecords.npz`` (the full record name is looked up first), or a ``NAME.npz`` whose ``record`` says which
of the two it belongs to; a local ``NAME.npz`` that does not say is refused there (it would pair one file's masks
with the other's records by byte offset; remote splits are not listed for this check).
"""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np

from data_modules.errors import GQNDataError
from data_modules.records import RECORD_SUFFIXES
from data_modules.remote import call, filesystem, is_url, local_path, read_bytes

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


def _record_name(record_file: str | Path) -> str:
    """The file name of a record file (a path or a URL)."""
    return str(record_file).rsplit("/", 1)[-1] if is_url(record_file) else Path(local_path(record_file)).name


def exact_sidecar_path(record_file: str | Path) -> Path | str:
    """``{root}/{split}/NAME.tfrecord`` -> ``{root}/objects/{split}/NAME.tfrecord.npz``: the sidecar named after the
    whole record file, looked up before :func:`sidecar_path`'s ``NAME.npz``."""
    stem_form = sidecar_path(record_file)
    name = _record_name(record_file)
    if is_url(stem_form):
        return f"{stem_form.rsplit('/', 1)[0]}/{name}{SIDECAR_SUFFIX}"
    return stem_form.with_name(name + SIDECAR_SUFFIX)


def write_sidecar(path: str | Path, offsets: np.ndarray, masks: np.ndarray, empty: np.ndarray,
                  record: str | None = None) -> None:
    """Write a sidecar; ``record``: the name of its record file (stored, so that a reader can tell)."""
    n = len(offsets)
    if masks.shape[0] != n or empty.shape[0] != n or masks.shape != empty.shape[:-1] or empty.shape[-1] != 3:
        raise ValueError(f"sidecar arrays disagree: offsets {offsets.shape}, masks {masks.shape}, "
                         f"empty {empty.shape} (want [N], [N, V, S, S], [N, V, S, S, 3])")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        named = {} if record is None else {"record": np.array(str(record))}
        np.savez_compressed(fh, offsets=offsets.astype(np.int64), masks=masks.astype(np.uint8),
                            empty=empty.astype(np.uint8), **named)
    tmp.replace(path)


def _read(path: Path | str) -> bytes | None:
    """The bytes of the sidecar at ``path`` (read whole: ``np.load`` would anyway), or None where there is none."""
    if is_url(path):
        return read_bytes(path)
    try:
        return Path(path).read_bytes() if Path(path).is_file() else None
    except OSError as err:  # a file we may not read
        raise _unreadable(path, f"{type(err).__name__}: {err}".splitlines()[0]) from None


def _record_exists(record_file: str, name: str) -> bool:
    """Whether a record file called ``name`` lies beside ``record_file`` (locally, or at the same URL prefix)."""
    if is_url(record_file):
        fs, where = filesystem(f"{str(record_file).rsplit('/', 1)[0]}/{name}")
        return bool(call("stat", str(record_file), fs.exists, where))
    return (Path(local_path(record_file)).parent / name).is_file()


def _twins(record_file: str) -> list[Path]:
    """Local record files beside ``record_file`` with its stem and another record suffix (``x.tfrecords`` for
    ``x.tfrecord``) and no sidecar named after them: files that could claim :func:`sidecar_path`'s too (remote
    files are not listed for this: there a whole-name sidecar, or ``record``, is the way to tell twins apart)."""
    if is_url(record_file):
        return []
    path = Path(local_path(record_file))
    twins = [path.with_suffix(s) for s in RECORD_SUFFIXES if s != path.suffix and path.with_suffix(s).is_file()]
    return [twin for twin in twins if not Path(exact_sidecar_path(twin)).is_file()]  # one with its own: no claim


def _owner(z) -> str | None:
    """The ``record`` a sidecar names (its file name; None where it names none)."""
    if "record" not in z.files:
        return None
    names = np.asarray(z["record"]).reshape(-1)
    return Path(str(names[0])).name if names.size else None


@functools.lru_cache(maxsize=8)
def load_sidecar(record_file: str) -> dict[int, tuple[np.ndarray, np.ndarray]] | None:
    """``{offset: (masks [V, S, S], empty [V, S, S, 3])}`` for a record file, or None without a sidecar: its
    ``NAME.tfrecord.npz``, else its ``NAME.npz`` unless that names (``record``) another record file that exists
    (a twin: ``NAME.tfrecords`` beside ``NAME.tfrecord``; a name of no file there is a renamed pair, still this
    file's). A ``NAME.npz`` that names no file, beside a local twin without a sidecar of its own, is a
    :class:`GQNDataError`; so is a sidecar that cannot be read."""
    name = _record_name(record_file)
    path = exact_sidecar_path(record_file)
    data = _read(path)
    exact = data is not None
    if not exact:
        path = sidecar_path(record_file)
        data = _read(path)
    if data is None:
        return None
    if data[:4] != b"PK\x03\x04":  # every .npz is a zip archive
        raise _unreadable(path, f"not an .npz archive (it starts with {data[:4]!r})")
    try:
        z = np.load(io.BytesIO(data))  # pickles refused (allow_pickle=False): a sidecar holds plain arrays
    except Exception as err:  # a damaged archive
        raise _unreadable(path, f"{type(err).__name__}: {err}".splitlines()[0]) from None
    with z:
        try:
            owner = _owner(z)
            missing = [k for k in ("offsets", "masks", "empty") if k not in z.files]
            if missing:
                raise _unreadable(path, f"no {', '.join(missing)} array (it holds {', '.join(z.files)})")
            offsets, masks, empty = z["offsets"], z["masks"], z["empty"]
        except GQNDataError:
            raise
        except Exception as err:  # a damaged member of the archive, an array of objects
            raise _unreadable(path, f"{type(err).__name__}: {err}".splitlines()[0]) from None
    if not exact:
        if owner is not None and owner != name and _record_exists(record_file, owner):
            return None  # another record file's (a twin)
        if owner is None and (twins := _twins(record_file)):  # NAME.npz beside NAME.tfrecord and NAME.tfrecords
            a, b = sorted([name, twins[0].name])  # the same line from either file
            err = GQNDataError(f"object sidecar {path} could belong to {a} or to {b}")
            err.fix = f"rename it {a}{SIDECAR_SUFFIX} or {b}{SIDECAR_SUFFIX}, whichever file it was written for"
            raise err
    n = len(offsets)
    if (offsets.ndim != 1 or masks.ndim != 4 or masks.shape[0] != n or empty.shape != (*masks.shape, 3)
            or masks.shape[-1] != masks.shape[-2]):
        raise _unreadable(path, f"arrays disagree: offsets {offsets.shape}, masks {masks.shape}, empty "
                                f"{empty.shape} (want [N], [N, V, S, S], [N, V, S, S, 3])")
    return {int(o): (m, e) for o, m, e in zip(offsets, masks, empty)}


#: the remedy for a sidecar that cannot be read or does not match its records
SIDECAR_FIX = ("write it again (gqn-data synth writes sidecars beside the records it writes) or delete it (without it "
               "the object-pixel metrics are left out); gqn-data verify <dataset dir> checks every sidecar")


def _sidecar_error(message: str) -> GQNDataError:
    err = GQNDataError(message)
    err.fix = SIDECAR_FIX
    return err


def _unreadable(path, problem: str) -> GQNDataError:
    return _sidecar_error(f"object sidecar {path} cannot be read: {problem}")


def masks_of(table: dict, record_file: str, offset: int, view: int) -> tuple[np.ndarray, np.ndarray]:
    """The masks and empty-room render of one view of one record from :func:`load_sidecar`'s ``table``; a
    :class:`GQNDataError` where the sidecar has none for them (it was written for other records: pairing by byte
    offset would hand the scene another scene's masks)."""
    if offset not in table or view >= len(table[offset][0]):
        which = "" if offset not in table else f" view {view}"
        raise _sidecar_error(f"the object sidecar of {record_file} has no masks for the record at byte {offset}"
                             f"{which}: it was written for other records")
    return table[offset][0][view], table[offset][1][view]
