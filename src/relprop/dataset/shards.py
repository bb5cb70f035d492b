"""Shards on disk: safetensors files written under a temporary name, renamed when complete.

A shard either exists under its final name, whole, or not at all: a run killed mid-write
leaves only a hidden `.tmp` file, which the next run deletes and redoes. Writing happens in
one background thread so that the next batches are explained meanwhile.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from torch import Tensor

from ..errors import RelpropError

SHARD_FORMAT = "relprop-shard/1"
SHARD_RE = re.compile(r"shard-(\d{6})\.safetensors")


def shard_name(k: int) -> str:
    return f"shard-{k:06d}.safetensors"


def temp_name(final: Path) -> Path:
    """Hidden and host/process-specific: readers never see it, concurrent writers never
    share one."""
    return final.with_name(f".{final.name}.{socket.gethostname()}.{os.getpid()}.tmp")


def stale_temps(folder: Path, final_name: str | None = None) -> list[Path]:
    """Leftover temporary files (of one final name, or all)."""
    pattern = f".{final_name}.*.tmp" if final_name else ".*.tmp"
    return sorted(folder.glob(pattern))


def write_atomic(path: Path, data: bytes) -> None:
    """Write, flush to disk, then rename: the final name only ever holds complete data."""
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as fh:
            write_through(fh, data)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise RelpropError(describe_os_error(exc, path)) from exc
    _fsync_dir(path.parent)


def write_through(fh: BinaryIO, data: bytes) -> None:
    """Into the file and onto the disk (a full disk shows up here, as ENOSPC)."""
    fh.write(data)
    fh.flush()
    os.fsync(fh.fileno())


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def describe_os_error(exc: OSError, path: Path) -> str:
    """One line that says what to do; finished shards are never touched by a failure."""
    kept = "shards finished earlier are kept; run the same command again to resume"
    if exc.errno == errno.ENOSPC:
        return f"disk full while writing {path} ({kept} once space is free)"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {path}: {exc.strerror} (choose a writable --out; {kept})"
    return f"cannot write {path}: {exc.strerror or exc} ({kept})"


def encode_shard(tensors: dict[str, Tensor], metadata: dict[str, str]) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()},
                metadata={"format": SHARD_FORMAT, **metadata})


def read_header(path: Path, keys: tuple[str, ...] = ("index", "label", "target")
                ) -> tuple[dict[str, str], dict[str, Tensor]]:
    """A shard's metadata and its small per-sample tensors (never the relevance)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        return meta, {k: f.get_tensor(k) for k in keys}


def shard_paths(meta: dict[str, str]) -> list[str]:
    return json.loads(meta.get("paths", "[]"))


class ShardWriter:
    """One background thread writes shards in order; errors surface on the next call."""

    def __init__(self, folder: Path, on_written: Callable[[int], None] | None = None,
                 pending: int = 2) -> None:
        self.folder = folder
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relprop-shards")
        self._futures: list[Future] = []
        self._pending = pending
        self._on_written = on_written
        self._failed = False

    def submit(self, k: int, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
        self._check(block=len(self._futures) >= self._pending)
        self._futures.append(self._pool.submit(self._write, k, tensors, metadata))

    def _write(self, k: int, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
        if self._failed:  # after a full disk, later shards are not attempted
            raise RelpropError(f"shard {k} not written: an earlier shard failed")
        try:
            write_atomic(self.folder / shard_name(k), encode_shard(tensors, metadata))
        except BaseException:
            self._failed = True
            raise
        if self._on_written is not None:
            self._on_written(k)

    def _check(self, block: bool) -> None:
        while self._futures and (block or self._futures[0].done()):
            self._futures.pop(0).result()  # raises the writer's error here
            block = False

    def close(self, raise_errors: bool = True) -> None:
        """Wait for every shard submitted (re-raising a write error) and stop the thread."""
        try:
            while self._futures:
                future = self._futures.pop(0)
                if raise_errors:
                    future.result()
                else:
                    future.exception()  # waits; the error that stopped the run wins
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
