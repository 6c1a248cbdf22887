"""The packing core and the pretraining loader: packing invariants, utilization on a real shard,
disjoint ranks (in-process and under real torchrun), exact resume, deterministic validation."""
import json
import os
import random
import subprocess
import sys
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from nanochat.common import UserError
from nanochat.dataloader import BestFitPacker, PretrainLoader
from nanochat.dataset import list_shards, shard_name, write_shard

BOS = 0


def synthetic_docs(n, max_len, seed=0):
    """Documents [BOS, unique ids...] so that every token can be traced back to its place."""
    rng = random.Random(seed)
    docs, nxt = [], 1
    for _ in range(n):
        L = rng.randint(1, max_len)
        docs.append([BOS] + list(range(nxt, nxt + L)))
        nxt += L
    return docs


def small_folder(root, data_dir, n_train_shards, docs_per_shard, rows_per_group, max_chars, seed=0):
    """Shards cut from real documents (random lengths), small row groups so there are many units."""
    src = pq.ParquetFile(list_shards(data_dir)[0]).read_row_group(0, columns=["text"]).column("text").to_pylist()
    rng = random.Random(seed)
    texts = [t[: rng.randint(20, max_chars)] for t in src]
    os.makedirs(root, exist_ok=True)
    k = 0
    for i in range(n_train_shards + 1):
        n = docs_per_shard if i < n_train_shards else docs_per_shard // 2
        write_shard(os.path.join(root, shard_name(i)), texts[k:k + n], row_group_size=rows_per_group)
        k += n
    return str(root)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, data_dir):
    return small_folder(tmp_path_factory.mktemp("shards"), data_dir, 3, 120, 16, 2000)


def pack_rows(docs, row_len, buffer_size=1000, cut=True, masks=False, pad=False):
    """Every row a BestFitPacker makes of `docs` (token lists, or (tokens, mask) pairs with masks=True),
    keeping about `buffer_size` documents buffered; stops when what is left cannot fill a row."""
    packer = BestFitPacker(row_len, cut=cut, pad=pad)
    it = iter(enumerate(docs))
    while True:
        while len(packer) < buffer_size or packer.available < row_len:
            nxt = next(it, None)
            if nxt is None:
                break
            key, item = nxt
            if masks:
                packer.add(item[0], key, mask=item[1])
            else:
                packer.add(item, key)
        row = np.full(row_len, -1, dtype=np.int64)
        mask = np.zeros(row_len, dtype=np.int8) if (masks or pad) else None
        if not packer.pack_row(row, mask):
            return
        yield (row, mask) if (masks or pad) else row


def rows_of(batches):
    """Reassemble the (T+1)-token rows from (inputs, targets) batches."""
    out = []
    for x, y in batches:
        assert x.dtype == torch.long and y.dtype == torch.long and x.shape == y.shape
        assert torch.equal(x[:, 1:], y[:, :-1])
        out += [np.concatenate([r[:1], t]) for r, t in zip(x.numpy(), y.numpy())]
    return out


# ---------------------------------------------------------------------------- packing core

def test_best_fit_small_example():
    docs = [[BOS, 1, 2, 3, 4, 5], [BOS, 6, 7], [BOS, 8, 9, 10], [BOS, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]
    rows = [r.tolist() for r in pack_rows(docs, 10, buffer_size=10)]
    # row 1: largest fitting (6) then largest fitting in 4 (4); row 2: 3 tokens fit, then nothing
    # fits in 7 -> the longest (12 tokens) is cut; its tail opens row 3
    assert rows[0] == [BOS, 1, 2, 3, 4, 5, BOS, 8, 9, 10]
    assert rows[1] == [BOS, 6, 7, BOS, 11, 12, 13, 14, 15, 16]
    assert len(rows) == 2  # the 5-token tail cannot fill a third row
    packer = BestFitPacker(10, cut=False)  # upstream-style: the 12-token document is cropped
    for i, d in enumerate(docs):
        packer.add(d, i)
    row = np.empty(10, dtype=np.int64)
    assert packer.pack_row(row) and packer.pack_row(row) and row.tolist() == rows[1]
    assert packer.tokens_dropped == 5 and not packer.pack_row(row)


@pytest.mark.parametrize("row_len", [17, 65, 257])
def test_packing_invariants(row_len):
    docs = synthetic_docs(400, 300, seed=row_len)
    packer = BestFitPacker(row_len)
    rows = []
    it = iter(enumerate(docs))
    while True:
        while len(packer) < 50:
            nxt = next(it, None)
            if nxt is None:
                break
            packer.add(nxt[1], nxt[0])
        row = np.empty(row_len, dtype=np.int64)
        if not packer.pack_row(row):
            break
        rows.append(row)
    n_in = sum(map(len, docs))
    assert packer.tokens_in == n_in and packer.tokens_dropped == 0
    flat = np.concatenate(rows + [packer.leftover()])
    nonbos = flat[flat != BOS]
    assert len(flat) == n_in and len(np.unique(nonbos)) == len(nonbos)  # none lost, none duplicated
    assert len(packer.leftover()) < row_len + 300 and packer.tokens_out == row_len * len(rows)
    # each document's tokens are contiguous in the row stream: a cut document goes on at the very
    # start of the next row
    stream = np.concatenate(rows)
    pos = {int(t): i for i, t in enumerate(stream) if t != BOS}
    n_cut = 0
    for d in docs:
        p = [pos[t] for t in d if t != BOS and t in pos]
        if p:
            assert p == list(range(p[0], p[0] + len(p))) and stream[p[0] - 1] == BOS
            n_cut += (p[0] - 1) // row_len != p[-1] // row_len
    assert n_cut > 0
    # a row either starts with BOS or continues the document that ended the previous row
    firsts = {d[1] for d in docs if len(d) > 1}
    for prev, row in zip(rows, rows[1:]):
        if row[0] != BOS:
            assert row[0] == prev[-1] + 1 or (prev[-1] == BOS and row[0] in firsts)


def test_crop_mode_drops_and_masks_travel():
    docs = synthetic_docs(200, 300, seed=1)
    rows = list(pack_rows(docs, 65, buffer_size=30, cut=False))
    assert all(r[0] == BOS for r in rows)  # upstream-style: every row BOS-aligned, remainders dropped
    kept = np.concatenate(rows)
    assert len(kept) < 0.9 * sum(map(len, docs))
    # masks: per-token masks are packed alongside their tokens
    items = [(d, [i % 2] * len(d)) for i, d in enumerate(docs)]
    owner = {t: i % 2 for i, d in enumerate(docs) for t in d[1:]}
    for row, mask in pack_rows(items, 65, buffer_size=30, masks=True):
        for t, m in zip(row, mask):
            if t != BOS:
                assert owner[int(t)] == m


def test_pad_mode_packs_whole_documents_best_fit_then_pads():
    docs = [[BOS, 1, 2, 3, 4, 5], [BOS, 6, 7], [BOS, 8, 9, 10], [BOS, 11, 12, 13, 14, 15, 16, 17, 18]]
    rows = [(r.tolist(), m.tolist()) for r, m in pack_rows(docs, 10, buffer_size=10, pad=True)]
    # row 1: the largest that fits (9), then nothing fits in 1 -> padding (left as the caller filled
    # it, mask 0); row 2: 6, then the largest that fits in 4 (4); row 3: the last document alone
    assert rows[0] == ([BOS, 11, 12, 13, 14, 15, 16, 17, 18, -1], [1] * 9 + [0])
    assert rows[1] == ([BOS, 1, 2, 3, 4, 5, BOS, 8, 9, 10], [1] * 10)
    assert rows[2] == ([BOS, 6, 7] + [-1] * 7, [1] * 3 + [0] * 7)
    assert len(rows) == 3  # a pad-mode packer empties itself: every document is used whole
    with pytest.raises(ValueError, match="whole documents"):
        BestFitPacker(4, pad=True).add([BOS, 1, 2, 3, 4], 0)


def test_utilization_real_shard(data_dir, tokenizer):
    texts = pq.ParquetFile(list_shards(data_dir)[0]).read_row_group(0, columns=["text"]).column("text").to_pylist()
    docs = tokenizer.encode(texts, prepend="<|bos|>", num_threads=2)
    n = sum(map(len, docs))
    for T in (512, 2048):
        ours = sum(map(len, pack_rows(docs, T + 1)))
        crop = sum(map(len, pack_rows(docs, T + 1, cut=False)))
        print(f"T={T}: utilization {ours / n:.4f} (upstream-style crop: {crop / n:.4f})")
        assert ours / n >= 0.95 and ours >= n - (T + 1) - max(map(len, docs))
        assert crop < ours


# ---------------------------------------------------------------------------- the loader

def test_loader_batches_and_full_pass(folder, tokenizer):
    texts = [t for p in list_shards(folder=folder)[:-1] for t in pq.read_table(p).column("text").to_pylist()]
    n_tokens = sum(map(len, tokenizer.encode(texts, prepend="<|bos|>")))
    loader = PretrainLoader(tokenizer, B=3, T=32, folder=folder, buffer_size=40, loop=False,
                            tokenizer_threads=1, rank=0, world_size=1)
    batches = list(loader)
    assert batches and all(x.shape == (3, 32) and x.device.type == "cpu" for x, _ in batches)
    rows = rows_of(batches)
    assert any(r[0] == tokenizer.get_bos_token_id() for r in rows)
    assert loader.packer.tokens_in == n_tokens  # every train document was loaded once
    assert loader.packer.tokens_out == len(rows) * 33
    assert loader.utilization() > 0.99
    # rows decode to real text from the shards
    bos = tokenizer.get_bos_token_id()
    first = rows[0].tolist()
    doc = first[1:first.index(bos, 1)] if bos in first[1:] else first[1:]
    assert any(tokenizer.decode(doc) in t for t in texts)


def token_counter(loader):
    rows = rows_of(list(loader))
    return Counter(np.concatenate(rows + [loader.packer.leftover()]).tolist()), loader.packer.tokens_in


def test_two_ranks_disjoint_union(folder, tokenizer):
    kw = dict(B=1, T=32, folder=folder, buffer_size=20, loop=False, tokenizer_threads=1)  # B=1: no partial batch
    one, n1 = token_counter(PretrainLoader(tokenizer, rank=0, world_size=1, **kw))
    r0 = PretrainLoader(tokenizer, rank=0, world_size=2, **kw)
    r1 = PretrainLoader(tokenizer, rank=1, world_size=2, **kw)
    u0 = {(s, rg) for s, rg, _, _ in r0.units}
    u1 = {(s, rg) for s, rg, _, _ in r1.units}
    assert u0 and u1 and not (u0 & u1)
    c0, n0 = token_counter(r0)
    c1, n1b = token_counter(r1)
    assert n0 + n1b == n1 and c0 + c1 == one
    # fewer units than ranks (the small validation shard): rows are strided instead
    v = [PretrainLoader(tokenizer, split="val", rank=r, world_size=7, **kw) for r in range(7)]
    assert all(len(x.units) == len(v[0].units) and x.units[0][2:] == (r, 7) for r, x in enumerate(v))


TORCHRUN_SCRIPT = r"""
import json, sys, numpy as np
from collections import Counter
from nanochat.common import compute_init, compute_cleanup
from nanochat.tokenizer import get_tokenizer
from nanochat.dataloader import PretrainLoader
_, rank, _, world, device = compute_init("cpu")
loader = PretrainLoader(get_tokenizer(), B=1, T=32, folder=sys.argv[1], buffer_size=20, loop=False, tokenizer_threads=1)
rows = [np.concatenate([x[:, :1].numpy(), y.numpy()], 1) for x, y in loader]
flat = np.concatenate([r.ravel() for r in rows] + [loader.packer.leftover()])
json.dump({"rank": rank, "world": world, "counts": Counter(flat.tolist()), "tokens_in": loader.packer.tokens_in},
          open(f"{sys.argv[2]}/rank{rank}.json", "w"))
compute_cleanup()
"""


def test_torchrun_two_ranks(folder, tokenizer, tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(TORCHRUN_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script), folder, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = [json.load(open(tmp_path / f"rank{i}.json")) for i in range(2)]
    assert [x["rank"] for x in res] == [0, 1] and all(x["world"] == 2 for x in res)
    one, n = token_counter(PretrainLoader(tokenizer, B=1, T=32, folder=folder, buffer_size=20, loop=False,
                                          tokenizer_threads=1, rank=0, world_size=1))
    both = Counter({int(k): v for k, v in res[0]["counts"].items()}) + Counter({int(k): v for k, v in res[1]["counts"].items()})
    assert both == one and res[0]["tokens_in"] + res[1]["tokens_in"] == n
    assert res[0]["counts"] != res[1]["counts"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, data_dir):
    # ~80 short documents: one epoch is ~100 batches of 2x32, so resumes cross epoch boundaries
    return small_folder(tmp_path_factory.mktemp("tiny"), data_dir, 2, 40, 8, 500, seed=3)


def test_exact_resume(tiny_folder, tokenizer):
    kw = dict(B=2, T=32, folder=tiny_folder, buffer_size=12, tokenizer_threads=1, rank=0, world_size=1)
    ref = PretrainLoader(tokenizer, **kw)
    total = 260
    states, batches = {}, []
    for i in range(total):
        states[i] = json.loads(json.dumps(ref.state_dict()))  # what a checkpoint would hold
        batches.append(next(ref))
    assert ref.epoch >= 2  # the run went through epoch boundaries
    assert any(s["pending"] for s in states.values()) and any(not s["pending"] for s in states.values())
    for k in (0, 1, 37, 101, 150, 199):
        res = PretrainLoader(tokenizer, **kw)
        next(res)  # a loader that already started: load_state_dict must stop its thread and restart
        res.load_state_dict(states[k])
        for i in range(k, min(k + 60, total)):
            x, y = next(res)
            assert torch.equal(x, batches[i][0]) and torch.equal(y, batches[i][1]), (k, i)
        assert res.state_dict() == states[min(k + 60, total)] if k + 60 < total else True
        res.close()
    ref.close()


def test_resume_refuses_changed_setup(tiny_folder, tokenizer):
    a = PretrainLoader(tokenizer, B=2, T=32, folder=tiny_folder, rank=0, world_size=1)
    next(a)
    st = a.state_dict()
    a.close()
    with pytest.raises(UserError, match="T"):
        PretrainLoader(tokenizer, B=2, T=16, folder=tiny_folder, rank=0, world_size=1).load_state_dict(st)
    with pytest.raises(UserError, match="world_size"):
        PretrainLoader(tokenizer, B=2, T=32, folder=tiny_folder, rank=0, world_size=2).load_state_dict(st)


def test_val_loader_deterministic(folder, tokenizer):
    kw = dict(B=2, T=32, split="val", folder=folder, buffer_size=20, tokenizer_threads=1, rank=0, world_size=1)
    a = [next(iter(PretrainLoader(tokenizer, **kw))) for _ in range(1)]
    la, lb = PretrainLoader(tokenizer, **kw), PretrainLoader(tokenizer, **kw)
    for _ in range(8):
        xa, ya = next(la)
        xb, yb = next(lb)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert torch.equal(a[0][0], PretrainLoader(tokenizer, **kw).__next__()[0])
    # the val loader reads the last shard only
    val_texts = pq.read_table(list_shards(folder=folder)[-1]).column("text").to_pylist()
    n = sum(map(len, tokenizer.encode(val_texts, prepend="<|bos|>")))
    lc = PretrainLoader(tokenizer, **dict(kw, loop=False))
    list(lc)
    assert lc.packer.tokens_in == n


def test_corrupt_shard_error_reaches_training_thread(tmp_path, folder, tokenizer):
    bad = tmp_path / "bad"
    bad.mkdir()
    paths = list_shards(folder=folder)
    data = open(paths[0], "rb").read()
    corrupt = bytearray(data)
    corrupt[50:len(data) // 2] = b"\x07" * (len(data) // 2 - 50)
    (bad / shard_name(0)).write_bytes(bytes(corrupt))
    (bad / shard_name(1)).write_bytes(open(paths[-1], "rb").read())
    loader = PretrainLoader(tokenizer, B=2, T=32, folder=str(bad), rank=0, world_size=1)
    with pytest.raises(UserError, match="shard_00000.parquet"):
        for _ in range(100):
            next(loader)
