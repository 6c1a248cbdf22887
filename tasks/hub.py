"""Hugging Face datasets in the hub's own parquet-export layout.

Every dataset on the hub is also published as parquet on its `refs/convert/parquet` branch, as
`<subset>/<split>/0000.parquet`, `0001.parquet`, ... We keep exactly that layout locally:

    $NANOCHAT_DATA/tasks/<repo>/<subset>/<split>/*.parquet

so a data root filled by hand (or the offline copy in ../shared/data) and one filled by downloads
look the same. A split found on disk is read and the network is never touched.
"""
import os
import shutil

import pyarrow.parquet as pq

from nanochat.common import UserError, get_data_dir, print0
from nanochat.download import DownloadError, NotFound, download_file, downloads_off

DEFAULT_HF_URL = "https://huggingface.co"
TIMEOUT_S = 60          # per connection attempt / socket read
RETRIES = 5             # attempts per file for transient failures (5xx, 429, resets, torn files)
BACKOFF_S = 2.0         # wait BACKOFF_S * 2**attempt between attempts
MAX_FILES = 10_000      # a split never has more files than this; guards the 0000, 0001, ... probe


def split_dir(repo: str, subset: str, split: str, data_dir=None) -> str:
    return os.path.join(data_dir or get_data_dir(), "tasks", repo, subset, split)


def split_url(repo: str, subset: str, split: str, index: int, base_url=None) -> str:
    """URL of one parquet file of the export: .../datasets/<repo>/resolve/refs%2Fconvert%2Fparquet/<subset>/<split>/NNNN.parquet
    (`/` in the branch name is escaped, as the hub expects)."""
    base = (base_url or os.environ.get("NANOCHAT_HF_URL") or DEFAULT_HF_URL).rstrip("/")
    return f"{base}/datasets/{repo}/resolve/refs%2Fconvert%2Fparquet/{subset}/{split}/{index:04d}.parquet"


def local_files(repo: str, subset: str, split: str, data_dir=None) -> list[str]:
    folder = split_dir(repo, subset, split, data_dir)
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".parquet"))


def load_split(repo: str, subset: str, split: str, data_dir=None, download=True,
               retries=None, backoff=None, timeout=None) -> list[dict]:
    """All rows of one split as a list of dicts (the hub's column names). Downloads the split into
    the data root first when it is not there (unless offline)."""
    files = local_files(repo, subset, split, data_dir)
    if not files:
        folder = split_dir(repo, subset, split, data_dir)
        if not download or downloads_off():
            raise UserError(
                f"{repo} ({subset}/{split}) is not in {folder} and downloads are off. Unset NANOCHAT_OFFLINE/"
                f"HF_HUB_OFFLINE to fetch it from the hub on first use, or point NANOCHAT_DATA at a data root "
                f"that has tasks/{repo}/{subset}/{split}/*.parquet")
        files = download_split(repo, subset, split, data_dir, retries=retries, backoff=backoff, timeout=timeout)
    rows = []
    for path in files:
        try:
            rows.extend(pq.read_table(path).to_pylist())
        except Exception as e:
            raise UserError(f"cannot read {path}: {e} (delete it to download it again)") from e
    return rows


def download_split(repo, subset, split, data_dir=None, retries=None, backoff=None, timeout=None) -> list[str]:
    """Fetch 0000.parquet, 0001.parquet, ... until the hub answers 404, into a temporary folder
    that is renamed into place at the end: a split folder is either complete or absent."""
    folder = split_dir(repo, subset, split, data_dir)
    tmp_dir = f"{folder}.tmp.{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(tmp_dir)
    try:
        for index in range(MAX_FILES):
            url = split_url(repo, subset, split, index)
            path = os.path.join(tmp_dir, f"{index:04d}.parquet")
            if not fetch_file(url, path, retries, backoff, timeout, missing_ok=index > 0, folder=folder):
                break
        try:
            os.rename(tmp_dir, folder)
        except OSError:
            if not local_files(repo, subset, split, data_dir):  # another process won the race: use its copy
                raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return local_files(repo, subset, split, data_dir)


def check_parquet(path):
    pq.ParquetFile(path).metadata  # the footer is at the end: a torn file fails here


def fetch_file(url, path, retries=None, backoff=None, timeout=None, missing_ok=False, folder="",
               validate=check_parquet) -> bool:
    """download.download_file with the hub's defaults and user-facing errors. `retries` counts all
    attempts. Returns False on 404 when `missing_ok` (the end of a split's file list)."""
    retries = RETRIES if retries is None else retries
    try:
        download_file(url, path, timeout=TIMEOUT_S if timeout is None else timeout, retries=max(0, retries - 1),
                      backoff=BACKOFF_S if backoff is None else backoff, validate=validate,
                      what="a readable file of the expected format")
    except NotFound as e:
        if missing_ok:
            return False
        raise UserError(f"{url} does not exist (404): check the dataset name, subset and split") from e
    except DownloadError as e:
        raise UserError(
            f"could not download {url} into {folder or os.path.dirname(path)}: {e}. Without internet, set "
            f"NANOCHAT_DATA to a data root that already has it (e.g. ../shared/data) or copy the file(s) there; "
            f"NANOCHAT_HF_URL points hub downloads at a mirror") from e
    print0(f"downloaded {url}")
    return True
