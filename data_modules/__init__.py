"""Streaming the DeepMind GQN TFRecord datasets (and generated ones) into the batch contract."""

from data_modules.datamodule import GQNDataModule
from data_modules.datasets import DATASETS, DatasetInfo, dataset_info
from data_modules.errors import CorruptRecordError, GQNDataError
from data_modules.stream import SceneStream, to_float

__all__ = [
    "DATASETS", "CorruptRecordError", "DatasetInfo", "GQNDataError", "GQNDataModule", "SceneStream",
    "dataset_info", "to_float",
]
