"""nanochat tokenizer eval: bytes per token on several kinds of text, next to GPT-2 and GPT-4."""
import argparse
import gzip
import json
import os

import tiktoken
import tiktoken.load

from nanochat.common import get_data_dir, print0
from nanochat.dataset import iter_texts
from nanochat.download import downloads_off
from nanochat.report import get_report
from nanochat.tokenizer import get_tokenizer

CODE_SAMPLE = '''
def merge_intervals(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge overlapping closed intervals; the result is sorted by start."""
    merged = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged

if __name__ == "__main__":
    print(merge_intervals([(1, 3), (2, 6), (8, 10), (15, 18)]))  # [(1, 6), (8, 10), (15, 18)]
'''

MATH_SAMPLE = r'''
Let $f(x) = 3x^2 - 12x + 7$. Completing the square gives $f(x) = 3(x - 2)^2 - 5$, so the minimum
value is $-5$ at $x = 2$. For the sum $\sum_{k=1}^{n} k^2 = \frac{n(n+1)(2n+1)}{6}$, taking
$n = 24$ yields $4900$. Check: 24 * 25 = 600, 600 * 49 = 29400, and 29400 / 6 = 4900.
The determinant of [[2, -1], [4, 3]] is 2*3 - (-1)*4 = 10; 0.125 + 0.375 = 0.5; 1e-3 = 0.001.
'''

NON_ENGLISH_SAMPLE = '''
Der schnelle braune Fuchs springt über den faulen Hund, während die Sonne hinter den Bergen versinkt.
Le petit prince regardait les étoiles et se demandait laquelle était la sienne.
El conocimiento es poder, pero la curiosidad es el motor que lo pone en marcha.
Москва — столица России, крупнейший по численности населения город страны.
東京は日本の首都であり、世界で最も人口の多い都市圏の一つです。
서울은 대한민국의 수도이며 한강을 따라 펼쳐진 큰 도시입니다.
北京是中国的首都，有着三千多年的建城史。
'''

CHAT_FALLBACK = '''User: Can you explain what a hash table is?
Assistant: Sure! A hash table stores key-value pairs. It runs each key through a hash function to
pick a bucket, so looking up a key takes about the same time no matter how many entries there are.
User: What happens when two keys land in the same bucket?
Assistant: That's a collision. Common fixes are chaining (each bucket holds a small list) and open
addressing (probe for the next free slot).'''


def sample_texts(data_dir=None):
    """{name: text} of a few kinds of text; the validation shard and a chat transcript come from
    the data root when present."""
    data_dir = data_dir or get_data_dir()
    texts = {}
    try:
        docs, n = [], 0
        for doc in iter_texts("val", data_dir=data_dir):
            docs.append(doc)
            n += len(doc)
            if n > 200_000:
                break
        texts["val shard"] = "\n\n".join(docs)
    except Exception as e:  # no shards: say so in the table rather than fail the whole eval
        print0(f"(no validation shard: {e})")
    chat = None
    path = os.path.join(data_dir, "chat", "sharegpt.jsonl.gz")
    if os.path.exists(path):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            conv = json.loads(next(f))
        chat = "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in conv)
    texts["chat"] = chat or CHAT_FALLBACK
    texts["code"] = CODE_SAMPLE
    texts["math"] = MATH_SAMPLE
    texts["non-English"] = NON_ENGLISH_SAMPLE
    return texts


def load_reference(name):
    """A tiktoken reference encoding, or None when it cannot be loaded. tiktoken downloads its
    files on first use and caches them; with downloads off (NANOCHAT_OFFLINE) only the cache is used."""
    fetch = tiktoken.load.read_file
    if downloads_off():
        def fetch_refused(blobpath):
            raise OSError(f"downloads are off and {blobpath} is not in tiktoken's cache")
        tiktoken.load.read_file = fetch_refused  # read_file_cached falls back to this on a cache miss
    try:
        return tiktoken.get_encoding(name)
    except Exception:
        return None
    finally:
        tiktoken.load.read_file = fetch


def main(argv=None):
    parser = argparse.ArgumentParser(description="Bytes per token of our tokenizer vs GPT-2 and GPT-4.")
    parser.parse_args(argv)
    tok = get_tokenizer()
    refs = {"gpt2": load_reference("gpt2"), "gpt4": load_reference("cl100k_base")}
    missing = [k for k, v in refs.items() if v is None]
    texts = sample_texts()
    cols = ["ours"] + [k for k, v in refs.items() if v is not None]
    print0(f"vocab sizes: ours {tok.get_vocab_size():,}" +
           "".join(f", {k} {v.n_vocab:,}" for k, v in refs.items() if v is not None))
    print0(f"{'text':<12} {'bytes':>9} " + " ".join(f"{c + ' tok':>10} {c + ' B/tok':>10}" for c in cols))
    results = {}
    for name, text in texts.items():
        nbytes = len(text.encode("utf-8"))
        row = {"bytes": nbytes}
        counts = {"ours": len(tok.encode(text))}
        assert tok.decode(tok.encode(text)) == text
        for k, enc in refs.items():
            if enc is not None:
                counts[k] = len(enc.encode_ordinary(text))
        for c in cols:
            row[c] = {"tokens": counts[c], "bytes_per_token": nbytes / max(1, counts[c])}
        results[name] = row
        print0(f"{name:<12} {nbytes:>9,} " + " ".join(
            f"{row[c]['tokens']:>10,} {row[c]['bytes_per_token']:>10.2f}" for c in cols))
    if missing:
        print0(f"not compared: {', '.join(missing)} (tiktoken could not load them: it downloads their files "
               f"on first use, which failed or is off with NANOCHAT_OFFLINE)")
    get_report().log("Tokenizer evaluation", [{f"{name} bytes/token": round(r['ours']['bytes_per_token'], 3)
                                               for name, r in results.items()}])
    return 0
