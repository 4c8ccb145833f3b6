"""Is it the generator? The same frames, image discriminator, loss and optimiser, two generators.

    python benchmarks/image_baseline.py --generator conv --kimg 20 --out /tmp/base-conv
    python benchmarks/image_baseline.py --generator inr --kimg 20 --out /tmp/base-inr

A controlled run for README "Does it learn?": one process, plain PyTorch (`SingleProcessTrainer`, the
recipe every run takes: G step, D step, separate lazy R1, EMA; DiffAugment and xflip as configured), the
demo footage, and only the IMAGE discriminator D_I (the motion discriminator is replaced by one that
scores every input 0, so neither G nor D gets a gradient from it: the motion D is not the cause, as a
main-job run with G's motion term dropped had already shown). The generator is either

- `inr`: the preset's DIGAN INR generator (its frames are scored, whatever motion they have), or
- `conv`: a plain StyleGAN2-style image generator (mapping network as the INR's, a learned 4x4 constant,
  two modulated-demodulated 3x3 convolutions per resolution after a bilinear x2 upsampling, a toRGB
  per resolution summed as in StyleGAN2's "skip" G; no noise inputs), the same widths
  (`model.channel_base / res`, at most `model.channel_max`) and the same mapping; its videos are still
  frames (one image for every t).

Both are scored like `quality.py` (real FVD16, TF-Hub I3D, N fake videos of fixed seeds against N real
clips; the floor is two disjoint real sets) at every `--every` kimg, with frame grids of the same seeds.
A still video pays an FVD price for its lack of motion, so the conv G's FVD is a pessimistic one; what
the comparison is for is the pictures and the course of FVD over kimg.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common import load_avg  # noqa: E402 (also puts the repository on sys.path)
from digan.config import add_config_args, config_from_args  # noqa: E402
from digan.models.layers import LRELU_GAIN, LRELU_SLOPE, FullyConnected, MappingNetwork  # noqa: E402


class ModulatedConv(nn.Module):
    """StyleGAN2's modulated convolution: per-sample weights scaled by an affine of w, demodulated, then bias
    and lrelu * sqrt(2) (`act`), as one grouped convolution."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, kernel: int, demod: bool = True,
                 act: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.affine = FullyConnected(w_dim, in_channels, bias_init=1.0)
        self.gain, self.demod, self.act = 1 / math.sqrt(in_channels * kernel * kernel), demod, act

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        b, c, h, wd = x.shape
        weight = self.weight[None] * (self.affine(w) * self.gain)[:, None, :, None, None]  # [B, O, I, k, k]
        if self.demod:
            weight = weight * torch.rsqrt(weight.square().sum(dim=(2, 3, 4), keepdim=True) + 1e-8)
        k = weight.shape[-1]
        x = F.conv2d(x.reshape(1, b * c, h, wd), weight.reshape(-1, c, k, k), padding=k // 2, groups=b)
        x = x.reshape(b, -1, h, wd) + self.bias.view(1, -1, 1, 1)
        return F.leaky_relu(x, LRELU_SLOPE) * LRELU_GAIN if self.act else x


class ConvImageGenerator(nn.Module):
    """A StyleGAN2-style image generator with the INR generator's interface: `prepare(z, z_motion)` -> w,
    `render(w, t)` -> the same frame at every time [B, T, 3, R, R], `forward(z, z_motion, t)`."""

    def __init__(self, cfg):
        super().__init__()
        self.z_dim, self.w_dim, self.motion_z_dim, self.num_classes = cfg.z_dim, cfg.w_dim, cfg.motion_z_dim, 0
        self.resolution = cfg.resolution
        self.mapping = MappingNetwork(cfg.z_dim, cfg.w_dim, cfg.mapping_layers, cfg.mapping_lr_mult)
        ch = [min(cfg.channel_base // r, cfg.channel_max) for r in self._resolutions()]
        self.const = nn.Parameter(torch.randn(ch[0], 4, 4))
        self.conv0 = nn.ModuleList(ModulatedConv(ch[max(i - 1, 0)], c, cfg.w_dim, 3) for i, c in enumerate(ch))
        self.conv1 = nn.ModuleList(ModulatedConv(c, c, cfg.w_dim, 3) for c in ch)
        self.torgb = nn.ModuleList(ModulatedConv(c, 3, cfg.w_dim, 1, demod=False, act=False) for c in ch)

    def _resolutions(self) -> list[int]:
        return [4 * 2 ** i for i in range(int(math.log2(self.resolution)) - 1)]

    def prepare(self, z: Tensor, z_motion: Tensor, truncation_psi: float = 1.0) -> Tensor:
        return self.mapping(z, truncation_psi=truncation_psi)

    def render(self, w: Tensor, t: Tensor, scale: int = 1) -> Tensor:
        x, img = self.const.expand(w.shape[0], *self.const.shape), None
        for i in range(len(self.conv1)):
            if i > 0:
                x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            x = self.conv1[i](self.conv0[i](x, w), w)
            y = self.torgb[i](x, w)
            img = y if img is None else F.interpolate(img, scale_factor=2, mode="bilinear", align_corners=False) + y
        return img.unsqueeze(1).expand(-1, t.shape[1], -1, -1, -1)

    def forward(self, z: Tensor, z_motion: Tensor, t: Tensor) -> Tensor:
        return self.render(self.prepare(z, z_motion), t)


class NoMotionD(nn.Module):
    """Scores every motion input 0 (but depends on it, so R1's gradient exists and is 0)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1).sum(1, keepdim=True) * 0


def build_generator(cfg, generator: str) -> nn.Module:
    from digan.models import build_generator as build_inr

    return ConvImageGenerator(cfg.model) if generator == "conv" else build_inr(cfg.model)


def load_snapshots(cfg, generator: str, out: Path) -> list[tuple[float, nn.Module]]:
    """(kimg, G_ema) of the snapshots a run saved under `out/snapshots`."""
    snaps = []
    for f in sorted((out / "snapshots").glob("kimg-*.pt")):
        G = build_generator(cfg, generator).eval()
        G.load_state_dict(torch.load(f, weights_only=True))
        snaps.append((float(f.stem.split("-")[1]), G))
    return snaps


def build_trainer(cfg, generator: str):
    """`SingleProcessTrainer` with the chosen G and the image D alone (fresh Adam for both)."""
    from digan.training import SingleProcessTrainer
    from digan.training.ema import EMA
    from digan.training.optim import PlainUpdater, build_adam, d_reg_interval
    from digan.training.recipe import DiscriminatorPair

    tr = SingleProcessTrainer(cfg, "cpu", seed=0)
    if generator == "conv":
        G = build_generator(cfg, generator).train()
        tr.g_updater = PlainUpdater(G, build_adam(G.parameters(), cfg.optim, cfg.loss.g_reg_interval),
                                    cfg.optim.grad_clamp)
        tr.ema = EMA(copy.deepcopy(G).eval(), cfg.train.batch_size, cfg.optim.ema_kimg, cfg.optim.ema_rampup)
    D = DiscriminatorPair(tr.D.img, NoMotionD()).train()
    tr.d_updater = PlainUpdater(D, build_adam(D.parameters(), cfg.optim, d_reg_interval(cfg.loss)),
                                cfg.optim.grad_clamp)
    return tr


def train(args: argparse.Namespace, cfg, out: Path) -> list[tuple[float, nn.Module]]:
    """Train to `--kimg`; (kimg, copy of G_ema) at every `--every` kimg, also saved under `out/snapshots`."""
    from digan.data import build_pair_loader

    (out / "snapshots").mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    tr = build_trainer(cfg, args.generator)
    batch = cfg.train.batch_size
    loader = build_pair_loader(cfg.data, cfg.model.resolution, batch, seed=cfg.train.seed)
    points, snaps, t0 = [args.every * (i + 1) for i in range(int(args.kimg / args.every + 1e-9))], [], time.time()
    while points:
        for real_pair, real_dt in loader:
            stats = tr.train_step(real_pair, real_dt)
            kimg = tr.cur_nimg / 1000
            if tr.step % 50 == 0:
                print(f"step {tr.step:5d} kimg {kimg:6.2f} loss_G {float(stats['loss_G']):.3f} loss_D "
                      f"{float(stats['loss_D']):.3f} D_I_real {float(stats['D_I_real']):+.2f} D_I_fake "
                      f"{float(stats['D_I_fake']):+.2f} ({tr.step / (time.time() - t0):.2f} it/s)", flush=True)
            if points and kimg >= points[0] - 1e-9:
                snaps.append((points.pop(0), copy.deepcopy(tr.G_ema).eval()))
                torch.save(snaps[-1][1].state_dict(), out / "snapshots" / f"kimg-{snaps[-1][0]:06.1f}.pt")
            if not points:
                break
    return snaps


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_args(p, default="demo-32")
    p.add_argument("--generator", choices=["conv", "inr"], default="conv")
    p.add_argument("--kimg", type=float, default=20.0)
    p.add_argument("--every", type=float, default=5.0)
    p.add_argument("--num-videos", type=int, default=64)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fid-frames", type=int, default=256,
                   help="frame FID: one frame (t = 0) of this many fake videos against the first frames of as many "
                        "real clips (FID Inception)")
    p.add_argument("--out", default="image-baseline")
    p.add_argument("--eval-only", action="store_true", help="evaluate the snapshots in --out again")
    args = p.parse_args()
    cfg = config_from_args(args)
    if args.dry_run:
        print(f"{args.generator} G, {args.config}, {args.kimg:g} kimg, points every {args.every:g}")
        return 0
    from digan.data.demo import ensure_demo_shards

    if cfg.data.source == "demo":
        cfg.data.source = ensure_demo_shards(cfg.data, cfg.model.resolution)
    print(f"{args.generator} G, image D only, {args.config}, load {load_avg()}", flush=True)
    out, t0 = Path(args.out), time.time()
    snaps = load_snapshots(cfg, args.generator, out) if args.eval_only else train(args, cfg, out)
    evaluate(args, cfg, snaps, None if args.eval_only else time.time() - t0)
    return 0


def real_first_frames(cfg, n: int, seed: int) -> torch.Tensor:
    """uint8 [n, H, W, 3]: the first frame of n distinct real clips."""
    from digan.data import build_clip_loader

    frames = []
    for clips in build_clip_loader(cfg.data, cfg.model.resolution, 8, 16, seed=seed):
        frames.append(clips[:, 0])
        if sum(len(f) for f in frames) >= n:
            return torch.cat(frames)[:n]
    raise SystemExit(f"the data has fewer than {n} clips (--fid-frames)")


def evaluate(args: argparse.Namespace, cfg, snaps: list[tuple[float, nn.Module]], train_s: float | None) -> None:
    """`quality.py`'s scoring (real FVD16, floor, grids, CSV, curve), plus the frame FID of every snapshot."""
    from quality import score

    from digan.metrics import build_frame_detector, frechet_distance_from_features
    from digan.sampling import sample_videos, video_seeds

    fdet = build_frame_detector("i3d", "cpu")
    real_frames = fdet(real_first_frames(cfg, args.fid_frames, args.seed))

    def frame_fid(G: nn.Module) -> dict:
        fake = sample_videos(G, video_seeds(args.seed, args.fid_frames), 1, cfg.data.num_frames)[:, 0]
        return {f"fid{args.fid_frames}_frames": round(frechet_distance_from_features(fdet(fake), real_frames), 2)}

    title = f"{args.generator} G, image D only: real FVD16 (N={args.num_videos}) vs kimg"
    score(snaps, cfg, Path(args.out), args.num_videos, args.seed, [0, 1, 2, 3], 8, title,
          {"generator": args.generator, "train_wall_s": round(train_s, 1) if train_s else ""}, frame_fid)


if __name__ == "__main__":
    sys.exit(main())
