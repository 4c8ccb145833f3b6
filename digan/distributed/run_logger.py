"""Rank 0's run-folder outputs: the progress line, TensorBoard, stats.jsonl, config.yaml and sample videos."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import torch

from digan.config import Config
from digan.distributed import checkpoint as ckpt
from digan.storage import atomic_path, atomic_write


class RunLogger:
    """Rank 0's run folder outputs. With local storage they go straight into the run folder; with S3
    they are written to a local staging folder and copied to `{run}/` at every checkpoint and at the end.
    """

    def __init__(self, cfg: Config, storage, enabled: bool):
        import pyarrow.fs as pafs

        self.cfg, self.enabled = cfg, enabled
        self.fs, self.run_fs_path = storage.storage_filesystem, storage.experiment_fs_path
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)
        self._tb = None
        self._purge_step: int | None = None
        if not enabled:
            return
        if self.is_local:
            self.dir = Path(self.run_fs_path)
            self.dir.mkdir(parents=True, exist_ok=True)
        else:
            # A fresh staging folder per attempt, seeded with the stored stats.jsonl so that a resumed run
            # appends to it (it holds the lines up to the last checkpoint, like the checkpoint itself).
            self.dir = Path(ckpt.staging_dir(f"run-{cfg.train.run_name}"))
            stats = f"{self.run_fs_path}/stats.jsonl"
            if self.fs.get_file_info(stats).type == pafs.FileType.File:
                pafs.copy_files(stats, str(self.dir / "stats.jsonl"), source_filesystem=self.fs)
        (self.dir / "config.yaml").write_text(_yaml(cfg))

    @property
    def tb(self):
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: after a resume, TensorBoard drops the events of the steps that were rolled back
            self._tb = SummaryWriter(log_dir=str(self.dir / "tensorboard"), purge_step=self._purge_step)
        return self._tb

    def resume_at(self, step: int) -> None:
        """A resumed run goes on from `step`: drop the log lines of later steps (they were rolled back), so
        stats.jsonl and TensorBoard hold each step once, from the attempt the checkpoints continue."""
        self._purge_step = step + 1
        if not self.enabled or not (self.dir / "stats.jsonl").exists():
            return
        lines = (self.dir / "stats.jsonl").read_text().splitlines(keepends=True)
        kept = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= step]
        if len(kept) != len(lines):
            with atomic_write(self.dir / "stats.jsonl", "w") as f:
                f.write("".join(kept))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.dir / "stats.jsonl", "a") as f:
            f.write(json.dumps({"time": time.time(), **metrics}, sort_keys=True) + "\n")
        for k, v in metrics.items():
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):  # strings: jsonl only
                self.tb.add_scalar(k, v, global_step=step)
        self.tb.flush()
        order = ["loss_G", "loss_D", "r1", "D_M_real", "D_M_fake", "D_I_real", "D_I_fake", "ada_p", "signs_real"]
        extra = " ".join(f"{k} {metrics[k]:.4g}" for k in order if k in metrics)
        metric_str = " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k.startswith(("fvd", "kvd", "fid",
                                                                                             "proxy_")))
        if metric_str and "metrics_detector" in metrics:
            metric_str += (f" ({metrics['metrics_detector']}, {metrics['metrics_protocol']}, "
                           f"N={int(metrics['metrics_num_videos'])})")
        print(f"step {step:7d} kimg {metrics['kimg']:9.3f} it/s {metrics['it_per_s']:6.2f} "
              f"samples/s {metrics['samples_per_s']:7.1f} data {100 * metrics['data_wait_frac']:4.1f}% "
              f"skipped {int(metrics['skipped_records'])} {extra} {metric_str}".rstrip(), flush=True)

    @torch.no_grad()
    def write_samples(self, G_ema: torch.nn.Module, step: int) -> Path | None:
        """A grid of `train.num_sample_videos` videos (seeds train.seed, train.seed + 1, ...: the videos
        `digan.generate` renders for those seeds) as samples/step-N.mp4 and in TensorBoard."""
        if not self.enabled:
            return None
        from digan.sampling import sample_videos, video_seeds
        from digan.video_io import tensorboard_video, video_grid, write_mp4

        seeds = video_seeds(self.cfg.train.seed, self.cfg.train.num_sample_videos)
        num_frames = self.cfg.data.num_frames
        grid = video_grid(sample_videos(G_ema, seeds, num_frames, clip_frames=num_frames))  # [T, H', W', 3]
        path = self.dir / "samples" / f"{ckpt.checkpoint_name(step)}.mp4"
        with atomic_path(path, keep_suffix=True) as tmp:  # the muxer picks mp4 by the name
            write_mp4(tmp, grid, fps=8)
        tensorboard_video(self.tb, "samples", grid, step, fps=8)  # watch progress in TensorBoard's Images tab
        self.tb.flush()
        return path

    def sync(self) -> None:
        """Copy the staging folder to the run folder on S3 (no-op for local storage)."""
        if not self.enabled or self.is_local:
            return
        import pyarrow.fs as pafs

        if self._tb is not None:
            self._tb.flush()
        pafs.copy_files(str(self.dir), self.run_fs_path, destination_filesystem=self.fs)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self.enabled and not self.is_local:
            shutil.rmtree(self.dir, ignore_errors=True)  # everything that counts was synced at the checkpoints


def _yaml(cfg: Config) -> str:
    from digan.config import dump_yaml

    return dump_yaml(cfg)
