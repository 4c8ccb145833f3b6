"""Metrics of a generator against real clips: `compute_metrics` (training and `digan.evaluate`).

Protocol (DIGAN `src/scripts/compute_fvd_kvd.py`, §6 of the reference):
* fake videos: the videos of seeds seed, seed + 1, ... (`digan.sampling`: the same videos `digan.generate`
  renders for those seeds, whatever the batch size or number of ranks), frames at t_k = k / (clip_frames - 1),
  so a 16-frame video is t = linspace(0, 1, 16), the span of a training clip, and a 128-frame video continues
  at the same frame rate (extrapolation in time, as for long-video FVD); clamp to [-1, 1], quantised to uint8
  as DIGAN does: `((x + 1) / 2 * 255).type(uint8)` (truncation);
* real videos: uint8 clips from the data pipeline, the first `T` frames of each;
* features: `detectors.py` (protocol `tfhub` or `digan`); FVD = Fréchet distance of the logits,
  KVD = unbiased polynomial MMD^2 over the whole sets (DIGAN), FID = Fréchet distance of the
  Inception pool features of the frames.

Real features are cached in memory and (with `cache_dir`) on disk, keyed by dataset, detector + weights
+ protocol, N and T, so a training run extracts them once.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from digan.sampling import sample_videos, video_seeds
from digan.storage import atomic_write

from .detectors import FrameDetector, VideoDetector, as_uint8_tensor, build_frame_detector, build_video_detector, \
    clips_to_frames
from .distances import FeatureStats, frechet_distance, kernel_distance

_METRIC_RE = re.compile(r"^(fvd|kvd)(\d+)$|^(fid)$")
_REAL_CACHE: dict[str, np.ndarray] = {}  # in-process cache of real features, by cache key


def parse_metric(name: str) -> tuple[str, int]:
    """'fvd16' -> ('fvd', 16); 'kvd128' -> ('kvd', 128); 'fid' -> ('fid', 16). ValueError otherwise."""
    m = _METRIC_RE.match(name)
    if not m:
        raise ValueError(f"unknown metric {name!r}: expected fvd<T>, kvd<T> (e.g. fvd16, fvd128, kvd16) or fid")
    if m.group(3):
        return "fid", 16
    frames = int(m.group(2))
    if frames < 9:
        raise ValueError(f"metric {name!r}: the I3D needs at least 9 frames")
    return m.group(1), frames


# ----------------------------------------------------------------------------------------------------
# Fake videos.


def iterate_fake_videos(G: torch.nn.Module, num_videos: int, num_frames: int, seed: int, batch_size: int,
                        clip_frames: int = 16, rank: int = 0, world_size: int = 1) -> Iterable[torch.Tensor]:
    """Yield uint8 fake clips for this rank's share of videos 0..num_videos-1 (rank r gets r, r+W, ...)."""
    seeds = video_seeds(seed, num_videos)[rank::world_size]
    for i in range(0, len(seeds), batch_size):
        yield sample_videos(G, seeds[i:i + batch_size], num_frames, clip_frames)


# ----------------------------------------------------------------------------------------------------
# Feature extraction over a stream of clips (one pass, every feature set at once).


def _extract(clip_iter: Iterable, num_videos: int, video_det: VideoDetector | None, video_frames: list[int],
             frame_det: FrameDetector | None, fid_frames: int, fid_frames_per_clip: int | None,
             desc: str, progress: bool) -> dict[str, np.ndarray]:
    """Consume up to `num_videos` clips; return {"video<T>": [N, D], "frames": [N * k, D]}."""
    feats: dict[str, list[np.ndarray]] = {f"video{t}": [] for t in video_frames}
    if frame_det is not None:
        feats["frames"] = []
    need = max(video_frames + ([fid_frames] if frame_det is not None else []))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=num_videos, desc=desc, unit="clip", dynamic_ncols=True)
    seen = 0
    for clips in clip_iter:
        if seen >= num_videos:
            break
        clips = as_uint8_tensor(clips)[: num_videos - seen]
        if clips.ndim != 5 or clips.shape[-1] != 3:
            raise ValueError(f"{desc}: clips must be uint8 [B, T, H, W, 3], got shape {tuple(clips.shape)}")
        if clips.shape[1] < need:
            raise ValueError(f"{desc}: clips have {clips.shape[1]} frames but the metrics need {need} "
                             f"(give longer real clips, e.g. data.num_frames={need})")
        for t in video_frames:
            feats[f"video{t}"].append(video_det(clips[:, :t]))
        if frame_det is not None:
            feats["frames"].append(frame_det(clips_to_frames(clips[:, :fid_frames], fid_frames_per_clip)))
        seen += clips.shape[0]
        if bar is not None:
            bar.update(clips.shape[0])
    if bar is not None:
        bar.close()
    if seen < num_videos:
        short = int((clip_iter.stats() if hasattr(clip_iter, "stats") else {}).get("skipped_short", 0))
        if short:  # the data's clips are too short for the metric, not too few
            raise ValueError(f"{desc}: only {seen} clips available, {num_videos} requested: {short} clips were "
                             f"shorter than the {need} frames the metrics need (use data with clips of >= {need} "
                             "frames)")
        raise ValueError(f"{desc}: only {seen} clips available, {num_videos} requested (lower metrics.num_videos)")
    return {k: np.concatenate(v) for k, v in feats.items()}


def _gather_rows(x: np.ndarray, world_size: int) -> np.ndarray:
    """Concatenate a feature array over ranks (torch.distributed, when the caller spreads the work)."""
    if world_size <= 1:
        return x
    import torch.distributed as dist

    parts: list[Any] = [None] * world_size
    dist.all_gather_object(parts, x)
    return np.concatenate(parts)


def _cache_key(dataset_key: str, name: str, num_videos: int, extra: str) -> str:
    text = json.dumps([dataset_key, name, num_videos, extra])
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _load_cached(key: str, cache_dir: str | None) -> np.ndarray | None:
    if key in _REAL_CACHE:
        return _REAL_CACHE[key]
    if cache_dir:
        path = Path(cache_dir).expanduser() / f"real-{key}.npz"
        if path.is_file():
            with np.load(path, allow_pickle=False) as f:
                _REAL_CACHE[key] = f["features"].astype(np.float64)
            return _REAL_CACHE[key]
    return None


def _store_cached(key: str, feats: np.ndarray, cache_dir: str | None, meta: dict) -> None:
    _REAL_CACHE[key] = feats
    if not cache_dir:
        return
    # Atomic: several ranks or runs may share the cache folder.
    with atomic_write(Path(cache_dir).expanduser() / f"real-{key}.npz") as f:
        np.savez(f, features=feats.astype(np.float32), meta=np.array(json.dumps(meta)))


# ----------------------------------------------------------------------------------------------------
# The API.


RealClips = Iterable | Callable[[int], Iterable]


def compute_metrics(
    G: torch.nn.Module,
    real_clips: RealClips,
    names: list[str],
    num_videos: int,
    protocol: str = "tfhub",
    detector: str = "i3d",
    device: str | torch.device = "cpu",
    seed: int = 0,
    *,
    dataset_key: str | None = None,
    cache_dir: str | None = None,
    i3d_weights: str | None = None,
    inception_weights: str | None = None,
    batch_size: int = 8,
    clip_frames: int = 16,
    fid_frames_per_clip: int | None = None,
    kvd_subsets: int = 0,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
) -> dict[str, float]:
    """Compute `names` (e.g. ["fvd16", "kvd16", "fvd128", "fid"]) for generator `G` against real clips.

    G: the generator (`G.prepare`/`G.render` or `G(z, z_motion, t)`), on its device; run under no_grad
       in eval mode (its training flag is restored afterwards).
    real_clips: an iterable of uint8 clips [B, T, H, W, 3] (torch or numpy) with T >= the longest metric
       (the first T frames are used), or a callable `real_clips(T) -> iterable` called only for the
       lengths whose features are not cached. Consumed up to `num_videos` clips (this rank's share).
    num_videos: N fake and N real videos per metric (report N with the number: FD depends on it).
    protocol: "tfhub" | "digan" (preprocessing, see detectors.py); detector: "i3d" | "proxy".
    seed: fake video i uses codes drawn from `seed` (same videos for any batch size / world size).
    dataset_key: identifies the real data (e.g. "s3://bucket/ucf101@128"); with it, real features are
       cached in memory and, with `cache_dir`, on disk. None: no caching.
    rank / world_size: spread the work over ranks (torch.distributed must be initialised when
       world_size > 1); each rank renders its share of fake videos and reads N / world_size real clips
       from its own `real_clips`; features are all-gathered, and every rank returns the same dict.
    clip_frames: frames of a training clip (cfg.data.num_frames): sets the frame rate t_k = k/(clip_frames-1).
    kvd_subsets: 0 = KVD over the whole sets (DIGAN); > 0 = mean over that many random subsets of 1000.

    Returns {name: value} with the real detector, {"proxy_" + name: value} with the proxy detector, so a
    proxy number is never reported as FVD. KVD values are the raw MMD^2 (not x1000).
    """
    parsed = [(n, *parse_metric(n)) for n in names]
    if not parsed:
        return {}
    if num_videos < 2:
        raise ValueError(f"num_videos={num_videos}: need at least 2 videos per set")
    video_frames = sorted({t for _, kind, t in parsed if kind in ("fvd", "kvd")})
    want_fid = any(kind == "fid" for _, kind, _ in parsed)
    video_det = build_video_detector(detector, protocol, device, i3d_weights, batch_size) if video_frames else None
    frame_det = build_frame_detector(detector, device, inception_weights, batch_size * 8) if want_fid else None
    job = _Job(video_det, frame_det, video_frames, want_fid, num_videos, fid_frames_per_clip, rank, world_size,
               progress)
    real = _real_features(job, real_clips, dataset_key, cache_dir)

    # Fake features: one pass over this rank's videos, rendered at the longest needed length.
    was_training = G.training
    G.eval()
    try:
        longest = max(video_frames + ([FID_FRAMES] if want_fid else []))
        fake_iter = iterate_fake_videos(G, num_videos, longest, seed, batch_size, clip_frames, rank, world_size)
        fake = job.extract(fake_iter, len(range(rank, num_videos, world_size)), video_frames, want_fid, "fake")
    finally:
        G.train(was_training)
    fake = {k: _gather_rows(v, world_size) for k, v in fake.items()}
    return _distances(parsed, real, fake, (video_det or frame_det).key_prefix, kvd_subsets)


FID_FRAMES = 16  # FID reads frames of the first 16 of every clip


@dataclass
class _Job:
    """What one `compute_metrics` call measures with, and how its work is split over ranks."""

    video_det: VideoDetector | None
    frame_det: FrameDetector | None
    video_frames: list[int]
    want_fid: bool
    num_videos: int
    fid_frames_per_clip: int | None
    rank: int
    world_size: int
    progress: bool

    @property
    def per_rank(self) -> int:
        """Real clips each rank reads: ceil(N / W) (all N in one process)."""
        return -(-self.num_videos // self.world_size) if self.world_size > 1 else self.num_videos

    def extract(self, clips, count: int, ts: list[int], fid: bool, what: str) -> dict[str, np.ndarray]:
        return _extract(clips, count, self.video_det, ts, self.frame_det if fid else None, FID_FRAMES,
                        self.fid_frames_per_clip, what, self.progress)


def _real_features(job: _Job, real_clips: RealClips, dataset_key: str | None,
                   cache_dir: str | None) -> dict[str, np.ndarray]:
    """Real features: from the cache, else one pass over the real clips (per missing length if callable)."""
    keys = {f"video{t}": _cache_key(dataset_key or "", job.video_det.name, job.num_videos, f"T={t}")
            for t in job.video_frames}
    if job.want_fid:
        keys["frames"] = _cache_key(dataset_key or "", job.frame_det.name, job.num_videos,
                                    f"T={FID_FRAMES},k={job.fid_frames_per_clip}")
    real: dict[str, np.ndarray] = {}
    if dataset_key is not None:
        for k, key in keys.items():
            cached = _load_cached(key, cache_dir)
            if cached is not None:
                real[k] = cached
    if job.world_size > 1:
        # Every rank must take part in the same real passes (they all-gather): a feature set missing
        # on any rank (e.g. a rank restarted with an empty memory cache) is recomputed on all of them.
        import torch.distributed as dist

        everyone: list[Any] = [None] * job.world_size
        dist.all_gather_object(everyone, sorted(set(keys) - set(real)))
        for k in set().union(*map(set, everyone)):
            real.pop(k, None)
    missing_t = [t for t in job.video_frames if f"video{t}" not in real]
    missing_fid = job.want_fid and "frames" not in real
    if not (missing_t or missing_fid):
        return real
    if callable(real_clips):
        groups = sorted(set(missing_t) | ({FID_FRAMES} if missing_fid else set()))
        passes = [(real_clips(t), [t] if t in missing_t else [], missing_fid and t == FID_FRAMES) for t in groups]
    else:
        passes = [(real_clips, missing_t, missing_fid)]
    for it, ts, fid in passes:
        for k, v in job.extract(it, job.per_rank, ts, fid, "real").items():
            rows_per_clip = v.shape[0] // job.per_rank
            # Ranks read ceil(N / W) clips each: keep exactly N clips' rows.
            real[k] = _gather_rows(v, job.world_size)[: job.num_videos * rows_per_clip]
            if dataset_key is not None:  # memory cache on every rank, the disk file from rank 0
                det_name = job.frame_det.name if k == "frames" else job.video_det.name
                _store_cached(keys[k], real[k], cache_dir if job.rank == 0 else None,
                              {"dataset": dataset_key, "features": k, "detector": det_name,
                               "num_videos": job.num_videos})
    return real


def _distances(parsed: list[tuple[str, str, int]], real: dict[str, np.ndarray], fake: dict[str, np.ndarray],
               prefix: str, kvd_subsets: int) -> dict[str, float]:
    """FD of Gaussian fits (FVD, FID) and the polynomial MMD (KVD) of the real and fake features."""
    out: dict[str, float] = {}
    for name, kind, t in parsed:
        key = "frames" if kind == "fid" else f"video{t}"
        if kind == "kvd":
            out[prefix + name] = kernel_distance(fake[key], real[key], kvd_subsets)[0]
        else:
            a, b = FeatureStats.from_features(real[key]), FeatureStats.from_features(fake[key])
            out[prefix + name] = frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    return out
