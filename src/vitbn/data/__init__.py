"""Datasets in memory: IDX reader, registry with verified downloads, local npz/folder/digits, in-memory loader."""

from vitbn.data.base import Dataset, PreparedData, Split, channel_stats, split_stratified, split_validation
from vitbn.data.datasets import (
    REGISTRY,
    IDXDataset,
    data_root,
    list_datasets,
    load_dataset,
    prepare_data,
    register_dataset,
)
from vitbn.data.download import RemoteFile, ensure_files, md5sum
from vitbn.data.idx import read_idx, write_idx
from vitbn.data.loader import InMemoryLoader

__all__ = [
    "REGISTRY",
    "Dataset",
    "IDXDataset",
    "InMemoryLoader",
    "PreparedData",
    "RemoteFile",
    "Split",
    "channel_stats",
    "data_root",
    "ensure_files",
    "list_datasets",
    "load_dataset",
    "md5sum",
    "prepare_data",
    "read_idx",
    "register_dataset",
    "split_stratified",
    "split_validation",
    "write_idx",
]
