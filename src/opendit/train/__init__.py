"""Training: data (digits, image folders), the flow-matching / DDPM trainer with DDP and exact resume, EMA."""

from opendit.digits.data import BatchSampler, DigitsDataset, ImageDataset, ImageFolderDataset, build_dataset
from opendit.train.ema import EMA
from opendit.train.trainer import TrainConfig, export_ema, read_log, train

__all__ = [
    "EMA",
    "BatchSampler",
    "DigitsDataset",
    "ImageDataset",
    "ImageFolderDataset",
    "TrainConfig",
    "build_dataset",
    "export_ema",
    "read_log",
    "train",
]
