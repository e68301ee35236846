"""Streaming GQN scenes from TFRecords: sharding, shuffling, per-scene view sampling, batching.

The stream yields whole batches (so that every item of a batch shares the number of context views M,
drawn per batch as in the paper) of **uint8** images; :func:`to_float` turns them into the float batch
contract late, in the consuming process.
"""

from __future__ import annotations

import atexit
import os
import signal
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import simplejpeg
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_modules.datasets import DatasetInfo
from data_modules.errors import CorruptRecordError, GQNDataError
from data_modules.objects import load_sidecar, masks_of
from data_modules.records import JPEG_MAGIC, RECORD_NAMES, camera_to_pose, decode_frame, parse_scene, record_files
from data_modules.remote import RemoteCache, is_url, iter_file_records, list_split, local_path

Record = tuple[str, int, int, bytes]  # (path, byte offset, global scene index, record bytes)


def shuffle_buffer(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """Approximate shuffle of a stream with a buffer of ``size`` items."""
    buf = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = int(rng.integers(size))
        buf[j], item = item, buf[j]
        yield item
    rng.shuffle(buf)
    yield from buf


class SceneStream(IterableDataset):
    """Batches of sampled (context, query) views from GQN TFRecord files.

    Shards are ``rank * num_workers + worker``: files are split across shards when there are at least as
    many files as shards (and no ``max_scenes`` cap), records otherwise, so that every scene is read by
    exactly one shard per pass.
    """

    def __init__(
        self,
        files: list[str],
        info: DatasetInfo,
        batch_size: int,
        context_size: int | tuple[int, int],
        image_size: int | None = None,
        shuffle: bool = False,
        shuffle_buffer: int = 256,
        seed: int = 0,
        repeat: bool = False,
        max_scenes: int | None = None,
        fixed_views: bool = False,
        skip_corrupt: bool = False,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        objects: bool = False,
        scene_filter=None,
        num_queries: int = 1,
        cache: RemoteCache | None = None,
    ):
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise GQNDataError(f"batch size must be an integer >= 1, got {batch_size!r}")
        self.files, self.info, self.batch_size = [str(f) for f in files], info, batch_size
        lo, hi = (context_size, context_size) if isinstance(context_size, int) else tuple(context_size)
        self.context_range = (int(lo), int(hi))
        self.image_size = image_size or info.image_size
        self.shuffle, self.buffer, self.seed, self.repeat = shuffle, shuffle_buffer, seed, repeat
        self.max_scenes, self.fixed_views, self.skip_corrupt = max_scenes, fixed_views, skip_corrupt
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        # the query view's object coverage and empty-room render, from sidecar files (data_modules.objects)
        self.objects = objects
        if num_queries < 1:
            raise GQNDataError(f"num_queries must be >= 1 (query views per scene), got {num_queries}")
        self.num_queries = num_queries  # query views per scene; > 1 gives [B, K, ...] query tensors
        self.scene_filter = scene_filter  # (path, offset) -> whether this stream reads the scene
        self.cache = cache  # local copies of remote files (data_modules.remote), or None
        self.epoch = 0
        self.skipped = 0
        self._pass = 0
        # set by GQNDataLoader for its (not persistent) worker processes: they send their counts of skipped
        # corrupt scenes in-band, with every batch and once more at the end of a pass
        self.report_skipped = False
        self.closing = None  # an Event of GQNDataLoader, set when its workers are to stop

    # ------------------------------------------------------------------ reading
    def _shard(self) -> tuple[int, int]:
        worker = get_worker_info()
        workers, wid = (worker.num_workers, worker.id) if worker else (1, 0)
        return self.rank * workers + wid, self.world_size * workers

    def _skip(self, err: CorruptRecordError, what: str = "skipping corrupt scene") -> None:
        """Warn on every hit (a damaged record is met again each pass), with the pass and a running count."""
        self.skipped += 1
        where = f"pass {self._pass}, " if self.repeat else ""
        warnings.warn(f"{what} ({where}{self.skipped} skipped so far): {err}", stacklevel=3)

    def _file_records(self, path: str) -> Iterator[tuple[int, bytes]]:
        try:  # a damaged record inside sound framing is skipped alone, the file's other scenes still count
            yield from iter_file_records(path, on_bad_data=self._skip if self.skip_corrupt else None, cache=self.cache)
        except CorruptRecordError as err:
            if not self.skip_corrupt:
                raise
            self._skip(err, "skipping the rest of a corrupt file")

    def _scenes(self, path: str) -> Iterator[tuple[int, bytes]]:
        """The records of one file that this stream reads (all, or those its ``scene_filter`` keeps)."""
        if self.scene_filter is None:
            return self._file_records(path)
        return ((offset, data) for offset, data in self._file_records(path) if self.scene_filter(path, offset))

    def records(self, epoch: int, shard: int, num_shards: int) -> Iterator[Record]:
        files = list(self.files)
        if self.shuffle:
            np.random.default_rng([self.seed, epoch]).shuffle(files)  # same order on every shard
        if len(files) >= num_shards and self.max_scenes is None:
            for path in files[shard::num_shards]:
                for offset, data in self._scenes(path):
                    yield path, offset, -1, data
            return
        index = 0
        for path in files:
            for offset, data in self._scenes(path):
                if self.max_scenes is not None and index >= self.max_scenes:
                    return
                if index % num_shards == shard:
                    yield path, offset, index, data
                index += 1

    # ------------------------------------------------------------------ sampling
    def _decode_into(self, out: np.ndarray, jpeg: bytes, path: str, offset: int, index: int) -> None:
        """Decode one frame into ``out`` ``[S, S, 3]`` (resized when ``image_size`` differs)."""
        native = self.info.image_size
        if self.image_size == native and jpeg.startswith(JPEG_MAGIC):
            try:
                image = simplejpeg.decode_jpeg(jpeg, colorspace="RGB", buffer=out)
            except ValueError:  # broken, or larger than the buffer: let decode_frame say which
                image = None
            if image is not None and image.shape[:2] == (native, native):
                return
        image = decode_frame(jpeg, native, path, offset, index)  # raises the precise error
        if self.image_size != native:
            image = np.asarray(Image.fromarray(image).resize((self.image_size,) * 2, Image.BILINEAR))
        out[...] = image

    def decode(self, jpeg: bytes, path: str = "<bytes>", offset: int = 0, index: int = 0) -> np.ndarray:
        """One frame as uint8 ``[S, S, 3]`` at this stream's image size, with the stream's checks."""
        out = np.empty((self.image_size, self.image_size, 3), np.uint8)
        self._decode_into(out, jpeg, path, offset, index)
        return out

    def _views(self, rec: Record, m: int, rng: np.random.Generator):
        """Parse a scene and draw its ``m + K`` views (K queries): (JPEGs, view indices, poses ``[m+K, 7]``)."""
        path, offset, _, data = rec
        frames, cameras = parse_scene(data, path, offset)
        k = self.num_queries
        if m + k > len(frames):
            raise CorruptRecordError(
                path, offset, f"scene has {len(frames)} frames, too few for {m} context views + {k} "
                f"quer{'y' if k == 1 else 'ies'}"
            )
        if self.fixed_views:  # evaluation: the same views of a scene every time, whatever the sharding
            # keyed by (file name, byte offset), known in both sharding modes (file-level sharding has no
            # global scene index), so that scenes do not all share one set of views
            rng = np.random.default_rng([self.seed, zlib.crc32(Path(path).name.encode()), offset])
        views = rng.permutation(len(frames))[: m + k]  # a fresh permutation per scene; last k = queries
        return [frames[v] for v in views], views, camera_to_pose(cameras[views])

    def _batch_pixels(self, n: int, m: int) -> torch.Tensor:
        """Where a batch of ``n`` scenes x ``m + K`` views is decoded: a fresh tensor, in shared memory inside
        a loader worker."""
        size = self.image_size
        images = torch.empty((n, m + self.num_queries, size, size, 3), dtype=torch.uint8)  # [B, M+K, H, W, 3]
        if get_worker_info() is not None:
            images.share_memory_()  # decoded straight into shared memory: no copy on the way to the trainer
        return images

    def context_draw(self, worker: int, batch: int) -> int:
        """The context size M of a worker's ``batch``-th batch (counted from where the stream started, batches lost
        to corruption not counted), shared by
        the whole batch. Drawn from (seed, starting epoch, worker, batch) and not from the shard: every DDP rank
        draws the same M for the same step (rank r's step i is its worker i mod W's batch i div W), so no rank's
        step waits for another's larger draw."""
        lo, hi = self.context_range
        if lo == hi:
            return lo
        return int(np.random.default_rng([self.seed, self.epoch, worker, batch, 2]).integers(lo, hi + 1))

    def make_batch(self, recs: list[Record], rng: np.random.Generator, m: int) -> dict | None:
        """A batch of ``recs``: ``m`` context views (:meth:`context_draw`) and the queries of each scene, whose views
        ``rng`` draws."""
        scenes, errors = [], {}
        for i, rec in enumerate(recs):
            try:
                scenes.append((i, rec, *self._views(rec, m, rng)))
            except CorruptRecordError as err:
                errors[i] = err
        images = self._batch_pixels(len(recs), m)
        pixels = images.numpy()
        for i, rec, jpegs, views, _ in scenes:
            try:
                for j, (jpeg, view) in enumerate(zip(jpegs, views)):
                    self._decode_into(pixels[i, j], jpeg, rec[0], rec[1], int(view))
            except CorruptRecordError as err:
                errors[i] = err
        for i in sorted(errors):
            if not self.skip_corrupt:
                raise errors[i]
            self._skip(errors[i])
        keep = [task[0] for task in scenes if task[0] not in errors]
        if not keep:
            return None
        if len(keep) < len(recs):  # move the good scenes to the front (the batch stays one flat buffer)
            for dst, src in enumerate(keep):
                if dst != src:
                    pixels[dst] = pixels[src]
            images = images[: len(keep)]
        poses = np.stack([task[4] for task in scenes if task[0] not in errors])  # [B, M+1, 7]
        poses = poses.astype(np.float32, copy=False)
        extras = self._query_objects([task for task in scenes if task[0] not in errors]) if self.objects else {}
        return {**to_batch(images, torch.from_numpy(poses), m, self.num_queries),
                **{k: torch.from_numpy(v) for k, v in extras.items()}}

    def _query_objects(self, scenes) -> dict[str, np.ndarray]:
        """The query views' object coverage ``[B, S, S]`` and empty-room renders ``[B, S, S, 3]`` (uint8) from
        the sidecar files; nothing when a scene's file has no sidecar (then the batch has no object metrics). A
        sidecar without masks for a scene's record (or view) is a :class:`GQNDataError`: it was written for
        other records, and pairing by byte offset would hand some scenes another scene's masks."""
        masks, empty = [], []
        for _, (path, offset, _, _), _, views, _ in scenes:
            table = load_sidecar(path)
            if table is None:
                return {}
            m, e = masks_of(table, path, offset, views[-1])
            if m.shape[0] != self.image_size:  # resized like the frames
                m = np.asarray(Image.fromarray(m).resize((self.image_size,) * 2, Image.BILINEAR))
                e = np.asarray(Image.fromarray(e).resize((self.image_size,) * 2, Image.BILINEAR))
            masks.append(m)
            empty.append(e)
        return {"query_object_mask": np.stack(masks), "query_empty_room": np.stack(empty)}

    def __iter__(self):
        worker = get_worker_info()
        if worker is None:
            yield from self._batches()
            return
        _quiet_worker_signals(self.closing)
        try:
            if not self.report_skipped:
                yield from self._batches()
                return
            for batch in self._batches():  # GQNDataLoader pops the count (see GQNDataLoader.__iter__)
                yield {**batch, "worker_skipped": (worker.id, self.skipped)}
            # skips after this worker's last batch (a repeating stream never gets here)
            yield {"worker_skipped": (worker.id, self.skipped)}
        except GQNDataError as err:
            # hand the error itself to the trainer process (torch would re-raise it there as a RuntimeError
            # holding this worker's traceback); GQNDataLoader raises it
            yield {"error": err}

    def _short_pass(self, read: int, num_shards: int) -> GQNDataError:
        where = f"{Path(self.files[0]).parent}" if self.files else self.info.name
        if num_shards == 1:
            return GQNDataError(
                f"{where} has {read} readable scenes, fewer than one batch (data.batch_size={self.batch_size}): "
                f"lower data.batch_size or add scenes"
            )
        return GQNDataError(
            f"{where} gives each of its {num_shards} readers (data.num_workers per process x processes) about "
            f"{read} scenes per pass, fewer than one batch (data.batch_size={self.batch_size}): lower "
            f"data.num_workers or data.batch_size"
        )

    def _batches(self):
        shard, num_shards = self._shard()
        epoch = self.epoch
        worker, count = shard - self.rank * (num_shards // self.world_size), 0  # batches made: M's draw
        pass_size, failed = None, 0  # records per pass; records in whole batches lost to corruption since a good one
        while True:
            self._pass = epoch
            rng = np.random.default_rng([self.seed, epoch, shard, 1])
            stream = self.records(epoch, shard, num_shards)
            if self.shuffle:
                stream = shuffle_buffer(stream, self.buffer, rng)
            batch, read, made = [], 0, 0
            for rec in stream:
                batch.append(rec)
                read += 1
                if len(batch) == self.batch_size:
                    out = self.make_batch(batch, rng, self.context_draw(worker, count))
                    made, count = made + 1, count + (out is not None)  # (a batch lost to corruption: draw again)
                    failed = failed + len(batch) if out is None else 0
                    batch = []
                    if out is not None:
                        yield out
                    elif pass_size and failed >= pass_size:
                        raise GQNDataError(
                            f"every scene of {Path(self.files[0]).parent} read by this loader was skipped as "
                            f"corrupt ({self.skipped} skipped): check the files with gqn-data verify"
                        )
            if batch and not self.drop_last:
                out = self.make_batch(batch, rng, self.context_draw(worker, count))
                count += out is not None
                if out is not None:
                    yield out
            if not self.repeat:
                return
            if not made:  # an endless stream that can never fill a batch would spin without a word
                raise self._short_pass(read, num_shards)
            pass_size = read
            epoch += 1


def _quiet_worker_signals(closing=None) -> None:
    """In a loader worker: leave SIGINT, and SIGTERM while the trainer still runs, to the trainer process.

    A Ctrl-C (SIGINT to the terminal's process group) or a SLURM preemption (SIGTERM to every process of
    the job) would otherwise kill the workers before the trainer has finished its step and saved a
    checkpoint, and torch then raises "worker exited unexpectedly" at an arbitrary point of the step. The
    trainer shuts its workers down itself. ``closing`` (an Event of :class:`GQNDataLoader`, set when its
    pass ends or the trainer exits) marks the terminate that comes from the trainer: then SIGTERM ends the
    worker as usual, as it does once the trainer is gone.
    """
    global _WORKER_SIGNALS_SET
    if _WORKER_SIGNALS_SET:
        return
    _WORKER_SIGNALS_SET = True
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if closing is None:
        return
    parent = os.getppid()

    def on_term(signum, frame):
        if os.getppid() == parent and not closing.is_set():
            return
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_term)


_WORKER_SIGNALS_SET = False



def to_batch(images: torch.Tensor, poses: torch.Tensor, m: int, queries: int = 1) -> dict[str, torch.Tensor]:
    """Split ``[B, M+K, H, W, 3]`` images and ``[B, M+K, 7]`` poses into context (first M) and the K queries:
    ``query_images`` ``[B, H, W, 3]`` for one query per scene, ``[B, K, H, W, 3]`` for several."""
    query = slice(m, None) if queries > 1 else m
    return {
        "context_images": images[:, :m],
        "context_poses": poses[:, :m],
        "query_images": images[:, query],
        "query_poses": poses[:, query],
    }


def to_float(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """uint8 channels-last images -> float32 ``[..., 3, H, W]`` in [0, 1] (the batch contract).

    The division runs in numpy, in one thread: torch would split this small job over its OpenMP
    threads, whose spin-waiting then takes CPU from the loader's worker processes (2 workers on 2
    cores: 4800 scenes/s with torch's 2 threads, 7300 in one). The result has channels-last strides.
    """
    out = dict(batch)
    for key in ("context_images", "query_images", "query_empty_room", "query_object_mask"):
        x = batch.get(key)
        if x is not None and x.dtype == torch.uint8:
            pixels = np.empty(x.shape, np.float32)
            np.divide(x.numpy(), np.float32(255.0), out=pixels)
            # masks [B, S, S] -> [B, 1, S, S]; images [..., S, S, 3] -> [..., 3, S, S]
            out[key] = torch.from_numpy(pixels)[:, None] if key == "query_object_mask" else \
                torch.from_numpy(pixels).movedim(-1, -3)
    return out


def _keep(item):
    """The loader's collate function: batches are made by the stream (and must not be re-shared)."""
    return item


class GQNDataLoader(DataLoader):
    """A DataLoader over a :class:`SceneStream` that yields the float batch contract and counts passes.

    With workers (not persistent ones), the workers' counts of skipped corrupt scenes, sent in-band under
    ``"worker_skipped"``, are added to the stream's ``skipped``.
    """

    def __init__(self, dataset, *args, **kwargs):
        kwargs.setdefault("collate_fn", _keep)
        super().__init__(dataset, *args, **kwargs)

    def __iter__(self):
        dataset = self.dataset
        if isinstance(dataset, SceneStream) and self.num_workers > 0 and not self.persistent_workers:
            dataset.report_skipped = True
        closing = None
        if isinstance(dataset, SceneStream) and self.num_workers > 0:
            closing = (self.multiprocessing_context or torch.multiprocessing).Event()
            dataset.closing = closing
            atexit.register(closing.set)  # runs before multiprocessing terminates the workers at exit
        try:
            iterator = super().__iter__()
        finally:
            if isinstance(dataset, SceneStream):
                dataset.report_skipped = False  # the workers hold their copies
                dataset.closing = None  # the stream stays picklable
        skipped, base = {}, getattr(dataset, "skipped", 0)  # each worker counts on from the value it was given
        error = None
        try:
            for batch in iterator:
                if "error" in batch:  # a worker's data error, raised here as itself (see SceneStream.__iter__)
                    error = batch["error"]
                    break
                if "worker_skipped" in batch:  # a worker's count of skipped scenes, with a batch or alone (its last)
                    worker, count = batch.pop("worker_skipped")
                    skipped[worker] = count - base
                    dataset.skipped = base + sum(skipped.values())
                    if not batch:
                        continue
                yield to_float(batch)
        finally:
            if closing is not None:
                closing.set()
                atexit.unregister(closing.set)
        if error is not None:
            # shut the workers down now: raised from here, the traceback would keep the torch iterator alive
            # until a garbage collection, whose finalizers tear its queues down in no particular order (the
            # workers then wait 5 s each for a stop message that never comes, and are killed)
            del batch, iterator
            raise error
        if isinstance(dataset, SceneStream):
            if dataset.repeat:  # an endless stream ended: every reader stopped without a batch
                raise GQNDataError(f"{Path(dataset.files[0]).parent if dataset.files else dataset.info.name} "
                                   f"gave no batch: no readable scenes")
            dataset.epoch += 1


def check_loader_options(**options: int | None) -> None:
    """``data.<name>`` counts a loader needs: batch sizes, buffer and validation scenes >= 1, workers >= 0
    (None: the default). A batch size of 0 would otherwise never fill a batch and spin without a word."""
    for name, value in options.items():
        if value is None and name in ("eval_batch_size",):
            continue
        low = 0 if name == "num_workers" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise GQNDataError(f"data.{name} must be an integer >= {low}, got {value!r}")


def split_files(data_dir: str | Path, dataset: str, split: str, how_to_get: str) -> list[str]:
    """The split's record files (``*.tfrecord``, ``*.tfrecords``: paths, or URLs for a remote ``data_dir``), sorted;
    a clear error when there are none."""
    if is_url(data_dir):
        return list_split(str(data_dir), dataset, split, how_to_get)
    directory = Path(local_path(data_dir)) / dataset / split
    if not directory.is_dir():
        raise GQNDataError(f"no data directory {directory} (expected {RECORD_NAMES} files there); "
                           f"{how_to_get}")
    files = [str(p) for p in record_files(directory)]
    if not files:
        raise GQNDataError(f"{directory} holds no {RECORD_NAMES} files (empty split); {how_to_get}")
    return files
