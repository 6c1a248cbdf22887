"""nanochat tokenizer train: byte-level BPE on the training shards, saved to $NANOCHAT_BASE_DIR/tokenizer."""
import argparse
import os

from nanochat.common import UserError, print0
from nanochat.report import get_report
from nanochat.tokenizer import Tokenizer, tokenizer_dir, train_from_shards


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train the BPE tokenizer on the pretraining shards.")
    parser.add_argument("--vocab-size", type=int, default=32768, help="total vocabulary incl. 9 special tokens")
    parser.add_argument("--max-chars", type=int, default=2_000_000_000, help="train on at most this many characters")
    parser.add_argument("--doc-cap", type=int, default=10_000, help="use at most this many characters of each document")
    parser.add_argument("--data-dir", default=None,
                        help="a folder of parquet shards, or a data root holding pretrain/ (default: $NANOCHAT_DATA/pretrain)")
    parser.add_argument("--out", default=None, help="output folder (default: $NANOCHAT_BASE_DIR/tokenizer)")
    args = parser.parse_args(argv)

    folder = None
    if args.data_dir:
        if not os.path.isdir(args.data_dir):
            raise UserError(f"--data-dir {args.data_dir} is not a folder")
        sub = os.path.join(args.data_dir, "pretrain")
        folder = sub if os.path.isdir(sub) else args.data_dir
    out = args.out or tokenizer_dir()
    print0(f"training a {args.vocab_size:,}-token BPE tokenizer on up to {args.max_chars:,} characters "
           f"(documents capped at {args.doc_cap:,})")
    tok, chars, seconds = train_from_shards(args.vocab_size, args.max_chars, args.doc_cap, folder=folder)
    tok.save(out)
    # quick self-check that what was saved loads and round-trips
    loaded = Tokenizer.load(out)
    sample = "Hello world! 12345 naïve café 你好 🙂"
    assert loaded.decode(loaded.encode(sample)) == sample
    print0(f"trained on {chars:,} characters in {seconds:.1f}s; vocab size {tok.get_vocab_size():,}; saved to {out}")
    get_report().log("Tokenizer training", [vars(args), {"train chars": chars, "train time (s)": round(seconds, 2),
                                                        "vocab size": tok.get_vocab_size()}])
    return 0
