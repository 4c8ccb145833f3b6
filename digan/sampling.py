"""Seeds -> videos, one way for every caller: `digan.generate`, `digan.evaluate` and the training metrics
(through `digan.metrics`), and the training-time sample grids. Seed s is the same video everywhere.

- Latents: seed s seeds a CPU `torch.Generator`; z_I is its first `z_dim` N(0, 1) draws and z_M the next
  `motion_z_dim` draws (with a separate motion seed m, z_M comes from m's stream at the same offset), so a
  video's codes do not depend on the device, the batch or the number of ranks. A set of N videos with base
  seed b is seeds b, b+1, ..., b+N-1 (`video_seeds`).
- Times: a 16-frame clip spans t in [0, 1] (t_k = k / (clip_frames - 1), the training span); more frames at
  the same rate continue past 1 (`clip_times`), or any range can be asked for (`time_stamps`).
- Classes (a class-conditional G): given per video, or seed s renders class s mod num_classes (`seed_classes`),
  so a set of consecutive seeds covers the classes evenly.
- Rendering: the per-video INR weights are prepared once and frames rendered in chunks (bounded memory).
- Pixels: clamp to [-1, 1], then `((x + 1) / 2 * 255)` truncated to uint8, the official DIGAN FVD conversion
  (`src/scripts/compute_fvd_kvd.py`), used for metrics, files and TensorBoard alike.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def video_seeds(seed: int, num_videos: int) -> list[int]:
    """The seeds of a set of videos with base seed `seed`: seed, seed + 1, ..."""
    return [seed + i for i in range(num_videos)]


def seed_latents(seeds: list[int], z_dim: int, motion_z_dim: int,
                 motion_seeds: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic (z_I [N, z_dim], z_M [N, motion_z_dim]) on the CPU for content seeds (and motion seeds)."""
    motion_seeds = seeds if motion_seeds is None else motion_seeds
    if len(motion_seeds) != len(seeds):
        raise ValueError("seeds and motion_seeds must have the same length")
    zs, zms = [], []
    for s, m in zip(seeds, motion_seeds):
        zs.append(torch.randn(z_dim, generator=torch.Generator().manual_seed(s)))
        g = torch.Generator().manual_seed(m)
        torch.randn(z_dim, generator=g)  # skip the stream's content part
        zms.append(torch.randn(motion_z_dim, generator=g))
    return torch.stack(zs), torch.stack(zms)


def seed_classes(seeds: list[int], num_classes: int) -> torch.Tensor | None:
    """The default classes of seeds' videos: s mod num_classes (None for an unconditional model)."""
    return torch.tensor([s % num_classes for s in seeds], dtype=torch.int64) if num_classes > 0 else None


def time_stamps(num_frames: int, t_start: float = 0.0, t_end: float = 1.0) -> torch.Tensor:
    """t = linspace(t_start, t_end, num_frames) [T] (float32, computed in float64); one frame renders t_start."""
    return torch.linspace(t_start, t_end, num_frames, dtype=torch.float64).to(torch.float32)


def clip_times(num_frames: int, clip_frames: int = 16) -> torch.Tensor:
    """t_k = k / (clip_frames - 1) for k < num_frames: a clip's span, continued at the same rate."""
    return time_stamps(num_frames, 0.0, (num_frames - 1) / (clip_frames - 1))


@torch.no_grad()
def render_chunks(G: torch.nn.Module, z: torch.Tensor, z_motion: torch.Tensor, t: torch.Tensor, scale: int = 1,
                  chunk_frames: int = 16, truncation_psi: float = 1.0, labels: torch.Tensor | None = None
                  ) -> Iterator[tuple[int, torch.Tensor]]:
    """Render B videos at times t [T] (shared) or [B, T] in chunks of at most `chunk_frames` frames each
    (`labels` [B]: their classes, for a class-conditional G).

    Yields (first frame index, float frames [B, Tc, 3, H*scale, W*scale]). The INR weights are prepared once.
    """
    device = next(G.parameters()).device
    cond = {} if labels is None else {"c": labels.to(device)}
    code = G.prepare(z.to(device), z_motion.to(device), truncation_psi=truncation_psi, **cond)
    t = t.to(device)
    if t.dim() == 1:
        t = t.unsqueeze(0).expand(z.shape[0], -1)
    for start in range(0, t.shape[1], chunk_frames):
        yield start, G.render(code, t[:, start: start + chunk_frames], scale)


def to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """Float frames [..., 3, H, W] in about [-1, 1] -> uint8 [..., H, W, 3] on the CPU (clamp, truncate)."""
    x = (frames.detach().to(torch.float32).clamp(-1, 1) + 1.0) / 2.0 * 255.0
    return x.to(torch.uint8).movedim(-3, -1).cpu().contiguous()


@torch.no_grad()
def render_videos(G: torch.nn.Module, z: torch.Tensor, z_motion: torch.Tensor, num_frames: int,
                  clip_frames: int = 16, chunk_frames: int = 16, labels: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [B, num_frames, H, W, 3] at `clip_times` (bounded memory: `chunk_frames` at a time)."""
    t = clip_times(num_frames, clip_frames)
    chunks = render_chunks(G, z, z_motion, t, chunk_frames=chunk_frames, labels=labels)
    return torch.cat([to_uint8(f) for _, f in chunks], dim=1)


def sample_videos(G: torch.nn.Module, seeds: list[int], num_frames: int, clip_frames: int = 16,
                  labels: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [N, num_frames, H, W, 3] of the videos of `seeds` (the path every caller shares); a conditional G
    renders `labels`, else `seed_classes`."""
    z, z_motion = seed_latents(seeds, G.z_dim, G.motion_z_dim)
    if labels is None:
        labels = seed_classes(seeds, getattr(G, "num_classes", 0))
    return render_videos(G, z, z_motion, num_frames, clip_frames, labels=labels)
