"""gqn-data's preview and synth --skip-existing."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

from data_modules.records import iter_records, parse_scene
from gqn.data_cli import main


def test_preview_is_a_grid_of_the_first_scenes_frames(data_root, tmp_path, capsys):
    root = data_root / "synthetic_rooms"
    out = tmp_path / "sheet.png"
    assert main(["preview", str(root), "--scenes", "2", "--views", "3", "--out", str(out)]) == 0
    assert f"wrote {out} (2 scenes x up to 3 views)" in capsys.readouterr().out
    sheet = np.array(Image.open(out))
    assert sheet.shape == (2 * 32, 3 * 32, 3)
    first = sorted((root / "test").glob("*.tfrecord"))[0]  # default split: test
    for row, (offset, data) in zip(range(2), iter_records(first)):
        frames, _ = parse_scene(data, first, offset)
        for col in range(3):  # decoded here with PIL, not the project's decoder
            expected = np.array(Image.open(io.BytesIO(frames[col])).convert("RGB")).astype(int)
            tile = sheet[row * 32 : (row + 1) * 32, col * 32 : (col + 1) * 32].astype(int)
            assert np.abs(tile - expected).max() <= 2, (row, col)


def test_synth_skip_existing_keeps_a_dataset_with_a_card(tmp_path, capsys):
    out = tmp_path / "rooms"
    args = ["synth", "--out", str(out), "--image-size", "16", "--train-scenes", "2", "--test-scenes", "1",
            "--views", "3", "--workers", "1"]
    assert main(args + ["--skip-existing"]) == 0  # no card yet: generated
    files = sorted(out.rglob("*.tfrecord"))
    assert len(files) == 2 and (out / "dataset.json").is_file()
    stamps = {p: p.stat().st_mtime_ns for p in [*files, out / "dataset.json"]}
    os.utime(files[0], ns=(1, 1))  # a rewrite would reset this
    stamps[files[0]] = 1
    capsys.readouterr()
    assert main(args + ["--skip-existing"]) == 0
    assert capsys.readouterr().out.strip() == f"{out} exists with these settings (dataset.json); keeping it"
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert main(args + ["--seed", "7", "--skip-existing"]) == 0  # other settings (the card says): written again
    assert "exists but was written with other settings; writing it again" in capsys.readouterr().out
    assert files[0].stat().st_mtime_ns != 1
    (out / "dataset.json").unlink()  # records without a card of gqn-data synth (e.g. a download): never replaced
    os.utime(files[0], ns=(1, 1))
    capsys.readouterr()
    assert main(args + ["--skip-existing"]) == 2
    assert "did not write" in capsys.readouterr().err
    assert files[0].stat().st_mtime_ns == 1 and not (out / "dataset.json").exists()
