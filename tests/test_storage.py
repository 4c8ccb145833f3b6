"""The one storage layer (digan.storage): URLs, atomic writes, listing and reading, local and on a real S3 server."""

from __future__ import annotations

import os
import stat

import pytest

from digan import storage
from digan.storage.s3 import S3Settings, s3_filesystem


def test_urls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.is_s3("s3://b/p") and not storage.is_s3("/data/s3://x") and not storage.is_s3(tmp_path)
    assert storage.strip_scheme("s3://b/p/k") == "b/p/k" and storage.strip_scheme("/a/b") == "/a/b"
    assert storage.resolve("runs") == str(tmp_path.resolve() / "runs")
    assert storage.resolve("s3://b/prefix/") == "s3://b/prefix"
    assert storage.join("s3://b/prefix/", "run", "step-1") == "s3://b/prefix/run/step-1"
    assert storage.join("runs", "demo") == str(tmp_path.resolve() / "runs" / "demo")
    assert storage.join("~/x", "y") == os.path.join(os.path.expanduser("~"), "x", "y")


def test_atomic_write_publishes_whole_files_only(tmp_path):
    target = tmp_path / "sub" / "state.bin"
    with storage.atomic_write(target) as f:
        f.write(b"old")
    assert target.read_bytes() == b"old"
    # A writer that fails half-way leaves the previous file as it was and no temp file behind.
    with pytest.raises(RuntimeError, match="disk full"):
        with storage.atomic_write(target) as f:
            f.write(b"new, half")
            assert target.read_bytes() == b"old"  # nothing visible while it is written
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["state.bin"]
    with storage.atomic_write(target, "w") as f:
        f.write("new")
    assert target.read_text() == "new"
    with pytest.raises(ValueError, match="mode 'a'"):
        with storage.atomic_write(target, "a"):
            pass


def test_atomic_path_keeps_the_suffix_and_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with storage.atomic_path(tmp_path / "v.mp4", keep_suffix=True) as tmp:
            assert tmp.endswith(".mp4") and os.path.basename(tmp).startswith(".v.mp4.")
            with open(tmp, "wb") as f:
                f.write(b"x")
    finally:
        os.umask(old)
    # As a plain open() would make it (0o666 minus the umask), not mkstemp's 0600: others on shared storage can read it.
    assert stat.S_IMODE((tmp_path / "v.mp4").stat().st_mode) == 0o644


def test_list_and_read_local(tmp_path):
    for name in ("shard-000001.tar", "shard-000000.tar", "notes.txt"):
        (tmp_path / name).write_bytes(name.encode())
    (tmp_path / "shard-000002.tar").mkdir()  # a folder is not a file
    urls = storage.list_files(tmp_path, r"^shard-\d{6}\.tar$")
    assert [os.path.basename(u) for u in urls] == ["shard-000000.tar", "shard-000001.tar"]
    assert storage.list_files(tmp_path / "missing", ".") == []
    assert storage.read_bytes(str(tmp_path / "notes.txt")) == b"notes.txt"
    assert storage.read_bytes(str(tmp_path / "missing.json")) is None


def test_list_read_and_publish_on_s3(s3_env, tmp_path):
    settings = S3Settings(endpoint_url=s3_env.endpoint_url)
    fs = s3_filesystem(settings)
    base = s3_env.url("storage-test")
    for name in ("shard-000001.tar", "shard-000000.tar", "notes.txt"):
        fs.pipe_file(storage.strip_scheme(f"{base}/{name}"), name.encode())
    urls = storage.list_files(base, r"^shard-\d{6}\.tar$", settings)
    assert urls == [f"{base}/shard-000000.tar", f"{base}/shard-000001.tar"]
    assert storage.list_files(s3_env.url("nothing-here"), ".", settings) == []
    assert storage.read_bytes(f"{base}/notes.txt", settings) == b"notes.txt"
    assert storage.read_bytes(f"{base}/missing.json", settings) is None

    arrow_fs, path = storage.arrow_filesystem(base + "/", settings)
    assert path == storage.strip_scheme(base) and storage.display_path(arrow_fs, path) == base
    local = tmp_path / "gen.pt"
    local.write_bytes(b"g" * 1000)
    storage.publish_file(arrow_fs, local, f"{path}/run/step-00000002/generator.pt")
    assert storage.read_bytes(f"{base}/run/step-00000002/generator.pt", settings) == b"g" * 1000

    local_fs, local_path = storage.arrow_filesystem(str(tmp_path / "out"))
    storage.publish_file(local_fs, local, f"{local_path}/a/generator.pt")
    assert (tmp_path / "out" / "a" / "generator.pt").read_bytes() == b"g" * 1000
    assert [p.name for p in (tmp_path / "out" / "a").iterdir()] == ["generator.pt"]
