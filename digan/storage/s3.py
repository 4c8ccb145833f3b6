"""S3 access: one s3fs per process, path-style addressing, the endpoint rule, the outage budget and retries.

Shard bytes are streamed by `digan.storage.s3_stream` (ranged GETs, prefetched, resumed after transient
errors within the budget kept here); listing, HEAD, the manifest, checkpoints and the builder's uploads go
through `s3_filesystem`. This module imports neither torch nor webdataset, so the shard builder's worker
processes stay light.

Why one filesystem (and one range client) per process: an `S3FileSystem` used before a fork is not
fork-safe (its aiohttp session belongs to the parent's event loop), so it is built lazily, cached by PID,
bypassing fsspec's instance cache; fsspec itself resets its event-loop thread in a forked child.
DataLoader workers may therefore be forked after the parent listed the bucket.

The endpoint and region come from `S3Settings` (filled from DataConfig), else from the standard AWS
environment/config chain (AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID, ~/.aws/...).
Credentials are never passed through here, stored in settings, printed or logged.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class S3Settings:
    endpoint_url: str | None = None  # None = AWS_ENDPOINT_URL(_S3) or AWS itself
    region: str | None = None  # None = AWS_DEFAULT_REGION / AWS config
    max_retries: int = 5  # botocore's retries of one request (its own backoff)
    backoff_s: float = 0.2  # our first backoff after a failed read; doubles per retry (with jitter), capped at 10 s
    profile: str | None = None  # AWS config profile (credentials stay in the AWS config)
    retry_budget_s: float = 300.0  # an outage (transient errors, no success in between) longer than this is fatal


class S3OutageError(OSError):
    """The endpoint stayed unreachable past the retry budget: fatal for the loader (not skipped, not retried)."""


class Outage:
    """The outage clock of this process: the first transient error with no successful read since.

    Every retry loop in this module asks it before retrying, so the budget is one total for the
    process (a DataLoader worker, or a trainer's main process) however many reads and shards wait on
    the same outage; any successful read stops the clock. Within the budget reads are retried at their
    byte offset: a server that comes back in time loses no bytes, hence no samples.
    """

    since: float | None = None
    retries = 0  # transient errors since the last `take_retries` (the loader's s3_retries count)

    @classmethod
    def ok(cls) -> None:
        cls.since = None

    @classmethod
    def take_retries(cls) -> int:
        n, cls.retries = cls.retries, 0
        return n

    @classmethod
    def failed(cls, exc: BaseException, settings: S3Settings, what: str) -> None:
        """Record a transient error; raise S3OutageError when the outage has outlasted the budget."""
        now = time.monotonic()
        cls.retries += 1
        if cls.since is None:
            cls.since = now
        if now - cls.since > settings.retry_budget_s:
            cls.since = None
            raise S3OutageError(
                f"s3: {endpoint_url(settings) or 'AWS S3'} unreachable for {settings.retry_budget_s:g} s "
                f"(data.s3_retry_budget_s) while reading {what}; last error: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200] if str(exc) else ''}") from exc


_settings = S3Settings()
_fs_cache: dict[tuple[int, S3Settings], object] = {}


def configure_s3(settings: S3Settings) -> None:
    """Set this process's default settings (DataLoader workers call it in their `__iter__`)."""
    global _settings
    _settings = settings


def current_settings() -> S3Settings:
    """This process's default settings (the last `configure_s3`)."""
    return _settings


def endpoint_url(settings: S3Settings) -> str | None:
    """The endpoint to use: the settings', else AWS_ENDPOINT_URL(_S3), else None (AWS itself)."""
    return settings.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_filesystem(settings: S3Settings | None = None):
    """The s3fs filesystem of this process for `settings` (built on first use in each process)."""
    import s3fs

    settings = settings or _settings
    key = (os.getpid(), settings)
    fs = _fs_cache.get(key)
    if fs is None:
        client_kwargs = {"region_name": settings.region} if settings.region else {}
        fs = s3fs.S3FileSystem(
            endpoint_url=endpoint_url(settings),
            client_kwargs=client_kwargs,
            # Path-style works with every S3-compatible server (SeaweedFS, MinIO, Ceph) and with AWS.
            config_kwargs={"s3": {"addressing_style": "path"}, "connect_timeout": 10, "read_timeout": 60,
                           "retries": {"max_attempts": settings.max_retries + 1, "mode": "standard"}},
            profile=settings.profile,
            skip_instance_cache=True,
        )
        _fs_cache[key] = fs
    return fs


def is_transient(exc: BaseException, _depth: int = 0) -> bool:
    """Errors worth a retry: connection resets, timeouts, throttling and 5xx answers."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, S3OutageError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    status = getattr(exc, "response", None)
    status = status.get("ResponseMetadata", {}).get("HTTPStatusCode") if isinstance(status, dict) else None
    if isinstance(status, int) and (status >= 500 or status == 429):
        return True
    text = f"{type(exc).__name__}: {exc}"
    markers = ("ClientPayloadError", "ServerDisconnected", "ClientConnectorError", "ClientOSError",
               "EndpointConnectionError", "ConnectionClosedError", "ReadTimeout", "ConnectTimeout",
               "IncompleteRead", "ResponseStreamingError", "Connection reset", "SlowDown", "Throttl",
               "ServiceUnavailable", "InternalError", "RequestTimeout", "TooManyRequests",
               "ProtocolError", "Connection broken")
    if any(m in text for m in markers):
        return True
    cause = exc.__cause__ or exc.__context__  # s3fs re-raises botocore/aiohttp errors as OSError from them
    return cause is not None and cause is not exc and _depth < 5 and is_transient(cause, _depth + 1)


def backoff_sleep(attempt: int, settings: S3Settings) -> None:
    delay = min(10.0, settings.backoff_s * (2 ** attempt))
    time.sleep(delay * (0.5 + random.random()))  # jitter so many workers don't retry in lockstep
