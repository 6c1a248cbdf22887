"""File primitives: durable atomic writes (temporary name, fsync, rename, fsync of the folder)
and bounded reads of regular files only, with their sha256 (checkpoints and metrics.jsonl use them)."""
import hashlib
import json
import os
import stat

import torch


def fsync_dir(d):
    # the rename itself is only durable once the directory entry is on disk
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def open_regular(path):
    """(binary file object, size) of `path`, which must be a regular file (a symlink to one is
    fine): opened without blocking, so a FIFO cannot hang the open, and checked before any byte
    is read, so a device such as /dev/zero is never read forever. ValueError otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode) or \
                stat.S_ISBLK(st.st_mode) else "a directory" if stat.S_ISDIR(st.st_mode) else "a socket or special file"
            raise ValueError(f"not a regular file but {kind}")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb"), st.st_size
    except BaseException:
        os.close(fd)
        raise


def sha256_of(f, size):
    """sha256 of the next `size` bytes of f (never more)."""
    h = hashlib.sha256()
    left = size
    while left > 0:
        block = f.read(min(1 << 20, left))
        if not block:
            break
        h.update(block)
        left -= len(block)
    return h.hexdigest()


def atomic_save(obj, path, writer):
    """Write `obj` to `path` via a temporary name; returns (sha256, size) of what was written
    (read back from the file, after the fsync)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            writer(obj, f)
            f.flush()
            os.fsync(f.fileno())
        digest, size = sha256_file(tmp), os.path.getsize(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fsync_dir(os.path.dirname(path))
    return digest, size


def torch_writer(obj, f):
    torch.save(obj, f)


def json_writer(obj, f):
    f.write(json.dumps(obj, indent=2).encode("utf-8"))
