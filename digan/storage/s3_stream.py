"""Streaming S3 objects (shards): prefetched ranged GETs on botocore's synchronous client, resumed at the byte.

`register_gopen()` puts `s3://` in webdataset's `gopen_schemes`, so shard URLs like
`s3://bucket/prefix/shard-000000.tar` open as a `RetryingS3Reader`: s3fs for the HEAD, the bytes as
prefetched ranged GETs (`_RangeFetcher`, cheaper per MiB than aiohttp). Transient errors are retried
within the process's outage budget (`digan.storage.s3`). Built lazily per PID, so fork-safe like the
filesystem.
"""

from __future__ import annotations

import io
import os
import sys

from digan.storage import strip_scheme
from digan.storage.s3 import (S3Settings, endpoint_url, Outage, backoff_sleep, current_settings, is_transient,
                              s3_filesystem)


class _RangeFetcher:
    """Ranged GETs of this process, on botocore's synchronous client (urllib3), one background thread.

    Measured on loopback (benchmarks/data.py): s3fs's `_cat_file` (aiobotocore + aiohttp, whose
    protocol feeds the body through Python in 64 KiB pieces and joins them) costs 1.3-2 CPU-ms per
    MiB; a urllib3 body read straight into a preallocated buffer 0.6. At 185 KiB per 128px clip that is
    the difference between S3 at ~70 % and ~90 % of local throughput per core. s3fs keeps listing,
    HEAD, the manifest and the builder's uploads; this carries only the shard bytes. The client is
    built lazily per PID (fork-safe like the filesystem), with the same endpoint, region, profile and
    the standard AWS credential chain, retries and timeouts as `s3_filesystem`.
    """

    _cache: dict[tuple[int, S3Settings], "_RangeFetcher"] = {}

    def __init__(self, settings: S3Settings):
        import botocore.config
        import botocore.session
        from concurrent.futures import ThreadPoolExecutor

        session = botocore.session.Session(profile=settings.profile)
        config = botocore.config.Config(
            s3={"addressing_style": "path"}, connect_timeout=10, read_timeout=60,
            retries={"max_attempts": settings.max_retries + 1, "mode": "standard"}, max_pool_connections=4)
        self.client = session.create_client("s3", endpoint_url=endpoint_url(settings), region_name=settings.region,
                                            config=config)
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="digan-s3")
        self.settings = settings
        # Range buffers for reuse, by capacity (a power of two, so the few sizes of a run's ranges share
        # them, the odd-sized last range of each shard included). A fresh multi-MiB buffer costs a page
        # fault per 4 KiB on first touch (the kernel zeroes each page): measured ~0.9 CPU-ms per MiB on
        # this VM, more than receiving the bytes. One buffer per capacity is kept (a reader releases its
        # current range before it submits the next). list.pop/append are atomic under the GIL.
        self._free: dict[int, list[bytearray]] = {}

    @classmethod
    def get(cls, settings: S3Settings) -> "_RangeFetcher":
        key = (os.getpid(), settings)
        if key not in cls._cache:
            cls._cache[key] = cls(settings)
        return cls._cache[key]

    def fetch(self, key: str, start: int, end: int) -> memoryview:
        """Bytes [start, end) of s3://key as a read-only view of one buffer (no per-piece copies).

        A body cut by a transient error (connection reset, read timeout, endpoint down) is resumed from
        the first missing byte, with backoff, for as long as the outage budget allows (`Outage`); what
        arrived is kept. botocore retries the request itself, not a broken body. Other errors, and
        S3OutageError once the budget is spent, propagate.
        """
        bucket, _, name = key.partition("/")
        capacity = 1 << max(end - start - 1, 0).bit_length()
        free = self._free.get(capacity)
        buf = free.pop() if free else bytearray(capacity)
        view, n, attempt = memoryview(buf)[: end - start], 0, 0
        while n < len(view):
            try:
                body = self.client.get_object(Bucket=bucket, Key=name, Range=f"bytes={start + n}-{end - 1}")["Body"]
                try:
                    raw = body._raw_stream  # urllib3 response
                    # Its http.client response reads the socket straight into our buffer (urllib3's own
                    # readinto reads into a temporary and copies). S3 bodies come undecoded either way.
                    fp = getattr(raw, "_fp", None)
                    readinto = fp.readinto if fp is not None and hasattr(fp, "readinto") else raw.readinto
                    while n < len(view):
                        got = readinto(view[n:])
                        if not got:
                            raise ConnectionError(f"connection closed after {n} of {len(view)} bytes at {start}")
                        n += got
                finally:
                    body.close()
                Outage.ok()
            except Exception as e:
                if not is_transient(e):
                    raise
                Outage.failed(e, self.settings, f"s3://{key} at byte {start + n}")
                backoff_sleep(attempt, self.settings)
                attempt += 1
        return view.toreadonly()

    def release(self, view: memoryview) -> None:
        """Take back the buffer of a range returned by `fetch`; the caller holds no other view of it."""
        buf = view.obj
        view.release()
        if isinstance(buf, bytearray):
            free = self._free.setdefault(len(buf), [])
            if not free:
                free.append(buf)

    def submit(self, key: str, start: int, end: int):
        return self.pool.submit(self.fetch, key, start, end)


class RetryingS3Reader(io.RawIOBase):
    """A sequential read-only stream of one S3 object: ranged GETs, prefetched, retried.

    The object is fetched in ranges on a background thread (`_RangeFetcher`), the next range always
    in flight while the current one is consumed, so reading overlaps with decoding. The first range is
    `first_chunk_bytes` (a shard starts streaming after one short GET); each next one doubles, up to
    `chunk_bytes`: a GET costs ~3 CPU-ms of botocore request handling on top of ~0.5 CPU-ms per MiB of
    body on loopback; long ranges with recycled buffers (`_RangeFetcher`) halve the per-clip fetch cost
    (1.2 -> 0.6 CPU-ms per MiB, benchmarks/data.py). At most two ranges (the one being read and the
    one in flight) are held in memory per open shard. A range that fails with a transient error (reset,
    timeout, 5xx, short read) is fetched again after an exponential backoff, on top of botocore's own
    retries, so a connection reset in the middle of a shard costs a retry, not the shard. Going around
    fsspec's file object also saves most of its per-read CPU (-> benchmarks/data.py).
    """

    def __init__(self, url: str, settings: S3Settings | None = None, chunk_bytes: int = 32 << 20,
                 first_chunk_bytes: int = 8 << 20):
        super().__init__()
        self.url, self.settings, self.chunk_bytes = url, settings or current_settings(), chunk_bytes
        self._range_bytes = min(first_chunk_bytes, chunk_bytes)  # length of the next range submitted
        self.key = strip_scheme(url)
        self.fs = s3_filesystem(self.settings)
        self.fetcher = _RangeFetcher.get(self.settings)
        # HEAD now: a missing object fails here (FileNotFoundError, no retries), and we learn the size.
        self.size = int(self._retrying(lambda: self.fs.info(self.key), 0)["size"])
        self.pos = 0  # object offset of the next byte returned
        self._buf, self._buf_start = memoryview(b""), 0
        self._next = self._submit(0)

    def _submit(self, start: int):
        if start >= self.size:
            return None
        end = min(start + self._range_bytes, self.size)
        self._range_bytes = min(2 * self._range_bytes, self.chunk_bytes)
        return start, end, self.fetcher.submit(self.key, start, end)

    def _retrying(self, fn, offset: int):
        """fn() retried on transient errors until it succeeds or the outage budget is spent."""
        attempt = 0
        while True:
            try:
                out = fn()
                Outage.ok()
                return out
            except Exception as e:
                if not is_transient(e):
                    raise
                Outage.failed(e, self.settings, f"{self.url} at byte {offset}")
                if attempt < 3 or attempt % 10 == 0:
                    print(f"s3: transient error on {self.url} at byte {offset} ({type(e).__name__}); "
                          f"retry {attempt + 1} (budget {self.settings.retry_budget_s:g} s)", file=sys.stderr)
                backoff_sleep(attempt, self.settings)
                attempt += 1

    def _advance(self) -> bool:
        """Make the range holding `self.pos` current; False at the end of the object."""
        pos = self.pos
        if pos >= self.size:
            return False
        if self._next is None or not self._next[0] <= pos < self._next[1]:
            if self._next is not None:  # a seek beyond the prefetched range: fetch from the new offset
                self._next[2].cancel()
            self._next = self._submit(pos)
        start, end, fut = self._next
        first = [fut]

        def get():  # `fetch` returns the whole range or raises; a retry fetches the range again
            return (first.pop() if first else self.fetcher.submit(self.key, start, end)).result()

        buf = self._retrying(get, start)
        self._release_buf()
        self._buf = buf
        self._buf_start = start
        self._next = self._submit(start + len(self._buf))
        return True

    def _release_buf(self) -> None:
        if self._buf.obj is not None and len(self._buf):
            self.fetcher.release(self._buf)
        self._buf = memoryview(b"")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        """Move the read position; data is fetched only when read (skipping is free inside a range)."""
        target = offset if whence == 0 else self.pos + offset if whence == 1 else self.size + offset
        if target < 0:
            raise ValueError(f"negative seek position {target}")
        self.pos = target
        return target

    def read(self, n: int | None = -1) -> bytes:
        if n is None or n < 0:
            n = self.size - self.pos
        off = self.pos - self._buf_start
        if 0 <= off and off + n <= len(self._buf):  # the common case: one copy out of the current range
            self.pos += n
            return self._buf[off: off + n].tobytes()
        buf = bytearray(max(0, min(n, self.size - self.pos)))
        del buf[self.readinto(buf):]
        return bytes(buf)

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, b) -> int:
        """Copy up to len(b) bytes straight from the current range (what io.BufferedReader calls)."""
        out, done = memoryview(b).cast("B"), 0
        while done < len(out):
            off = self.pos - self._buf_start
            if not 0 <= off < len(self._buf):
                if not self._advance():
                    break
                continue
            k = min(len(out) - done, len(self._buf) - off)
            out[done: done + k] = self._buf[off: off + k]
            self.pos += k
            done += k
        return done

    def close(self) -> None:
        if self._next is not None:
            self._next[2].cancel()
            self._next = None
        self._release_buf()
        super().close()


def open_s3(url: str, mode: str = "rb", bufsize: int = 1 << 20, **kw):
    """webdataset gopen handler for s3:// (read-only, sequential)."""
    if mode != "rb":
        raise ValueError(f"s3 shards are read-only here, got mode {mode!r}")
    # Unbuffered: `read` slices the current range directly (one copy of only the bytes the tar reader
    # keeps; skipped frames are never copied) and `seek` is arithmetic. An io.BufferedReader on top
    # would copy every byte once more into its own buffer.
    return RetryingS3Reader(url)


def register_gopen() -> None:
    """Make webdataset open s3:// URLs with `open_s3` (idempotent)."""
    import webdataset as wds

    wds.gopen_schemes["s3"] = open_s3
