"""Bad data and bad configuration: each problem is reported saying what is wrong and where (file and
byte offset), skip_corrupt carries on past it, and `gqn-data verify/info` report it too."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from records_helper import (
    camera,
    encode_jpeg,
    frame_jpeg,
    frame_record,
    make_example,
    record_offsets,
    scene_example,
    scenes_views,
    write_dataset,
    write_file,
)

from data_modules import DATASETS, CorruptRecordError, GQNDataError, GQNDataModule
from gqn import data_cli

ROOMS = "rooms_ring_camera"  # 64 px, 10 frames per scene


def dm_for(root, **kw) -> GQNDataModule:
    opts = dict(batch_size=2, context_size=3, num_workers=0)
    opts.update(kw)
    return GQNDataModule(str(root), ROOMS, **opts)


def read_all(dm: GQNDataModule, split="test") -> list[int]:
    loader = dm.test_dataloader() if split == "test" else dm.val_dataloader()
    return [scene for batch in loader for scene, _ in scenes_views(batch)]


@pytest.fixture
def good(tmp_path):
    """rooms_ring_camera with 2 train files and one test file of 4 scenes (ids 100-103)."""
    paths = write_dataset(tmp_path, ROOMS, train=[[0, 1], [2, 3]], test=[[100, 101, 102, 103]])
    return tmp_path, paths["test"][0]


def offsets(path) -> list[int]:
    return [off for off, _ in record_offsets(path)]


def flip(path: Path, at: int) -> None:
    blob = bytearray(path.read_bytes())
    blob[at] ^= 0x40
    path.write_bytes(bytes(blob))


def at(path, offset) -> str:
    return f"{path} at byte {offset}"


def scene_with_frames(jpegs, scene=0) -> bytes:
    return make_example(jpegs, [c for v in range(len(jpegs)) for c in camera(scene, v)])


# ------------------------------------------------------------------------------------- configuration
def test_missing_directory_says_how_to_download(tmp_path):
    dm = dm_for(tmp_path)  # a DeepMind name: the table is known before any file exists
    with pytest.raises(GQNDataError) as err:
        dm.setup("fit")
    msg = str(err.value)
    assert str(tmp_path / ROOMS / "train") in msg
    assert f"gqn-data download {ROOMS} --out {tmp_path}" in msg and "data.data_dir=gs://gqn-dataset" in msg
    with pytest.raises(GQNDataError, match="no data directory"):
        dm.train_dataloader()


def test_missing_test_split_is_named(tmp_path):
    """Training validates on a carve-out of train, so only testing needs the test split."""
    write_dataset(tmp_path, ROOMS, train=[[0, 1], [2, 3]], test=[])
    dm_for(tmp_path).setup("fit")
    with pytest.raises(GQNDataError) as err:
        dm_for(tmp_path).setup("test")
    assert str(tmp_path / ROOMS / "test") in str(err.value)


def test_missing_generated_dataset_says_gqn_data_synth(tmp_path):
    with pytest.raises(GQNDataError) as err:
        GQNDataModule(str(tmp_path), "synthetic_rooms", batch_size=2, context_size=3, num_workers=0)
    msg = str(err.value)
    assert "'synthetic_rooms'" in msg
    assert f"gqn-data synth --family rooms --out {tmp_path / 'synthetic_rooms'}" in msg


@pytest.mark.parametrize("make_dir", [False, True], ids=["no-directory", "directory-without-card"])
def test_unknown_dataset_lists_valid_names(tmp_path, make_dir):
    if make_dir:
        (tmp_path / "rooms_ring_cameras" / "train").mkdir(parents=True)
    with pytest.raises(GQNDataError) as err:
        GQNDataModule(str(tmp_path), "rooms_ring_cameras", batch_size=2, context_size=3, num_workers=0)
    msg = str(err.value)
    assert "rooms_ring_cameras" in msg and "valid names" in msg
    for name in DATASETS:
        assert name in msg


def test_empty_split(tmp_path):
    write_dataset(tmp_path, ROOMS, train=[[0, 1]], test=[[100]])
    train = tmp_path / ROOMS / "train"
    for f in train.glob("*.tfrecord"):
        f.rename(f.with_suffix(".tfrecord.partial"))  # an interrupted download
    with pytest.raises(GQNDataError) as err:
        dm_for(tmp_path).setup("fit")
    msg = str(err.value)
    assert str(train) in msg and "no *.tfrecord" in msg and f"gqn-data download {ROOMS}" in msg


@pytest.mark.parametrize("context_size,needs", [(10, 11), ([1, 10], 11), ([2, 12], 13)])
def test_context_size_must_leave_a_query(tmp_path, context_size, needs):
    with pytest.raises(GQNDataError) as err:
        dm_for(tmp_path, context_size=context_size)
    msg = str(err.value)
    assert f"needs {needs} views" in msg and ROOMS in msg and "has 10" in msg and "at most 9" in msg


def test_context_size_limits_follow_the_dataset(tmp_path):
    dm_for(tmp_path, context_size=9)  # the largest legal value for 10 frames
    GQNDataModule(str(tmp_path), "mazes", batch_size=2, context_size=[1, 299], num_workers=0)
    with pytest.raises(GQNDataError, match="mazes has 300; use at most 299"):
        GQNDataModule(str(tmp_path), "mazes", batch_size=2, context_size=300, num_workers=0)
    with pytest.raises(GQNDataError, match="context_size must be >= 1"):
        dm_for(tmp_path, context_size=0)
    with pytest.raises(GQNDataError, match="eval_context_size must be in"):
        dm_for(tmp_path, context_size=3, eval_context_size=10)


# ------------------------------------------------------------------------------------- damaged records
def test_truncated_record_names_file_and_offset(good):
    root, path = good
    offs = offsets(path)
    path.write_bytes(path.read_bytes()[:-30])  # the last (4th) record loses its tail
    with pytest.raises(CorruptRecordError) as err:
        read_all(dm_for(root))
    assert err.value.path == str(path) and err.value.offset == offs[3]
    assert at(path, offs[3]) in str(err.value) and "truncated" in str(err.value)


def test_truncated_header_names_file_and_offset(good):
    root, path = good
    end = path.stat().st_size
    path.write_bytes(path.read_bytes() + b"\x10\x00\x00")
    with pytest.raises(CorruptRecordError) as err:
        read_all(dm_for(root))
    assert at(path, end) in str(err.value) and "truncated record header" in str(err.value)


def test_data_crc_mismatch_names_file_and_offset(good):
    root, path = good
    offs = offsets(path)
    flip(path, offs[2] + 12 + 40)  # a byte inside the 3rd record's data
    with pytest.raises(CorruptRecordError) as err:
        read_all(dm_for(root))
    assert at(path, offs[2]) in str(err.value) and "data CRC mismatch" in str(err.value)


def test_length_crc_mismatch_names_file_and_offset(good):
    root, path = good
    offs = offsets(path)
    flip(path, offs[1] + 9)  # the 2nd record's length CRC
    with pytest.raises(CorruptRecordError) as err:
        read_all(dm_for(root))
    assert at(path, offs[1]) in str(err.value) and "length CRC mismatch" in str(err.value)


@pytest.mark.parametrize("payload,problem", [
    (b"GIF89a" + bytes(100), "is neither a JPEG nor a PNG"),
    (b"\xff\xd8\xff\xe0" + bytes(100), "broken JPEG"),
], ids=["not-jpeg", "broken-jpeg"])
def test_frames_that_are_not_jpegs(tmp_path, payload, problem):
    good_scene = scene_example(100, 10, 64)
    path = write_file(tmp_path / ROOMS / "test" / "001-of-240.tfrecord",
                      [good_scene, scene_with_frames([payload] * 10, scene=101)])
    write_dataset(tmp_path, ROOMS, train=[[0, 1]], test=[])
    with pytest.raises(CorruptRecordError) as err:
        read_all(dm_for(tmp_path, batch_size=1))
    msg = str(err.value)
    assert at(path, offsets(path)[1]) in msg and problem in msg and re.search(r"frame \d", msg)


def test_frame_size_different_from_the_table(tmp_path):
    small = [encode_jpeg(np.full((32, 32, 3), 128, np.uint8))] * 10
    path = write_file(tmp_path / ROOMS / "test" / "001-of-240.tfrecord", [scene_with_frames(small)])
    write_dataset(tmp_path, ROOMS, train=[[0, 1]], test=[])
    with pytest.raises(CorruptRecordError) as err:
        read_all(dm_for(tmp_path))
    msg = str(err.value)
    assert at(path, 0) in msg and "32x32" in msg and "64x64" in msg


def test_scene_with_fewer_frames_than_views_needed(tmp_path):
    path = write_file(tmp_path / ROOMS / "test" / "001-of-240.tfrecord",
                      [scene_with_frames([frame_jpeg(0, v, 64) for v in range(3)])])
    write_dataset(tmp_path, ROOMS, train=[[0, 1]], test=[])
    with pytest.raises(CorruptRecordError) as err:
        read_all(dm_for(tmp_path, context_size=5))
    assert at(path, 0) in str(err.value) and "3 frames" in str(err.value)


def test_cameras_not_matching_frames(tmp_path):
    jpegs = [frame_jpeg(0, v, 64) for v in range(10)]
    path = write_file(tmp_path / ROOMS / "test" / "001-of-240.tfrecord", [make_example(jpegs, [0.0] * 45)])
    write_dataset(tmp_path, ROOMS, train=[[0, 1]], test=[])
    with pytest.raises(CorruptRecordError) as err:
        read_all(dm_for(tmp_path))
    assert at(path, 0) in str(err.value) and "45 camera floats" in str(err.value)


# ------------------------------------------------------------------------------------- skip_corrupt
def corrupt_test_split(root) -> dict[str, Path]:
    """Test split: good scenes 100-106 around a non-JPEG scene, a CRC-damaged one and a cut-off tail."""
    d = root / ROOMS / "test"
    not_jpeg = scene_with_frames([b"not a jpeg"] * 10, scene=199)
    a = write_file(d / "001-of-240.tfrecord", [scene_example(100, 10, 64), not_jpeg, scene_example(101, 10, 64)])
    b = write_file(d / "002-of-240.tfrecord", [scene_example(s, 10, 64) for s in (102, 198, 103)])
    flip(b, offsets(b)[1] + 12 + 40)
    c = write_file(d / "003-of-240.tfrecord", [scene_example(s, 10, 64) for s in (104, 105, 106)])
    c.write_bytes(c.read_bytes() + frame_record(scene_example(197, 10, 64))[:-50])
    write_dataset(root, ROOMS, train=[[0, 1]], test=[])
    return {"a": a, "b": b, "c": c}


def test_skip_corrupt_warns_counts_and_delivers_the_good_scenes(tmp_path):
    files = corrupt_test_split(tmp_path)
    with pytest.raises(CorruptRecordError):
        read_all(dm_for(tmp_path))  # the default stops at the first problem
    loader = dm_for(tmp_path, skip_corrupt=True).test_dataloader()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scenes = [s for batch in loader for s, _ in scenes_views(batch)]
    assert sorted(scenes) == list(range(100, 107))  # including 103, after the damaged record of file b
    assert loader.dataset.skipped == 3
    texts = [str(w.message) for w in caught if "skipping" in str(w.message)]
    assert len(texts) == 3, texts
    assert any(at(files["a"], offsets(files["a"])[1]) in t and "neither a JPEG nor a PNG" in t for t in texts)
    assert any(at(files["b"], offsets(files["b"])[1]) in t and "CRC" in t for t in texts)
    assert any(str(files["c"]) in t and "truncated" in t for t in texts)


def test_skip_corrupt_counts_skips_made_in_worker_processes(tmp_path):
    corrupt_test_split(tmp_path)
    loader = dm_for(tmp_path, skip_corrupt=True, num_workers=2).test_dataloader()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scenes = [s for batch in loader for s, _ in scenes_views(batch)]
    assert sorted(scenes) == list(range(100, 107))
    assert loader.dataset.skipped == 3  # counted in the workers, reported to the trainer's stream


# ------------------------------------------------------------------------------------- gqn-data CLI
def cli(capsys, *args) -> tuple[int, str, str]:
    code = data_cli.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_verify_passes_a_good_dataset(good, capsys):
    root, _ = good
    code, out, _ = cli(capsys, "verify", str(root / ROOMS))
    assert code == 0
    assert "verified 8 scenes" in out and "0 problem(s)" in out and "problem:" not in out


def test_verify_reports_every_damaged_record_and_fails(good, capsys):
    root, path = good
    offs = offsets(path)
    flip(path, offs[1] + 12 + 40)
    flip(path, offs[3] + 12 + 40)
    code, out, _ = cli(capsys, "verify", str(root / ROOMS))
    assert code != 0
    problems = [line for line in out.splitlines() if line.startswith("problem:")]
    assert len(problems) == 2, out
    assert at(path, offs[1]) in problems[0] and "CRC" in problems[0]
    assert at(path, offs[3]) in problems[1] and "CRC" in problems[1]
    assert "verified 6 scenes" in out and "2 problem(s)" in out  # the others were still read


def test_verify_reports_bad_frames_and_truncation(tmp_path, capsys):
    files = corrupt_test_split(tmp_path)
    code, out, _ = cli(capsys, "verify", str(tmp_path / ROOMS))
    assert code != 0
    where = re.escape(at(files["a"], offsets(files["a"])[1]))
    assert re.search(where + r": frame \d+ is neither a JPEG nor a PNG", out), out
    assert at(files["b"], offsets(files["b"])[1]) in out
    end_of_good = offsets(files["c"])[3]  # the 4th (cut-off) record starts after three good ones
    assert at(files["c"], end_of_good) + ": truncated record" in out


def test_verify_checks_frame_size_against_the_table(tmp_path, capsys):
    small = [encode_jpeg(np.full((32, 32, 3), 128, np.uint8))] * 10
    path = write_file(tmp_path / ROOMS / "test" / "001-of-240.tfrecord", [scene_with_frames(small)])
    code, out, _ = cli(capsys, "verify", str(tmp_path / ROOMS))
    assert code != 0
    assert at(path, 0) in out and "32x32" in out and "64x64" in out


def test_verify_missing_directory(tmp_path, capsys):
    code, out, err = cli(capsys, "verify", str(tmp_path / "nowhere"))
    assert code == 2
    assert str(tmp_path / "nowhere") in err and "gqn-data synth" in err


def test_info_prints_files_scenes_frames_and_size(tmp_path, capsys):
    write_dataset(tmp_path, "jaco", train=[[0, 1, 2], [3, 4]], test=[[100, 101, 102]])
    code, out, _ = cli(capsys, "info", str(tmp_path / "jaco"))
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    for split, files, scenes in (("train", 2, 5), ("test", 1, 3)):
        assert re.search(rf"files\s+{files}\s+scenes\s+{scenes}\s+frames/scene 11\s+image 64x64", rows[split]), out
