"""GQNDataModule: streams the DeepMind GQN TFRecords (or generated ones) into the batch contract."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L

from data_modules.datasets import dataset_info, how_to_get
from data_modules.errors import GQNDataError
from data_modules.remote import RemoteCache
from data_modules.splits import ValidationSplit, carve_validation
from data_modules.stream import GQNDataLoader, SceneStream, check_loader_options, split_files


class GQNDataModule(L.LightningDataModule):
    """Batches ``context_images [B, M, 3, H, W]``, ``context_poses [B, M, 7]``, ``query_images
    [B, 3, H, W]``, ``query_poses [B, 7]`` from ``{data_dir}/{dataset}/{train,test}/*.tfrecord``.

    ``context_size`` is an int or ``[min, max]`` (M drawn per training batch). Validation is carved from the
    train split (:func:`data_modules.splits.carve_validation`: ``val_files`` whole files, else ``val_fraction``
    of the files or, with too few files, of the scenes; seeded by ``split_seed``, not by the training seed);
    training reads the rest. Validation reads the first ``val_scenes`` scenes of the carve-out, test the
    whole test split, both with fixed views per scene and ``eval_context_size`` views (default: the largest
    M). Where the data has object sidecars (:mod:`data_modules.objects`), evaluation batches also carry the
    query view's object mask and empty-room render.
    """

    def __init__(
        self,
        data_dir: str = "data",
        dataset: str = "synthetic_rooms",
        batch_size: int = 36,
        context_size: int | Sequence[int] = (1, 5),
        image_size: int | None = None,
        num_workers: int = 2,
        shuffle_buffer: int = 256,
        val_scenes: int = 256,
        eval_context_size: int | None = None,
        eval_batch_size: int | None = None,
        seed: int = 0,
        skip_corrupt: bool = False,
        val_fraction: float = 0.02,
        val_files: int | None = None,
        split_seed: int = 0,
        num_queries: int = 1,
        cache_dir: str | None = None,
        cache_max_gb: float | None = None,
    ):
        super().__init__()
        check_loader_options(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                             shuffle_buffer=shuffle_buffer, val_scenes=val_scenes)
        self.data_dir, self.dataset = str(data_dir), dataset
        self.info = dataset_info(data_dir, dataset)
        self.image_size = int(image_size or self.info.image_size)
        self.context_size = context_size if isinstance(context_size, int) else tuple(int(c) for c in context_size)
        lo, hi = (self.context_size,) * 2 if isinstance(self.context_size, int) else self.context_size
        frames = self.info.frames_per_scene
        if not 1 <= lo <= hi:
            raise GQNDataError(f"context_size must be >= 1 (an int or [min, max]), got {context_size}")
        if not isinstance(num_queries, int) or num_queries < 1:
            raise GQNDataError(f"data.num_queries must be an integer >= 1 (query views per scene), got {num_queries}")
        self.num_queries = num_queries
        if hi + num_queries > frames:
            raise GQNDataError(
                f"context_size {context_size} with num_queries={num_queries} needs {hi + num_queries} views per "
                f"scene but {dataset} has {frames}; use at most {frames - num_queries} context views"
            )
        self.eval_context_size = int(eval_context_size or hi)
        if not 1 <= self.eval_context_size < frames:
            raise GQNDataError(f"eval_context_size must be in [1, {frames - 1}], got {eval_context_size}")
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.shuffle_buffer, self.val_scenes = num_workers, shuffle_buffer, val_scenes
        self.seed, self.skip_corrupt = seed, skip_corrupt
        self.val_fraction, self.val_files, self.split_seed = val_fraction, val_files, split_seed
        self._split: ValidationSplit | None = None
        # remote data_dir only: keep files read once on local disk (data_modules.remote.RemoteCache)
        self.cache = RemoteCache(cache_dir, cache_max_gb) if cache_dir else None

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Lightning saves this in every checkpoint (under ``GQNDataModule``): what defines the run's validation
        split and the views it draws, so that ``gqn-eval split=val`` scores exactly what training validated on;
        and what defines the training stream (``stream_settings``), so that a resume can say where it differs."""
        return {"dataset": self.dataset, "seed": self.seed, "val_files": self.val_files,
                "val_fraction": self.val_fraction, "split_seed": self.split_seed, "val_scenes": self.val_scenes,
                "eval_context_size": self.eval_context_size, **self.stream_settings()}

    def stream_settings(self) -> dict:
        """The settings that decide which views of which scenes a training step reads (checked on resume)."""
        # an int c draws the same views as [c, c]: saved as [c, c], so the two compare equal on resume
        context = [self.context_size] * 2 if isinstance(self.context_size, int) else list(self.context_size)
        return {"context_size": context, "num_queries": self.num_queries, "batch_size": self.batch_size,
                "image_size": self.image_size, "shuffle_buffer": self.shuffle_buffer}

    def load_state_dict(self, state_dict: dict) -> None:
        """On resume the run's own config decides; the saved settings are read by ``gqn-eval``."""

    # ------------------------------------------------------------------ files and streams
    def files(self, split: str) -> list[str]:
        return split_files(self.data_dir, self.dataset, split, how_to_get(self.data_dir, self.dataset))

    @property
    def validation_split(self) -> ValidationSplit:
        """Training and validation files (and scene filters) carved from the train split."""
        if self._split is None:
            self._split = carve_validation(self.files("train"), self.val_fraction, self.val_files, self.split_seed)
        return self._split

    def _dist(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def stream(self, split: str, **kwargs) -> SceneStream:
        """A stream over ``split``: "train" (minus the validation carve-out), "val" (the carve-out) or "test";
        ``kwargs`` override the stream's options (``files=`` its files)."""
        rank, world = self._dist()
        if split == "test":
            files, scene_filter = self.files("test"), None
        else:
            carve = self.validation_split
            files, scene_filter = ((carve.train_files, carve.train_filter) if split == "train"
                                   else (carve.val_files, carve.val_filter))
        opts = dict(
            info=self.info, image_size=self.image_size, seed=self.seed, skip_corrupt=self.skip_corrupt,
            rank=rank, world_size=world, scene_filter=scene_filter, cache=self.cache,
        )
        opts.update(kwargs)
        return SceneStream(opts.pop("files", files), **opts)

    def _loader(self, stream: SceneStream) -> GQNDataLoader:
        return GQNDataLoader(
            stream, batch_size=None, num_workers=self.num_workers, persistent_workers=False,
            prefetch_factor=4 if self.num_workers else None,
        )

    def setup(self, stage: str | None = None) -> None:
        # fail early, in the main process, with a clear message
        if stage in (None, "fit", "validate"):
            self.validation_split  # noqa: B018  (lists the train files and carves validation out of them)
        if stage in (None, "test"):
            self.files("test")

    def train_dataloader(self) -> GQNDataLoader:
        stream = self.stream("train", batch_size=self.batch_size, context_size=self.context_size, shuffle=True,
                             shuffle_buffer=self.shuffle_buffer, repeat=True, drop_last=True,
                             num_queries=self.num_queries)
        trainer = getattr(self, "trainer", None)
        if trainer is not None:  # a resumed run continues with fresh shuffles, not the first run's order
            stream.epoch = int(trainer.global_step)
        return self._loader(stream)

    def val_dataloader(self) -> GQNDataLoader:
        return self._loader(
            self.stream("val", batch_size=self.eval_batch_size, context_size=self.eval_context_size,
                        max_scenes=self.val_scenes, fixed_views=True, objects=True)
        )

    def test_dataloader(self) -> GQNDataLoader:
        return self._loader(
            self.stream("test", batch_size=self.eval_batch_size, context_size=self.eval_context_size,
                        fixed_views=True, objects=True)
        )
