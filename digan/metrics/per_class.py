"""Per-class FVD of a class-conditional generator: each class's videos against that class's real clips.

One pass over the labelled real clips fills every class's set (up to N clips each); then each class's N fake
videos (seeds `seed`, `seed + 1`, ... rendered in that class, `digan.sampling`) are scored against them. A
class with fewer real clips than N is scored at the number it has (reported with it); one with fewer than 2
gets no value.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from digan.metrics.detectors import VideoDetector
from digan.metrics.distances import frechet_distance_from_features
from digan.sampling import sample_videos, video_seeds


def real_features_by_class(batches: Iterable, num_classes: int, num_videos: int, num_frames: int,
                           det: VideoDetector) -> dict[int, np.ndarray]:
    """Features of up to `num_videos` real clips per class from (uint8 clips [B, T, H, W, 3], labels [B])."""
    feats: dict[int, list[np.ndarray]] = {k: [] for k in range(num_classes)}
    have = dict.fromkeys(range(num_classes), 0)
    for clips, labels in batches:
        keep = []
        for i, k in enumerate(labels.tolist()):
            if have[k] < num_videos:
                have[k] += 1
                keep.append(i)
        if keep:
            f = det(torch.as_tensor(clips)[keep, :num_frames])
            for row, i in enumerate(keep):
                feats[int(labels[i])].append(f[row])
        if all(n >= num_videos for n in have.values()):
            break
    return {k: np.stack(v) for k, v in feats.items() if v}


def per_class_fvd(G: torch.nn.Module, real_batches: Iterable, num_classes: int, num_videos: int,
                  det: VideoDetector, num_frames: int = 16, seed: int = 0, batch_size: int = 8,
                  clip_frames: int = 16) -> dict[int, dict[str, float | int | None]]:
    """{class: {"fvd": FVD at `num_frames` frames or None, "num_videos": N used}} for every class."""
    real = real_features_by_class(real_batches, num_classes, num_videos, num_frames, det)
    out: dict[int, dict[str, float | int | None]] = {}
    for k in range(num_classes):
        n = len(real.get(k, ()))
        if n < 2:
            out[k] = {"fvd": None, "num_videos": n}
            continue
        seeds = video_seeds(seed, n)
        fake = np.concatenate([det(sample_videos(G, seeds[i:i + batch_size], num_frames, clip_frames,
                                                 labels=torch.full((len(seeds[i:i + batch_size]),), k)))
                               for i in range(0, n, batch_size)])
        out[k] = {"fvd": frechet_distance_from_features(fake, real[k]), "num_videos": n}
    return out
