"""Records in the DeepMind format written by other writers: a dataset directory without a card (its frame size and
frames per scene read from its first record), PNG frames, ``*.tfrecords`` files."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from records_helper import camera, colour, make_example, scenes_views, write_file, write_split

from data_modules import CorruptRecordError, GQNDataError, GQNDataModule
from data_modules.datasets import dataset_info
from gqn import data_cli

OTHER = "other_renderer_rooms"  # neither a DeepMind name nor written by gqn-data synth: no dataset.json


def dm_for(root, name=OTHER, **kw) -> GQNDataModule:
    opts = dict(batch_size=2, context_size=3, num_workers=0)
    opts.update(kw)
    return GQNDataModule(str(root), name, **opts)


def first_batch(dm: GQNDataModule, split: str = "test") -> dict:
    dm.setup("fit" if split == "train" else "test")
    return next(iter(dm.train_dataloader() if split == "train" else dm.test_dataloader()))


def png(image: np.ndarray, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def png_scene(scene: int, frames: int, size: int, mode: str = "RGB") -> bytes:
    pngs = [png(np.broadcast_to(np.array(colour(scene, v), np.uint8), (size, size, 3)).copy(), mode)
            for v in range(frames)]
    return make_example(pngs, [c for v in range(frames) for c in camera(scene, v)])


def test_a_dataset_without_a_card_reads_its_frame_size_and_frames_per_scene(tmp_path):
    write_split(tmp_path, OTHER, "train", [[0, 1], [2, 3]], size=48, frames=7, total=2)
    write_split(tmp_path, OTHER, "test", [[100, 101, 102]], size=48, frames=7, total=1)
    info = dataset_info(str(tmp_path), OTHER)
    assert (info.image_size, info.frames_per_scene, info.from_records) == (48, 7, True)
    batch = first_batch(dm_for(tmp_path))
    assert tuple(batch["query_images"].shape) == (2, 3, 48, 48)
    assert {s for s, _ in scenes_views(batch)} <= {100, 101, 102}  # every frame the JPEG its pose belongs to
    # read at another size (the 64 px rooms read at 32 px) and with the most views the scenes allow
    small = first_batch(dm_for(tmp_path, image_size=32, context_size=[3, 6]), "train")
    assert tuple(small["query_images"].shape) == (2, 3, 32, 32)
    with pytest.raises(GQNDataError, match="needs 8 views per scene"):  # 7 frames per scene, as the record says
        dm_for(tmp_path, context_size=7)


def test_a_dataset_without_a_card_whose_first_record_cannot_say(tmp_path):
    (tmp_path / OTHER / "train").mkdir(parents=True)
    with pytest.raises(GQNDataError, match=r"holds no record files in train/ or test/.*valid names"):
        dm_for(tmp_path)
    write_file(tmp_path / OTHER / "train" / "a.tfrecord", [])  # an empty file
    with pytest.raises(GQNDataError, match="hold no scenes"):
        dm_for(tmp_path)
    wide = np.zeros((32, 48, 3), np.uint8)
    write_file(tmp_path / OTHER / "train" / "b.tfrecord", [make_example([png(wide)] * 4, [0.0] * 20)])
    with pytest.raises(GQNDataError, match=r"frames are 48x32; the GQN reads square frames"):
        dm_for(tmp_path)
    assert data_cli.main(["verify", str(tmp_path / OTHER)]) == 1  # verify says what training would refuse
    header = bytearray(png(np.zeros((8, 8, 3), np.uint8)))
    header[12:16] = b"IHDX"  # the first chunk is not the header
    write_file(tmp_path / OTHER / "train" / "b.tfrecord", [make_example([bytes(header)] * 4, [0.0] * 20)])
    with pytest.raises(GQNDataError, match=r"frame 0: broken PNG \(no valid IHDR header\)"):
        dm_for(tmp_path)
    write_file(tmp_path / OTHER / "train" / "b.tfrecord", [make_example([b"GIF89a" + bytes(40)] * 4, [0.0] * 20)])
    with pytest.raises(GQNDataError, match=r"first record, which cannot be read: .*b.tfrecord at byte 0: frame 0 "
                                           r"is neither a JPEG nor a PNG"):
        dm_for(tmp_path)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_png_frames_decode_to_the_same_pixels(tmp_path, mode):
    name = "rooms_ring_camera"  # 64 px, 10 frames per scene: the table's size is checked against the PNGs too
    write_file(tmp_path / name / "test" / "1-of-1.tfrecord", [png_scene(s, 10, 64, mode) for s in (100, 101)])
    write_file(tmp_path / name / "train" / "1-of-1.tfrecord", [png_scene(s, 10, 64, mode) for s in (0, 1)])
    batch = first_batch(dm_for(tmp_path, name))
    scenes = {100: 0, 101: 1}
    for i in range(2):  # the query's pose says its scene and view (records_helper.camera); a PNG is lossless
        scene, view = int(round(batch["query_poses"][i, 0].item())), int(round(batch["query_poses"][i, 1].item()))
        assert scene in scenes
        rgb = np.array(colour(scene, view), np.uint8)
        want = np.asarray(Image.fromarray(rgb[None, None]).convert(mode).convert("RGB"))[0, 0] / 255
        got = batch["query_images"][i].numpy()
        np.testing.assert_allclose(got, np.broadcast_to(want[:, None, None], (3, 64, 64)).astype(np.float32), atol=1e-6)
    resized = first_batch(dm_for(tmp_path, name, image_size=32))
    assert tuple(resized["context_images"].shape) == (2, 3, 3, 32, 32)


def test_16_bit_grey_pngs_keep_their_grey(tmp_path):
    name = "rooms_ring_camera"
    grey16 = np.full((64, 64), 40000, np.uint16)  # 40000 / 65535 of white: 156 of 255 in 8 bits
    buf = io.BytesIO()
    Image.fromarray(grey16).save(buf, format="PNG")
    cams = [c for v in range(10) for c in camera(100, v)]
    write_file(tmp_path / name / "test" / "1-of-1.tfrecord", [make_example([buf.getvalue()] * 10, cams)])
    write_file(tmp_path / name / "train" / "1-of-1.tfrecord", [png_scene(0, 10, 64)])
    img = first_batch(dm_for(tmp_path, name, batch_size=1))["query_images"][0]
    np.testing.assert_allclose(img.numpy(), np.full((3, 64, 64), 156 / 255, np.float32), atol=1e-6)


def test_a_broken_png_names_its_record(tmp_path):
    name = "rooms_ring_camera"
    bad = png(np.zeros((64, 64, 3), np.uint8))[:60]  # cut short inside its image data
    path = write_file(tmp_path / name / "test" / "1-of-1.tfrecord",
                      [make_example([bad] * 10, [c for v in range(10) for c in camera(100, v)])])
    write_file(tmp_path / name / "train" / "1-of-1.tfrecord", [png_scene(0, 10, 64)])
    with pytest.raises(CorruptRecordError, match=rf"{path} at byte 0: frame \d+: broken PNG"):
        first_batch(dm_for(tmp_path, name, batch_size=1))


def test_tfrecords_files_are_read_and_verified(tmp_path, capsys):
    write_split(tmp_path, OTHER, "train", [[0, 1]], size=32, frames=5, total=1)
    write_split(tmp_path, OTHER, "test", [[100, 101]], size=32, frames=5, total=1)
    for path in list((tmp_path / OTHER).glob("*/*.tfrecord")):
        path.rename(path.with_suffix(".tfrecords"))
    assert {s for s, _ in scenes_views(first_batch(dm_for(tmp_path)))} == {100, 101}
    assert data_cli.main(["info", str(tmp_path / OTHER)]) == 0
    out = capsys.readouterr().out
    assert "files     1  scenes       2  frames/scene 5  image 32x32" in out and "problem" not in out, out
    assert data_cli.main(["verify", str(tmp_path / OTHER)]) == 0
    assert f"verified 4 scenes in {tmp_path / OTHER}: 0 problem(s)" in capsys.readouterr().out
