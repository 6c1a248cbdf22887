"""nanochat data download: fetch pretraining shards from the hub into $NANOCHAT_DATA/pretrain.

Downloads the first N training shards plus the validation shard (the dataset's last shard, so
it sorts last in the folder). Shards already present and valid are skipped, so re-running
resumes an interrupted download; a shard that still fails after all retries is named at the end
and the command exits non-zero.
"""
import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed

from tqdm import tqdm

from nanochat.common import UserError
from nanochat.core_eval import ensure_eval_bundle
from nanochat.dataset import (DEFAULT_DATASET, HUB_DATASETS, check_writable, download_shard, is_valid_shard,
                              pretrain_dir, shard_name)
from nanochat.download import DownloadError, downloads_off


def main(argv=None):
    parser = argparse.ArgumentParser(prog="nanochat data download", description=__doc__.split("\n")[0])
    parser.add_argument("-n", "--num-shards", type=int, default=-1,
                        help="training shards to fetch, from the first (default -1: all of them)")
    parser.add_argument("-w", "--workers", type=int, default=4, help="parallel downloads (default 4)")
    parser.add_argument("--dataset", default=DEFAULT_DATASET, choices=sorted(HUB_DATASETS),
                        help=f"which hub dataset (default {DEFAULT_DATASET})")
    parser.add_argument("--base-url", default=os.environ.get("NANOCHAT_HUB_URL") or None,
                        help="fetch shard_NNNNN.parquet from this URL instead of the dataset's hub URL "
                             "(default: $NANOCHAT_HUB_URL if set)")
    parser.add_argument("--out", default=None, help="target folder (default $NANOCHAT_DATA/pretrain)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request without data (default 60)")
    parser.add_argument("--retries", type=int, default=5, help="retries per shard after the first try (default 5)")
    parser.add_argument("--backoff", type=float, default=2.0,
                        help="seconds before the first retry, doubling after each (default 2)")
    parser.add_argument("--eval-bundle", action="store_true",
                        help="also fetch the CORE eval bundle into $NANOCHAT_DATA/eval_bundle (otherwise "
                             "`nanochat eval base` fetches it on first use)")
    args = parser.parse_args(argv)
    if args.eval_bundle:
        print(f"CORE eval bundle: {ensure_eval_bundle(retries=args.retries, backoff=args.backoff, timeout=args.timeout)}")

    hub_url, max_shard = HUB_DATASETS[args.dataset]
    base_url = (args.base_url or hub_url).rstrip("/")
    num_train = max_shard if args.num_shards < 0 else min(args.num_shards, max_shard)
    if args.workers < 1:
        raise UserError("--workers must be at least 1")
    indices = list(range(num_train)) + [max_shard]  # training shards, then the validation shard

    out = args.out or pretrain_dir()
    todo = [i for i in indices if not is_valid_shard(os.path.join(out, shard_name(i)))]
    print(f"{args.dataset}: {len(indices)} shards wanted ({num_train} train + 1 validation = "
          f"{shard_name(max_shard)}), {len(indices) - len(todo)} already present, "
          f"{len(todo)} to fetch from {base_url} into {out}", flush=True)
    if not todo:
        return 0
    if downloads_off():
        raise UserError(f"{len(todo)} of the wanted shards are missing in {out} ({shard_name(todo[0])} ...) and "
                        f"downloads are off (NANOCHAT_OFFLINE / HF_HUB_OFFLINE): point NANOCHAT_DATA at a data root "
                        f"that has pretrain/*.parquet, or unset NANOCHAT_OFFLINE")
    check_writable(out)

    failed = {}

    def fetch(i):
        download_shard(f"{base_url}/{shard_name(i)}", os.path.join(out, shard_name(i)),
                      timeout=args.timeout, retries=args.retries, backoff=args.backoff)

    with ThreadPoolExecutor(max_workers=args.workers) as pool, tqdm(total=len(todo), unit="shard") as bar:
        futures = {pool.submit(fetch, i): i for i in todo}
        for fut in as_completed(futures):
            try:
                fut.result()
            except DownloadError as e:
                failed[futures[fut]] = str(e)
                bar.write(f"failed: {shard_name(futures[fut])}: {e}")
            bar.update(1)
    if failed:
        names = ", ".join(shard_name(i) for i in sorted(failed))
        print(f"error: {len(failed)} of {len(todo)} shards failed after {args.retries} retries: {names}. "
              f"Run the command again to retry them.", file=sys.stderr, flush=True)
        return 1
    print(f"done: {len(todo)} shards written to {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
