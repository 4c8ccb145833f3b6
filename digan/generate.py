"""Render videos from a trained DIGAN generator (or a fresh one, for smoke tests).

    python -m digan.generate --checkpoint runs/digan-128 --seeds 0-7 --outdir out/        # 16 frames, t in [0, 1]
    python -m digan.generate --checkpoint ... --seeds 3 --num-frames 128                  # 8x slow motion
    python -m digan.generate --checkpoint ... --seeds 3 --num-frames 32 --t-end 2.0667    # extrapolate to t > 1
    python -m digan.generate --checkpoint ... --seeds 3 --scale 2                         # 2x super-resolution
    python -m digan.generate --checkpoint ... --seeds 3 --motion-seeds 0-3                # one content, 4 motions
    python -m digan.generate --config demo-32 --seeds 0-3 --format mp4,gif,png           # untrained model (smoke)

Seeds -> latents -> frames go through `digan.sampling`, as in `digan.evaluate` and the training samples, so
seed s is the same video in all three: seed s seeds a CPU `torch.Generator`; z_I is its first `z_dim` normal
draws and z_M the next `motion_z_dim` draws. With `--motion-seeds m1,m2,..`, z_I comes from the content seed
and z_M from the second draw of motion seed m's stream, so (s, m=s) is the default video.

Time stamps: t = linspace(t_start, t_end, num_frames). Training sees t in [0, 1] (16-frame clips are
t_k = k/15); more frames over the same range interpolate (slow motion), a range past 1 extrapolates.

Memory: at most `--max-frames-in-memory` frames are rendered at once (videos x frame chunk); the per-video
INR weights are computed once per video and reused for every chunk, and each chunk is encoded into the MP4
right away. GIF and PNG outputs keep the video's uint8 frames until it is finished.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from digan.config import (ArgumentError, Config, ConfigError, OneLineParser, add_config_args, config_from_args,
                          dump_yaml, parse_classes, parse_seeds)
from digan.malloc import configure_malloc
from digan.models import build_generator, generator_from_export, read_generator_export
from digan.sampling import render_chunks, seed_latents, time_stamps, to_uint8
from digan.video_io import Mp4Writer, frame_grid, write_gif, write_png

FORMATS = ("mp4", "gif", "png")


# ----------------------------------------------------------------------------------------------------
# The CLI.


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="digan-generate", description="Render DIGAN videos from seeds.")
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", metavar="PATH",
                   help="generator.pt, a checkpoint folder, or a run folder (its latest checkpoint)")
    add_config_args(g, default=None)
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g = p.add_argument_group("videos")
    g.add_argument("--seeds", default="0-3", help="content seeds: 0-7 or 0,3,5")
    g.add_argument("--motion-seeds", default=None, help="render every content seed with each of these motions")
    g.add_argument("--classes", default=None,
                   help="class-conditional model: render every seed in each of these classes (indices or names, "
                        "comma-separated; default: seed s in class s mod model.num_classes)")
    g.add_argument("--num-frames", type=int, default=16, help="frames per video")
    g.add_argument("--t-start", type=float, default=0.0, help="time of the first frame (training range: [0, 1])")
    g.add_argument("--t-end", type=float, default=1.0, help="time of the last frame (> 1 extrapolates)")
    g.add_argument("--scale", type=int, default=1, help="spatial super-resolution factor (denser coordinate grids)")
    g.add_argument("--trunc", type=float, default=1.0, help="truncation psi (1 = none, as in the paper)")
    g = p.add_argument_group("output")
    g.add_argument("--outdir", default="generated", help="output folder")
    g.add_argument("--format", default="mp4", help="comma-separated: mp4, gif, png (frame grid)")
    g.add_argument("--fps", type=float, default=8.0, help="frame rate of mp4/gif")
    g.add_argument("--max-frames-in-memory", type=int, default=32,
                   help="most frames rendered at once (videos per batch x frames per chunk)")
    g.add_argument("--batch-videos", type=int, default=None,
                   help="videos rendered together (default: as many as max-frames-in-memory allows)")
    return p


def _check(args: argparse.Namespace) -> None:
    """Validate the arguments; raise ArgumentError with one line naming the flag."""
    if args.checkpoint is None and args.config is None:
        raise ArgumentError("give --checkpoint (a trained run) or --config (a fresh, untrained model)")
    if args.checkpoint is not None and (args.config is not None or args.overrides):
        raise ArgumentError("--config and key=value overrides describe a fresh model; "
                            "a --checkpoint carries its own config")
    if args.num_frames < 1:
        raise ArgumentError(f"--num-frames={args.num_frames}: must be >= 1")
    if args.scale < 1:
        raise ArgumentError(f"--scale={args.scale}: must be an integer >= 1")
    if args.max_frames_in_memory < 1:
        raise ArgumentError(f"--max-frames-in-memory={args.max_frames_in_memory}: must be >= 1")
    if args.batch_videos is not None and not 1 <= args.batch_videos <= args.max_frames_in_memory:
        raise ArgumentError(f"--batch-videos={args.batch_videos}: must be in [1, --max-frames-in-memory]")
    if not (math.isfinite(args.t_start) and math.isfinite(args.t_end)):
        raise ArgumentError("--t-start/--t-end must be finite numbers")
    if not args.fps > 0:
        raise ArgumentError(f"--fps={args.fps}: must be > 0")
    args.formats = [f.strip() for f in args.format.split(",") if f.strip()]
    bad = [f for f in args.formats if f not in FORMATS]
    if bad or not args.formats:
        raise ArgumentError(f"--format={args.format!r}: choose from {', '.join(FORMATS)}")
    args.seed_list = parse_seeds(args.seeds)
    args.motion_list = parse_seeds(args.motion_seeds) if args.motion_seeds is not None else None
    if args.device != "auto":
        try:
            dev = torch.device(args.device)
        except RuntimeError:
            raise ArgumentError(f"--device={args.device!r}: not a device (auto, cpu, cuda, cuda:N)") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ArgumentError(f"--device={args.device}: CUDA is not available on this machine")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the flags
    try:
        _check(args)
        if args.checkpoint is not None:
            # read once: the config now (for the plan), the weights after it
            source, payload, cfg = read_generator_export(args.checkpoint)
        else:
            source, payload, cfg = None, None, config_from_args(args)
    except (ArgumentError, FileNotFoundError, ValueError, KeyError, ConfigError) as e:
        msg = f"bad checkpoint: {e}" if isinstance(e, KeyError) else str(e)
        print(f"digan-generate: error: {msg}", file=sys.stderr)
        return 2
    try:
        args.class_list = parse_classes(args.classes, cfg.model)
    except ArgumentError as e:
        print(f"digan-generate: error: {e}", file=sys.stderr)
        return 2
    plan = _plan(args, cfg, source)
    if args.dry_run:
        print(dump_yaml(cfg), end="")
        for job in plan.jobs:
            c = "" if job[2] is None else f", class {job[2]}"
            print(f"  would write {plan.outdir / plan.stem(*job)}.{{{','.join(args.formats)}}} "
                  f"(z_I seed {job[0]}, z_M seed {job[1]}{c})")
        return 0
    configure_malloc(cfg.dist, plan.device)
    if source is not None:
        G = generator_from_export(payload, cfg, source, map_location=plan.device)
    else:
        torch.manual_seed(cfg.train.seed)
        G = build_generator(cfg.model).to(plan.device).eval().requires_grad_(False)
    plan.outdir.mkdir(parents=True, exist_ok=True)
    start_time = time.perf_counter()
    bar = tqdm(total=len(plan.jobs) * args.num_frames, unit="frame", desc="rendering", file=sys.stderr)
    written: list[Path] = []
    for b0 in range(0, len(plan.jobs), plan.per_batch):
        written += _render_batch(G, args, plan, plan.jobs[b0: b0 + plan.per_batch], bar)
    bar.close()
    elapsed = time.perf_counter() - start_time
    total = len(plan.jobs) * args.num_frames
    print(f"wrote {len(written)} files to {plan.outdir}/ ({total} frames in {elapsed:.1f} s, "
          f"{total / elapsed:.1f} frames/s)")
    return 0


@dataclass
class _Plan:
    """(content seed, motion seed, class or None) per video, how they are batched and chunked, where they go."""

    jobs: list[tuple[int, int, int | None]]
    per_batch: int
    chunk: int
    device: torch.device
    outdir: Path
    named_by_motion: bool
    times: torch.Tensor
    class_names: list[str]

    def stem(self, s: int, m: int, c: int | None = None) -> str:
        name = f"seed{s:04d}-motion{m:04d}" if self.named_by_motion else f"seed{s:04d}"
        if c is not None:
            name += "-" + (_safe(self.class_names[c]) if self.class_names else f"class{c:03d}")
        return name


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)


def _plan(args: argparse.Namespace, cfg: Config, source: Path | None) -> _Plan:
    """The plan of the run, printed."""
    pairs = [(s, s) for s in args.seed_list] if args.motion_list is None else \
        [(s, m) for s in args.seed_list for m in args.motion_list]
    n = cfg.model.num_classes
    if args.class_list is not None:
        jobs = [(s, m, c) for s, m in pairs for c in args.class_list]
    else:
        jobs = [(s, m, s % n if n else None) for s, m in pairs]
    per_batch = args.batch_videos or max(1, min(len(jobs), args.max_frames_in_memory // args.num_frames))
    chunk = max(1, args.max_frames_in_memory // per_batch)
    side = cfg.model.resolution * args.scale
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    outdir = Path(args.outdir)
    model_desc = (f"checkpoint {source}" if source is not None else
                  f"FRESH UNTRAINED generator from config {args.config!r} (smoke test: the videos are noise-like)")
    print(f"model: {model_desc}")
    print(f"plan: {len(jobs)} videos x {args.num_frames} frames of {side}x{side} (scale {args.scale}), "
          f"t from {args.t_start:g} to {args.t_end:g}, formats {','.join(args.formats)} -> {outdir}/")
    print(f"      {per_batch} videos per batch, chunks of {chunk} frames (<= {per_batch * chunk} frames in memory), "
          f"device {device}")
    return _Plan(jobs, per_batch, chunk, device, outdir, args.motion_list is not None,
                 time_stamps(args.num_frames, args.t_start, args.t_end), list(cfg.model.class_names))


def _render_batch(G, args: argparse.Namespace, plan: _Plan, batch: list[tuple[int, int]], bar) -> list[Path]:
    """Render one batch of videos chunk by chunk: mp4s stream, gif/png keep the frames. Returns the files."""
    z, z_motion = seed_latents([j[0] for j in batch], G.z_dim, G.motion_z_dim, [j[1] for j in batch])
    labels = torch.tensor([j[2] for j in batch]) if batch[0][2] is not None else None
    names = [plan.outdir / plan.stem(*j) for j in batch]
    mp4s = [Mp4Writer(n.with_suffix(".mp4"), args.fps) for n in names] if "mp4" in args.formats else []
    keep = [[] for _ in batch] if ("gif" in args.formats or "png" in args.formats) else None
    try:
        for _, frames in render_chunks(G, z, z_motion, plan.times, args.scale, plan.chunk, args.trunc, labels):
            frames_u8 = to_uint8(frames)  # [B, Tc, H, W, 3]
            for i in range(len(batch)):
                if mp4s:
                    mp4s[i].write(frames_u8[i])
                if keep is not None:
                    keep[i].append(frames_u8[i])
            bar.update(frames_u8.shape[0] * frames_u8.shape[1])
    finally:
        for w in mp4s:
            w.close()
    written = [w.path for w in mp4s]
    for i, name in enumerate(names if keep is not None else []):
        video = torch.cat(keep[i])
        if "gif" in args.formats:
            written.append(write_gif(name.with_suffix(".gif"), video, args.fps))
        if "png" in args.formats:
            written.append(write_png(name.with_suffix(".png"), frame_grid(video, num_cols=min(len(video), 8))))
    return written


if __name__ == "__main__":
    raise SystemExit(main())
