"""Pretraining shards: parquet files with one `text` column; the last shard is the validation split."""
import os

import pyarrow.parquet as pq

from nanochat.common import UserError, get_data_dir


def pretrain_dir(data_dir=None) -> str:
    return os.path.join(data_dir or get_data_dir(), "pretrain")


def list_shards(data_dir=None, folder=None) -> list[str]:
    """Sorted shard paths (last = validation). `folder` points straight at a folder of shards."""
    folder = folder or pretrain_dir(data_dir)
    paths = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".parquet")) \
        if os.path.isdir(folder) else []
    if not paths:
        raise UserError(f"no pretraining shards (*.parquet) in {folder}: run `nanochat data download` "
                        f"or `nanochat data build YOUR_FILES`, or point NANOCHAT_DATA at a data root")
    return paths


def read_row_group_texts(path: str, row_group: int) -> list[str]:
    try:
        return pq.ParquetFile(path).read_row_group(row_group, columns=["text"]).column("text").to_pylist()
    except Exception as e:  # a truncated or corrupt file: say which one
        raise UserError(f"cannot read shard {path}: {e}") from e


def iter_texts(split="train", data_dir=None, folder=None):
    """Yield document strings of the train split (all shards but the last) or the val split."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    paths = list_shards(data_dir, folder)
    if split == "val":
        paths = paths[-1:]
    else:
        paths = paths[:-1] if len(paths) > 1 else paths
    for path in paths:
        try:
            n = pq.ParquetFile(path).num_row_groups
        except Exception as e:
            raise UserError(f"cannot read shard {path}: {e}") from e
        for rg in range(n):
            yield from read_row_group_texts(path, rg)
