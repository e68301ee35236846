"""Sampling, determinism, resizing and sharding of the GQN scene stream."""

from __future__ import annotations

import contextlib
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest
import torch
from records_helper import (
    camera,
    check_contract,
    make_example,
    scene_example,
    scenes_views,
    write_dataset,
    write_file,
    write_split,
)
from torch.utils.data import DataLoader

from data_modules import DATASETS, GQNDataModule, SceneStream, to_float
from data_modules.stream import GQNDataLoader

ROOMS = "rooms_ring_camera"  # 64 px, 10 frames per scene


@pytest.fixture
def rooms(tmp_path):
    """12 train scenes (ids 0-11) in 3 files, 9 test scenes (ids 100-108) in 3 files."""
    write_dataset(tmp_path, ROOMS, train=[[0, 1, 2, 3], [4, 5, 6, 7, 8], [9, 10, 11]],
                  test=[[100, 101, 102], [103, 104], [105, 106, 107, 108]])
    return tmp_path


def views_by_scene(batches) -> dict[int, list[int]]:
    out = {}
    for batch in batches:
        for scene, views in scenes_views(batch):
            assert scene not in out, f"scene {scene} delivered twice"
            out[scene] = views
    return out


def test_each_scene_gets_its_own_view_permutation(rooms):
    dm = GQNDataModule(str(rooms), ROOMS, batch_size=8, context_size=5, num_workers=0)
    batch = next(iter(dm.train_dataloader()))
    check_contract(batch, 8, 5, 64)
    items = scenes_views(batch)
    assert len({s for s, _ in items}) == 8
    # one index set shared by every scene is the classic bug: require (nearly) all to differ
    assert len({tuple(v) for _, v in items}) >= 7, items
    assert len({frozenset(v[:-1]) for _, v in items}) >= 7, items
    assert len({v[-1] for _, v in items}) >= 3, "the query view is the same for every scene"


def test_evaluation_views_also_differ_between_scenes(rooms):
    dm = GQNDataModule(str(rooms), ROOMS, batch_size=9, context_size=5, num_workers=0, val_files=1)
    views = views_by_scene(dm.test_dataloader())
    assert sorted(views) == list(range(100, 109))
    assert len({tuple(v) for v in views.values()}) >= 8, views
    views = views_by_scene(dm.val_dataloader())  # the validation carve-out: one of the train files
    assert sorted(views) in ([0, 1, 2, 3], [4, 5, 6, 7, 8], [9, 10, 11])
    assert len({tuple(v) for v in views.values()}) == len(views), views


def test_context_size_range_draws_m_per_batch(rooms):
    dm = GQNDataModule(str(rooms), ROOMS, batch_size=4, context_size=[1, 5], num_workers=0)
    ms = []
    for batch in islice(dm.train_dataloader(), 40):
        m = batch["context_images"].shape[1]
        check_contract(batch, 4, m, 64)  # one M for every item of the batch
        assert 1 <= m <= 5
        assert len(scenes_views(batch)) == 4
        ms.append(m)
    assert len(set(ms)) >= 3, Counter(ms)


def test_fixed_context_size_and_eval_default_to_the_largest(rooms):
    dm = GQNDataModule(str(rooms), ROOMS, batch_size=4, context_size=[2, 6], num_workers=0, val_scenes=5,
                       val_files=2)
    assert {b["context_images"].shape[1] for b in dm.val_dataloader()} == {6}
    dm = GQNDataModule(str(rooms), ROOMS, batch_size=4, context_size=3, num_workers=0)
    assert {b["context_images"].shape[1] for b in islice(dm.train_dataloader(), 10)} == {3}


def test_validation_is_identical_on_two_passes(rooms):
    dm = GQNDataModule(str(rooms), ROOMS, batch_size=4, context_size=[1, 5], num_workers=0, val_scenes=6,
                       val_files=2)
    loader = dm.val_dataloader()
    first, second = list(loader), list(loader)
    assert len(first) == len(second) == 2  # 6 scenes in batches of 4
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    # the first val_scenes scenes of the two held-out train files, in file order
    by_file = {"1": [0, 1, 2, 3], "2": [4, 5, 6, 7, 8], "3": [9, 10, 11]}
    held_out = [s for f in dm.validation_split.val_files for s in by_file[Path(f).name.split("-")[0].lstrip("0")]]
    assert [s for batch in first for s, _ in scenes_views(batch)] == held_out[:6]
    # a freshly built loader (e.g. after a restart) gives the same views too
    again = list(GQNDataModule(str(rooms), ROOMS, batch_size=4, context_size=[1, 5], num_workers=0,
                               val_scenes=6, val_files=2).val_dataloader())
    assert all(torch.equal(a["query_images"], b["query_images"]) for a, b in zip(first, again))


def test_fixed_views_do_not_depend_on_sharding(rooms):
    files = GQNDataModule(str(rooms), ROOMS, 2, 4, num_workers=0).files("test")  # 3 files

    def views(world):  # 1 and 2 shards: file-level sharding; 4 shards: record-level sharding
        out = {}
        for rank in range(world):
            stream = SceneStream(files, DATASETS[ROOMS], batch_size=2, context_size=4, fixed_views=True,
                                 rank=rank, world_size=world)
            out.update(views_by_scene(to_float(b) for b in stream))
        return out

    one = views(1)
    assert sorted(one) == list(range(100, 109))
    assert views(2) == one
    assert views(4) == one


def test_training_reshuffles_every_epoch(rooms):
    dm = GQNDataModule(str(rooms), ROOMS, batch_size=4, context_size=3, num_workers=0)
    batches = list(islice(dm.train_dataloader(), 6))  # 12 scenes: two epochs of 3 batches
    order = [s for batch in batches for s, _ in scenes_views(batch)]
    epoch1, epoch2 = order[:12], order[12:]
    assert sorted(epoch1) == sorted(epoch2) == list(range(12))  # each scene once per epoch
    assert epoch1 != list(range(12)), "training scenes come in file order"
    assert epoch1 != epoch2, "the same order every epoch"


def test_image_size_resizes_128_to_64(tmp_path):
    name = "rooms_free_camera_with_object_rotations"
    write_dataset(tmp_path, name, train=[[0, 1, 2]], test=[[100, 101]])
    dm = GQNDataModule(str(tmp_path), name, batch_size=2, context_size=4, image_size=64, num_workers=0)
    for batch in (next(iter(dm.train_dataloader())), next(iter(dm.test_dataloader()))):
        check_contract(batch, 2, 4, 64)
        scenes_views(batch)  # the resized frames keep their colour and stay paired with their poses
    native = GQNDataModule(str(tmp_path), name, batch_size=2, context_size=4, num_workers=0)
    check_contract(next(iter(native.test_dataloader())), 2, 4, 128)


# ------------------------------------------------------------------------------------------ sharding
def run_ranks(files, world=2, workers=2, batch_size=2, loader_class=DataLoader, **kw) -> Counter:
    """Every scene id delivered by ``world`` simulated ranks, each with a DataLoader of ``workers``."""
    seen = Counter()
    for rank in range(world):
        stream = SceneStream([str(f) for f in files], DATASETS[ROOMS], batch_size=batch_size, context_size=2,
                             repeat=False, rank=rank, world_size=world, **kw)
        loader = loader_class(stream, batch_size=None, num_workers=workers)
        for batch in loader:
            batch = to_float(batch)
            assert set(batch) == {"context_images", "context_poses", "query_images", "query_poses"}  # nothing in-band
            assert batch["query_images"].shape[1:] == (3, 64, 64)
            seen.update(scene for scene, _ in scenes_views(batch))
    return seen


@pytest.mark.parametrize("shuffle", [False, True], ids=["ordered", "shuffled"])
def test_sharding_more_files_than_shards(tmp_path, shuffle):
    # 6 files (one of them empty) for 2 ranks x 2 workers = 4 shards: files are dealt out
    sizes = [3, 1, 0, 4, 2, 5]
    ids, files, first = [], [], 0
    for n in sizes:
        files.append(list(range(first, first + n)))
        ids += files[-1]
        first += n
    paths = write_split(tmp_path, ROOMS, "train", files)
    seen = run_ranks(paths, shuffle=shuffle, shuffle_buffer=4)
    assert seen == Counter(ids)  # every scene exactly once


@pytest.mark.parametrize("shuffle", [False, True], ids=["ordered", "shuffled"])
def test_sharding_fewer_files_than_shards(tmp_path, shuffle):
    # 2 files for 4 shards: records are dealt out
    paths = write_split(tmp_path, ROOMS, "train", [list(range(0, 7)), list(range(7, 13))])
    seen = run_ranks(paths, shuffle=shuffle, shuffle_buffer=4)
    assert seen == Counter(range(13))


def test_sharding_across_the_workers_of_gqn_data_loader(tmp_path):
    # GQNDataLoader's 2 workers per rank (which send their counts of skipped scenes in-band with every batch and
    # at the end of the pass): still every scene exactly once, and no in-band message reaches the batches
    paths = write_split(tmp_path, ROOMS, "train", [list(range(0, 9)), list(range(9, 20)), list(range(20, 31))])
    assert run_ranks(paths, loader_class=GQNDataLoader, shuffle=True, shuffle_buffer=4) == Counter(range(31))


def test_worker_batches_equal_in_process_batches(rooms):
    # one worker is one shard, like no worker: the same batches, bit for bit, M varying per batch, over two
    # passes of 6 batches (the second reshuffled)
    def batches(workers):
        dm = GQNDataModule(str(rooms), ROOMS, batch_size=2, context_size=[1, 5], num_workers=workers)
        return list(islice(dm.train_dataloader(), 12))

    here, there = batches(0), batches(1)
    # the poses (passed through to_float) came through the worker's queue, in shared memory, or not at all
    assert not any(b["query_poses"].is_shared() for b in here)
    assert all(b["query_poses"].is_shared() for b in there)
    assert len({b["context_images"].shape[1] for b in here}) > 1
    for a, b in zip(here, there, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_draw_the_same_context_size_per_step(tmp_path, workers):
    """DDP: every rank's i-th batch has the same M (a step waits for the slowest rank: independent draws would make
    each step as slow as the largest of them), over pass ends that come at different batches on different ranks
    (13 scenes in 2 files: shards of unequal size), while the ranks still read different scenes."""
    paths = write_split(tmp_path, ROOMS, "train", [list(range(0, 7)), list(range(7, 13))])
    per_rank = []
    for rank in range(2):
        stream = SceneStream([str(p) for p in paths], DATASETS[ROOMS], batch_size=2, context_size=(1, 5),
                             shuffle=True, shuffle_buffer=4, repeat=True, drop_last=True, rank=rank, world_size=2)
        stream.epoch = 7  # as a resumed run sets it (its global step)
        loader = DataLoader(stream, batch_size=None, num_workers=workers)
        per_rank.append([to_float(b) for b in islice(loader, 24)])
    ms = [[b["context_images"].shape[1] for b in batches] for batches in per_rank]
    assert ms[0] == ms[1] and len(set(ms[0])) >= 3, ms
    scenes = [[s for b in batches[:2] for s, _ in scenes_views(b)] for batches in per_rank]
    assert not set(scenes[0]) & set(scenes[1]), scenes


def test_a_batch_lost_to_corruption_keeps_the_ranks_draws_together(tmp_path):
    """A batch one rank loses to corrupt scenes (data.skip_corrupt) does not use up a draw: that rank's next batch
    has the M the other rank's next batch has."""
    bad = make_example([b"not a jpeg"] * 10, [c for v in range(10) for c in camera(99, v)])
    good = write_split(tmp_path, ROOMS, "train", [list(range(0, 12))])[0]
    lossy = write_file(tmp_path / "lossy" / "2-of-2.tfrecord", [bad, bad] + [scene_example(s, 10, 64)
                                                                             for s in range(20, 32)])
    ms = []
    for rank in range(2):
        stream = SceneStream([str(good), str(lossy)], DATASETS[ROOMS], batch_size=2, context_size=(1, 5),
                             skip_corrupt=True, rank=rank, world_size=2)
        with pytest.warns(UserWarning, match="skipping corrupt scene") if rank else contextlib.nullcontext():
            ms.append([b["context_images"].shape[1] for b in stream])
    assert len(ms[0]) == 6 and ms[0] == ms[1] and len(set(ms[0])) >= 2, ms


def test_sharding_with_a_scene_cap(tmp_path):
    # validation's max_scenes: exactly the first N scenes, each once, however many shards
    paths = write_split(tmp_path, ROOMS, "test", [list(range(0, 5)), list(range(5, 9)), list(range(9, 14))])
    assert run_ranks(paths, max_scenes=10, fixed_views=True) == Counter(range(10))


@pytest.mark.parametrize("workers", [0, 2])
def test_several_query_views_per_training_scene(rooms, workers):
    """num_queries=K: [B, K, ...] queries, each a frame of its own scene with its own pose, no view repeated in
    a scene (context or query), from worker processes too; evaluation keeps one query per scene."""
    from records_helper import check_frame

    dm = GQNDataModule(str(rooms), ROOMS, batch_size=3, context_size=[2, 4], num_workers=workers, num_queries=3,
                       val_files=1)
    for batch in islice(dm.train_dataloader(), 4):
        m = batch["context_images"].shape[1]
        assert batch["query_images"].shape == (3, 3, 3, 64, 64) and batch["query_poses"].shape == (3, 3, 7)
        for i in range(3):
            seen = [check_frame(img, pose) for img, pose in zip(batch["context_images"][i], batch["context_poses"][i])]
            seen += [check_frame(img, pose) for img, pose in zip(batch["query_images"][i], batch["query_poses"][i])]
            assert len({s for s, _ in seen}) == 1 and len({v for _, v in seen}) == m + 3, seen
    check_contract(next(iter(dm.val_dataloader())), 3, 4, 64)
    with pytest.raises(Exception, match="num_queries=8 needs 12 views"):
        GQNDataModule(str(rooms), ROOMS, batch_size=3, context_size=[2, 4], num_workers=0, num_queries=8)
