"""Video Inception Score on UCF-101 (TGAN / TGANv2 protocol) with a C3D loaded from a user file.

The C3D fine-tuned on UCF-101 (`conv3d_deepnetA_ucf.npz`, Chainer, from pfnet-research/tgan2 releases)
and its mean clip (`mean2.npz`) ship in no package, so IS runs only when the user passes both files;
otherwise `load_c3d` fails with a one-line message saying what to pass.

Protocol (TGANv2's `calc_inception`, as used by DIGAN's UCF-101 IS): 16-frame clips, each frame resized
to 128x128 (bicubic), RGB -> BGR, minus the mean clip `mean[..., 21:149]` (the mean is 3x16x128x171,
BGR), centre crop 112x112, C3D softmax over the 101 classes, IS = exp(E KL(p(y|x) || p(y))) with
eps 1e-7, mean and std over splits. Bicubic here is torch's (a = -0.75, as OpenCV's INTER_CUBIC).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .i3d import I3DWeightsError

_CONVS = [("conv1a", 3, 64), ("conv2a", 64, 128), ("conv3a", 128, 256), ("conv3b", 256, 256),
          ("conv4a", 256, 512), ("conv4b", 512, 512), ("conv5a", 512, 512), ("conv5b", 512, 512)]
_FCS = [("fc6", 8192, 4096), ("fc7", 4096, 4096), ("fc8", 4096, 101)]


class C3D(nn.Module):
    """C3D (Tran et al. 2015) as TGANv2's `C3DVersion1`: x [B, 3, 16, 112, 112] (BGR, mean-subtracted)
    -> class probabilities [B, 101]. Chainer pools with `cover_all`, i.e. ceil mode (pool5: 7 -> 4)."""

    def __init__(self):
        super().__init__()
        for name, cin, cout in _CONVS:
            setattr(self, name, nn.Conv3d(cin, cout, 3, padding=1))
        for name, cin, cout in _FCS:
            setattr(self, name, nn.Linear(cin, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool3d(F.relu(self.conv1a(x)), (1, 2, 2), (1, 2, 2), ceil_mode=True)
        x = F.max_pool3d(F.relu(self.conv2a(x)), 2, 2, ceil_mode=True)
        x = F.max_pool3d(F.relu(self.conv3b(F.relu(self.conv3a(x)))), 2, 2, ceil_mode=True)
        x = F.max_pool3d(F.relu(self.conv4b(F.relu(self.conv4a(x)))), 2, 2, ceil_mode=True)
        x = F.max_pool3d(F.relu(self.conv5b(F.relu(self.conv5a(x)))), 2, 2, ceil_mode=True)
        x = F.relu(self.fc7(F.relu(self.fc6(x.flatten(1)))))
        return F.softmax(self.fc8(x), dim=1)


def load_c3d(weights: str | Path | None, mean: str | Path | None) -> tuple[C3D, torch.Tensor]:
    """(C3D in eval mode, mean clip [3, 16, 128, 128] BGR) from TGANv2's Chainer npz files.

    `weights` holds `<layer>/W` and `<layer>/b` arrays (Chainer layouts equal torch's: conv
    (out, in, kT, kH, kW), linear (out, in)); `mean` holds `mean` of 3*16*128*171 values."""
    if not weights or not mean:
        raise I3DWeightsError("IS needs the UCF-101 C3D: pass --c3d-weights conv3d_deepnetA_ucf.npz and "
                              "--c3d-mean mean2.npz (from pfnet-research/tgan2; not shipped in any package)")
    for p in (weights, mean):
        if not Path(p).expanduser().is_file():
            raise I3DWeightsError(f"C3D file {p} does not exist")
    model = C3D()
    with np.load(Path(weights).expanduser(), allow_pickle=False) as f:
        sd = {}
        for name, _, _ in _CONVS + _FCS:
            for src, dst in (("W", "weight"), ("b", "bias")):
                key = f"{name}/{src}"
                if key not in f:
                    raise I3DWeightsError(f"C3D weights {weights}: missing array {key!r} (not TGANv2's C3D npz)")
                sd[f"{name}.{dst}"] = torch.from_numpy(np.asarray(f[key], dtype=np.float32))
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise I3DWeightsError(f"C3D weights {weights}: wrong shapes ({str(e).splitlines()[-1].strip()})") from None
    with np.load(Path(mean).expanduser(), allow_pickle=False) as f:
        m = np.asarray(f["mean"], dtype=np.float32)
    if m.size != 3 * 16 * 128 * 171:
        raise I3DWeightsError(f"C3D mean {mean}: expected 3*16*128*171 values, got {m.size}")
    m = torch.from_numpy(m.reshape(3, 16, 128, 171)[..., 21:21 + 128].copy())
    return model.eval().requires_grad_(False), m


@torch.no_grad()
def c3d_probs(model: C3D, mean_bgr: torch.Tensor, clips: torch.Tensor, device="cpu") -> np.ndarray:
    """uint8 clips [B, 16, H, W, 3] RGB -> class probabilities [B, 101] (TGANv2 preprocessing)."""
    b, t, h, w, _ = clips.shape
    if t != 16:
        raise ValueError(f"the C3D IS protocol uses 16-frame clips, got {t}")
    x = clips.to(device).reshape(b * t, h, w, 3).permute(0, 3, 1, 2).float()
    if (h, w) != (128, 128):
        x = F.interpolate(x, size=(128, 128), mode="bicubic", align_corners=False)
    x = x.flip(1).reshape(b, t, 3, 128, 128).permute(0, 2, 1, 3, 4)  # RGB -> BGR, [B, 3, T, H, W]
    x = x - mean_bgr.to(device)[None]
    x = x[..., 8:8 + 112, 8:8 + 112]
    return model.to(device)(x.contiguous()).double().cpu().numpy()
