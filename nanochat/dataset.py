"""Pretraining shards: parquet files with one `text` column; the last shard is the validation split.

Shards are named `shard_NNNNN.parquet` (5-digit, zero-padded). The folder listing is sorted by
name, so the validation shard must carry the largest number: the hub datasets put it at their
last index (e.g. shard_06542 for ClimbMix), `nanochat data build` writes it right after the
training shards. Downloading more training shards later never moves it from the end.
"""
import os

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.common import UserError, get_data_dir
from nanochat.download import download_file

# ---------------------------------------------------------------------------
# The public hub datasets (Hugging Face, karpathy/*). Shards 0..MAX-1 are training data, shard MAX
# is the validation shard (the same convention upstream nanochat uses). Each shard holds about
# 250 M characters (~90-100 MB of zstd parquet).
HUB_DATASETS = {
    # NVIDIA ClimbMix-400B, shuffled and re-sharded: the current nanochat pretraining mix
    "climbmix": ("https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main", 6542),
    # FineWeb-Edu 100B tokens, shuffled: the original nanochat pretraining mix
    "fineweb-edu": ("https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main", 1822),
}
DEFAULT_DATASET = "climbmix"
ROW_GROUP_SIZE = 1024  # rows per row group, as in the hub shards and ../shared/data


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def pretrain_dir(data_dir=None) -> str:
    return os.path.join(data_dir or get_data_dir(), "pretrain")


def list_shards(data_dir=None, folder=None) -> list[str]:
    """Sorted shard paths (last = validation). `folder` points straight at a folder of shards."""
    folder = folder or pretrain_dir(data_dir)
    # temporary files of an unfinished download or build end in .tmp.*, so they never match
    paths = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".parquet")) \
        if os.path.isdir(folder) else []
    if not paths:
        raise UserError(f"no pretraining shards (*.parquet) in {folder}: run `nanochat data download` "
                        f"or `nanochat data build YOUR_FILES`, or point NANOCHAT_DATA at a data root")
    return paths


def split_shards(split: str, data_dir=None, folder=None) -> list[str]:
    """The shards of one split: train = all but the last, val = the last one. With a single shard,
    both splits are that shard (tiny setups only; `data build` always writes two or more)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    paths = list_shards(data_dir, folder)
    if split == "val":
        return paths[-1:]
    return paths[:-1] if len(paths) > 1 else paths


def _is_text_type(t) -> bool:
    if pa.types.is_dictionary(t):  # e.g. a pandas categorical column: strings underneath
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _check_schema(f: pq.ParquetFile) -> None:
    """ValueError unless the file has a `text` column of strings without nulls (as far as the
    footer's statistics tell: reading a row group checks the rest)."""
    schema = f.schema_arrow
    if "text" not in schema.names:
        raise ValueError(f"no 'text' column (columns: {schema.names})")
    t = schema.field("text").type
    if not _is_text_type(t):
        raise ValueError(f"its 'text' column holds {t} values, not strings")
    j = f.schema_arrow.get_field_index("text")
    for i in range(f.metadata.num_row_groups):
        stats = f.metadata.row_group(i).column(j).statistics
        if stats is not None and stats.has_null_count and stats.null_count:
            raise ValueError(f"its 'text' column holds {stats.null_count} nulls in row group {i}")


def validate_shards(paths: list[str]) -> list[str]:
    """Check every shard's schema from its footer alone (milliseconds per shard, no row group is
    read): a parquet file with a `text` column of strings and no recorded nulls. UserError naming
    the first bad shard; returns `paths`. Training and tokenizer training call it on the shards
    they will use, so that a bad one is found at the start, not hours in."""
    for path in paths:
        try:
            _check_schema(pq.ParquetFile(path))
        except Exception as e:  # truncated, not parquet, wrong schema
            raise UserError(f"shard {path} cannot be used: {e}") from None
    return paths


def num_row_groups(path: str) -> int:
    try:
        f = pq.ParquetFile(path)
        _check_schema(f)
        return f.num_row_groups
    except Exception as e:  # a truncated or corrupt file: say which one
        raise UserError(f"cannot read shard {path}: {e}") from e


def read_row_group_texts(path: str, row_group: int) -> list[str]:
    try:
        column = pq.ParquetFile(path).read_row_group(row_group, columns=["text"]).column("text")
        if not _is_text_type(column.type):
            raise ValueError(f"its 'text' column holds {column.type} values, not strings")
        if column.null_count:
            raise ValueError(f"its 'text' column holds {column.null_count} nulls in row group {row_group}")
        return column.to_pylist()
    except Exception as e:  # a truncated or corrupt file: say which one
        raise UserError(f"cannot read shard {path}: {e}") from e


def iter_texts(split="train", data_dir=None, folder=None):
    """Yield document strings of the train split (all shards but the last) or the val split."""
    for path in split_shards(split, data_dir, folder):
        for rg in range(num_row_groups(path)):
            yield from read_row_group_texts(path, rg)


def is_valid_shard(path: str) -> bool:
    """True when `path` opens as parquet with a `text` column and every row group's metadata is
    readable. A truncated download loses the footer, so it fails here."""
    try:
        f = pq.ParquetFile(path)
        return "text" in f.schema_arrow.names and f.metadata.num_rows >= 0
    except Exception:
        return False


def check_writable(folder: str) -> None:
    """Create `folder` if needed; UserError if it is read-only. A folder without any write bit counts
    as read-only even for root, who could write there anyway: a shared data root is marked that way."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {folder}: {e}") from e
    if not os.access(folder, os.W_OK) or not os.stat(folder).st_mode & 0o222:
        raise UserError(f"{folder} is read-only (a shared data root?): set NANOCHAT_DATA to a folder you own, "
                        f"or pass --out")


def write_shard(path: str, texts: list[str], row_group_size: int = ROW_GROUP_SIZE) -> None:
    """Write one shard atomically (temporary name, then rename), in the hub's layout."""
    tmp = f"{path}.tmp.{os.getpid()}"
    table = pa.table({"text": pa.array(texts, type=pa.string())})
    try:
        pq.write_table(table, tmp, row_group_size=row_group_size, compression="zstd")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ---------------------------------------------------------------------------
# Downloading one shard from the hub (the `nanochat data download` stage drives this)

def download_shard(url: str, path: str, timeout: float = 30.0, retries: int = 5, backoff: float = 2.0) -> None:
    """download.download_file, accepting only a readable parquet shard with a `text` column."""
    download_file(url, path, timeout=timeout, retries=retries, backoff=backoff, validate=is_valid_shard,
                  what="a valid parquet shard with a 'text' column")
