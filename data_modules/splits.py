"""The validation split: a fixed, seeded carve-out of the training data, the same on every rank and worker.

Where the train split has enough files, whole files are carved out (reading them costs nothing extra).
Where it has too few (a small generated set), scenes are: a scene belongs to validation when a hash of
(its file's name, its byte offset, the seed) falls below the fraction, a pure function that every process
computes alike. Training reads exactly the complement. The test split is never touched.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_modules.errors import GQNDataError


@dataclass(frozen=True)
class SceneSplit:
    """``(path, offset) -> bool``: whether a scene belongs to this side of a scene-level carve-out."""

    fraction: float
    seed: int
    validation: bool  # True: keep the validation scenes; False: keep the training scenes

    def __call__(self, path: str, offset: int) -> bool:
        key = zlib.crc32(f"{self.seed}:{Path(path).name}:{offset}".encode()) / 2**32
        return (key < self.fraction) == self.validation


@dataclass(frozen=True)
class ValidationSplit:
    train_files: list[str]
    val_files: list[str]
    train_filter: SceneSplit | None = None  # set for a scene-level carve-out
    val_filter: SceneSplit | None = None

    @property
    def level(self) -> str:
        return "scenes" if self.val_filter is not None else "files"


def carve_validation(files: list[str], val_fraction: float, val_files: int | None, seed: int) -> ValidationSplit:
    """Split the train split's ``files`` into training and validation.

    ``val_files``: carve out this many whole files; else ``floor(val_fraction * len(files))`` of them. When that
    is 0 (too few files for whole files to make the fraction), carve out ``val_fraction`` of the scenes instead.
    """
    files = sorted(files)
    if not 0 < val_fraction < 1:
        raise GQNDataError(f"data.val_fraction must be in (0, 1), got {val_fraction} (validation is carved from "
                           "the training data; the test split is for reported numbers only)")
    n = math.floor(val_fraction * len(files)) if val_files is None else int(val_files)
    if val_files is not None and not 1 <= n < len(files):
        fix = f"use 1 to {len(files) - 1}, or" if len(files) > 1 else "use"
        raise GQNDataError(f"data.val_files={val_files} but the train split has {len(files)} file(s): {fix} "
                           "data.val_files=null to carve out data.val_fraction of the scenes instead")
    if 1 <= n < len(files):
        chosen = set(np.random.default_rng([seed, len(files)]).choice(len(files), size=n, replace=False).tolist())
        return ValidationSplit([f for i, f in enumerate(files) if i not in chosen],
                               [f for i, f in enumerate(files) if i in chosen])
    return ValidationSplit(files, files, SceneSplit(val_fraction, seed, False), SceneSplit(val_fraction, seed, True))
