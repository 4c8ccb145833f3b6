"""The UCF-101 IS path: C3D weights and mean come only from user files (TGANv2's Chainer npz layout);
without them IS fails with one clear line. The real files are not redistributable, so the format is
exercised with a file written in that layout (random values) and the IS maths in test_metrics_distances."""

import numpy as np
import pytest
import torch

from digan.metrics.c3d import _CONVS, _FCS, C3D, c3d_probs, load_c3d
from digan.metrics.i3d import I3DWeightsError


def test_missing_files_fail_clearly(tmp_path):
    with pytest.raises(I3DWeightsError, match="--c3d-weights"):
        load_c3d(None, None)
    with pytest.raises(I3DWeightsError, match="does not exist"):
        load_c3d(tmp_path / "w.npz", tmp_path / "m.npz")
    np.savez(tmp_path / "w.npz", **{"conv1a/W": np.zeros((64, 3, 3, 3, 3), np.float32)})
    np.savez(tmp_path / "m.npz", mean=np.zeros(10, np.float32))
    with pytest.raises(I3DWeightsError, match="missing array 'conv1a/b'"):
        load_c3d(tmp_path / "w.npz", tmp_path / "m.npz")


def test_tgan_npz_layout_loads_and_gives_probabilities(tmp_path):
    rng = np.random.Generator(np.random.PCG64(0))
    arrays = {}
    for name, cin, cout in _CONVS:
        arrays[f"{name}/W"] = (rng.standard_normal((cout, cin, 3, 3, 3)) * np.sqrt(2 / (cin * 27))).astype(np.float32)
        arrays[f"{name}/b"] = np.zeros(cout, np.float32)
    for name, cin, cout in _FCS:
        arrays[f"{name}/W"] = (rng.standard_normal((cout, cin), dtype=np.float32) * np.float32(np.sqrt(1 / cin)))
        arrays[f"{name}/b"] = np.zeros(cout, np.float32)
    np.savez(tmp_path / "conv3d_deepnetA_ucf.npz", **arrays)
    mean = rng.uniform(80, 120, (3, 16, 128, 171)).astype(np.float32)
    np.savez(tmp_path / "mean2.npz", mean=mean)
    model, mean_bgr = load_c3d(tmp_path / "conv3d_deepnetA_ucf.npz", tmp_path / "mean2.npz")
    assert isinstance(model, C3D) and mean_bgr.shape == (3, 16, 128, 128)
    torch.testing.assert_close(mean_bgr, torch.from_numpy(mean[..., 21:149]))  # TGANv2's centre columns
    torch.testing.assert_close(model.fc8.weight, torch.from_numpy(arrays["fc8/W"]))
    clips = torch.from_numpy(rng.integers(0, 256, (1, 16, 64, 64, 3), dtype=np.uint8))
    p = c3d_probs(model, mean_bgr, clips)
    assert p.shape == (1, 101) and np.isclose(p.sum(), 1.0) and (p >= 0).all()
    with pytest.raises(ValueError, match="16-frame"):
        c3d_probs(model, mean_bgr, clips[:, :8])
