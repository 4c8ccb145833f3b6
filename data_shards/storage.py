"""Build destinations: a local folder or `s3://bucket/prefix` (through the per-process s3fs of digan.storage.s3).

Both give the same small interface; every write is whole-object (S3 puts) or temp-file + rename (local),
so a reader never sees half a shard or half a manifest. Every local file is created by
`digan.storage.new_temp`, with the mode a plain `open()` gives (0o666 minus the umask), so shared
storage shows published files to whoever the umask lets read them. Temp files live in one folder per
destination (`temp_dir`: the destination folder itself, or a private folder under the system temp dir
for S3) that `clean_temp` empties; the builder calls it before a build and after one, finished or not.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import tempfile
from pathlib import Path

from digan.storage import is_s3, new_temp, strip_scheme
from digan.storage.s3 import S3Settings, s3_filesystem

_CREDENTIAL_ERRORS = ("NoCredentialsError", "PartialCredentialsError", "ProfileNotFound")  # botocore's


class S3AccessDenied(PermissionError):
    """The S3 destination refused us (or no credentials were found); the message names it, never a key."""


class Destination:
    """Where shards, the manifest and the resume journal go. Creates nothing until the first write."""

    def __init__(self, url: str, s3: S3Settings | None = None):
        self.url = url.rstrip("/")
        self.s3 = s3 or S3Settings()
        if is_s3(self.url):
            if not strip_scheme(self.url).split("/")[0]:
                raise ValueError(f"bad S3 destination {url!r}: expected s3://bucket/prefix")
            self.root = None
            tag = hashlib.sha256(self.url.encode()).hexdigest()[:16]
            self.temp_dir = Path(tempfile.gettempdir()) / f"data-shards-{os.getuid()}-{tag}"
        else:
            self.root = self.temp_dir = Path(self.url).expanduser().resolve()

    @property
    def is_s3(self) -> bool:
        return self.root is None

    def _key(self, name: str) -> str:
        return f"{strip_scheme(self.url)}/{name}"

    @contextlib.contextmanager
    def _fs(self):
        """This process's s3fs; access errors become one line naming the destination (no keys, no traceback)."""
        try:
            yield s3_filesystem(self.s3)
        except PermissionError as e:
            code = (getattr(e.__cause__, "response", None) or {}).get("Error", {}).get("Code", "")
            code = f" ({code})" if code and not code.isdigit() else ""
            raise S3AccessDenied(f"{self.url}: access denied{code}; check the S3 credentials (AWS_ACCESS_KEY_ID/"
                                 "AWS_SECRET_ACCESS_KEY, AWS_PROFILE or --s3-profile) and the endpoint") from None
        except Exception as e:
            if type(e).__name__ not in _CREDENTIAL_ERRORS:
                raise
            raise S3AccessDenied(f"{self.url}: no usable S3 credentials ({e}); set AWS_ACCESS_KEY_ID/"
                                 "AWS_SECRET_ACCESS_KEY, AWS_PROFILE or --s3-profile") from None

    def exists(self, name: str) -> bool:
        if self.is_s3:
            with self._fs() as fs:
                return fs.exists(self._key(name))
        return (self.root / name).exists()

    def read_json(self, name: str) -> dict | None:
        if self.is_s3:
            with self._fs() as fs:
                try:
                    return json.loads(fs.cat_file(self._key(name)))
                except FileNotFoundError:
                    return None
        p = self.root / name
        return json.loads(p.read_text()) if p.is_file() else None

    def write_json(self, name: str, obj: dict) -> None:
        data = json.dumps(obj, indent=1, sort_keys=True).encode()
        if self.is_s3:
            with self._fs() as fs:
                fs.pipe_file(self._key(name), data)
            return
        tmp = self.temp_path(name)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            self.commit(tmp, name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def temp_path(self, name: str) -> str:
        """A new empty local file to write `name` into before `commit`: in the destination folder (so
        commit is a rename) or, for S3, in this destination's private folder under the system temp dir."""
        if self.is_s3:
            self.temp_dir.mkdir(mode=0o700, exist_ok=True)
            self._own_temp_dir()
        else:
            self.root.mkdir(parents=True, exist_ok=True)
        return new_temp(self.temp_dir, name)

    def commit(self, tmp_path: str, name: str) -> None:
        """Publish a finished local file under `name` (S3 upload or atomic rename); removes the temp file."""
        if self.is_s3:
            try:
                with self._fs() as fs:
                    fs.put_file(tmp_path, self._key(name))
            finally:
                os.unlink(tmp_path)
        else:
            os.replace(tmp_path, self.root / name)

    def remove(self, name: str) -> None:
        if self.is_s3:
            with self._fs() as fs:
                if fs.exists(self._key(name)):
                    fs.rm_file(self._key(name))
        elif (self.root / name).exists():
            (self.root / name).unlink()

    def _own_temp_dir(self) -> bool:
        """Whether the S3 temp folder exists; raises unless it is a real folder of this user (its name is
        predictable, in a shared /tmp)."""
        try:
            st = self.temp_dir.lstat()
        except FileNotFoundError:
            return False
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            raise PermissionError(f"{self.temp_dir}: not a folder of this user; remove it")
        return True

    def clean_temp(self) -> None:
        """Remove the temp files of this destination (a killed build's too); for S3 also their folder."""
        if self._own_temp_dir() if self.is_s3 else self.temp_dir.is_dir():
            for p in self.temp_dir.glob(".*.tmp"):
                p.unlink(missing_ok=True)
            if self.is_s3:
                with contextlib.suppress(OSError):
                    self.temp_dir.rmdir()
