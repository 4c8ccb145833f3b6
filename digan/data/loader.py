"""Streaming loaders over clip shards (folder or s3://): DIGAN training pairs and whole evaluation clips.

Pipeline of one reader (a DataLoader worker of one rank):

    shard URLs -> [resampled: draw with replacement | once: epoch permutation, rank slice, worker slice]
      -> webdataset gopen (files, pipe:, http:, s3: digan.storage.s3) -> tar records (digan.data.tar)
      -> shuffle buffer -> decode (2 frames, or a whole clip) -> batches

The rank/worker split is webdataset's split_by_node + split_by_worker, driven by the explicit rank
and world size given to the builders rather than by RANK/WORLD_SIZE in the environment. Resampled
mode is webdataset's ResampledShards + with_epoch (counted per worker), seeded per reader.

Everything random is seeded by (seed, stream, worker, epoch, purpose), so a stream is reproducible and
two streams or two epochs never share one. Training pairs come in `streams` (one per rank of the run's largest
worker count, `dist.num_workers`): a rank of a smaller (elastic) group reads the streams of its share of the global
batch side by side, so the global batch does not depend on how many workers hold it. Batches are assembled in the workers; each one carries the
counts of records read and skipped since the previous batch, which the main process adds up, so
`loader.stats()` covers every worker process exactly (no shared memory needed).

Training pairs follow the official sampler: u1 ~ Beta(2,1), u2 ~ Beta(1,2), indices floor(N*u) sorted,
dt = (late - early) / (N - 1), values scaled to [-1, 1]; only the two frames are decoded.
"""

from __future__ import annotations

import copy
import math
import sys

import torch

from digan.config import DataConfig
from digan.data.reader import COUNT_KEYS, DataError, ShardReader
from digan.data.source import check_source, count_clips, locate, s3_settings
from digan.storage.s3 import S3OutageError, S3Settings, configure_s3


class ClipStream(torch.utils.data.IterableDataset):
    """The dataset each DataLoader worker iterates: picklable plain fields, pipeline built in `__iter__`."""

    def __init__(self, shards: list[str], mode: str, resolution: int, num_frames: int, batch_size: int,
                 rank: int, world_size: int, seed: int, resampled: bool, batches_per_worker: int | None,
                 shuffle_buffer: int, partial: bool, s3: S3Settings, start_epoch: int = 0, direct: bool = False,
                 shard_clips: list[int] | None = None, stall_timeout_s: float = 300.0,
                 global_batch: int | None = None, batch_start: int | None = None, num_classes: int = 0,
                 streams: list[tuple[int, int]] | None = None):
        super().__init__()
        self.num_classes = num_classes  # > 0: pairs come with class indices (records without one are skipped)
        # This rank's batches hold global samples [batch_start, batch_start + batch_size) of every global batch of
        # `global_batch` (even shares unless an elastic group's size does not divide it: digan.distributed.utils).
        self.global_batch = world_size * batch_size if global_batch is None else global_batch
        self.batch_start = rank * batch_size if batch_start is None else batch_start
        self.direct = direct  # the manifest says frames are stored at `resolution`: decode into the batch
        self.shards, self.mode, self.resolution, self.num_frames = shards, mode, resolution, num_frames
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.resampled, self.batches_per_worker = resampled, batches_per_worker
        self.shuffle_buffer, self.partial, self.s3 = shuffle_buffer, partial, s3
        self.shard_clips = None if resampled else shard_clips  # exact epochs when set (training pairs)
        self.stall_timeout_s = stall_timeout_s
        self.start_epoch = start_epoch
        self.skip: dict[int, int] = {}  # exact epochs, resumed mid-epoch: batches each worker already gave
        self._num_iters = 0  # counted inside each worker: persistent workers re-enter __iter__ once per epoch
        self._endless = None  # resampled mode: [(reader, batches)] kept across epochs inside the worker
        # (first sample, size) of each stream's share of a global batch; None: one stream per rank of this group
        self.streams = streams

    def parts(self) -> list[tuple["ClipStream", int, int]]:
        """(the stream as its own dataset, first row, end row of it in this rank's batches) for each stream this
        rank's share [batch_start, batch_start + batch_size) overlaps. A stream's dataset is this one as rank v of
        len(streams) would have it: the reads, draws and shuffles of stream v are the same whichever rank holds
        it. Just this dataset when the streams are the ranks (a fixed worker count)."""
        lo, hi = self.batch_start, self.batch_start + self.batch_size
        if self.streams is None or (len(self.streams) == self.world_size and self.streams[self.rank] == (lo, self.batch_size)):
            return [(self, 0, self.batch_size)]
        out = []
        for v, (start, size) in enumerate(self.streams):
            a, b = max(lo, start), min(hi, start + size)
            if a < b:
                part = copy.copy(self)
                part.rank, part.world_size, part.batch_start, part.batch_size = v, len(self.streams), start, size
                part.streams = None
                out.append((part, a - start, b - start))
        return out

    @property
    def exact(self) -> bool:
        return self.shard_clips is not None

    def steps_per_epoch(self) -> int:
        """Exact epochs: batches per rank per epoch (the same on every rank: global batches per epoch)."""
        return sum(self.shard_clips) // self.global_batch

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_endless"}  # generators do not pickle

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.start_epoch + self._num_iters
        first = self._num_iters == 0
        self._num_iters += 1
        configure_s3(self.s3)
        parts = self.parts()
        if not self.resampled:
            skip = self.skip.get(worker, 0) if first else 0
            readers = [ShardReader(part, worker, num_workers, epoch).batches() for part, _, _ in parts]
            for items in zip(*readers):  # the streams give their batches in step, then their last counts
                b = _merge(items, parts)
                if skip and "data" in b:  # taken before the checkpoint: made again (same draws), not yielded
                    skip -= 1
                    continue
                yield b
            return
        # Resampled: one endless stream per (seed, stream, worker, start epoch), cut into epochs of a fixed
        # number of batches (webdataset's with_epoch, counted per worker). Keeping it alive across epochs
        # avoids refilling the shuffle buffer at every epoch boundary.
        if getattr(self, "_endless", None) is None:
            readers = [ShardReader(part, worker, num_workers, epoch) for part, _, _ in parts]
            self._endless = [(reader, reader.batches()) for reader in readers]
        for _, items in zip(range(self.batches_per_worker), zip(*(batches for _, batches in self._endless))):
            yield _merge(items, parts)
        yield {"counts": sum(reader.take_counts() for reader, _ in self._endless), "worker": worker}


def _merge(items: tuple[dict, ...], parts: list[tuple[ClipStream, int, int]]) -> dict:
    """One rank's batch from its streams' batches (each cut to the rows this rank holds), in global order."""
    if len(items) == 1 and parts[0][1] == 0 and parts[0][2] == parts[0][0].batch_size:
        return items[0]
    out = {"counts": sum(item["counts"] for item in items), "worker": items[0]["worker"]}
    if "data" in items[0]:
        rows = [slice(a, b) for _, a, b in parts]
        data = [item["data"] if isinstance(item["data"], tuple) else (item["data"],) for item in items]
        merged = tuple(torch.cat([d[k][r] for d, r in zip(data, rows)]) for k in range(len(data[0])))
        out["data"] = merged if isinstance(items[0]["data"], tuple) else merged[0]
        out["keys"] = [key for item, r in zip(items, rows) for key in item["keys"][r]]
    return out


def _own_line(e: BaseException) -> str:
    """The one-line message of a DataError/S3OutageError, also when torch re-raised it from a worker."""
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(e).__name__
    last = lines[-1]
    for name in ("DataError: ", "S3OutageError: "):
        if name in last:
            return last.split(name, 1)[1]
    return last


class StreamLoader:
    """Batches of one rank. Iterate once per epoch; `stats()`, `state_dict()`, `load_state_dict()`.

    Resume semantics. Resampled: a restored loader continues with a fresh epoch (epoch + 1 if the saved
    epoch was partly consumed), so a resumed run never replays the stream it already saw (epochs are
    only a bookkeeping unit there). Exact epochs: it resumes inside the saved epoch; each DataLoader
    worker remakes its share and leaves out the batches it had given before the checkpoint, so the
    epoch's clips are still each seen once.

    Every wait is bounded: readers stop after data.stall_timeout_s without a usable record (DataError,
    with the reason), S3 reads after data.s3_retry_budget_s of outage (S3OutageError); the DataLoader
    itself gives up after both plus a minute without a batch.
    """

    def __init__(self, dataset: ClipStream, num_workers: int, start_method: str):
        self.dataset, self.num_workers, self.start_method = dataset, num_workers, start_method
        self.epoch, self.step = dataset.start_epoch, 0  # epoch in progress and batches taken from it
        self.taken: dict[int, int] = {}  # batches taken from each DataLoader worker in this epoch
        self._in_epoch = False  # a pass was started and not finished (abandoned passes still use up an epoch)
        self._counts = dict.fromkeys(COUNT_KEYS, 0)
        self._loader = None
        self.last_keys: list[str] = []  # record keys of the last batch yielded (for logs and tests)

    def _dataloader(self):
        if self._loader is None:
            kw = {}
            if self.num_workers > 0:
                wait = self.dataset.stall_timeout_s + self.dataset.s3.retry_budget_s + 60
                kw = dict(multiprocessing_context=self.start_method, persistent_workers=True, prefetch_factor=4,
                          timeout=wait)
            # Its own generator: a DataLoader iterator draws a base seed, which from the global RNG would shift
            # the training step's augmentation draws whenever an iterator starts (e.g. right after a resume).
            self._loader = torch.utils.data.DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                                                       generator=torch.Generator().manual_seed(self.dataset.seed),
                                                       **kw)
        return self._loader

    def __iter__(self):
        loader = self._dataloader()
        if self._in_epoch:  # the previous pass was abandoned: its workers counted an epoch too
            self.epoch += 1
            self.dataset.skip = {}
        self.taken = dict(self.dataset.skip)  # a resumed exact epoch starts with what was taken before
        self._in_epoch, self.step = True, sum(self.taken.values())
        it = iter(loader)  # each pass re-enters ClipStream.__iter__ in every worker
        while True:
            try:
                item = next(it)
            except StopIteration:
                break
            except (DataError, S3OutageError) as e:  # from a worker: torch wraps the message in its traceback
                raise type(e)(_own_line(e)) from None
            except RuntimeError as e:
                if "DataLoader timed out" in str(e):
                    raise DataError(f"digan.data: no batch from the DataLoader workers for "
                                    f"{self._dataloader().timeout:.0f} s (a hung read?)") from e
                raise
            for k, v in zip(COUNT_KEYS, item["counts"].tolist()):
                self._counts[k] += v
            if "data" in item:
                self.step += 1
                self.taken[item["worker"]] = self.taken.get(item["worker"], 0) + 1
                self.last_keys = item["keys"]
                yield item["data"]
        self._in_epoch, self.step, self.taken = False, 0, {}
        self.dataset.skip = {}
        self.epoch += 1

    def __len__(self) -> int:
        """Batches per epoch of this rank (a resampled or exact-epoch stream; an evaluation pass has none)."""
        if self.dataset.exact:
            return self.dataset.steps_per_epoch()
        if not self.dataset.resampled:
            raise TypeError("a single evaluation pass has no fixed length")
        return self.dataset.batches_per_worker * max(1, self.num_workers)

    def stats(self) -> dict[str, int]:
        """Cumulative counts over all workers: records read, samples produced, skips by reason."""
        out = dict(self._counts)
        out["skipped_total"] = sum(v for k, v in out.items() if k.startswith("skipped_") or k == "shard_errors")
        return out

    def state_dict(self) -> dict:
        return {"seed": self.dataset.seed, "epoch": self.epoch, "step": self.step, "counts": dict(self._counts),
                "taken": {str(k): v for k, v in self.taken.items()}, "num_workers": self.num_workers}

    def load_state_dict(self, state: dict) -> None:
        if int(state["seed"]) != self.dataset.seed:
            print(f"digan.data: resuming with seed {self.dataset.seed} (checkpoint had {state['seed']})",
                  file=sys.stderr)
        epoch, step = int(state["epoch"]), int(state["step"])
        taken = {int(k): int(v) for k, v in state.get("taken", {}).items()}
        same_split = int(state.get("num_workers", -1)) == self.num_workers and sum(taken.values()) == step
        if self.dataset.exact and step > 0 and same_split:
            self.dataset.skip = taken  # resume inside the epoch: each worker leaves out what it gave
        else:
            if self.dataset.exact and step > 0:
                print(f"digan.data: resuming with data.num_workers={self.num_workers} (the checkpoint had another "
                      f"split): epoch {epoch} is not finished, epoch {epoch + 1} starts", file=sys.stderr)
            epoch += 1 if step > 0 else 0
            self.dataset.skip = {}
        self.epoch, self.step, self._in_epoch, self.taken = epoch, 0, False, {}
        self.dataset.start_epoch = epoch
        self.dataset._num_iters = 0
        self.dataset._endless = None
        self._counts = {k: int(state.get("counts", {}).get(k, 0)) for k in COUNT_KEYS}
        self._loader = None  # workers restart with the new start epoch


# ----------------------------------------------------------------------------------------------------
# Public builders.


def _start_method(cfg: DataConfig, shards: list[str]) -> str:
    method = cfg.worker_start_method
    if method == "auto":
        # fork is safe with S3 here although this process already used s3fs (the listing): workers build
        # their own filesystem (cached by PID) and fsspec resets its event-loop thread after a fork. It
        # starts in milliseconds where spawn re-imports torch per worker, and unlike a forkserver
        # (started once, keeping its first environment) it sees the current AWS_* settings.
        return "fork"
    return method


def build_pair_loader(cfg: DataConfig, resolution: int, batch_per_worker: int, rank: int = 0, world_size: int = 1,
                      seed: int = 0, batch_start: int | None = None, global_batch: int | None = None,
                      num_classes: int = 0, streams: list[tuple[int, int]] | None = None) -> StreamLoader:
    """DIGAN training pairs of one rank: iterates `(pair float32 [B,2,3,R,R] in [-1,1], dt float32 [B])`, plus
    class indices int64 [B] (the records' `label_index`; records without a valid one skipped and counted as
    `skipped_unlabelled`) when `num_classes` > 0.

    Shards built at a larger resolution are centre-cropped and downscaled on the fly (antialiased);
    smaller ones are refused. Build shards at the training resolution for speed.

    `cfg.resampled` (the training default): every rank and DataLoader worker draws shards with replacement
    from all shards, independently; each epoch is `len(loader)` batches on every rank, the epoch size
    being `cfg.epoch_clips` (0 = the manifest's clip count). Not resampled: exact epochs. The clips, in a
    seeded per-epoch shard order, are cut into equal contiguous shares (one per rank, then per worker,
    whole batches each); every clip is read once per epoch by one rank; the last W*B-1 clips at most
    (W ranks, B clips per rank batch) are left out of that epoch (a different tail every epoch).
    Rejected records are replaced by repeats of the share's own clips (counted as `padded`), so every
    rank takes the same number of steps. A restored loader resumes inside the epoch it was saved in.

    Ranks of an elastic group whose size does not divide the global batch take unequal shares:
    `batch_start` (this rank's first sample of each global batch) and `global_batch` say which. `streams`:
    (first sample, size) of each rank's share at the run's largest worker count; a rank reads the streams its
    share covers, each as that rank would (its shards, pair draws, shuffle and exact-epoch share), so the global
    batch, in either mode, is the same at any worker count.
    """
    src = check_source(cfg, resolution)
    global_batch = world_size * batch_per_worker if global_batch is None else global_batch
    bpw, clips = None, None
    if cfg.resampled:
        epoch_clips = cfg.epoch_clips or src.manifest["num_clips"]  # check_source made sure there is one
        bpw = max(1, math.ceil(epoch_clips / (max(1, cfg.num_workers) * global_batch)))
    else:
        clips = src.clips if src.clips is not None else count_clips(src.shards, s3_settings(cfg))
        if sum(clips) < global_batch:
            raise ValueError(f"data.source={src.location!r}: {sum(clips)} clips, fewer than one global batch "
                             f"({global_batch})")
    ds = ClipStream(src.shards, "pair", resolution, cfg.num_frames, batch_per_worker, rank, world_size, seed,
                    cfg.resampled, bpw, cfg.shuffle_buffer, partial=False, s3=s3_settings(cfg), direct=src.direct,
                    shard_clips=clips, stall_timeout_s=cfg.stall_timeout_s, global_batch=global_batch,
                    batch_start=batch_start, num_classes=num_classes, streams=streams)
    return StreamLoader(ds, cfg.num_workers, _start_method(cfg, src.shards))


def build_clip_loader(cfg: DataConfig, resolution: int, batch: int, num_frames: int, rank: int = 0,
                      world_size: int = 1, seed: int = 0, num_classes: int = 0) -> StreamLoader:
    """Whole real clips for evaluation: iterates uint8 [B,T,R,R,3] (T = num_frames, RGB, channels last), with
    `num_classes` > 0 pairs (clips, class indices int64 [B]) of labelled records only.

    One shuffled pass over this rank's shards per iteration (a new seeded order each pass); clips
    longer than num_frames give their first num_frames frames, shorter ones are skipped and counted.
    ClipsTooShortError (a ValueError) when the manifest says every clip is shorter than num_frames.
    """
    src = locate(cfg, resolution, num_frames)
    ds = ClipStream(src.shards, "clip", resolution, num_frames, batch, rank, world_size, seed, False, None,
                    cfg.shuffle_buffer, partial=True, s3=s3_settings(cfg), direct=src.direct,
                    stall_timeout_s=cfg.stall_timeout_s, num_classes=num_classes)
    return StreamLoader(ds, cfg.num_workers, _start_method(cfg, src.shards))
