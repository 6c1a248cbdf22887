"""nanochat data build: turn your own text files into pretraining shards.

Inputs are files or folders (searched recursively): .txt and .md files (one document per file),
.jsonl files (one document per line, in its `text` field) and .parquet files (one document per
row, in their `text` column); .gz versions of .txt/.md/.jsonl are read too. Documents longer than
--max-doc-chars are cut at paragraph boundaries (blank lines; failing that at line ends, then at
spaces). Exact duplicates (after stripping surrounding whitespace) are dropped, the rest is
shuffled with a fixed seed, --val-fraction of the documents go to the validation shard, and the
others are written as training shards of about --shard-chars characters each.
"""
import argparse
import gzip
import hashlib
import json
import os
import random
import re

import pyarrow.parquet as pq

from nanochat.common import UserError
from nanochat.dataset import check_writable, pretrain_dir, shard_name, write_shard

TEXT_EXTS = (".txt", ".md")
ALL_EXTS = (".txt", ".md", ".jsonl", ".parquet", ".txt.gz", ".md.gz", ".jsonl.gz")


def find_files(inputs: list[str]) -> list[str]:
    """Expand folders (recursively, sorted, hidden entries skipped); a file named explicitly must
    have a known extension, files inside folders without one are ignored."""
    files = []
    for inp in inputs:
        if os.path.isdir(inp):
            for root, dirs, names in os.walk(inp):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                files += [os.path.join(root, n) for n in sorted(names)
                          if not n.startswith(".") and n.lower().endswith(ALL_EXTS)]
        elif os.path.isfile(inp):
            if not inp.lower().endswith(ALL_EXTS):
                raise UserError(f"{inp}: unsupported file type (use {', '.join(ALL_EXTS)})")
            files.append(inp)
        else:
            raise UserError(f"{inp}: no such file or folder")
    return files


def _text(path, where, text):
    """text, unless it holds a NUL character: that is binary data (a text file never has one),
    which would otherwise become a "document" of garbage."""
    if "\0" in text:
        raise UserError(f"{path}{where}: binary data (a NUL character at position {text.index(chr(0))}), "
                        f"not text: remove this input")
    return text


def read_documents(path: str):
    """Yield the documents of one input file. Bad content is a UserError naming the file:
    binary data (NUL characters), invalid UTF-8, a compressed file that ends early (gzip
    checks every member's length and CRC, so a cut inside one is caught; a multi-member file cut
    exactly between two members cannot be told from a complete one)."""
    name = path.lower()
    opener = gzip.open if name.endswith(".gz") else open
    try:
        if name.endswith(".parquet"):
            f = pq.ParquetFile(path)
            if "text" not in f.schema_arrow.names:
                raise UserError(f"{path}: no 'text' column (columns: {', '.join(f.schema_arrow.names)})")
            for rg in range(f.num_row_groups):
                for t in f.read_row_group(rg, columns=["text"]).column("text").to_pylist():
                    if t is not None and not isinstance(t, str):
                        raise UserError(f"{path}: the 'text' column must hold strings")
                    yield _text(path, f" (row group {rg})", t or "")
        elif name.endswith((".jsonl", ".jsonl.gz")):
            with opener(path, "rt", encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
                    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                        raise UserError(f"{path}:{lineno}: each line must be an object with a string 'text' field")
                    try:  # JSON escapes can spell a lone surrogate ("\ud800"), which is not text
                        row["text"].encode("utf-8")
                    except UnicodeEncodeError as e:
                        raise UserError(f"{path}:{lineno}: the 'text' holds an unpaired surrogate "
                                        f"({row['text'][e.start]!r} at character {e.start}), which is not "
                                        f"valid Unicode: fix or drop that line") from None
                    yield _text(path, f":{lineno}", row["text"])
        else:
            with opener(path, "rt", encoding="utf-8") as f:
                text = f.read()
            yield _text(path, "", text)
    except UserError:
        raise
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise UserError(f"{path}: cannot read: {e}") from e
    except Exception as e:  # pyarrow errors on a corrupt parquet file
        raise UserError(f"{path}: cannot read: {e}") from e


def _split_long(text: str, max_chars: int, separators=("\n\n", "\n", " ")) -> list[str]:
    """Cut `text` into pieces of at most max_chars, at the coarsest separator that works."""
    if len(text) <= max_chars:
        return [text]
    if not separators:  # one unbroken run of characters: hard cut
        return [text[i:i + max_chars] for i in range(0, len(text), max_chars)]
    sep, rest = separators[0], separators[1:]
    parts = re.split(r"\n\s*\n", text) if sep == "\n\n" else text.split(sep)
    pieces, cur = [], ""
    for part in parts:
        if len(part) > max_chars:  # this part alone is too long: cut it at a finer separator
            if cur:
                pieces.append(cur)
                cur = ""
            pieces += _split_long(part, max_chars, rest)
        elif cur and len(cur) + len(sep) + len(part) > max_chars:
            pieces.append(cur)
            cur = part
        else:
            cur = cur + sep + part if cur else part
    if cur:
        pieces.append(cur)
    return pieces


def cut_document(text: str, max_chars: int) -> list[str]:
    """Pieces of at most max_chars, cut at paragraph boundaries where possible; empty ones dropped."""
    text = text.strip()
    if not text:
        return []
    return [p.strip() for p in _split_long(text, max_chars) if p.strip()]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="nanochat data build", description=__doc__.split("\n")[0])
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="files or folders")
    parser.add_argument("--out", default=None, help="output folder (default $NANOCHAT_DATA/pretrain)")
    parser.add_argument("--max-doc-chars", type=int, default=12000,
                        help="cut longer documents at paragraph boundaries (default 12000)")
    parser.add_argument("--val-fraction", type=float, default=0.01,
                        help="share of documents held out for the validation shard (default 0.01; at least 1)")
    parser.add_argument("--shard-chars", type=int, default=250_000_000,
                        help="characters per training shard (default 250M, like the hub shards)")
    parser.add_argument("--seed", type=int, default=42, help="shuffle seed (default 42)")
    parser.add_argument("--force", action="store_true",
                        help="replace the shard_*.parquet files already in --out")
    args = parser.parse_args(argv)
    if args.max_doc_chars < 1 or args.shard_chars < 1:
        raise UserError("--max-doc-chars and --shard-chars must be positive")
    if not 0 < args.val_fraction < 1:
        raise UserError("--val-fraction must be between 0 and 1 (exclusive)")

    out = os.path.abspath(args.out or pretrain_dir())
    existing = sorted(f for f in os.listdir(out) if f.endswith(".parquet")) if os.path.isdir(out) else []
    if existing and not args.force:
        raise UserError(f"{out} already holds {len(existing)} shards ({existing[0]} ...): pass --force to "
                        f"replace them, or --out EMPTY_FOLDER")
    if existing and any(not f.startswith("shard_") for f in existing):
        raise UserError(f"{out} holds parquet files that are not shards (shard_NNNNN.parquet); "
                        f"refusing to touch them: choose another --out")

    # read, cut, dedupe (exact, on whole pieces, by hash so memory holds each text once)
    files = find_files(args.inputs)
    if not files:
        raise UserError(f"no .txt/.md/.jsonl/.parquet files found in {', '.join(args.inputs)}")
    seen, docs = set(), []
    n_raw = n_pieces = n_dups = 0
    for path in files:
        for text in read_documents(path):
            n_raw += 1
            for piece in cut_document(text, args.max_doc_chars):
                n_pieces += 1
                h = hashlib.blake2b(piece.encode("utf-8"), digest_size=16).digest()
                if h in seen:
                    n_dups += 1
                    continue
                seen.add(h)
                docs.append(piece)
    if len(docs) < 2:
        raise UserError(f"only {len(docs)} distinct non-empty documents in the inputs: need at least 2 "
                        f"(one for training, one for validation)")

    random.Random(args.seed).shuffle(docs)
    n_val = min(len(docs) - 1, max(1, round(len(docs) * args.val_fraction)))
    val, train = docs[:n_val], docs[n_val:]
    shards, cur, cur_chars = [], [], 0
    for d in train:
        cur.append(d)
        cur_chars += len(d)
        if cur_chars >= args.shard_chars:
            shards.append(cur)
            cur, cur_chars = [], 0
    if cur:
        shards.append(cur)

    check_writable(out)
    for f in existing:  # --force: only our own shard files, and only now that the new data is ready
        os.remove(os.path.join(out, f))
    for i, shard in enumerate(shards):
        write_shard(os.path.join(out, shard_name(i)), shard)
    write_shard(os.path.join(out, shard_name(len(shards))), val)  # validation: the highest number

    train_chars = sum(map(len, train))
    val_chars = sum(map(len, val))
    print(f"read {len(files)} files, {n_raw:,} documents; cut into {n_pieces:,} pieces of <= "
          f"{args.max_doc_chars:,} chars; dropped {n_dups:,} exact duplicates", flush=True)
    print(f"wrote {len(shards)} training shards ({len(train):,} documents, {train_chars:,} chars) and "
          f"validation shard {shard_name(len(shards))} ({len(val):,} documents, {val_chars:,} chars) to {out}",
          flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
