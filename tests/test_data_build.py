"""`nanochat data build` from real text in mixed formats, and from bad inputs."""
import gzip
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import cli
from nanochat.common import UserError
from nanochat.dataset import iter_texts, list_shards, shard_name, write_shard
from nanochat.stages.data_build import cut_document
from nanochat.stages.data_build import main as build


@pytest.fixture(scope="module")
def real_docs(data_dir):
    """120 real documents from the offline validation shard."""
    val = list_shards(data_dir)[-1]
    return pq.ParquetFile(val).read_row_group(0, columns=["text"]).column("text").to_pylist()[:120]


def make_inputs(root, docs):
    """A folder of mixed inputs: .txt and .md files, a nested .jsonl, a .jsonl.gz, a .parquet,
    an exact duplicate, an empty file and a file type that must be ignored."""
    (root / "books" / "deep").mkdir(parents=True)
    for i, d in enumerate(docs[:20]):
        (root / "books" / f"doc{i:02d}.txt").write_text(d, encoding="utf-8")
    (root / "books" / "readme.md").write_text(docs[20], encoding="utf-8")
    (root / "books" / "copy_of_doc00.txt").write_text(docs[0] + "\n\n", encoding="utf-8")  # duplicate
    (root / "books" / "empty.txt").write_text("   \n", encoding="utf-8")
    (root / "books" / "notes.csv").write_text("a,b\n1,2\n")  # not an input type: ignored in folders
    with open(root / "books" / "deep" / "rows.jsonl", "w", encoding="utf-8") as f:
        for d in docs[21:60]:
            f.write(json.dumps({"text": d, "id": 1}) + "\n")
        f.write("\n")  # blank lines are fine
    with gzip.open(root / "more.jsonl.gz", "wt", encoding="utf-8") as f:
        for d in docs[60:80]:
            f.write(json.dumps({"text": d}) + "\n")
    pq.write_table(pa.table({"id": list(range(40)), "text": docs[80:120]}), root / "table.parquet")
    return [str(root / "books"), str(root / "more.jsonl.gz"), str(root / "table.parquet")]


def test_cut_document_at_paragraphs():
    paras = [("word " * n).strip() for n in (50, 80, 30, 110, 10)]
    text = "\n\n".join(paras)
    pieces = cut_document(text, 600)
    assert all(len(p) <= 600 for p in pieces)
    assert "\n\n".join(pieces) == text  # cut only at paragraph breaks here, nothing lost
    assert cut_document("x" * 25, 10) == ["x" * 10, "x" * 10, "x" * 5]  # no break anywhere: hard cut
    lines = "\n".join(["line of text"] * 10)
    assert all(len(p) <= 30 for p in cut_document(lines, 30))
    assert cut_document("  \n\n ", 10) == []


def test_build_mixed_inputs(tmp_path, real_docs, capsys, tokenizer):
    inputs = make_inputs(tmp_path / "in", real_docs)
    out = tmp_path / "pretrain"
    assert build(inputs + ["--out", str(out), "--max-doc-chars", "4000", "--val-fraction", "0.1",
                           "--shard-chars", "150000"]) == 0
    msg = capsys.readouterr().out
    all_pieces = [p for d in real_docs[:120] + [real_docs[0]] for p in cut_document(d, 4000)]
    assert len(all_pieces) - len(set(all_pieces)) >= len(cut_document(real_docs[0], 4000))  # the copied file
    assert f"dropped {len(all_pieces) - len(set(all_pieces))} exact duplicates" in msg
    paths = list_shards(folder=str(out))
    assert len(paths) >= 3 and [os.path.basename(p) for p in paths] == [shard_name(i) for i in range(len(paths))]
    train = list(iter_texts("train", folder=str(out)))
    val = list(iter_texts("val", folder=str(out)))
    # every document cut from the inputs appears exactly once, none longer than the limit
    expected = sorted({p for d in real_docs[:120] for p in cut_document(d, 4000)})
    assert sorted(train + val) == expected
    assert len(set(train) & set(val)) == 0
    assert all(len(t) <= 4000 for t in train + val)
    assert len(val) == round(0.1 * len(expected))
    assert f"{len(train):,} documents" in msg
    # deterministic: the same inputs give the same shards
    out2 = tmp_path / "again"
    build(inputs + ["--out", str(out2), "--max-doc-chars", "4000", "--val-fraction", "0.1", "--shard-chars", "150000"])
    assert list(iter_texts("train", folder=str(out2))) == train
    # the tokenizer reads them
    ids = tokenizer.encode(val[:3], prepend="<|bos|>")
    assert len(ids) == 3 and all(x[0] == tokenizer.get_bos_token_id() for x in ids)


def test_build_default_out_refuses_existing_then_force(tmp_path, real_docs, monkeypatch):
    monkeypatch.setenv("NANOCHAT_DATA", str(tmp_path / "data"))
    inputs = make_inputs(tmp_path / "in", real_docs)
    assert cli.main(["data", "build", *inputs]) == 0
    out = tmp_path / "data" / "pretrain"
    first = sorted(os.listdir(out))
    assert first == [shard_name(0), shard_name(1)]
    with pytest.raises(UserError, match="--force"):
        build(inputs)
    assert cli.main(["data", "build", *inputs]) == 1  # the CLI turns it into exit 1
    # --force replaces our shards (fewer now: one input) and leaves other files alone
    (out / "notes.txt").write_text("mine")
    assert build([inputs[2], "--force"]) == 0
    assert sorted(os.listdir(out)) == ["notes.txt", shard_name(0), shard_name(1)]
    assert len(list(iter_texts("train", folder=str(out)))) + len(list(iter_texts("val", folder=str(out)))) == \
        len({p for d in real_docs[80:120] for p in cut_document(d, 12000)})


def test_build_refuses_foreign_parquet_and_readonly(tmp_path, real_docs):
    inputs = make_inputs(tmp_path / "in", real_docs)
    out = tmp_path / "o"
    out.mkdir()
    write_shard(str(out / "mydata.parquet"), ["precious"])
    with pytest.raises(UserError, match="not shards"):
        build(inputs + ["--out", str(out), "--force"])
    assert (out / "mydata.parquet").exists()
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    try:
        with pytest.raises(UserError, match="read-only"):
            build(inputs + ["--out", str(ro)])
        assert os.listdir(ro) == []
    finally:
        os.chmod(ro, 0o755)


def test_build_never_touches_shared_root(data_dir, tmp_path):
    before = sorted(os.listdir(os.path.join(data_dir, "pretrain")))
    (tmp_path / "a.txt").write_text("one\n\ntwo")
    (tmp_path / "b.txt").write_text("three")
    with pytest.raises(UserError):
        build([str(tmp_path), "--out", os.path.join(data_dir, "pretrain")])
    assert sorted(os.listdir(os.path.join(data_dir, "pretrain"))) == before


def _gz_lines(n):
    return gzip.compress("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(n)).encode())


@pytest.mark.parametrize("setup, match", [
    (lambda d: None, "no such file"),
    (lambda d: (d / "x.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n'), r"x.jsonl:2: .*'text'"),
    (lambda d: (d / "x.jsonl").write_text('{"text": "a"}\nnot json\n'), r"x.jsonl:2: not valid JSON"),
    (lambda d: (d / "x.jsonl").write_text('{"text": "a"}\n{"text": "b \\ud800 c"}\n'), r"x.jsonl:2: .*surrogate"),
    (lambda d: pq.write_table(pa.table({"body": ["a", "b"]}), d / "x.parquet"), r"x.parquet: no 'text' column"),
    (lambda d: (d / "x.parquet").write_bytes(b"PAR1 this is not parquet"), r"x.parquet: cannot read"),
    (lambda d: (d / "x.txt").write_bytes(b"\xff\xfe\xfa bad utf8"), r"x.txt: cannot read"),
    (lambda d: (d / "x.csv").write_text("a,b"), "unsupported file type"),
    # binary data is not a document, whatever the extension says
    (lambda d: ((d / "a.txt").write_text("fine text"), (d / "x.txt").write_bytes(b"\0" * 4096)),
     r"x.txt: binary data"),
    (lambda d: ((d / "a.txt").write_text("fine text"), (d / "x.md.gz").write_bytes(gzip.compress(b"ab\0cd"))),
     r"x.md.gz: binary data"),
    (lambda d: (d / "x.jsonl").write_text('{"text": "a"}\n{"text": "b\\u0000c"}\n'), r"x.jsonl:2: binary data"),
    (lambda d: pq.write_table(pa.table({"text": ["a", "b\0"]}), d / "x.parquet"), r"x.parquet .*binary data"),
    # a compressed file cut short: an error naming it, never a build from what could be read
    (lambda d: ((d / "a.txt").write_text("fine text"), (d / "x.jsonl.gz").write_bytes(_gz_lines(3000)[:-9])),
     r"x.jsonl.gz: cannot read"),
    (lambda d: ((d / "a.txt").write_text("fine text"), (d / "x.jsonl.gz").write_bytes(_gz_lines(3000)[:4000])),
     r"x.jsonl.gz: cannot read"),
    (lambda d: ((d / "a.txt").write_text("fine text"), (d / "x.txt.gz").write_bytes(_gz_lines(3000)[:-1])),
     r"x.txt.gz: cannot read"),
    (lambda d: (d / "x.txt").write_text("only one document"), "need at least 2"),
    (lambda d: ((d / "a.txt").write_text("same"), (d / "b.txt").write_text("same")), "need at least 2"),
    (lambda d: (d / "sub").mkdir(), "no .txt/.md/.jsonl/.parquet files"),
])
def test_build_bad_inputs(tmp_path, setup, match):
    d = tmp_path / "in"
    d.mkdir()
    setup(d)
    files = sorted(os.listdir(d))
    target = [str(tmp_path / "missing.txt")] if not files else \
        [str(d / "sub")] if files == ["sub"] else [str(d / f) for f in files]
    with pytest.raises(UserError, match=match):
        build(target + ["--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_build_bad_flags(tmp_path):
    (tmp_path / "a.txt").write_text("a")
    for flags in (["--val-fraction", "0"], ["--val-fraction", "1.5"], ["--max-doc-chars", "0"]):
        with pytest.raises(UserError):
            build([str(tmp_path / "a.txt"), "--out", str(tmp_path / "o"), *flags])
