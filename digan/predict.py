"""Non-autoregressive video prediction, interpolation and inversion with a trained DIGAN generator.

A DIGAN video is a function of (x, y, t): fit its codes to a few observed frames of a real clip at their
times, then render any other time, the future (prediction), frames in between (interpolation) or the same
clip on a denser grid (super-resolution), each frame independently of the others.

    python -m digan.predict --checkpoint runs/digan --video clip.mp4 --observe 0-7 --predict 0-15
    python -m digan.predict --checkpoint runs/digan --data ./shards --key clip0012 --observe 0,5,10,15

Frame k of the clip is shown at t = k / (clip_frames - 1) (the training span: a 16-frame clip covers [0, 1]).
The fit (Adam on the content code w, one per synthesis block with `--space w+`, and the motion code z_M;
`--space z` fits the latents themselves) minimises the pixel MSE on the observed frames plus `--perceptual`
times the squared distance of their FID-Inception features (standing in for LPIPS, shipped offline).
Outputs in --outdir: `codes.pt` (the fitted codes), `predicted.mp4`, `compare.png` (rows: true frames,
observed ones, ours, the baseline) and `report.json`: PSNR/SSIM of our frames and of two trivial baselines
(copy the last observed frame; linear blending between observed frames) on the future and in-between
frames that were not observed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from digan.config import ArgumentError, OneLineParser, parse_classes, parse_seeds
from digan.sampling import to_uint8

SPACES = ("w", "w+", "z")


@dataclass
class Fit:
    """Fitted codes: `w` [1, w_dim] or [1, num_blocks, w_dim] (spaces w / w+), or `z` [1, z_dim]; `z_motion`."""

    space: str
    z_motion: torch.Tensor
    w: torch.Tensor | None = None
    z: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    losses: list[float] | None = None

    def code(self, G):
        if self.space == "z":
            return G.prepare(self.z, self.z_motion, c=self.labels)
        return G.prepare_w(self.w, self.z_motion)

    def state_dict(self) -> dict:
        out = {"space": self.space, "z_motion": self.z_motion.detach().cpu()}
        for k in ("w", "z", "labels"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k).detach().cpu()
        return out


def mean_w(G, labels: torch.Tensor | None, n: int = 512, seed: int = 0) -> torch.Tensor:
    """The mean mapped code of n random z (of class `labels[0]` for a conditional G): where fitting starts."""
    z = torch.randn(n, G.z_dim, generator=torch.Generator().manual_seed(seed)).to(next(G.parameters()).device)
    c = None if labels is None else labels[:1].expand(n)
    with torch.no_grad():
        return G.mapping(z, c).mean(0, keepdim=True)


def fit_codes(G, frames: torch.Tensor, times: torch.Tensor, space: str = "w", steps: int = 300, lr: float = 0.05,
              perceptual: float = 0.0, labels: torch.Tensor | None = None, features=None, seed: int = 0) -> Fit:
    """Fit codes so that G renders `frames` [T, 3, H, W] (in [-1, 1]) at `times` [T].

    `features` (frames [N, 3, H, W] in [-1, 1] -> [N, D]) gives the perceptual term, weighted by `perceptual`.
    G's parameters stay fixed; the fit is deterministic for a given seed (z starts from its stream).
    """
    if space not in SPACES:
        raise ValueError(f"space {space!r}: choose from {', '.join(SPACES)}")
    device = next(G.parameters()).device
    frames, t = frames.to(device), times.to(device).reshape(1, -1)
    g = torch.Generator().manual_seed(seed)
    fit = Fit(space, torch.zeros(1, G.motion_z_dim, device=device).requires_grad_(True), labels=labels)
    if space == "z":
        fit.z = torch.randn(1, G.z_dim, generator=g).to(device).requires_grad_(True)
    else:
        w = mean_w(G, labels, seed=seed)
        fit.w = (w.unsqueeze(1).repeat(1, len(G.blocks), 1) if space == "w+" else w).requires_grad_(True)
    params = [p for p in (fit.w, fit.z, fit.z_motion) if p is not None]
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))
    target_feat = features(frames).detach() if perceptual > 0 else None
    fit.losses = []
    for i in range(steps):
        # StyleGAN2's projector schedule: a short warm-up, then a cosine ramp-down over the last quarter
        ramp = min(1.0, (1 - i / steps) / 0.25)
        for group in opt.param_groups:
            group["lr"] = lr * (0.5 - 0.5 * math.cos(math.pi * ramp)) * min(1.0, i / (0.05 * steps) + 1 / steps)
        out = G.render(fit.code(G), t)[0]  # [T, 3, H, W]
        loss = F.mse_loss(out, frames)
        if target_feat is not None:
            loss = loss + perceptual * (features(out) - target_feat).square().sum(1).mean() / target_feat.shape[1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        fit.losses.append(float(loss.detach()))
    return fit


@torch.no_grad()
def render_fit(G, fit: Fit, times: torch.Tensor, scale: int = 1) -> torch.Tensor:
    """uint8 [T, H*scale, W*scale, 3] of the fitted video at `times` [T]."""
    device = next(G.parameters()).device
    return to_uint8(G.render(fit.code(G), times.to(device).reshape(1, -1), scale)[0])


def baseline(frames: np.ndarray, observed: list[int], targets: list[int], blend: bool) -> np.ndarray:
    """The trivial predictions of frames `targets` from the `observed` ones (uint8 [N, H, W, 3] indexed by
    frame): the last observed frame at or before each target (the first observed before them all), or,
    with `blend`, linear blending of the observed frames on either side of an in-between target."""
    obs = sorted(observed)
    out = []
    for k in targets:
        before = [o for o in obs if o <= k] or obs[:1]
        after = [o for o in obs if o >= k]
        a = before[-1]
        if blend and after and after[0] != a:
            b = after[0]
            lam = (k - a) / (b - a)
            out.append(np.round((1 - lam) * frames[a].astype(np.float64) + lam * frames[b]).astype(np.uint8))
        else:
            out.append(frames[a])
    return np.stack(out)


def frame_scores(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """Mean PSNR (dB) and SSIM (scikit-image, RGB) of predicted vs true uint8 frames [N, H, W, 3]."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    psnr = [peak_signal_noise_ratio(t, p, data_range=255) for p, t in zip(pred, true)]
    ssim = [structural_similarity(t, p, channel_axis=-1, data_range=255, win_size=7) for p, t in zip(pred, true)]
    return {"psnr": float(np.mean(psnr)), "ssim": float(np.mean(ssim)), "frames": len(pred)}


def evaluate_prediction(clip: np.ndarray, ours: np.ndarray, observed: list[int], targets: list[int]) -> dict:
    """PSNR/SSIM of ours and of both baselines on the unobserved targets with a true frame, split into
    `future` (after the last observed frame) and `between` (inside the observed span)."""
    report = {}
    last = max(observed)
    groups = {"future": [k for k in targets if k > last and k < len(clip)],
              "between": [k for k in targets if min(observed) < k < last and k not in observed]}
    for name, ks in groups.items():
        if not ks:
            continue
        idx = [targets.index(k) for k in ks]
        true = clip[ks]
        report[name] = {"ours": frame_scores(ours[idx], true),
                        "copy_last": frame_scores(baseline(clip, observed, ks, blend=False), true),
                        "linear_blend": frame_scores(baseline(clip, observed, ks, blend=True), true)}
    return report


# ----------------------------------------------------------------------------------------------------
# The CLI.


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="digan-predict", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="a trained run, checkpoint folder or generator.pt")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--video", help="a video file (any PyAV format); centre-cropped and resized to the model")
    src.add_argument("--data", help="shards (folder or s3://) holding the clip --key")
    p.add_argument("--key", help="with --data: the record key of the clip")
    p.add_argument("--start", type=int, default=0, help="with --video: the clip's first frame in the file")
    p.add_argument("--observe", default="0-7", help="frames of the clip to fit (e.g. 0-7 or 0,5,10,15)")
    p.add_argument("--predict", default="0-15", help="frames to render (any, also past the clip's end)")
    p.add_argument("--clip-frames", type=int, default=16, help="frame k is at t = k / (clip_frames - 1)")
    p.add_argument("--class", dest="cls", default=None, help="conditional model: the clip's class (index or name)")
    p.add_argument("--space", default="w", choices=SPACES, help="codes fitted: w (default), w+ (per block), z")
    p.add_argument("--steps", type=int, default=300, help="optimisation steps")
    p.add_argument("--lr", type=float, default=0.05, help="Adam learning rate")
    p.add_argument("--perceptual", type=float, default=0.1,
                   help="weight of the FID-Inception feature distance (0 = pixel MSE only)")
    p.add_argument("--scale", type=int, default=1, help="render the predictions this many times denser")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--outdir", default="predicted", help="output folder")
    p.add_argument("--fps", type=float, default=8.0)
    p.add_argument("--dry-run", action="store_true", help="print the plan, fit nothing")
    return p


def _frames(text: str, flag: str) -> list[int]:
    try:
        return sorted(set(parse_seeds(text)))
    except ArgumentError as e:
        raise ArgumentError(f"{flag}: {str(e).replace('seed', 'frame')}") from None


def load_clip(args: argparse.Namespace, resolution: int, num_frames: int) -> np.ndarray:
    """uint8 [T, R, R, 3]: up to `num_frames` frames of the clip (a video file's from --start, or a shard record)."""
    if args.video is not None:
        from PIL import Image

        from data_shards.sources import square_resize
        from digan.video_io import read_video

        frames = read_video(args.video)[args.start: args.start + num_frames]
        if len(frames) == 0:
            raise ArgumentError(f"--start={args.start}: {args.video} has no frame there")
        return np.stack([square_resize(Image.fromarray(f), resolution) for f in frames])
    from digan.config import DataConfig
    from digan.data import build_clip_loader

    loader = build_clip_loader(DataConfig(source=args.data, num_workers=0, resampled=False, shuffle_buffer=0),
                               resolution, 1, num_frames)
    for clips in loader:
        if loader.last_keys[0] == args.key:
            return clips[0].numpy()
    raise ArgumentError(f"--key={args.key!r}: no clip of at least {num_frames} frames with that key in {args.data}")


def _check(args: argparse.Namespace, cfg) -> None:
    if args.data is not None and not args.key:
        raise ArgumentError("--data needs --key (the record key of the clip)")
    args.observed, args.targets = _frames(args.observe, "--observe"), _frames(args.predict, "--predict")
    if args.clip_frames < 2 or args.steps < 1 or args.scale < 1:
        raise ArgumentError("--clip-frames must be >= 2, --steps and --scale >= 1")
    classes = parse_classes(args.cls, cfg.model) if args.cls is not None else None
    if cfg.model.num_classes and classes is None:
        raise ArgumentError("--class: the model is class-conditional; give the clip's class (index or name)")
    if classes is not None and len(classes) != 1:
        raise ArgumentError("--class: one class")
    args.labels = torch.tensor(classes) if classes is not None else None


def frame_times(frames: list[int], clip_frames: int) -> torch.Tensor:
    """t of frame k: k / (clip_frames - 1) (a clip of clip_frames frames spans [0, 1], as in training)."""
    return torch.tensor(frames, dtype=torch.float32) / (clip_frames - 1)


def main(argv: list[str] | None = None) -> int:
    from digan.models import generator_from_export, read_generator_export

    args = build_parser().parse_args(argv)
    try:
        source, payload, cfg = read_generator_export(args.checkpoint)
        _check(args, cfg)
        print(f"model: checkpoint {source}\nplan: fit {args.space} to frames {args.observe} by {args.steps} steps "
              f"(perceptual {args.perceptual:g}), render frames {args.predict} -> {args.outdir}/")
        if args.dry_run:
            return 0
        # the observed frames, and the true ones to score against where the clip has them
        need = max(max(args.observed) + 1, min(max(args.targets) + 1, args.clip_frames))
        clip = load_clip(args, cfg.model.resolution, need)
        if len(clip) <= max(args.observed):
            raise ArgumentError(f"--observe: the clip has {len(clip)} frames")
    except (ArgumentError, FileNotFoundError, ValueError, KeyError) as e:
        print(f"digan-predict: error: {e}", file=sys.stderr)
        return 2
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    G = generator_from_export(payload, cfg, source, map_location=device)
    observed = torch.from_numpy(clip[args.observed]).permute(0, 3, 1, 2).float() / 127.5 - 1
    features = None
    if args.perceptual > 0:
        from digan.metrics.detectors import inception_feature_fn

        features = inception_feature_fn(device)
    labels = None if args.labels is None else args.labels.to(device)
    fit = fit_codes(G, observed, frame_times(args.observed, args.clip_frames), args.space, args.steps, args.lr,
                    args.perceptual, labels, features, args.seed)
    ours = render_fit(G, fit, frame_times(args.targets, args.clip_frames), args.scale).numpy()
    write_outputs(args, clip, ours, fit)
    return 0


def write_outputs(args: argparse.Namespace, clip: np.ndarray, ours: np.ndarray, fit: Fit) -> None:
    """codes.pt, predicted.mp4, compare.png and report.json (scores at the model's resolution)."""
    from PIL import Image

    from digan.video_io import frame_grid, write_mp4, write_png

    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(fit.state_dict(), out / "codes.pt")
    write_mp4(out / "predicted.mp4", ours, args.fps)
    res = clip.shape[1]
    small = ours if args.scale == 1 else np.stack([np.asarray(Image.fromarray(f).resize((res, res), Image.LANCZOS))
                                                  for f in ours])
    blank = np.zeros_like(clip[0])
    rows = [[clip[k] if k < len(clip) else blank for k in args.targets],
            [clip[k] if k in args.observed else blank for k in args.targets], list(small),
            list(baseline(clip, args.observed, [min(k, len(clip) - 1) for k in args.targets], blend=True))]
    write_png(out / "compare.png", frame_grid(np.stack([f for r in rows for f in r]), num_cols=len(args.targets)))
    report = {"observed": args.observed, "predicted": args.targets, "space": args.space, "steps": args.steps,
              "perceptual": args.perceptual, "final_loss": fit.losses[-1],
              **evaluate_prediction(clip, small, args.observed, args.targets)}
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    for group in ("future", "between"):
        for name, s in report.get(group, {}).items():
            print(f"{group:8s} {name:12s} PSNR {s['psnr']:6.2f} dB  SSIM {s['ssim']:.3f}  ({s['frames']} frames)")
    print(f"wrote {out}/codes.pt, predicted.mp4, compare.png, report.json")


if __name__ == "__main__":
    raise SystemExit(main())
