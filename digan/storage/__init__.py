"""Where things are stored: a local folder or `s3://bucket/prefix`, handled one way for the whole tree.

    is_s3(url); strip_scheme(url); resolve(url); join(url, name, ...)     # URLs
    with atomic_write(path) as f: ...                                      # a file appears whole or not at all
    with atomic_path(path) as tmp: writer(tmp)                             # the same, for writers that take a path
    list_files(url, pattern, s3) -> [url]; read_bytes(url, s3) -> bytes | None
    arrow_filesystem(url, s3) -> (pyarrow fs, path); publish_file(fs, local, path); display_path(fs, path)

S3 goes through this process's s3fs (`digan.storage.s3.s3_filesystem`: path-style addressing, the one
endpoint rule, retries), so every reader and writer of the tree talks to the same endpoint the same way.
Credentials come only from the AWS chain; nothing here prints or stores them. This package imports
neither torch nor webdataset (the shard builder's worker processes use it).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from pathlib import Path
from typing import IO, Iterator

SCHEME = "s3://"


def is_s3(url: str | os.PathLike) -> bool:
    return str(url).startswith(SCHEME)


def strip_scheme(url: str) -> str:
    """`s3://bucket/key` -> `bucket/key` (what s3fs and pyarrow take); a local path is returned as it is."""
    return url[len(SCHEME):] if is_s3(url) else url


def resolve(url: str | os.PathLike) -> str:
    """An absolute local path (user and symlinks expanded), or the S3 URL without a trailing slash."""
    return str(url).rstrip("/") if is_s3(url) else str(Path(url).expanduser().resolve())


def join(url: str | os.PathLike, *names: str) -> str:
    """`resolve(url)` with `names` appended, '/'-joined for S3."""
    base = resolve(url)
    return "/".join([base, *names]) if is_s3(base) else str(Path(base, *names))


# ----------------------------------------------------------------------------------------------------
# Atomic local writes.


def new_temp(folder: str | os.PathLike, name: str, suffix: str = "") -> str:
    """Create an empty hidden `.<name>.<random>.tmp<suffix>` in `folder`; returns its path.

    os.open with 0o666 lets the kernel apply the umask, as for any plain file (mkstemp's 0600 would survive
    the rename and hide the published file from everyone else on shared storage). `suffix` keeps an
    extension for writers that choose the format by it (an mp4 muxer)."""
    for _ in range(16):
        path = Path(folder) / f".{name}.{secrets.token_hex(6)}.tmp{suffix}"
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return str(path)
        except FileExistsError:
            continue
    raise FileExistsError(f"{folder}: no free temp name for {name}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, keep_suffix: bool = False, fsync: bool = True) -> Iterator[str]:
    """Yield a temp file's path next to `path`; when the block ends without error the file is flushed to disk
    and renamed over `path` (readers see the old file or the whole new one), else removed.

    `keep_suffix` ends the temp name with `path`'s extension (for writers that pick a format by it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_temp(path.parent, path.name, path.suffix if keep_suffix else "")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """`open(path, mode)` that publishes the file only once it is complete (see `atomic_path`)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode {mode!r}, expected 'w' or 'wb'")
    with atomic_path(path) as tmp:
        with open(tmp, mode) as f:
            yield f


# ----------------------------------------------------------------------------------------------------
# Reading and listing (local or S3).


def list_files(url: str, pattern: re.Pattern | str, s3=None) -> list[str]:
    """Sorted URLs of the files directly under a folder or an s3:// prefix whose name matches `pattern`
    (searched in the base name); [] when the folder or prefix does not exist. `s3`: S3Settings."""
    pattern = re.compile(pattern)
    url = resolve(url)
    if is_s3(url):
        from digan.storage.s3 import s3_filesystem

        try:
            names = s3_filesystem(s3).ls(strip_scheme(url), detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return sorted(SCHEME + n for n in names if pattern.search(n.rsplit("/", 1)[-1]))
    root = Path(url)
    return sorted(str(p) for p in root.iterdir() if p.is_file() and pattern.search(p.name)) if root.is_dir() else []


def read_bytes(url: str, s3=None) -> bytes | None:
    """The whole content of a file or S3 object, or None when it does not exist."""
    if is_s3(url):
        from digan.storage.s3 import s3_filesystem

        try:
            return s3_filesystem(s3).cat_file(strip_scheme(url))
        except FileNotFoundError:
            return None
    p = Path(url).expanduser()
    return p.read_bytes() if p.is_file() else None


# ----------------------------------------------------------------------------------------------------
# pyarrow filesystems (what Ray's RunConfig takes, and the checkpoint code uses).


def arrow_filesystem(url: str, s3=None):
    """(pyarrow filesystem, its path) for a folder or s3://bucket/prefix; S3 through this process's s3fs."""
    import pyarrow.fs as pafs

    url = resolve(url)
    if is_s3(url):
        from digan.storage.s3 import s3_filesystem

        return pafs.PyFileSystem(pafs.FSSpecHandler(s3_filesystem(s3))), strip_scheme(url)
    return pafs.LocalFileSystem(), url


def display_path(fs, fs_path: str) -> str:
    """A path a user can paste: absolute local path, or s3://bucket/key."""
    import pyarrow.fs as pafs

    return fs_path if isinstance(fs, pafs.LocalFileSystem) else SCHEME + fs_path


def publish_file(fs, local_file: str | os.PathLike, fs_path: str) -> None:
    """Copy one local file to `fs_path` (pyarrow fs) so that it appears complete or not at all.

    Local: into a temp file next to it, then rename. S3: one PUT (multipart uploads only become visible
    when completed).
    """
    import pyarrow.fs as pafs

    parent = fs_path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        with atomic_path(fs_path, fsync=False) as tmp:
            pafs.copy_files(str(local_file), tmp, destination_filesystem=fs)
    else:
        with open(local_file, "rb") as src, fs.open_output_stream(fs_path) as dst:
            while chunk := src.read(8 << 20):
                dst.write(chunk)
