"""gqn-data: synthesise, inspect, verify and preview GQN-format datasets."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np


def _synth(args) -> int:
    from data_modules.datasets import read_card
    from data_modules.errors import GQNDataError
    from data_modules.records import record_files
    from gqn.synthetic import synthesize
    from gqn.synthetic.scenes import RING_RADIUS

    out = Path(args.out)
    blocker = next((p for p in [out, *out.parents] if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise GQNDataError(f"--out {out}: {blocker} is a file, not a directory; give a directory for the dataset "
                           f"(it is created), e.g. --out data/synthetic_rooms")
    opts = dict(family=args.family, train_scenes=args.train_scenes, test_scenes=args.test_scenes,
                seed=args.seed, image_size=args.image_size, views=args.views,
                scenes_per_file=args.scenes_per_file, parts=args.parts, samples=args.samples,
                objects=not args.no_objects, fov_degrees=args.fov)
    if (args.object_scale, args.camera_radius) != (1.0, RING_RADIUS):  # as the card's settings record them
        opts.update(object_scale=args.object_scale, camera_radius=args.camera_radius)
    if args.camera != "ring":
        opts.update(camera=args.camera)
    card = read_card(out) if out.is_dir() else None  # a damaged card: one line, and nothing is touched
    held = [p for split in ("train", "test") if (out / split).is_dir() for p in record_files(out / split)]
    if held and not str((card or {}).get("generator", "")).startswith("gqn.synthetic"):
        # writing replaces the split directories' records: never those of a dataset this tool did not write
        raise GQNDataError(f"--out {out} already holds a dataset that gqn-data synth did not write ({len(held)} "
                           f"record files in train/ and test/, no dataset.json of gqn-data synth); refusing "
                           f"to replace it; fix: give another --out (or delete {out} first if you want it replaced)")
    if args.skip_existing and card is not None:
        old = card.get("settings")
        if old == opts:
            print(f"{out} exists with these settings (dataset.json); keeping it")
            return 0
        print(f"{out} exists but was written with other settings; writing it again")
    try:
        synthesize(out, workers=args.workers, **opts)
    except OSError as err:
        raise GQNDataError(f"cannot write the dataset to {out}: {err.strerror or err}") from None
    return 0


def _splits(root: Path):
    from data_modules.errors import GQNDataError
    from data_modules.records import RECORD_NAMES

    if root.exists() and not root.is_dir():
        raise GQNDataError(f"{root} is a file, not a dataset directory (one holding train/ and test/ of "
                           f"{RECORD_NAMES} files)")
    if not root.is_dir():
        raise GQNDataError(f"no dataset directory {root}; generate one with gqn-data synth --out {root}")
    splits = [s for s in ("train", "test") if (root / s).is_dir()]
    if not splits:
        raise GQNDataError(f"{root} has no train/ or test/ directory of {RECORD_NAMES} files")
    return splits


def _expected(root: Path):
    """((frame size, frames per scene or None) that the dataset must have, or None; what is wrong with its
    dataset.json or, for another writer's dataset without one, with its first record, or None). The DeepMind table
    and a card fix both numbers; a dataset read from its first record only its frame size (training reads it so),
    not the views per scene (a scene with more views than the first trains as well)."""
    from data_modules.datasets import CARD, DATASETS, dataset_info, record_paths
    from data_modules.errors import GQNDataError

    try:
        info = dataset_info(root.parent, root.name)
    except GQNDataError as err:  # with a card there, the card is damaged; without one, the first record cannot say
        other = root.name not in DATASETS and next(record_paths(root.parent, root.name), None) is not None
        return None, (str(err) if (root / CARD).is_file() or other else None)
    return (info.image_size, None if info.from_records else info.frames_per_scene), None


def _scan(root: Path, decode: bool):
    """Read every record of every split; returns ({split: stats}, [problems])."""
    from data_modules.errors import CorruptRecordError
    from data_modules.records import RECORD_NAMES, frame_size, iter_records, parse_scene, record_files

    expected, card_problem = _expected(root)
    stats, problems = {}, [card_problem] if card_problem else []  # a damaged card: said, the records still checked
    for split in _splits(root):
        files = record_files(root / split)
        frames_per_scene, sizes, scenes = Counter(), Counter(), 0
        for path in files:
            views, unread = {}, set()  # offset -> frames of each readable scene; the other records' offsets
            whole = True  # every record of the file was found (framing intact)

            def bad_data(err, unread=unread):
                problems.append(str(err))
                unread.add(err.offset)

            try:
                for offset, data in iter_records(path, on_bad_data=bad_data):
                    unread.add(offset)  # until it parses
                    try:
                        frames, _ = parse_scene(data, path, offset)
                        views[offset] = len(frames)
                        unread.discard(offset)
                        for i, jpeg in enumerate(frames if decode else frames[:1]):
                            h, w = frame_size(jpeg, path, offset, i, decode)
                            sizes[f"{w}x{h}"] += 1
                            if expected and (h, w) != (expected[0],) * 2:
                                raise CorruptRecordError(
                                    path, offset, f"frame {i} is {w}x{h} but {root.name} has "
                                    f"{expected[0]}x{expected[0]} frames (wrong dataset name?)")
                        if expected and expected[1] is not None and len(frames) != expected[1]:
                            raise CorruptRecordError(
                                path, offset, f"{len(frames)} frames but {root.name} has {expected[1]} per scene")
                        frames_per_scene[len(frames)] += 1
                        scenes += 1
                    except CorruptRecordError as err:
                        problems.append(str(err))
            except CorruptRecordError as err:  # framing broken: the rest of the file is unreadable
                problems.append(str(err))
                whole = False
            if decode:
                problems.extend(_sidecar_problems(path, views, unread if whole else None))
        stats[split] = {"files": len(files), "scenes": scenes,
                        "frames_per_scene": dict(frames_per_scene), "frame_sizes": dict(sizes)}
        if not files:
            problems.append(f"{root / split} holds no {RECORD_NAMES} files (empty {split} split)")
        elif not scenes:
            problems.append(f"{root / split}: no readable scene in {len(files)} file(s) (empty {split} split)")
    for split in ("train", "test"):
        if split not in stats:
            problems.append(f"{root} has no {split}/ directory (training needs train/, evaluation test/)")
    return stats, list(dict.fromkeys(problems))  # once each (twin record files share a sidecar's problem)


def _sidecar_problems(path: Path, views: dict[int, int], unread: set[int] | None) -> list[str]:
    """What is wrong with the object sidecar of record file ``path`` (none: nothing), given its readable scenes'
    ``{offset: frames}`` and the offsets of the records it could not read (None: the file's framing broke, so its
    later records are unknown): unreadable, or not matching the records (written for other records, other views)."""
    from data_modules.errors import GQNDataError
    from data_modules.objects import SIDECAR_FIX, load_sidecar

    load_sidecar.cache_clear()  # a file replaced since it was last read
    try:
        table = load_sidecar(str(path))
    except GQNDataError as err:
        return [f"{err}; fix: {err.fix}" if err.fix else str(err)]
    if table is None:
        return []
    missing = [o for o in views if o not in table]
    extra = [] if unread is None else [o for o in table if o not in views and o not in unread]
    if missing or extra:
        what = [f"no masks for {len(missing)} of its {len(views)} readable records"] if missing else []
        what += [f"masks for {len(extra)} record(s) it does not hold"] if extra else []
        return [f"the object sidecar of {path} has {' and '.join(what)} (first at byte {(missing or extra)[0]}): "
                f"it was written for other records; fix: {SIDECAR_FIX}"]
    if short := [o for o in views if len(table[o][0]) != views[o]]:
        o = short[0]
        return [f"the object sidecar of {path} has {len(table[o][0])} views of masks for the record at byte {o}, "
                f"which has {views[o]} frames ({len(short)} such records); fix: {SIDECAR_FIX}"]
    return []


def _info(args) -> int:
    from data_modules.remote import is_url

    if is_url(args.dir):  # listings only: files and bytes per split, nothing downloaded
        from data_modules.datasets import DATASETS
        from data_modules.download import remote_info

        for split, files, size in remote_info(args.dir):
            print(f"{split:5s}  files {files:5d}  bytes {size:14d} ({size / 1e9:.2f} GB)")
        info = DATASETS.get(args.dir.rstrip("/").rsplit("/", 1)[-1])
        if info is not None:
            print(f"image {info.image_size}x{info.image_size}  frames/scene {info.frames_per_scene} (DeepMind table)")
        return 0
    stats, problems = _scan(Path(args.dir), decode=False)
    for split, s in stats.items():
        fps = ", ".join(f"{k}" for k in sorted(s["frames_per_scene"])) or "-"
        size = ", ".join(sorted(s["frame_sizes"])) or "-"
        print(f"{split:5s}  files {s['files']:5d}  scenes {s['scenes']:7d}  frames/scene {fps}  image {size}")
    for p in problems:
        print(f"problem: {p}")
    return 1 if problems else 0


def _verify(args) -> int:
    stats, problems = _scan(Path(args.dir), decode=True)
    total = sum(s["scenes"] for s in stats.values())
    for p in problems:
        print(f"problem: {p}")
    print(f"verified {total} scenes in {Path(args.dir)}: {len(problems)} problem(s)")
    return 1 if problems else 0


def _preview(args) -> int:
    from PIL import Image

    from data_modules.errors import GQNDataError
    from data_modules.records import decode_frame, iter_records, parse_scene, record_files

    root = Path(args.dir)
    splits = _splits(root)
    split = splits[-1] if args.split is None else args.split
    if split not in splits:
        raise GQNDataError(f"{root} has no {split}/ split (it has {', '.join(splits)}); give --split "
                           f"{' or --split '.join(splits)}")
    out = Path(args.out or root / "preview.png")
    if out.is_dir() or not out.parent.is_dir():
        raise GQNDataError(f"--out {out}: " + ("is a directory" if out.is_dir() else f"no directory {out.parent}")
                           + "; give a PNG path in an existing directory, e.g. --out preview.png")
    rows = []
    for path in record_files(root / split):
        for offset, data in iter_records(path):
            frames, _ = parse_scene(data, path, offset)
            imgs = [decode_frame(f, _size(f), path, offset, i)
                    for i, f in enumerate(frames[: args.views])]
            rows.append(np.concatenate(imgs, axis=1))
            if len(rows) == args.scenes:
                break
        if len(rows) == args.scenes:
            break
    if not rows:
        raise GQNDataError(f"{root / split} holds no scenes (no records in its record files)")
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
    try:
        Image.fromarray(np.concatenate(rows, axis=0)).save(out)
    except (OSError, ValueError) as err:  # an unwritable path, or a name without an image extension
        raise GQNDataError(f"cannot write --out {out}: {str(err).splitlines()[0]}") from None
    print(f"wrote {out} ({len(rows)} scenes x up to {args.views} views)")
    return 0


def _size(jpeg: bytes) -> int:
    from data_modules.records import frame_size

    return frame_size(jpeg)[0]


def _download(args) -> int:
    from data_modules.download import download

    return download(args.name, args.out, source=args.source, split=args.split, files=args.files,
                    fraction=args.fraction, jobs=args.jobs, dry_run=args.dry_run, progress=not args.no_progress)


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad argument on one line (``prog: error: ...``), without the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def field_of_view(text: str) -> float:
    """An argparse type: a full field of view in degrees, strictly between 0 and 180."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected degrees, got {text!r}") from None
    if not 0 < value < 180:
        raise argparse.ArgumentTypeError(f"must be in (0, 180) degrees, got {value:g}")
    return value


def _float_in(text: str, low: float, high: float, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (low < value < high and np.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be {what}, got {value:g}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    return _float_in(text, 0.0, float("inf"), "> 0")


def camera_radius(text: str) -> float:
    """An argparse type: a camera-ring radius inside the synthetic rooms' walls (at 1.5)."""
    return _float_in(text, 0.0, 1.5, "in (0, 1.5), inside the walls")


def at_least(low: int, multiple: int = 1):
    """An argparse type: an integer >= ``low`` (and a multiple of ``multiple``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or value % multiple:
            extra = f" and a multiple of {multiple}" if multiple > 1 else ""
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}{extra}, got {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="gqn-data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("synth", help="render procedural scenes into DeepMind-format TFRecords")
    s.add_argument("--family", choices=["rooms", "shepard_metzler"], default="rooms",
                   help="scene family: rooms with 1-3 objects (ring camera) or Shepard-Metzler objects")
    s.add_argument("--out", required=True, help="dataset directory, e.g. data/synthetic_rooms")
    s.add_argument("--train-scenes", type=at_least(1), default=2000, help="scenes in train/ (default: 2000)")
    s.add_argument("--test-scenes", type=at_least(1), default=200, help="scenes in test/ (default: 200)")
    s.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default: 0)")
    s.add_argument("--image-size", type=at_least(8, 4), default=64,
                   help="frame size in pixels, a multiple of 4 (default: 64)")
    s.add_argument("--views", type=at_least(2), default=10, help="frames per scene (default: 10)")
    s.add_argument("--scenes-per-file", type=at_least(1), default=100, help="records per .tfrecord file (default: 100)")
    s.add_argument("--parts", type=at_least(1), default=7, help="cubes per Shepard-Metzler object (default: 7)")
    s.add_argument("--samples", type=at_least(1), default=2,
                   help="anti-aliasing: N x N rays per pixel, box-filtered (default: 2; 1 = aliased)")
    s.add_argument("--fov", type=field_of_view, default=60.0,
                   help="the cameras' full field of view in degrees (default: 60); the public datasets do not "
                        "publish theirs, so models must not assume one")
    s.add_argument("--object-scale", type=positive_float, default=1.0,
                   help="rooms: multiply the objects' sizes (default: 1.0; sizes 0.12-0.34 with walls at 1.5)")
    s.add_argument("--camera-radius", type=camera_radius, default=1.3,
                   help="rooms: radius of the camera ring, inside the walls at 1.5 (default: 1.3); smaller puts "
                        "the cameras closer to the objects")
    s.add_argument("--camera", choices=["ring", "free"], default="ring",
                   help="rooms: cameras on a ring looking at the centre (default), or free: anywhere in the square "
                        "|x|, |y| <= --camera-radius outside the objects, any heading, tilted a little (views "
                        "share little)")
    s.add_argument("--no-objects", action="store_true",
                   help="do not write the object masks and empty-room renders beside the records "
                        "(objects/{split}/*.npz, used by gqn-eval's object-pixel metrics)")
    s.add_argument("--workers", type=at_least(1), default=None, help="processes (default: 2)")
    s.add_argument("--skip-existing", action="store_true",
                   help="do nothing if the dataset exists with the same settings (its dataset.json says)")
    s.set_defaults(func=_synth)
    for name, func, text in (("info", _info, "files, scenes, frames per scene, image size per split (for a URL: "
                                             "files and bytes per split, from listings)"),
                             ("verify", _verify, "read every record, check CRCs, decode every frame")):
        p = sub.add_parser(name, help=text)
        p.add_argument("dir", help="dataset directory holding train/ and test/" + (
            " (or a URL: gs://gqn-dataset/rooms_ring_camera, https://..., any fsspec URL)" if name == "info" else ""))
        p.set_defaults(func=func)
    d = sub.add_parser("download", help="copy a dataset, or part of it, from the bucket (resumable, CRC-checked)",
                       description="Copy DIR/NAME/{train,test}/*.tfrecord (or *.tfrecords) from --source. "
                       "Interrupted runs resume their .part files; every file is CRC-checked before it gets its "
                       "final name; a rerun skips complete files. Settings: GQN_REMOTE_RETRIES, GQN_REMOTE_BACKOFF, "
                       "GQN_REMOTE_TIMEOUT, GQN_REMOTE_BLOCK_MB; STORAGE_EMULATOR_HOST points gs:// at an emulator.")
    d.add_argument("name", help="dataset name, e.g. rooms_ring_camera or shepard_metzler_5_parts")
    d.add_argument("--out", required=True, help="data dir; files go to OUT/NAME/{train,test}/")
    d.add_argument("--source", default="gs://gqn-dataset",
                   help="where NAME lives: gs://gqn-dataset (default), https://storage.googleapis.com/gqn-dataset, "
                        "a mirror, any fsspec URL")
    d.add_argument("--split", default="all", choices=["train", "test", "all"], help="which split (default: all)")
    d.add_argument("--files", default=None, metavar="A:B",
                   help="a slice of each split's sorted file list, e.g. 0:100 (default: all files)")
    d.add_argument("--fraction", type=float, default=None,
                   help="the first FRACTION of each split's files, e.g. 0.05 (at least one)")
    d.add_argument("--jobs", type=int, default=4, help="files transferred in parallel (default: 4)")
    d.add_argument("--dry-run", action="store_true", help="list the files and the total size; fetch nothing")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.set_defaults(func=_download)
    p = sub.add_parser("preview", help="write a PNG contact sheet of a few scenes")
    p.add_argument("dir", help="dataset directory holding train/ and test/")
    p.add_argument("--split", default=None, help="train or test (default: test if it exists, else train)")
    p.add_argument("--scenes", type=at_least(1), default=8, help="rows: scenes shown (default: 8)")
    p.add_argument("--views", type=at_least(1), default=10, help="columns: frames per scene shown (default: 10)")
    p.add_argument("--out", default=None, help="PNG path (default: DIR/preview.png)")
    p.set_defaults(func=_preview)
    return parser


def main(argv=None) -> int:
    from data_modules.errors import GQNDataError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except GQNDataError as err:
        print(f"gqn-data: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
