"""Listing and reading pretraining shards: the real offline shards, and broken ones."""
import os
import shutil

import pytest

from nanochat.common import UserError
from nanochat.dataset import (is_valid_shard, iter_texts, list_shards, num_row_groups, read_row_group_texts,
                              shard_name, split_shards, write_shard)


def test_list_shards_real(data_dir):
    paths = list_shards(data_dir)
    assert len(paths) >= 2
    assert paths == sorted(paths)
    assert split_shards("val", data_dir) == paths[-1:]
    assert split_shards("train", data_dir) == paths[:-1]
    assert all(is_valid_shard(p) for p in paths[:2])


def test_iter_texts_val_real(data_dir):
    val = list_shards(data_dir)[-1]
    texts = list(iter_texts("val", data_dir))
    n = sum(len(read_row_group_texts(val, rg)) for rg in range(num_row_groups(val)))
    assert len(texts) == n > 0
    assert all(isinstance(t, str) and t for t in texts)


def test_empty_folder_is_clear_error(tmp_path):
    with pytest.raises(UserError, match="nanochat data download"):
        list_shards(folder=str(tmp_path))
    with pytest.raises(ValueError):
        next(iter_texts("test", folder=str(tmp_path)))


def test_shard_names_sort_validation_last():
    names = [shard_name(i) for i in (0, 1, 9, 10, 99, 240)] + [shard_name(6542)]
    assert sorted(names) == names
    assert shard_name(7) == "shard_00007.parquet"


def test_write_shard_roundtrip_and_tmp_files_ignored(tmp_path):
    texts = [f"document {i}" for i in range(2500)]
    write_shard(str(tmp_path / shard_name(0)), texts)
    write_shard(str(tmp_path / shard_name(1)), ["val doc"])
    (tmp_path / "shard_00002.parquet.tmp.123").write_bytes(b"partial")  # an interrupted download
    paths = list_shards(folder=str(tmp_path))
    assert [os.path.basename(p) for p in paths] == [shard_name(0), shard_name(1)]
    assert num_row_groups(paths[0]) == 3  # 1024-row groups, like the hub shards
    assert list(iter_texts("train", folder=str(tmp_path))) == texts
    assert list(iter_texts("val", folder=str(tmp_path))) == ["val doc"]


def test_truncated_shard_names_the_file(tmp_path, data_dir):
    src = list_shards(data_dir)[0]
    good = tmp_path / shard_name(0)
    shutil.copy(src, good)
    data = open(src, "rb").read()
    bad = tmp_path / shard_name(1)
    bad.write_bytes(data[: len(data) // 2])
    assert is_valid_shard(str(good)) and not is_valid_shard(str(bad))
    with pytest.raises(UserError, match="shard_00001.parquet"):
        list(iter_texts("val", folder=str(tmp_path)))
    # corrupt bytes inside a row group (footer intact): reading it names the file too
    corrupt = bytearray(data)
    corrupt[100:20000] = b"\x00" * 19900
    bad.write_bytes(bytes(corrupt))
    with pytest.raises(UserError, match="shard_00001.parquet"):
        read_row_group_texts(str(bad), 0)
