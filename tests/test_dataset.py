"""Listing and reading pretraining shards: the real offline shards, and broken ones."""
import os
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat.common import UserError
from nanochat.dataset import (is_valid_shard, iter_texts, list_shards, num_row_groups, read_row_group_texts,
                              shard_name, split_shards, validate_shards, write_shard)


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


BAD_TEXT_COLUMNS = {
    "int": pa.array([1, 2, 3]),
    "binary": pa.array([b"a", b"b", b"c"]),
    "list": pa.array([["a"], ["b"], ["c"]]),
    "null": pa.array([None, None, None]),
    "strings with nulls": pa.array(["a", None, "c"]),
}


def _bad_folder(tmp_path, data_dir, kind):
    """A shard folder: one real shard, then a bad one with the given `text` column (as val)."""
    folder = tmp_path / kind.replace(" ", "_")
    folder.mkdir()
    shutil.copy(list_shards(data_dir)[0], folder / shard_name(0))
    pq.write_table(pa.table({"text": BAD_TEXT_COLUMNS[kind]}), folder / shard_name(1))
    return folder


@pytest.mark.parametrize("kind", sorted(BAD_TEXT_COLUMNS))
def test_validate_shards_reads_only_the_footer_and_names_the_bad_shard(tmp_path, data_dir, kind):
    folder = _bad_folder(tmp_path, data_dir, kind)
    paths = list_shards(folder=str(folder))
    assert validate_shards(paths[:1]) == paths[:1]
    with pytest.raises(UserError, match=f"shard .*{shard_name(1)} cannot be used") as e:
        validate_shards(paths)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=shard_name(1)):  # reading it directly is a clear error too
        read_row_group_texts(paths[1], 0)


def test_validate_real_shards(data_dir):
    paths = list_shards(data_dir)
    assert validate_shards(paths) == paths


@pytest.mark.parametrize("kind", ["int", "null"])
def test_train_base_and_tokenizer_train_refuse_bad_shards_in_one_line(tmp_path, data_dir, kind, tokenizer):
    """They used to start and then die with a traceback (a TypeError from the tokenizer, in the
    loader thread or in rustbpe)."""
    folder = _bad_folder(tmp_path, data_dir, kind)
    shutil.copy(folder / shard_name(1), folder / shard_name(2))  # bad in the training split too
    root = tmp_path / "root"
    (root / "pretrain").mkdir(parents=True)
    for name in os.listdir(folder):
        shutil.copy(folder / name, root / "pretrain" / name)
    env = dict(os.environ, NANOCHAT_DATA=str(root))
    for args in (["tokenizer", "train", "--vocab-size", "300", "--max-chars", "100000"],
                 ["train", "base", "--depth", "1", "--max-seq-len", "32", "--device-batch-size", "1",
                  "--total-batch-size", "32", "--num-iterations", "1", "--eval-every", "-1",
                  "--core-metric-every", "-1", "--sample-every", "-1", "--model-tag", "badshards",
                  "--device-type", "cpu"]):
        p = subprocess.run([sys.executable, "-m", "nanochat", *args], capture_output=True, text=True,
                           timeout=300, env=env, cwd=str(tmp_path))
        assert p.returncode == 1, (args, p.stderr[-2000:])
        assert "Traceback" not in p.stderr and f"{shard_name(1)} cannot be used" in p.stderr, p.stderr[-2000:]
