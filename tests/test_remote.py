"""Remote data dirs through a real Cloud Storage API server on 127.0.0.1 (gcp-storage-emulator).

gcsfs reaches the server through STORAGE_EMULATOR_HOST, as a user's own emulator or proxy would;
nothing here touches the internet. Retries are shortened (GQN_REMOTE_RETRIES/BACKOFF) to keep the
fault tests quick.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import re
import signal
import threading
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from records_helper import record_offsets

from data_modules import GQNDataModule
from data_modules.emulator import Emulator
from data_modules.errors import CorruptRecordError, GQNDataError
from data_modules.remote import RemoteCache, RemoteDataError, call, filesystem, iter_file_records
from data_modules.stream import split_files

NAME = "synthetic_rooms"


@pytest.fixture(scope="module")
def emulator(data_root):
    """The server, holding ``data_root``'s synthetic_rooms (24 train scenes in 3 files, 8 test)."""
    with Emulator() as emu:
        emu.upload(data_root, "")
        yield emu


@pytest.fixture
def gcs(emulator, monkeypatch):
    """The emulator, running and reset, with gcsfs pointed at it and quick retries."""
    if emulator._api is None:
        emulator.start()
    emulator.delay = 0.0
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.host)
    monkeypatch.setenv("GQN_REMOTE_RETRIES", "3")
    monkeypatch.setenv("GQN_REMOTE_BACKOFF", "0.05")
    monkeypatch.delenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", raising=False)
    emulator.reset_counts()
    yield emulator
    if emulator._api is None:
        emulator.start()


def dm(data_dir, **kw) -> GQNDataModule:
    opts = dict(batch_size=4, context_size=(1, 5), num_workers=0, shuffle_buffer=8, seed=3)
    opts.update(kw)
    return GQNDataModule(str(data_dir), NAME, **opts)


def epoch(loader) -> list[dict]:
    loader.dataset.repeat = False
    return list(loader)


def same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


def names(files) -> list[str]:
    return [f.rsplit("/", 1)[-1] for f in files]


# ---------------------------------------------------------------------------------------- reading
def test_listing_gives_the_local_files_as_urls(gcs, data_root):
    for split in ("train", "test"):
        local = split_files(data_root, NAME, split, "")
        assert split_files(f"file://{data_root}", NAME, split, "") == local  # file:// is a local path
        for url in (gcs.url, "https://storage.googleapis.com/gqn-dataset"):
            remote = split_files(url, NAME, split, "")
            assert names(remote) == names(local) and remote == sorted(remote)
            assert all(f.startswith(url.rstrip("/") + f"/{NAME}/{split}/") for f in remote)


def test_emulator_reads_the_same_scenes_and_pixels_as_local(gcs, data_root, tmp_path):
    local, remote = dm(data_root), dm(gcs.url, cache_dir=str(tmp_path / "cache"))
    assert remote.info == local.info  # the dataset card, read from the bucket
    same(epoch(local.train_dataloader()), epoch(remote.train_dataloader()))  # shuffled, seeded
    same(epoch(local.test_dataloader()), epoch(remote.test_dataloader()))
    assert gcs.count("/download/") >= 4  # the records came from the server (3 train files, 1 test)
    https = dm("https://storage.googleapis.com/gqn-dataset")  # the bucket's https form, same objects
    same(epoch(local.test_dataloader()), epoch(https.test_dataloader()))


def test_emulator_with_a_worker_process(gcs, data_root):
    local, remote = dm(data_root, num_workers=1), dm(gcs.url, num_workers=1)
    same(epoch(local.train_dataloader()), epoch(remote.train_dataloader()))


class Batches(L.Callback):
    def __init__(self):
        self.digests = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        h = hashlib.sha256()
        for key in sorted(batch):
            h.update(key.encode() + batch[key].numpy().tobytes())
        self.digests.append(h.hexdigest())


def test_training_through_the_emulator_sees_the_local_batches(gcs, train_cfg, tmp_path):
    from gqn.train import train

    seen = {}
    for where, extra in (("local", []), ("remote", [f"paths.data_dir={gcs.url}", f"data.cache_dir={tmp_path / 'c'}"])):
        probe = Batches()
        train(train_cfg("logger=none", "callbacks=none", "trainer.max_steps=3", *extra), extra_callbacks=[probe])
        seen[where] = probe.digests
    assert len(seen["local"]) == 3 and seen["remote"] == seen["local"]
    assert gcs.count(f"/download/storage/v1/b/gqn-dataset/o/{NAME}/train/") > 0


def test_the_standard_gcs_client_is_used_unless_the_extended_one_is_asked_for(gcs, monkeypatch):
    import gcsfs.core

    fs, path = filesystem("gs://gqn-dataset/x")
    assert path == "gqn-dataset/x" and isinstance(fs, gcsfs.core.GCSFileSystem)
    assert "Extended" not in " ".join(c.__name__ for c in type(fs).__mro__)  # no gRPC bucket-type probe
    monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "true")
    fs, _ = filesystem("gs://gqn-dataset/x")
    assert "ExtendedGcsFileSystem" in [c.__name__ for c in type(fs).__mro__]


# ---------------------------------------------------------------------------------------- the cache
def test_second_epoch_with_the_cache_makes_no_requests_for_cached_files(gcs, data_root, tmp_path):
    remote = dm(gcs.url, cache_dir=str(tmp_path / "cache"))
    first = epoch(remote.test_dataloader()) + epoch(remote.train_dataloader())
    files = names(remote.files("train") + remote.files("test"))
    assert all(gcs.count(f) > 0 for f in files)
    gcs.reset_counts()
    second = epoch(remote.test_dataloader())
    second += epoch(remote.train_dataloader())  # a new stream: the first epoch's shuffle again
    same(first, second)
    assert [gcs.count(f"/o/{NAME}/{s}/{f}") for s in ("train", "test") for f in files] == [0] * 2 * len(files)
    cached = sorted(p.relative_to(tmp_path / "cache").as_posix() for p in (tmp_path / "cache").rglob("*.tfrecord"))
    assert cached == sorted(f"gs/gqn-dataset/{NAME}/{s}/{f}" for s in ("train", "test")
                            for f in names(split_files(data_root, NAME, s, "")))


def test_a_damaged_cached_copy_is_dropped_and_fetched_again(gcs, data_root, tmp_path, caplog):
    url = f"{gcs.url}/{NAME}/train/002-of-003.tfrecord"
    original = (data_root / NAME / "train" / "002-of-003.tfrecord").read_bytes()
    cache = RemoteCache(tmp_path / "cache")
    want = list(iter_file_records(url, cache=cache))
    copy = cache.path(url)
    assert copy.read_bytes() == original
    offset, length = record_offsets(copy)[3]
    blob = bytearray(original)
    blob[offset + 12 + length // 2] ^= 0xFF  # inside record 3's data: its CRC fails
    copy.write_bytes(bytes(blob))
    gcs.reset_counts()
    with caplog.at_level(logging.WARNING, logger="data_modules.remote"):
        got = list(iter_file_records(url, cache=cache))
    assert got == want  # every record once, none from the damaged bytes
    assert f"at byte {offset}" in caplog.text and "dropped" in caplog.text
    assert gcs.count("002-of-003.tfrecord") > 0 and copy.read_bytes() == original  # fetched again, repaired


def test_the_cache_stays_under_its_cap(gcs, data_root, tmp_path):
    sizes = [p.stat().st_size for p in sorted((data_root / NAME / "train").glob("*.tfrecord"))]
    cap = (sizes[-1] + sizes[-2] - 1) / 2**30  # room for one file and a half
    remote = dm(gcs.url, cache_dir=str(tmp_path / "cache"), cache_max_gb=cap)
    loader = remote.train_dataloader()
    loader.dataset.shuffle = False
    epoch(loader)
    kept = list((tmp_path / "cache").rglob("*.tfrecord"))
    assert [p.name for p in kept] == ["003-of-003.tfrecord"]  # the last read; older ones evicted
    assert sum(p.stat().st_size for p in kept) <= cap * 2**30


# ---------------------------------------------------------------------------------------- faults
@pytest.fixture
def corrupt_on_server(gcs, data_root):
    """``broken_rooms`` on the server: synthetic_rooms with record 2 of test/001-of-001 damaged."""
    src = data_root / NAME / "test" / "001-of-001.tfrecord"
    blob = bytearray(src.read_bytes())
    offset, length = record_offsets(src)[2]
    blob[offset + 12 + length - 5] ^= 0x55
    gcs.put("broken_rooms/dataset.json", (data_root / NAME / "dataset.json").read_bytes())
    gcs.put("broken_rooms/test/001-of-001.tfrecord", bytes(blob))
    return "broken_rooms", f"{gcs.url}/broken_rooms/test/001-of-001.tfrecord", offset


def test_a_file_corrupt_on_the_server_is_reported_and_not_cached(corrupt_on_server, tmp_path):
    name, url, offset = corrupt_on_server
    remote = GQNDataModule("gs://gqn-dataset", name, batch_size=2, context_size=2, num_workers=0,
                           cache_dir=str(tmp_path / "cache"))
    with pytest.raises(CorruptRecordError) as err:
        epoch(remote.test_dataloader())
    assert err.value.path == url and err.value.offset == offset and "CRC" in str(err.value)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]  # neither a copy nor a temporary


def test_download_of_a_file_corrupt_on_the_server_reports_it_and_keeps_nothing(corrupt_on_server, tmp_path, capsys):
    name, url, offset = corrupt_on_server
    _, err = download(capsys, "--out", str(tmp_path), name=name, code=1)
    assert f"problem: {url} at byte {offset}: data CRC mismatch" in err
    assert not list((tmp_path / name).rglob("*.tfrecord*"))  # neither the file nor its .part


def test_server_stopped_mid_epoch_retries_then_one_clear_line(gcs, caplog, monkeypatch):
    monkeypatch.setenv("GQN_REMOTE_BLOCK_MB", "0.01")  # ~10 range requests per file
    monkeypatch.setenv("GQN_REMOTE_READAHEAD", "1")
    loader = dm(gcs.url, batch_size=2).train_dataloader()
    loader.dataset.shuffle = False
    it = iter(loader)
    next(it)
    gcs.stop()
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="data_modules.remote"), pytest.raises(RemoteDataError) as err:
        for _ in it:
            pass
    message = str(err.value)
    assert "\n" not in message and "after 3 tries" in message and gcs.url in message
    assert "STORAGE_EMULATOR_HOST" in message and "is that server running" in message
    assert caplog.text.count("retry ") == 2  # tries 1 and 2 failed and were retried, try 3 gave up
    # the backoff's waits (0.05 s, then 0.1 s, each up to 1.25x; logged to 0.1 s); beside them the three tries to a
    # stopped server fail at once: no per-try timeout (seconds each) and no client retry loop of its own
    waits = [float(w) for w in re.findall(r"retry \d of \d in ([\d.]+) s", caplog.text)]
    assert len(waits) == 2 and sum(waits) <= 0.3
    assert time.perf_counter() - start - sum(waits) < 10


def test_a_server_that_comes_back_loses_no_place(gcs, data_root, monkeypatch):
    monkeypatch.setenv("GQN_REMOTE_BLOCK_MB", "0.01")
    monkeypatch.setenv("GQN_REMOTE_READAHEAD", "1")
    monkeypatch.setenv("GQN_REMOTE_RETRIES", "8")
    monkeypatch.setenv("GQN_REMOTE_BACKOFF", "0.1")
    want = epoch(dm(data_root, batch_size=2).test_dataloader())
    loader = dm(gcs.url, batch_size=2).test_dataloader()
    got = []
    for i, batch in enumerate(loader):
        got.append(batch)
        if i == 0:  # down for 0.4 s mid-file
            gcs.stop()
            threading.Timer(0.4, gcs.start).start()
    same(want, got)


def test_gqn_data_info_on_a_stopped_server_is_one_line(gcs, capsys, caplog):
    gcs.stop()
    with caplog.at_level(logging.WARNING, logger="data_modules.remote"):
        _, err = gqn_data(capsys, "info", f"{gcs.url}/{NAME}", code=2)
    lines = err.strip().splitlines()
    assert lines[-1].startswith("gqn-data: error: could not list gs://gqn-dataset/synthetic_rooms/")
    assert len(lines) == 1, err  # (the retry notes go to the log; with no log handler, to stderr before it)
    assert [r.getMessage().split("; ")[-1][:14] for r in caplog.records] == ["retry 1 of 2 i", "retry 2 of 2 i"]


def test_retry_policy_retries_only_transient_errors(monkeypatch):
    monkeypatch.setenv("GQN_REMOTE_BACKOFF", "0")
    monkeypatch.setenv("GQN_REMOTE_RETRIES", "4")
    calls = []

    def fail(exc):
        calls.append(exc)
        raise exc

    for exc, retried, text in [
        (ConnectionResetError("reset"), True, "after 4 tries"),
        (OSError("Forbidden: gqn-dataset/x"), False, "denied"),
        (FileNotFoundError("x"), False, "not found"),
        (ValueError("Bad Request"), False, "could not read"),
    ]:
        calls.clear()
        with pytest.raises(RemoteDataError, match=text):
            call("read", "gs://b/x", fail, exc)
        assert len(calls) == (4 if retried else 1), exc


def test_a_remote_dataset_without_a_card_reads_its_frame_size_from_its_first_record(gcs, data_root):
    """Another writer's records on a bucket (no dataset.json): read as the same scenes; ``*.tfrecords`` names too."""
    for split in ("train", "test"):
        for path in split_files(data_root, NAME, split, ""):
            blob, name = Path(path).read_bytes(), path.rsplit("/", 1)[-1]
            gcs.put(f"other_rooms/{split}/{name}", blob)
            gcs.put(f"other_rooms_s/{split}/{name}s", blob)
    remote = GQNDataModule(gcs.url, "other_rooms", batch_size=4, context_size=(1, 5), num_workers=0, shuffle_buffer=8,
                           seed=3)
    local = dm(data_root)
    assert (remote.info.image_size, remote.info.frames_per_scene) == (local.info.image_size,
                                                                      local.info.frames_per_scene)
    keys = ("context_images", "context_poses", "query_images", "query_poses")  # no object sidecars were copied
    same([{k: b[k] for k in keys} for b in epoch(local.test_dataloader())], epoch(remote.test_dataloader()))
    renamed = GQNDataModule(gcs.url, "other_rooms_s", batch_size=4, context_size=(1, 5), num_workers=0)
    assert remote.info.from_records and not local.info.from_records
    assert renamed.info == remote.info.__class__("other_rooms_s", remote.info.image_size, remote.info.frames_per_scene,
                                                 from_records=True)
    assert names(renamed.files("test")) == [n + "s" for n in names(local.files("test"))]


def test_missing_bucket_or_dataset_is_one_clear_error(gcs):
    with pytest.raises(GQNDataError,
                       match=r"unknown dataset 'nope': no gs://gqn-dataset/nope/dataset.json and no record files"):
        GQNDataModule(gcs.url, "nope")
    with pytest.raises(GQNDataError, match=r"no \*.tfrecord or \*.tfrecords files at gs://no-such-bucket/rooms_ring_camera/train"):
        GQNDataModule("gs://no-such-bucket", "rooms_ring_camera", context_size=2).setup("fit")


# ---------------------------------------------------------------------------------------- gqn-data
def gqn_data(capsys, *args, code=0) -> tuple[str, str]:
    """The ``gqn-data`` entry point in this process; checks its exit code, returns (stdout, stderr)."""
    from gqn.data_cli import main

    capsys.readouterr()
    got = main(list(args))
    out, err = capsys.readouterr()
    assert got == code, (got, out, err)
    return out, err


def test_gqn_data_info_on_a_url_lists_files_and_bytes(gcs, data_root, capsys):
    out, _ = gqn_data(capsys, "info", f"{gcs.url}/{NAME}")
    for split in ("train", "test"):
        files = sorted((data_root / NAME / split).glob("*.tfrecord"))
        size = sum(p.stat().st_size for p in files)
        assert f"{split:5s}  files {len(files):5d}  bytes {size:14d}" in out
    assert gcs.count("/download/") == 0  # listings only


def download(capsys, *args, name=NAME, code=0) -> str:
    """``gqn-data download`` in this process (the subprocess start-up costs seconds); returns stdout."""
    out = gqn_data(capsys, "download", name, "--source", "gs://gqn-dataset", "--no-progress", *args, code=code)
    return out[0] if code == 0 else out


def test_download_copies_byte_identical_files_and_a_rerun_is_a_no_op(gcs, data_root, tmp_path, capsys):
    out = download(capsys, "--out", str(tmp_path / "d"), "--jobs", "2")
    local = sorted(p.relative_to(data_root / NAME) for p in (data_root / NAME).rglob("*")
                   if p.is_file() and p.parts[-3] != "objects")  # object sidecars are not downloaded
    got = sorted(p.relative_to(tmp_path / "d" / NAME) for p in (tmp_path / "d" / NAME).rglob("*") if p.is_file())
    assert got == local  # the card and every record file, nothing else (no .part left)
    for rel in local:
        assert (tmp_path / "d" / NAME / rel).read_bytes() == (data_root / NAME / rel).read_bytes()
    assert "4 file(s) written" in out
    gcs.reset_counts()
    again = download(capsys, "--out", str(tmp_path / "d"))
    assert "to fetch: 0 file(s)" in again and gcs.count(".tfrecord?alt=media") == 0


def test_download_a_part_and_dry_run(gcs, tmp_path, capsys):
    dry = download(capsys, "--out", str(tmp_path), "--files", "1:3", "--split", "train", "--dry-run")
    assert "train      2 files" in dry and "002-of-003.tfrecord .. 003-of-003.tfrecord" in dry
    assert not (tmp_path / NAME).exists() and gcs.count("?alt=media") == 0
    download(capsys, "--out", str(tmp_path), "--fraction", "0.5")
    assert names(map(str, sorted((tmp_path / NAME).rglob("*.tfrecord")))) == [
        "001-of-001.tfrecord", "001-of-003.tfrecord", "002-of-003.tfrecord"]  # ceil(0.5 * 3) train, 1 test
    for args, text in ((["--files", "x"], "--files takes START:END"), (["--fraction", "2"], "--fraction must be"),
                       (["--files", "7:9"], "selects none")):
        _, err = download(capsys, "--out", str(tmp_path), *args, code=2)
        assert err.count("\n") == 1 and err.startswith("gqn-data: error: ") and text in err, err
    _, err = download(capsys, "--out", str(tmp_path), name="nope", code=2)
    assert "no *.tfrecord or *.tfrecords files at gs://gqn-dataset/nope" in err


def test_download_killed_mid_file_resumes_to_byte_identical_files(gcs, data_root, tmp_path, capsys, monkeypatch):
    gcs.delay = 0.05  # per GET: a file of ~100 KB in 2 KB blocks takes ~2.5 s
    from gqn.data_cli import main

    monkeypatch.setenv("GQN_REMOTE_BLOCK_MB", str(2 / 1024))
    monkeypatch.setenv("GQN_REMOTE_READAHEAD", "1")
    argv = ["download", NAME, "--out", str(tmp_path), "--source", "gs://gqn-dataset", "--split", "train", "--jobs",
            "1", "--no-progress"]
    # a forked process runs the real command (no start-up cost) and is killed with SIGKILL mid-file
    proc = multiprocessing.get_context("fork").Process(target=main, args=(argv,))
    proc.start()
    part, deadline = None, time.monotonic() + 60
    try:
        while part is None and time.monotonic() < deadline:
            parts = [p for p in (tmp_path / NAME / "train").glob("*.part") if p.stat().st_size > 0] \
                if (tmp_path / NAME / "train").is_dir() else []
            part = parts[0] if parts else None
            time.sleep(0.02)
        assert part is not None, "no partial file appeared"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.join(timeout=30)
    assert proc.exitcode == -signal.SIGKILL
    kept = part.stat().st_size
    full = (data_root / NAME / "train" / part.name[: -len(".part")]).stat().st_size
    assert 0 < kept < full and not (tmp_path / NAME / "train" / part.name[: -len(".part")]).exists()
    gcs.delay, gcs_ranges_from = 0.0, len(gcs.requests)
    out = download(capsys, "--out", str(tmp_path), "--split", "train")
    assert "resumed" in out and "(1 resumed)" in out
    first_range = [r for m, p, r in gcs.requests[gcs_ranges_from:] if part.name[: -len(".part")] in p][0]
    assert first_range.startswith(f"bytes={kept}-")  # continued where the killed run stopped
    for p in sorted((data_root / NAME / "train").glob("*.tfrecord")):
        assert (tmp_path / NAME / "train" / p.name).read_bytes() == p.read_bytes()
    assert not list((tmp_path / NAME).rglob("*.part"))


def test_bench_data_compares_the_emulator_with_local_disk(tmp_path):
    from gqn.bench import bench_data

    result = bench_data(scenes=16, batch=4, context=3, workers=(0,), image_size=32)
    rows = {(r["source"], r["workers"]): r for r in result["results"]}
    assert set(rows) == {("local", 0), ("emulator", 0)}
    assert all(r["scenes_per_s"] > 0 and r["scenes"] == 16 - 4 for r in rows.values())  # first batch: start-up

