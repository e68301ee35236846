"""gqn-data: synthesise, inspect, verify and preview GQN-format datasets."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np


def _synth(args) -> int:
    from data_modules.datasets import CARD, read_card
    from gqn.synthetic import synthesize

    out = Path(args.out)
    if args.skip_existing and read_card(out) is not None:
        print(f"{out} exists ({CARD} found); keeping it")
        return 0
    synthesize(out, family=args.family, train_scenes=args.train_scenes, test_scenes=args.test_scenes,
               seed=args.seed, image_size=args.image_size, views=args.views,
               scenes_per_file=args.scenes_per_file, parts=args.parts, workers=args.workers)
    return 0


def _splits(root: Path):
    from data_modules.errors import GQNDataError

    if not root.is_dir():
        raise GQNDataError(f"no dataset directory {root}; generate one with gqn-data synth --out {root}")
    splits = [s for s in ("train", "test") if (root / s).is_dir()]
    if not splits:
        raise GQNDataError(f"{root} has no train/ or test/ directory of *.tfrecord files")
    return splits


def _expected(root: Path):
    """(frame size, frames per scene) that the dataset must have (DeepMind table or card), or None."""
    from data_modules.datasets import dataset_info
    from data_modules.errors import GQNDataError

    try:
        info = dataset_info(root.parent, root.name)
    except GQNDataError:
        return None
    return info.image_size, info.frames_per_scene


def _scan(root: Path, decode: bool):
    """Read every record of every split; returns ({split: stats}, [problems])."""
    from data_modules.errors import CorruptRecordError
    from data_modules.records import frame_size, iter_records, parse_scene

    stats, problems = {}, []
    expected = _expected(root)
    for split in _splits(root):
        files = sorted((root / split).glob("*.tfrecord"))
        frames_per_scene, sizes, scenes = Counter(), Counter(), 0
        for path in files:
            try:
                for offset, data in iter_records(path, on_bad_data=lambda err: problems.append(str(err))):
                    try:
                        frames, _ = parse_scene(data, path, offset)
                        for i, jpeg in enumerate(frames if decode else frames[:1]):
                            h, w = frame_size(jpeg, path, offset, i, decode)
                            sizes[f"{w}x{h}"] += 1
                            if expected and (h, w) != (expected[0],) * 2:
                                raise CorruptRecordError(
                                    path, offset, f"frame {i} is {w}x{h} but {root.name} has "
                                    f"{expected[0]}x{expected[0]} frames (wrong dataset name?)")
                        if expected and len(frames) != expected[1]:
                            raise CorruptRecordError(
                                path, offset, f"{len(frames)} frames but {root.name} has {expected[1]} per scene")
                        frames_per_scene[len(frames)] += 1
                        scenes += 1
                    except CorruptRecordError as err:
                        problems.append(str(err))
            except CorruptRecordError as err:  # framing broken: the rest of the file is unreadable
                problems.append(str(err))
        stats[split] = {"files": len(files), "scenes": scenes,
                        "frames_per_scene": dict(frames_per_scene), "frame_sizes": dict(sizes)}
    return stats, problems


def _info(args) -> int:
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

    from data_modules.records import decode_frame, iter_records, parse_scene

    root = Path(args.dir)
    split = _splits(root)[-1] if args.split is None else args.split
    rows = []
    for path in sorted((root / split).glob("*.tfrecord")):
        for offset, data in iter_records(path):
            frames, _ = parse_scene(data, path, offset)
            imgs = [decode_frame(f, _size(f), path, offset, i)
                    for i, f in enumerate(frames[: args.views])]
            rows.append(np.concatenate(imgs, axis=1))
            if len(rows) == args.scenes:
                break
        if len(rows) == args.scenes:
            break
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
    out = Path(args.out or root / "preview.png")
    Image.fromarray(np.concatenate(rows, axis=0)).save(out)
    print(f"wrote {out} ({len(rows)} scenes x up to {args.views} views)")
    return 0


def _size(jpeg: bytes) -> int:
    from data_modules.records import frame_size

    return frame_size(jpeg)[0]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gqn-data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("synth", help="render procedural scenes into DeepMind-format TFRecords")
    s.add_argument("--family", choices=["rooms", "shepard_metzler"], default="rooms",
                   help="scene family: rooms with 1-3 objects (ring camera) or Shepard-Metzler objects")
    s.add_argument("--out", required=True, help="dataset directory, e.g. data/synthetic_rooms")
    s.add_argument("--train-scenes", type=int, default=2000, help="scenes in train/ (default: 2000)")
    s.add_argument("--test-scenes", type=int, default=200, help="scenes in test/ (default: 200)")
    s.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default: 0)")
    s.add_argument("--image-size", type=int, default=64, help="frame size in pixels (default: 64)")
    s.add_argument("--views", type=int, default=10, help="frames per scene (default: 10)")
    s.add_argument("--scenes-per-file", type=int, default=100, help="records per .tfrecord file (default: 100)")
    s.add_argument("--parts", type=int, default=7, help="cubes per Shepard-Metzler object (default: 7)")
    s.add_argument("--workers", type=int, default=None, help="processes (default: 2)")
    s.add_argument("--skip-existing", action="store_true", help="do nothing if the dataset card exists")
    s.set_defaults(func=_synth)
    for name, func, text in (("info", _info, "files, scenes, frames per scene, image size per split"),
                             ("verify", _verify, "read every record, check CRCs, decode every frame")):
        p = sub.add_parser(name, help=text)
        p.add_argument("dir", help="dataset directory holding train/ and test/")
        p.set_defaults(func=func)
    p = sub.add_parser("preview", help="write a PNG contact sheet of a few scenes")
    p.add_argument("dir", help="dataset directory holding train/ and test/")
    p.add_argument("--split", default=None, help="train or test (default: test if it exists, else train)")
    p.add_argument("--scenes", type=int, default=8, help="rows: scenes shown (default: 8)")
    p.add_argument("--views", type=int, default=10, help="columns: frames per scene shown (default: 10)")
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
