"""Downloads: the one downloader of the project (download_file: retries with backoff, a temporary
name renamed only once the file validates) and the offline switch every loader asks (downloads_off)."""
import os
import time

import requests

from nanochat.common import UserError


def downloads_off() -> bool:
    """NANOCHAT_OFFLINE=1 (or HF_HUB_OFFLINE=1): loaders never fetch what is missing; they say
    which path is missing and what would fetch it."""
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("NANOCHAT_OFFLINE", "HF_HUB_OFFLINE"))


class DownloadError(Exception):
    pass


class NotFound(DownloadError):
    """The server answered 404: the file does not exist (never retried)."""


def download_file(url: str, path: str, timeout: float = 30.0, retries: int = 5, backoff: float = 2.0,
                  validate=None, what: str = "a valid file") -> None:
    """Fetch `url` into `path`: stream into `path.tmp.<pid>`, check it with `validate(tmp_path)`
    (False or an exception = invalid), then rename, so `path` is never a torn file. Retries network
    errors, 5xx/408/429 answers, truncated bodies and invalid files with exponential backoff
    (backoff * 2**(attempt-1) seconds, `retries` times after the first try); other 4xx answers
    fail at once. Every downloader of the project (shards, task splits, the word list, the CORE
    bundle) goes through here. Raises NotFound on 404, DownloadError with the last reason otherwise."""
    if downloads_off():  # every caller checks first with a better message; this is the backstop
        raise UserError(f"{path} is missing and downloads are off (NANOCHAT_OFFLINE / HF_HUB_OFFLINE): "
                        f"not fetching {url}")
    tmp = f"{path}.tmp.{os.getpid()}"
    reason = "no attempt"
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        got = 0
        try:
            with requests.get(url, stream=True, timeout=timeout, headers={"User-Agent": "nanochat"}) as r:
                if r.status_code == 404:
                    raise NotFound(f"{url}: HTTP 404")
                if r.status_code != 200:
                    reason = f"HTTP {r.status_code}"
                    if 400 <= r.status_code < 500 and r.status_code not in (408, 429):
                        break  # forbidden etc.: retrying will not help
                    continue
                expected = r.headers.get("Content-Length")
                with open(tmp, "wb") as f:
                    for chunk in r.iter_content(chunk_size=1 << 20):
                        f.write(chunk)
                        got += len(chunk)
            if expected is not None and got != int(expected):
                reason = f"truncated: got {got} of {expected} bytes"
                continue
            try:
                ok = validate is None or validate(tmp) is not False
            except Exception as e:
                ok, what = False, f"{what} ({e})"
            if not ok:
                reason = f"not {what} ({got} bytes)"
                continue
            os.replace(tmp, path)
            return
        except (requests.RequestException, OSError) as e:
            reason = f"{type(e).__name__}: {e}"
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    raise DownloadError(reason)
