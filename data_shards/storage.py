"""Build destinations: a local folder or `s3://bucket/prefix` (through the per-process s3fs of digan.data.s3).

Both give the same small interface; every write is whole-object (S3 puts) or temp-file + rename (local),
so a reader never sees half a shard or half a manifest.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from digan.data.s3 import S3Settings, is_s3, s3_filesystem, strip_scheme


class Destination:
    """Where shards, the manifest and the resume journal go."""

    def __init__(self, url: str, s3: S3Settings | None = None):
        self.url = url.rstrip("/")
        self.s3 = s3 or S3Settings()
        if is_s3(self.url):
            if not strip_scheme(self.url).split("/")[0]:
                raise ValueError(f"bad S3 destination {url!r}: expected s3://bucket/prefix")
            self.root = None
        else:
            self.root = Path(self.url).expanduser().resolve()
            self.root.mkdir(parents=True, exist_ok=True)

    @property
    def is_s3(self) -> bool:
        return self.root is None

    def _key(self, name: str) -> str:
        return f"{strip_scheme(self.url)}/{name}"

    def child_url(self, name: str) -> str:
        return f"{self.url}/{name}" if self.is_s3 else str(self.root / name)

    def exists(self, name: str) -> bool:
        if self.is_s3:
            return s3_filesystem(self.s3).exists(self._key(name))
        return (self.root / name).exists()

    def read_json(self, name: str) -> dict | None:
        if self.is_s3:
            fs = s3_filesystem(self.s3)
            try:
                return json.loads(fs.cat_file(self._key(name)))
            except FileNotFoundError:
                return None
        p = self.root / name
        return json.loads(p.read_text()) if p.exists() else None

    def write_json(self, name: str, obj: dict) -> None:
        data = json.dumps(obj, indent=1, sort_keys=True).encode()
        if self.is_s3:
            s3_filesystem(self.s3).pipe_file(self._key(name), data)
            return
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, self.root / name)

    def temp_path(self, name: str) -> str:
        """A local path to write `name` into before `commit` (inside the folder, so commit is a rename)."""
        d = tempfile.gettempdir() if self.is_s3 else str(self.root)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{name}.", suffix=".tmp")
        os.close(fd)
        return tmp

    def commit(self, tmp_path: str, name: str) -> None:
        """Publish a finished local file under `name` (S3 upload or atomic rename); removes the temp file."""
        if self.is_s3:
            try:
                s3_filesystem(self.s3).put_file(tmp_path, self._key(name))
            finally:
                os.unlink(tmp_path)
        else:
            os.replace(tmp_path, self.root / name)

    def remove(self, name: str) -> None:
        if self.is_s3:
            fs = s3_filesystem(self.s3)
            if fs.exists(self._key(name)):
                fs.rm_file(self._key(name))
        elif (self.root / name).exists():
            (self.root / name).unlink()

    def clean_temp(self) -> None:
        """Remove temp files a killed build left in a local destination."""
        if not self.is_s3:
            for p in self.root.glob(".*.tmp"):
                p.unlink()
