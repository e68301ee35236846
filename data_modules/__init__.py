"""Streaming the DeepMind GQN TFRecord datasets (and generated ones) into the batch contract.

The names below load on first use (PEP 562), so that ``from data_modules.errors import GQNDataError`` (the command
lines' error handling) does not import torch and Lightning: ``gqn-train --help`` answers in a second.
"""

from __future__ import annotations

import importlib

_WHERE = {name: module for module, names in {
    "data_modules.datamodule": ["GQNDataModule"],
    "data_modules.datasets": ["DATASETS", "DatasetInfo", "dataset_info"],
    "data_modules.errors": ["CorruptRecordError", "GQNDataError"],
    "data_modules.stream": ["SceneStream", "to_float"],
}.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'data_modules' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value  # once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
