"""S3 access for shards: one s3fs per process, path-style addressing, retries with exponential backoff.

`register_gopen()` (called when `digan.data.loader` is imported) puts `s3://` in webdataset's
`gopen_schemes`, so shard URLs like `s3://bucket/prefix/shard-000000.tar` open through s3fs. This module
itself imports neither torch nor webdataset, so the shard builder's workers stay light. Why per process: an `S3FileSystem` used before
a fork is not fork-safe (its aiohttp session and event loop belong to the parent), so the filesystem is
built lazily and cached by PID, bypassing fsspec's instance cache.

The endpoint and region come from `S3Settings` (filled from DataConfig), else from the standard AWS
environment/config chain (AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID, ~/.aws/...).
Credentials are never passed through here, stored in settings, printed or logged.
"""

from __future__ import annotations

import io
import os
import random
import sys
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class S3Settings:
    endpoint_url: str | None = None  # None = AWS_ENDPOINT_URL(_S3) or AWS itself
    region: str | None = None  # None = AWS_DEFAULT_REGION / AWS config
    max_retries: int = 5  # retries of one read/open after a transient error
    backoff_s: float = 0.2  # first backoff; doubles per retry (with jitter), capped at 10 s
    profile: str | None = None  # AWS config profile (credentials stay in the AWS config)


_settings = S3Settings()
_fs_cache: dict[tuple[int, S3Settings], object] = {}


def configure_s3(settings: S3Settings) -> None:
    """Set this process's default settings (DataLoader workers call it in their `__iter__`)."""
    global _settings
    _settings = settings


def is_s3(url: str) -> bool:
    return str(url).startswith("s3://")


def s3_filesystem(settings: S3Settings | None = None):
    """The s3fs filesystem of this process for `settings` (built on first use in each process)."""
    import s3fs

    settings = settings or _settings
    key = (os.getpid(), settings)
    fs = _fs_cache.get(key)
    if fs is None:
        endpoint = settings.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        client_kwargs = {"region_name": settings.region} if settings.region else {}
        fs = s3fs.S3FileSystem(
            endpoint_url=endpoint or None,
            client_kwargs=client_kwargs,
            # Path-style works with every S3-compatible server (SeaweedFS, MinIO, Ceph) and with AWS.
            config_kwargs={"s3": {"addressing_style": "path"}, "connect_timeout": 10, "read_timeout": 60,
                           "retries": {"max_attempts": settings.max_retries + 1, "mode": "standard"}},
            profile=settings.profile,
            skip_instance_cache=True,
        )
        _fs_cache[key] = fs
    return fs


def strip_scheme(url: str) -> str:
    return url[len("s3://"):] if is_s3(url) else url


def is_transient(exc: BaseException) -> bool:
    """Errors worth a retry: connection resets, timeouts, throttling and 5xx answers."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    text = f"{type(exc).__module__}.{type(exc).__name__}: {exc}"
    markers = ("ClientPayloadError", "ServerDisconnected", "ClientConnectorError", "ClientOSError",
               "EndpointConnectionError", "ConnectionClosedError", "ReadTimeout", "ConnectTimeout",
               "IncompleteRead", "ResponseStreamingError", "Connection reset", "SlowDown", "Throttl",
               "ServiceUnavailable", "InternalError", "RequestTimeout", "503", "500", "502", "504")
    if any(m in text for m in markers):
        return True
    cause = exc.__cause__ or exc.__context__
    return cause is not None and cause is not exc and is_transient(cause)


def backoff_sleep(attempt: int, settings: S3Settings) -> None:
    delay = min(10.0, settings.backoff_s * (2 ** attempt))
    time.sleep(delay * (0.5 + random.random()))  # jitter so many workers don't retry in lockstep


class RetryingS3Reader(io.RawIOBase):
    """A sequential read-only stream of one S3 object that survives transient errors.

    On a transient error the object is reopened at the current offset after an exponential backoff,
    so a connection reset in the middle of a shard costs a retry, not the shard.
    """

    def __init__(self, url: str, settings: S3Settings | None = None, block_size: int = 8 << 20):
        super().__init__()
        self.url, self.settings, self.block_size = url, settings or _settings, block_size
        self.pos = 0
        self.retries = 0  # transient errors survived (for tests and logs)
        self._f = None
        self._with_retries(lambda: None)  # open now, so a missing object fails here, not mid-stream

    def _drop(self) -> None:
        if self._f is not None:
            try:
                self._f.close()
            except Exception:  # closing a broken connection may fail again; the handle is dropped anyway
                pass
            self._f = None

    def _with_retries(self, fn):
        for attempt in range(self.settings.max_retries + 1):
            try:
                if self._f is None:
                    f = s3_filesystem(self.settings).open(strip_scheme(self.url), "rb", block_size=self.block_size,
                                                          cache_type="readahead")
                    f.seek(self.pos)
                    self._f = f
                return fn()
            except Exception as e:
                if attempt == self.settings.max_retries or not is_transient(e):
                    raise
                self.retries += 1
                print(f"s3: transient error on {self.url} at byte {self.pos} ({type(e).__name__}); "
                      f"retry {attempt + 1}/{self.settings.max_retries}", file=sys.stderr)
                self._drop()
                backoff_sleep(attempt, self.settings)
        raise AssertionError("unreachable")

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self._with_retries(lambda: self._f.read(len(b)))
        n = len(data)
        b[:n] = data
        self.pos += n
        return n

    def close(self) -> None:
        self._drop()
        super().close()


def open_s3(url: str, mode: str = "rb", bufsize: int = 1 << 20, **kw):
    """webdataset gopen handler for s3:// (read-only)."""
    if mode != "rb":
        raise ValueError(f"s3 shards are read-only here, got mode {mode!r}")
    return io.BufferedReader(RetryingS3Reader(url), buffer_size=max(bufsize, 1 << 20))


def register_gopen() -> None:
    """Make webdataset open s3:// URLs with `open_s3` (idempotent)."""
    import webdataset as wds

    wds.gopen_schemes["s3"] = open_s3
