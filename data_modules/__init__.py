"""Streaming the DeepMind GQN TFRecord datasets (and generated ones) into the batch contract.

The names below load on first use (:func:`gqn.lazy.lazy_names`), so that ``from data_modules.errors import
GQNDataError`` (the command lines' error handling) does not import torch and Lightning.
"""

from gqn.lazy import lazy_names

__all__, __getattr__, __dir__ = lazy_names(__name__, {
    "data_modules.datamodule": ["GQNDataModule"],
    "data_modules.datasets": ["DATASETS", "DatasetInfo", "dataset_info"],
    "data_modules.errors": ["CorruptRecordError", "GQNDataError"],
    "data_modules.stream": ["SceneStream", "to_float"],
})
