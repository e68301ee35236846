"""The measuring stick: a validation split carved from train, anti-aliased synthetic rooms with object sidecars,
object-pixel PSNR, and gqn-eval's spreads over scenes and context draws."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_main
from records_helper import scenes_views, write_dataset

from data_modules import GQNDataModule
from data_modules.errors import GQNDataError
from data_modules.objects import exact_sidecar_path, load_sidecar, sidecar_path
from data_modules.records import iter_records, parse_scene
from data_modules.splits import carve_validation
from gqn import metrics
from gqn.synthetic import synthesize
from gqn.synthetic.raycast import Sphere, World
from gqn.synthetic.scenes import render_views

ROOMS = "rooms_ring_camera"  # 64 px, 10 frames per scene


def scene_ids(stream, num_shards: int) -> list[int]:
    """Scene ids (camera x of the test records) that all ``num_shards`` shards of a stream read in one pass."""
    ids = []
    for shard in range(num_shards):
        for _path, _offset, _index, data in stream.records(0, shard, num_shards):
            ids.append(int(round(float(parse_scene(data)[1][0, 0]))))
    return ids


@pytest.mark.parametrize("layout", ["files", "scenes"])
def test_validation_is_carved_from_train_disjoint_and_the_same_on_every_rank_and_worker(tmp_path, layout):
    if layout == "files":  # 6 train files: whole files are held out
        train = [list(range(i * 5, i * 5 + 5)) for i in range(6)]
        kw = dict(val_files=2)
    else:  # 2 train files: a seeded fraction of the scenes is held out
        train = [list(range(0, 20)), list(range(20, 40))]
        kw = dict(val_files=None, val_fraction=0.3)
    write_dataset(tmp_path, ROOMS, train=train, test=[[100, 101, 102], [103, 104]])
    all_train = {s for f in train for s in f}

    def dm(**extra):
        return GQNDataModule(str(tmp_path), ROOMS, batch_size=2, context_size=3, num_workers=0, **kw, **extra)

    assert dm().validation_split.level == layout
    val = scene_ids(dm().stream("val", batch_size=2, context_size=3), 1)
    assert val and len(val) == len(set(val))
    for shards in (1, 2, 3, 4, 8):  # ranks x workers: every shard layout reads the complement of validation
        seen = scene_ids(dm().stream("train", batch_size=2, context_size=3), shards)
        assert sorted(seen) == sorted(all_train - set(val)), shards
        assert sorted(scene_ids(dm().stream("val", batch_size=2, context_size=3), shards)) == sorted(val)
    assert not set(val) & {s for s in range(100, 105)}, "validation read the test split"
    assert scene_ids(dm(seed=7).stream("val", batch_size=2, context_size=3), 1) == val, "depends on the train seed"
    if layout == "scenes":
        assert 0.1 < len(val) / len(all_train) < 0.5
    other = scene_ids(dm(split_seed=1).stream("val", batch_size=2, context_size=3), 1)
    assert sorted(other) != sorted(val)


def test_loaders_never_read_a_test_file_and_val_batches_hold_only_validation_scenes(tmp_path):
    write_dataset(tmp_path, ROOMS, train=[list(range(i * 4, i * 4 + 4)) for i in range(5)],
                  test=[[100, 101], [102, 103]])
    dm = GQNDataModule(str(tmp_path), ROOMS, batch_size=3, context_size=2, num_workers=2, val_files=1)
    dm.setup("fit")
    assert not any("/test/" in f for f in dm.validation_split.train_files + dm.validation_split.val_files)
    val_ids = {s for b in dm.val_dataloader() for s, _ in scenes_views(b)}
    assert val_ids == {s for f in dm.validation_split.val_files for s in scene_ids_of_file(f)}
    train_ids = {s for b in _take(dm.train_dataloader(), 12) for s, _ in scenes_views(b)}
    assert train_ids and not train_ids & val_ids and max(train_ids) < 100
    assert {s for b in dm.test_dataloader() for s, _ in scenes_views(b)} == {100, 101, 102, 103}


def scene_ids_of_file(path) -> list[int]:
    return [int(round(float(parse_scene(d)[1][0, 0]))) for _, d in iter_records(path)]


def _take(loader, n):
    for i, batch in enumerate(loader):
        if i == n:
            return
        yield batch


def test_bad_validation_settings_say_what_to_do(tmp_path):
    from data_modules.errors import GQNDataError

    with pytest.raises(GQNDataError, match="val_files=3 but the train split has 2 file.*use 1 to 1, or"):
        carve_validation(["a", "b"], 0.02, 3, 0)
    with pytest.raises(GQNDataError, match="val_fraction must be in"):
        carve_validation(["a", "b"], 0.0, None, 0)


# ------------------------------------------------------------------------------------------ synthetic data
def test_supersampling_antialiases_edges_and_masks_are_coverage():
    """A sphere's silhouette: one ray per pixel gives two colours; 4x4 rays give the coverage in between."""
    world = World(objects=[Sphere(np.array([2.0, 0.0, 0.0]), 0.5, np.array([1.0, 1.0, 1.0]))], ambient=1.0,
                  shadows=False)
    cameras = np.array([[0.0, 0.0, 0.0, 0.0, 0.0]], np.float32)
    aliased, hard = render_views(world, cameras, 32, samples=1, return_objects=True)
    smooth, soft = render_views(world, cameras, 32, samples=4, return_objects=True)
    assert set(np.unique(aliased[..., 0])) == {0, 255} and set(np.unique(hard)) == {0, 255}
    edge = (soft > 0) & (soft < 255)
    assert edge.sum() > 20  # the silhouette's pixels are partly covered
    # white sphere on black: a pixel's brightness is the fraction of it the sphere covers
    assert np.abs(smooth[..., 0].astype(int) - soft.astype(int)).max() <= 1
    assert abs(int((soft >= 128).sum()) - int((hard > 0).sum())) < 0.1 * (hard > 0).sum()


def test_synth_writes_sidecars_that_match_the_records(tmp_path):
    root = tmp_path / "synthetic_rooms"
    card = synthesize(root, "rooms", train_scenes=4, test_scenes=3, seed=3, image_size=32, views=5,
                      scenes_per_file=2, workers=1, log=lambda *_: None)
    assert card["sampling"].startswith("2x2") and card["settings"]["objects"] is True
    for record_file in sorted(root.glob("*/*.tfrecord")):
        table = load_sidecar(str(record_file))
        offsets = [o for o, _ in iter_records(record_file)]
        assert sorted(table) == offsets, record_file
        masks, empty = table[offsets[0]]
        assert masks.shape == (5, 32, 32) and empty.shape == (5, 32, 32, 3)
    dm = GQNDataModule(str(tmp_path), "synthetic_rooms", batch_size=3, context_size=2, num_workers=0)
    batch = next(iter(dm.test_dataloader()))
    mask, empty, target = batch["query_object_mask"], batch["query_empty_room"], batch["query_images"]
    assert mask.shape == (3, 1, 32, 32) and empty.shape == (3, 3, 32, 32)
    objects = metrics.object_pixels(mask).expand_as(target)
    diff = (empty - target).abs()
    assert objects.any()
    # the empty-room render is the query view without its objects: equal up to JPEG and shadows off the objects
    assert diff[~objects].median() < 0.03 and diff[objects].mean() > 0.05
    data = sidecar_path(next(root.glob("train/*.tfrecord")))
    assert data.parent.parent.name == "objects" and data.suffix == ".npz"


def test_twin_record_files_never_share_a_sidecar(tmp_path):
    """``x.tfrecord`` beside ``x.tfrecords``: each gets its own sidecar (``x.tfrecords.npz`` first), a ``x.npz`` that
    names its record file is only that file's, and one that does not is refused instead of pairing one file's
    masks with the other's records by byte offset."""
    for seed, name in ((0, "a"), (1, "b")):
        synthesize(tmp_path / name, "rooms", train_scenes=2, test_scenes=3, seed=seed, image_size=32, views=4,
                   scenes_per_file=3, workers=1, log=lambda *_: None)
    a = tmp_path / "a" / "test" / "001-of-001.tfrecord"
    b = tmp_path / "b" / "test" / "001-of-001.tfrecord"
    twin = a.with_suffix(".tfrecords")
    shutil.copyfile(b, twin)  # other scenes, the same first offset (0)
    load_sidecar.cache_clear()
    own = load_sidecar(str(a))
    assert sorted(own) == [o for o, _ in iter_records(a)]
    assert load_sidecar(str(twin)) is None  # a.npz says it is 001-of-001.tfrecord's
    # its own sidecar, named after the whole file
    shutil.copyfile(sidecar_path(b), exact_sidecar_path(twin))  # (it names 001-of-001.tfrecord: not checked)
    load_sidecar.cache_clear()
    theirs = load_sidecar(str(twin))
    assert sorted(theirs) == [o for o, _ in iter_records(b)]
    assert not np.array_equal(theirs[0][0], own[0][0])
    assert sorted(load_sidecar(str(a))) == sorted(own)
    # a sidecar that does not say whose it is, beside twins: refused for both files
    exact_sidecar_path(twin).unlink()
    side = sidecar_path(a)
    with np.load(side) as z:
        assert str(z["record"]) == a.name
        unnamed = {k: z[k] for k in z.files if k != "record"}
    np.savez_compressed(side, **unnamed)
    for path in (a, twin):
        load_sidecar.cache_clear()
        with pytest.raises(GQNDataError, match=r"could belong to 001-of-001\.tfrecord or to 001-of-001\.tfrecords$"):
            load_sidecar(str(path))
    shutil.copyfile(sidecar_path(b), exact_sidecar_path(twin))  # the twin has its own: a.npz is a's
    load_sidecar.cache_clear()
    assert sorted(load_sidecar(str(a))) == sorted(own)
    exact_sidecar_path(twin).unlink()
    # a.npz naming a: never the twin's, even when a has a sidecar of its own
    np.savez_compressed(side, **unnamed, record=np.array(a.name))
    shutil.copyfile(side, exact_sidecar_path(a))
    load_sidecar.cache_clear()
    assert load_sidecar(str(twin)) is None
    exact_sidecar_path(a).unlink()
    twin.unlink()  # without a twin, an unnamed sidecar is the file's, as before
    load_sidecar.cache_clear()
    assert sorted(load_sidecar(str(a))) == sorted(own)
    load_sidecar.cache_clear()


def test_remote_twins_are_told_apart_by_the_record_a_sidecar_names(tmp_path):
    """Over a URL (fsspec memory://) a split is not listed for twins: a NAME.npz naming NAME.tfrecord serves only
    NAME.tfrecord, its twin NAME.tfrecords gets nothing (or its own NAME.tfrecords.npz); a renamed pair (a name of no
    file there) still pairs."""
    import fsspec

    synthesize(tmp_path / "a", "rooms", train_scenes=2, test_scenes=2, seed=0, image_size=32, views=4,
               scenes_per_file=2, workers=1, log=lambda *_: None)
    local = tmp_path / "a" / "test" / "001-of-001.tfrecord"
    fs = fsspec.filesystem("memory")
    base = f"/twins-{tmp_path.name}"
    fs.pipe(f"{base}/test/001-of-001.tfrecord", local.read_bytes())
    fs.pipe(f"{base}/test/001-of-001.tfrecords", local.read_bytes())
    fs.pipe(f"{base}/objects/test/001-of-001.npz", sidecar_path(local).read_bytes())
    url = f"memory://{base}/test/001-of-001.tfrecord"
    load_sidecar.cache_clear()
    assert sorted(load_sidecar(url)) == [o for o, _ in iter_records(local)]
    assert load_sidecar(url + "s") is None  # a.npz names 001-of-001.tfrecord, which is there
    fs.pipe(f"{base}/objects/test/001-of-001.tfrecords.npz", sidecar_path(local).read_bytes())
    load_sidecar.cache_clear()
    assert sorted(load_sidecar(url + "s")) == [o for o, _ in iter_records(local)]
    fs.rm(f"{base}/test/001-of-001.tfrecords")
    fs.mv(f"{base}/test/001-of-001.tfrecord", f"{base}/test/renamed.tfrecord")
    fs.mv(f"{base}/objects/test/001-of-001.npz", f"{base}/objects/test/renamed.npz")
    load_sidecar.cache_clear()
    assert sorted(load_sidecar(f"memory://{base}/test/renamed.tfrecord")) == [o for o, _ in iter_records(local)]
    load_sidecar.cache_clear()


@pytest.mark.parametrize("damage,said", [
    ("text", "not an .npz archive (it starts with b'nope')"),
    ("cut", "cannot be read: BadZipFile"),
    ("no-masks", "no masks array (it holds offsets, empty)"),
    ("disagree", "arrays disagree: offsets (2,), masks (2, 4, 32, 32), empty (2, 4, 32, 16, 3)"),
    ("objects", "cannot be read: ValueError: Object arrays cannot be loaded when allow_pickle=False"),
])
def test_an_unreadable_sidecar_is_one_line(tmp_path, damage, said):
    synthesize(tmp_path / "a", "rooms", train_scenes=2, test_scenes=2, seed=0, image_size=32, views=4,
               scenes_per_file=2, workers=1, log=lambda *_: None)
    record = tmp_path / "a" / "test" / "001-of-001.tfrecord"
    side = sidecar_path(record)
    with np.load(side) as z:
        arrays = {k: z[k] for k in z.files}
    if damage == "text":
        side.write_text("nope")
    elif damage == "cut":
        side.write_bytes(side.read_bytes()[:200])
    elif damage == "no-masks":
        np.savez_compressed(side, offsets=arrays["offsets"], empty=arrays["empty"])
    elif damage == "disagree":
        np.savez_compressed(side, **{**arrays, "empty": arrays["empty"][:, :, :, :16]})
    else:
        np.savez_compressed(side, **{**arrays, "record": np.array([{"not": "a name"}], dtype=object)})
    load_sidecar.cache_clear()
    with pytest.raises(GQNDataError) as err:
        load_sidecar(str(record))
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"object sidecar {side} ") and said in line, line
    assert "write it again" in err.value.fix
    load_sidecar.cache_clear()


def test_verify_checks_sidecars_against_their_records(tmp_path, capsys):
    """gqn-data verify: a good dataset's sidecars pass; a damaged record is one problem (its masks are not a
    second); a file cut short is one problem; masks of fewer views than a record's frames are one."""
    from gqn import data_cli

    root = tmp_path / "synthetic_rooms"
    synthesize(root, "rooms", train_scenes=2, test_scenes=4, seed=2, image_size=32, views=4, scenes_per_file=4,
               workers=1, log=lambda *_: None)
    path = root / "test" / "001-of-001.tfrecord"
    offsets = [o for o, _ in iter_records(path)]

    def problems():
        code = data_cli.main(["verify", str(root)])
        lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("problem:")]
        assert code == (1 if lines else 0)
        return lines

    assert problems() == []
    good = path.read_bytes()
    damaged = bytearray(good)
    damaged[offsets[1] + 12 + 40] ^= 0x40
    path.write_bytes(bytes(damaged))
    assert [("CRC" in p, "object sidecar" in p) for p in problems()] == [(True, False)]
    path.write_bytes(good[: offsets[3] + 20])
    assert [("truncated" in p, "object sidecar" in p) for p in problems()] == [(True, False)]
    # a record whose framing and CRCs are intact but whose bytes are no scene
    from gqn.synthetic.writer import _framed

    path.write_bytes(_framed(b"\xff" * (offsets[1] - 16)) + good[offsets[1]:])  # the later offsets unchanged
    assert [("object sidecar" in p) for p in problems()] == [False]
    path.write_bytes(good)
    side = sidecar_path(path)
    with np.load(side) as z:
        arrays = {k: z[k] for k in z.files}
    np.savez_compressed(side, **{**arrays, "masks": arrays["masks"][:, :3], "empty": arrays["empty"][:, :3]})
    (only,) = problems()
    assert f"has 3 views of masks for the record at byte {offsets[0]}, which has 4 frames (4 such records)" in only


def test_a_sidecar_without_the_query_views_masks_stops_the_reader(tmp_path):
    """A sidecar that covers the record but not the query's view (masks of no views here) is an error in the
    reader, not an IndexError or another view's masks."""
    root = tmp_path / "synthetic_rooms"
    synthesize(root, "rooms", train_scenes=2, test_scenes=2, seed=4, image_size=32, views=4, scenes_per_file=2,
               workers=1, log=lambda *_: None)
    side = sidecar_path(root / "test" / "001-of-001.tfrecord")
    with np.load(side) as z:
        arrays = {k: z[k] for k in z.files}
    np.savez_compressed(side, **{**arrays, "masks": arrays["masks"][:, :0], "empty": arrays["empty"][:, :0]})
    load_sidecar.cache_clear()
    dm = GQNDataModule(str(tmp_path), "synthetic_rooms", batch_size=2, context_size=2, num_workers=0)
    with pytest.raises(GQNDataError, match=r"has no masks for the record at byte 0 view \d: it was written for other"):
        next(iter(dm.test_dataloader()))
    load_sidecar.cache_clear()


def test_data_without_sidecars_has_no_object_keys(tmp_path):
    synthesize(tmp_path / "synthetic_rooms", "rooms", train_scenes=2, test_scenes=2, image_size=32, views=4,
               scenes_per_file=1, workers=1, objects=False, samples=1, log=lambda *_: None)
    assert not (tmp_path / "synthetic_rooms" / "objects").exists()
    dm = GQNDataModule(str(tmp_path), "synthetic_rooms", batch_size=2, context_size=2, num_workers=0)
    assert "query_object_mask" not in next(iter(dm.test_dataloader()))


# ------------------------------------------------------------------------------------------ object metric
def constructed_batch(b=4, m=3, s=8):
    g = torch.Generator().manual_seed(0)
    target = torch.rand(b, 3, s, s, generator=g)
    mask = torch.zeros(b, 1, s, s)
    mask[:, :, 2:5, 3:6] = 1.0
    mask[-1] = 0.0  # the last query view shows no object
    empty = torch.rand(b, 3, s, s, generator=g)
    return {
        "context_images": torch.rand(b, m, 3, s, s, generator=g), "context_poses": torch.randn(b, m, 7, generator=g),
        "query_images": target, "query_poses": torch.randn(b, 7, generator=g),
        "query_object_mask": mask, "query_empty_room": empty,
    }


def expected_object_psnr(img, target, mask):
    out = []
    for i in range(len(img)):
        sel = mask[i, 0] >= 0.5
        if not sel.any():
            out.append(float("nan"))
            continue
        mse = ((img[i] - target[i])[:, sel] ** 2).mean().clamp_min(1e-4)
        out.append(-10 * math.log10(float(mse)))
    return torch.tensor(out)


@pytest.mark.parametrize("render", ["empty_room", "mean_view", "perfect"])
def test_object_psnr_on_constructed_images(render, monkeypatch):
    from gqn.gqn_module import GQNModule

    model = {"_target_": "gqn.model.GQN", "image_size": 8, "hidden_channels": 4, "canvas_channels": 4,
             "num_steps": 1, "encoder": {"_target_": "gqn.model.Tower", "image_size": 8, "channels": 4}}
    schedule = {"lr_init": 1e-3, "lr_final": 1e-3, "lr_steps": 1, "sigma_init": 0.5, "sigma_final": 0.5,
                "sigma_steps": 1}
    module = GQNModule(model, {"_target_": "torch.optim.Adam", "_partial_": True}, schedule)
    batch = constructed_batch()
    image = {"empty_room": batch["query_empty_room"], "mean_view": batch["context_images"].mean(1),
             "perfect": batch["query_images"]}[render]
    monkeypatch.setattr(module.model, "render", lambda *a, **k: image.clone())
    values = module.evaluation_metrics(batch)
    model = values["object_psnr_model"]
    assert model[-1].isnan() and values["object_psnr_empty_room"][-1].isnan()
    if render == "perfect":
        assert torch.allclose(model[:-1], torch.full((3,), 40.0))  # the cap, from the MSE floor
    else:
        assert torch.equal(model[:-1], values[f"object_psnr_{render}"][:-1])
    want = expected_object_psnr(image, batch["query_images"], batch["query_object_mask"])
    assert torch.allclose(model[:-1], want[:-1].float(), atol=1e-4)
    assert torch.allclose(values["object_fraction"], torch.tensor([9 / 64] * 3 + [0.0]))


def test_eval_reports_object_metrics_with_spreads_and_draws(tmp_path, data_root, capsys, monkeypatch):
    """gqn-eval on data with sidecars: object-pixel PSNRs, standard errors, strict JSON, context draws."""
    monkeypatch.chdir(tmp_path)  # in-process runs: their relative defaults (paths.output_dir) under tmp_path
    from test_cli import tiny

    run = tmp_path / "run"
    run_main("gqn-train", tiny(data_root, run, "trainer.max_steps=2", "callbacks=none"), capsys, check=True)
    out = tmp_path / "eval"
    _, stdout = _eval_here(capsys, out, f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"paths.data_dir={data_root}",
                           "num_workers=0", "draws=2")
    text = (out / "metrics.json").read_text()
    report = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    m, spread = report["metrics"], report["spread"]
    assert report["draws"] == 2 and report["scenes"] == 8 and report["split"] == "test"
    for key in ("object_psnr_model", "object_psnr_nearest_view", "object_psnr_mean_view", "object_psnr_empty_room",
                "object_psnr_gain_over_mean_view_db", "psnr_gain_over_nearest_view_db", "psnr_model"):
        assert math.isfinite(m[key]), key
        assert spread[key]["se"] > 0 and spread[key]["n"] >= 2, key
        lo, hi = spread[key]["ci95"]
        assert lo < m[key] < hi
    assert m["object_psnr_gain_over_mean_view_db"] == pytest.approx(
        m["object_psnr_model"] - m["object_psnr_mean_view"], abs=1e-6)
    assert "object-pixel PSNR" in stdout


def _eval_here(capsys, out: Path, *args) -> tuple[dict, str]:
    """gqn-eval in this process (run_main: ~5 s of imports less than a subprocess), its run directory ``out``: its
    metrics.json and stdout."""
    _, stdout, _ = run_main("gqn-eval", [f"hydra.run.dir={out}", *args], capsys, check=True)
    return json.loads((out / "metrics.json").read_text()), stdout


def test_eval_on_the_validation_split_reproduces_training_validation(tmp_path, data_root, capsys, monkeypatch):
    """gqn-eval split=val scores the scenes training validated on, with the same fixed views: its PSNRs are the
    ones the training run logged (fp32 both), with no option repeated: the checkpoint carries the run's seed and
    validation carve-out and context size. The test split's scores differ (5 views drawn with seed 0). Then a baseline
    checkpoint scored on the same scenes and views, paired by scene."""
    monkeypatch.chdir(tmp_path)  # in-process runs: their relative defaults (paths.output_dir) under tmp_path
    import csv

    from test_cli import tiny

    run = tmp_path / "run"
    run_main("gqn-train", tiny(data_root, run, "callbacks=none", "trainer.precision=32-true", "seed=7",
                               "data.val_scenes=3", "data.eval_context_size=3"), capsys, check=True)
    rows = list(csv.DictReader((run / "csv" / "version_0" / "metrics.csv").read_text().splitlines()))
    logged = next(r for r in rows if r.get("val/psnr_model"))
    reports, stdout = {}, {}
    for split in ("val", "test"):
        out = tmp_path / f"eval_{split}"
        reports[split], stdout[split] = _eval_here(capsys, out, f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
                                                   f"paths.data_dir={data_root}", "num_workers=0", f"split={split}")
    val, test = reports["val"], reports["test"]
    assert stdout["val"].startswith("the training run's validation split (val_files=2, val_fraction=0.02, "
                                    "split_seed=0, val_scenes=3), 3 context views drawn with seed 7\n"
                                    "3 val scenes x 1 context draw(s), 3 context views"), stdout["val"]
    assert stdout["test"].startswith("8 test scenes x 1 context draw(s), 5 context views"), stdout["test"]
    assert (val["split"], val["scenes"], val["seed"]) == ("val", 3, 7) and (test["scenes"], test["seed"]) == (8, 0)
    for key in ("psnr_model", "psnr_nearest_view", "psnr_mean_view", "object_psnr_model"):
        assert val["metrics"][key] == pytest.approx(float(logged[f"val/{key}"]), abs=1e-3), key
    assert val["metrics"]["psnr_nearest_view"] != pytest.approx(test["metrics"]["psnr_nearest_view"], abs=1e-3)
    # another seed draws other views of the same three scenes; an option on the command line wins
    out = tmp_path / "eval_val_seed"
    other, _ = _eval_here(capsys, out, f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"paths.data_dir={data_root}",
                          "num_workers=0", "split=val", "seed=8", "data.val_scenes=2")
    assert (other["seed"], other["scenes"]) == (8, 2)
    assert "val_scenes" not in other["split_settings"] and "seed 8" in other["split_settings"]

    # baseline_ckpt_path: both checkpoints scored on the same batches (this run's split and seed). The baseline's
    # numbers are its own (as gqn-eval of it alone on those views gives them), the paired differences are this
    # minus the baseline scene by scene, and a checkpoint against itself differs by exactly nothing
    base = tmp_path / "base"
    run_main("gqn-train", tiny(data_root, base, "callbacks=none", "trainer.precision=32-true", "seed=2",
                               "data.val_scenes=3"), capsys, check=True)
    ckpt, base_ckpt = run / "checkpoints" / "last.ckpt", base / "checkpoints" / "last.ckpt"

    def evaluate(name, *args):
        return _eval_here(capsys, tmp_path / name, f"paths.data_dir={data_root}", "num_workers=0", "split=val", *args)

    alone, _ = evaluate("alone", f"ckpt_path={base_ckpt}", "seed=7", "context_size=3")  # this run's views
    paired, stdout = evaluate("paired", f"ckpt_path={ckpt}", f"baseline_ckpt_path={base_ckpt}")
    same, _ = evaluate("same", f"ckpt_path={ckpt}", f"baseline_ckpt_path={ckpt}")
    m = paired["metrics"]
    assert paired["baseline"]["checkpoint"] == str(base_ckpt) and paired["scenes"] == 3
    for key in ("psnr_model", "object_psnr_model", "ssim_model"):
        assert m[key] == pytest.approx(val["metrics"][key], abs=1e-5), key
        assert m[f"baseline/{key}"] == pytest.approx(alone["metrics"][key], abs=1e-5), key
        assert m[f"paired/{key}"] == pytest.approx(m[key] - m[f"baseline/{key}"], abs=1e-5), key
        assert same["metrics"][f"paired/{key}"] == 0 and same["spread"][f"paired/{key}"]["se"] == 0, key
    assert m["paired/psnr_model"] != 0
    assert "this - baseline, paired by scene: PSNR " in stdout

