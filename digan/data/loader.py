"""Streaming loaders over clip shards (folder or s3://): DIGAN training pairs and whole evaluation clips.

Pipeline of one reader (a DataLoader worker of one rank):

    shard URLs -> [resampled: draw with replacement | once: epoch permutation, rank slice, worker slice]
      -> webdataset gopen (files, pipe:, http:, s3: digan.data.s3) -> tar records (digan.data.tar)
      -> shuffle buffer -> decode (2 frames, or a whole clip) -> batches

The rank/worker split is webdataset's split_by_node + split_by_worker, driven by the explicit rank
and world size given to the builders rather than by RANK/WORLD_SIZE in the environment. Resampled
mode is webdataset's ResampledShards + with_epoch (counted per worker), seeded per reader.

Everything random is seeded by (seed, rank, worker, epoch, purpose), so a stream is reproducible and
two ranks or two epochs never share one. Batches are assembled in the workers; each one carries the
counts of records read and skipped since the previous batch, which the main process adds up, so
`loader.stats()` covers every worker process exactly (no shared memory needed).

Training pairs follow the official sampler: u1 ~ Beta(2,1), u2 ~ Beta(1,2), indices floor(N*u) sorted,
dt = (late - early) / (N - 1), values scaled to [-1, 1]; only the two frames are decoded.
"""

from __future__ import annotations

import io
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import simplejpeg
import torch
from PIL import Image

from data_shards.records import ENCODINGS, MANIFEST, SHARD_RE, frame_member, record_frame_keys
from digan.config import DataConfig
from digan.data.s3 import (S3OutageError, S3Settings, configure_s3, is_s3, register_gopen, s3_filesystem,
                          strip_scheme)
from digan.data.tar import iter_records
from webdataset.gopen import gopen

register_gopen()

COUNT_KEYS = ("records", "samples", "skipped_incomplete", "skipped_decode", "skipped_short", "shard_errors",
              "empty_shards", "padded")


class DataError(RuntimeError):
    """The stream cannot go on (nothing usable for data.stall_timeout_s, every record rejected): fatal."""


def s3_settings(cfg: DataConfig) -> S3Settings:
    return S3Settings(endpoint_url=cfg.s3_endpoint_url, region=cfg.s3_region, max_retries=cfg.s3_max_retries,
                      retry_budget_s=cfg.s3_retry_budget_s)


# ----------------------------------------------------------------------------------------------------
# Locating shards.


def list_shards(location: str, s3: S3Settings | None = None) -> list[str]:
    """Sorted shard URLs (`shard-NNNNNN.tar`) under a folder or an s3:// prefix."""
    location = location.rstrip("/")
    if is_s3(location):
        fs = s3_filesystem(s3)
        try:
            names = fs.ls(strip_scheme(location), detail=False, refresh=True)
        except FileNotFoundError:
            names = []
        urls = sorted(f"s3://{n}" for n in names if SHARD_RE.search(n))
    else:
        root = Path(location).expanduser()
        urls = sorted(str(p) for p in root.glob("shard-*.tar") if SHARD_RE.search(p.name)) if root.is_dir() else []
    if not urls:
        raise FileNotFoundError(f"data.source={location!r}: no shard-NNNNNN.tar files there "
                                "(build them with `python -m data_shards build ...`)")
    return urls


def read_manifest(location: str, s3: S3Settings | None = None) -> dict | None:
    location = location.rstrip("/")
    if is_s3(location):
        try:
            return json.loads(s3_filesystem(s3).cat_file(f"{strip_scheme(location)}/{MANIFEST}"))
        except FileNotFoundError:
            return None
    p = Path(location).expanduser() / MANIFEST
    return json.loads(p.read_text()) if p.exists() else None


def resolve_source(cfg: DataConfig, resolution: int) -> str:
    """`data.source` as a shard location; `demo` builds the embedded dataset first if needed."""
    if cfg.source == "demo":
        from digan.data.demo import ensure_demo_shards

        return ensure_demo_shards(cfg, resolution)
    return cfg.source


# ----------------------------------------------------------------------------------------------------
# Decoding.


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def square_resize(img: Image.Image, resolution: int) -> np.ndarray:
    """Centre crop to a square and antialiased resize (the builder's transform) -> uint8 [R,R,3]."""
    w, h = img.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    return np.asarray(img.resize((resolution, resolution), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0))


def decode_frame(data: bytes, resolution: int) -> np.ndarray:
    """JPEG/PNG bytes -> uint8 [R,R,3]. Larger frames are centre-cropped and resized (antialiased).

    JPEG goes through simplejpeg (libjpeg-turbo straight into numpy, with DCT-domain downscaling of
    large frames): the same pixels as PIL for 3-4x less CPU, PIL's header parsing in Python being
    most of the cost of a 32-128 px frame. PNG goes through PIL.
    """
    if data[:2] == b"\xff\xd8":
        arr = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=resolution, min_width=resolution)
        if arr.shape[0] == arr.shape[1] == resolution:
            return arr
        return square_resize(Image.fromarray(arr), resolution)
    img = Image.open(io.BytesIO(data))
    if img.mode != "RGB":
        img = img.convert("RGB")
    if img.size == (resolution, resolution):
        return np.asarray(img)
    return square_resize(img, resolution)


def decode_mp4(data: bytes, upto: int, resolution: int) -> list[np.ndarray]:
    """The first `upto`+1 frames of an mp4 clip (decoding must run from the GOP start)."""
    import av

    out = []
    with av.open(io.BytesIO(data)) as c:
        stream = c.streams.video[0]
        stream.codec_context.thread_count = 1  # threads only add latency on 16-frame clips
        for frame in c.decode(stream):
            img = frame.to_ndarray(format="rgb24")
            if img.shape[:2] != (resolution, resolution):
                img = square_resize(Image.fromarray(img), resolution)
            out.append(img)
            if len(out) > upto:
                break
    if len(out) <= upto:
        raise ValueError(f"mp4 clip has {len(out)} frames, needed {upto + 1}")
    return out


_DECODE_ERRORS: tuple = (OSError, ValueError, SyntaxError, EOFError, KeyError, IndexError, TypeError)


class _Reader:
    """The record stream of one (rank, worker, epoch); counts what it reads and skips, and why."""

    def __init__(self, ds: "ClipStream", worker: int, num_workers: int, epoch: int):
        self.ds, self.worker, self.num_workers, self.epoch = ds, worker, num_workers, epoch
        self.counts = dict.fromkeys(COUNT_KEYS, 0)
        self.rng = random.Random(_seed(ds.seed, ds.rank, worker, epoch, 2))
        self.errors_in_a_row = 0  # shard errors since the last good record
        self.last_good = time.monotonic()  # when the last usable sample was produced (or the reader started)
        self.rejected = 0  # records rejected since then
        self.why: dict[str, object] = {}  # the latest reason per kind of rejection, for the stall message
        self._pos, self._lo, self._hi = 0, 0, None  # record ordinal in the current shard, the share's range

    # -- bounded waits -----------------------------------------------------------------------------

    def good(self) -> None:
        self.last_good, self.rejected = time.monotonic(), 0

    def reject(self, kind: str, reason: str) -> None:
        """Count a rejected record, shard or error (kind in COUNT_KEYS) and stop the stream when nothing usable
        came for too long."""
        self.counts[kind] += 1
        self.rejected += 1
        self.why[kind] = reason
        self.check_stall()

    def check_stall(self) -> None:
        waited = time.monotonic() - self.last_good
        if waited > self.ds.stall_timeout_s:
            raise DataError(f"digan.data: no usable record for {waited:.0f} s (data.stall_timeout_s="
                            f"{self.ds.stall_timeout_s:g}): {self.explain()}")

    def explain(self) -> str:
        """One line: how many records were rejected since the last usable one, and why."""
        names = {"skipped_short": "too short", "skipped_decode": "undecodable", "skipped_incomplete": "incomplete",
                 "shard_errors": "shard errors", "empty_shards": "empty shards"}
        parts = [f"{names[k]} ({self.why[k]})" for k in names if k in self.why]
        return (f"all {self.rejected} records read since the last usable one were rejected: " + "; ".join(parts)
                if parts else "no record arrived (storage slow or unreachable?)")

    # -- shards -> records ------------------------------------------------------------------------

    def shard_urls(self):
        ds = self.ds
        if ds.resampled:
            # With replacement, independently per reader: no reader runs dry, every rank runs the same steps.
            rng = random.Random(_seed(ds.seed, ds.rank, self.worker, self.epoch, 0))
            while True:
                yield {"url": rng.choice(ds.shards)}
        if ds.shard_clips is not None:  # exact epochs: this reader's contiguous share of the epoch's clips
            yield from self.share()[0]
            return
        order = list(ds.shards)
        random.Random(_seed(ds.seed, self.epoch, 1)).shuffle(order)  # same permutation on every rank
        # split_by_node then split_by_worker, driven by the explicit rank/world size (not env vars)
        mine = order[ds.rank::ds.world_size][self.worker::self.num_workers]
        for url in mine:
            yield {"url": url}

    def share(self) -> tuple[list[dict], int]:
        """Exact epochs: ([{url, lo, hi}] record ranges of this reader's share, its number of batches).

        The epoch's clips in a seeded shard order (the same on every rank) are cut into W ranks x S
        batches of B (S = floor(N / (W*B))); rank r takes batches [r*S, (r+1)*S), its workers
        contiguous runs of those. The N - W*S*B clips at the end of the order sit this epoch out.
        """
        ds = self.ds
        order = list(range(len(ds.shards)))
        random.Random(_seed(ds.seed, self.epoch, 1)).shuffle(order)
        steps, b = ds.steps_per_epoch(), ds.batch_size
        base, extra = divmod(steps, self.num_workers)
        first = self.worker * base + min(self.worker, extra)
        mine = base + (self.worker < extra)
        start = (ds.rank * steps + first) * b
        end = start + mine * b
        ranges, pos = [], 0
        for i in order:
            n = ds.shard_clips[i]
            lo, hi = max(start - pos, 0), min(end - pos, n)
            if lo < hi:
                ranges.append({"url": ds.shards[i], "lo": lo, "hi": hi})
            pos += n
        return ranges, mine

    def on_shard_error(self, exn: BaseException) -> bool:
        if isinstance(exn, (DataError, S3OutageError)):
            raise exn  # fatal: an outage past its budget, a stall
        self.errors_in_a_row += 1
        if self.errors_in_a_row > max(20, 2 * len(self.ds.shards)):
            # every shard failing means a wrong location or an outage, not bad records: stop loudly
            raise DataError(f"digan.data: {self.errors_in_a_row} shard errors in a row without a readable "
                            f"record; last: {type(exn).__name__}: {str(exn)[:300]}") from exn
        if self.counts["shard_errors"] < 10:
            print(f"digan.data: skipping the rest of a shard: {type(exn).__name__}: {str(exn)[:300]}",
                  file=sys.stderr)
        self.reject("shard_errors", f"{type(exn).__name__}: {str(exn).splitlines()[0][:200] if str(exn) else ''}")
        return True  # continue with the next record / shard

    def on_truncated(self, partial: dict | None, exn: BaseException) -> None:
        if partial is not None:
            self.counts["skipped_incomplete"] += 1  # the record the break cut in half
        self.on_shard_error(exn)

    def records(self):
        for src in self.shard_urls():
            url, lo, hi = src["url"], src.get("lo", 0), src.get("hi")
            self._pos, self._lo, self._hi = 0, lo, hi
            try:
                # webdataset's gopen: plain paths, file:, pipe:, http(s):, and s3: (registered above)
                stream = gopen(url, "rb", bufsize=1 << 20)
            except Exception as e:  # missing shard, denied: counted, next shard (an outage past its budget: fatal)
                self.on_shard_error(e)
                continue
            failed = False
            with stream:
                try:
                    for rec in iter_records(stream, url, self.on_truncated, self.select):
                        pos, self._pos = self._pos, self._pos + 1
                        if pos < lo:
                            continue
                        if hi is not None and pos >= hi:
                            break
                        self.counts["records"] += 1
                        self.errors_in_a_row = 0
                        yield rec
                except (DataError, S3OutageError):
                    raise
                except Exception as e:  # a read error iter_records does not classify (e.g. an S3 client error)
                    failed = True
                    self.on_shard_error(e)
            if self._pos == 0 and not failed:
                if self.counts["empty_shards"] < 3:
                    print(f"digan.data: empty shard (no records): {url}", file=sys.stderr)
                self.reject("empty_shards", f"e.g. {url}")

    def shuffled(self, items):
        n = self.ds.shuffle_buffer
        if n <= 1:
            yield from items
            return
        rng = random.Random(_seed(self.ds.seed, self.ds.rank, self.worker, self.epoch, 3))
        buf = []
        for x in items:
            if len(buf) < n:
                buf.append(x)
                continue
            i = rng.randrange(n)
            buf[i], x = x, buf[i]
            yield x
        rng.shuffle(buf)
        yield from buf

    # -- records -> samples ------------------------------------------------------------------------

    def _draw_pair(self, length: int) -> tuple[int, int, int]:
        """(window offset, i0, i1) of a DIGAN pair inside a clip of `length` frames."""
        n, rng = self.ds.num_frames, self.rng
        offset = rng.randrange(length - n + 1)  # a random N-window of a longer clip
        # u1 ~ Beta(2,1), u2 ~ Beta(1,2) by inverting their CDFs (x^2 and 1-(1-x)^2): exact and cheap
        u1, u2 = math.sqrt(rng.random()), 1.0 - math.sqrt(rng.random())
        i0, i1 = sorted((min(int(n * u1), n - 1), min(int(n * u2), n - 1)))
        return offset, i0, i1

    def select(self, rec: dict) -> set[str] | None:
        """Called by the tar reader right after a record's JSON: which frame members to read at all.

        Pairs: draw the two indices now and read only those two frames (the shuffle buffer then holds
        2 frames per record, not 16). Clips: the first num_frames frames. None = read everything
        (mp4, or metadata the decoder will reject and count).
        """
        if not self._lo <= self._pos < (self._hi if self._hi is not None else math.inf):
            return set()  # outside this reader's share (exact epochs): read no frame of it
        try:
            meta = json.loads(rec["json"])
            length, ext = int(meta["num_frames"]), meta.get("encoding", "jpg")
        except _DECODE_ERRORS:
            return None
        if ext == "mp4" or length < self.ds.num_frames:
            return None
        if self.ds.mode == "pair":
            offset, i0, i1 = rec["__pair__"] = self._draw_pair(length)
            return {frame_member(offset + i0, ext), frame_member(offset + i1, ext)}
        return {frame_member(i, ext) for i in range(self.ds.num_frames)}

    def _clip_header(self, rec: dict) -> dict | None:
        """Metadata of a complete record, or None (counted) for a bad one."""
        if "json" not in rec:
            self.reject("skipped_incomplete", f"e.g. {rec['__key__']} has no .json member")
            return None
        try:
            meta = json.loads(rec["json"])
            length = int(meta["num_frames"])
        except _DECODE_ERRORS as e:
            what = "no 'num_frames' field" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
            self.reject("skipped_incomplete", f"e.g. {rec['__key__']}.json: {what}"[:200])
            return None
        if meta.get("encoding") == "mp4":
            complete = "mp4" in rec
        else:  # frames read plus frames skipped unread must make the whole clip
            skipped = [k for k in rec.get("__skipped__", ()) if k[:1] == "f" and k[1:5].isdigit()]
            complete = len(record_frame_keys(rec)) + len(skipped) == length
        if not complete:
            self.reject("skipped_incomplete", f"e.g. {rec['__key__']}: frame members do not match num_frames={length}")
            return None
        if length < self.ds.num_frames:
            self.reject("skipped_short", f"clips of {length} frames, data.num_frames={self.ds.num_frames}")
            return None
        return meta

    def _frame_into(self, data: bytes, out: np.ndarray) -> None:
        if self.ds.direct and data[:2] == b"\xff\xd8":
            img = simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=out)  # straight into the batch
            if img.shape == out.shape:
                return
        out[...] = decode_frame(data, self.ds.resolution)

    def pair(self, rec: dict, out: np.ndarray) -> float | None:
        """Decode the two frames of a pair into out [2,R,R,3]; -> dt, or None (counted) for a bad record."""
        meta = self._clip_header(rec)
        if meta is None:
            return None
        n, r, ext = self.ds.num_frames, self.ds.resolution, meta.get("encoding", "jpg")
        offset, i0, i1 = rec.get("__pair__") or self._draw_pair(int(meta["num_frames"]))
        try:
            if ext == "mp4":
                clip = decode_mp4(rec["mp4"], offset + i1, r)
                out[0], out[1] = clip[offset + i0], clip[offset + i1]
            else:
                self._frame_into(rec[frame_member(offset + i0, ext)], out[0])
                self._frame_into(rec[frame_member(offset + i1, ext)], out[1])
        except _DECODE_ERRORS as e:
            self.reject("skipped_decode", f"e.g. {rec['__key__']}: {type(e).__name__}: {e}"[:200])
            return None
        return (i1 - i0) / (n - 1)

    def clip(self, rec: dict, out: np.ndarray) -> bool:
        """Decode the first T = num_frames frames into out [T,R,R,3]; False (counted) for a bad record."""
        meta = self._clip_header(rec)
        if meta is None:
            return False
        n, r, ext = self.ds.num_frames, self.ds.resolution, meta.get("encoding", "jpg")
        try:
            if ext == "mp4":
                out[...] = np.stack(decode_mp4(rec["mp4"], n - 1, r)[:n])
            else:
                for i in range(n):
                    self._frame_into(rec[frame_member(i, ext)], out[i])
        except _DECODE_ERRORS as e:
            self.reject("skipped_decode", f"e.g. {rec['__key__']}: {type(e).__name__}: {e}"[:200])
            return False
        return True

    # -- samples -> batches ------------------------------------------------------------------------

    def take_counts(self) -> torch.Tensor:
        t = torch.tensor([self.counts[k] for k in COUNT_KEYS], dtype=torch.int64)
        self.counts = dict.fromkeys(COUNT_KEYS, 0)
        return t

    def batches(self):
        """Batches decoded straight into one uint8 array each (no per-sample arrays to stack).

        Exact epochs: exactly this reader's share of batches; records rejected in it are made up for with
        further passes over the share (its usable clips again, counted as `padded`).
        """
        ds = self.ds
        r = ds.resolution
        shape = (ds.batch_size, 2 if ds.mode == "pair" else ds.num_frames, r, r, 3)
        buf, keys, dts = np.empty(shape, np.uint8), [], []
        wanted = self.share()[1] if ds.exact else None
        made, good_in_share, passes = 0, 0, 0
        while True:
            for rec in self.shuffled(self.records()):
                slot = buf[len(keys)]  # a failed decode leaves the slot to the next record
                if ds.mode == "pair":
                    dt = self.pair(rec, slot)
                    if dt is None:
                        continue
                    dts.append(dt)
                elif not self.clip(rec, slot):
                    continue
                self.good()
                self.counts["samples"] += 1
                if passes:
                    self.counts["padded"] += 1
                else:
                    good_in_share += 1
                keys.append(rec["__key__"])
                if len(keys) == ds.batch_size:
                    yield {"data": self.collate(buf, dts), "keys": keys, "counts": self.take_counts(),
                           "worker": self.worker}
                    buf, keys, dts = np.empty(shape, np.uint8), [], []
                    made += 1
                    if wanted is not None and made == wanted:
                        break
            if wanted is None or made == wanted:
                break
            if good_in_share == 0:
                raise DataError(f"digan.data: rank {ds.rank} worker {self.worker}, epoch {self.epoch}: "
                                f"{self.explain()}")
            passes += 1
        if keys and ds.partial:
            yield {"data": self.collate(buf[: len(keys)], dts), "keys": keys, "counts": self.take_counts(),
                   "worker": self.worker}
        yield {"counts": self.take_counts(), "worker": self.worker}  # what was skipped after the last batch

    def collate(self, buf: np.ndarray, dts: list[float]):
        if self.ds.mode == "pair":
            # reorder to [B,2,3,H,W] while still uint8 (4x fewer bytes to shuffle), then scale to [-1, 1]
            x = torch.from_numpy(np.ascontiguousarray(buf.transpose(0, 1, 4, 2, 3)))
            return x.float().mul_(2.0 / 255.0).sub_(1.0), torch.tensor(dts, dtype=torch.float32)
        return torch.from_numpy(buf)  # [B,T,H,W,3] uint8


class ClipStream(torch.utils.data.IterableDataset):
    """The dataset each DataLoader worker iterates: picklable plain fields, pipeline built in `__iter__`."""

    def __init__(self, shards: list[str], mode: str, resolution: int, num_frames: int, batch_size: int,
                 rank: int, world_size: int, seed: int, resampled: bool, batches_per_worker: int | None,
                 shuffle_buffer: int, partial: bool, s3: S3Settings, start_epoch: int = 0, direct: bool = False,
                 shard_clips: list[int] | None = None, stall_timeout_s: float = 300.0):
        super().__init__()
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
        self._endless = None  # resampled mode: (reader, batches) kept across epochs inside the worker

    @property
    def exact(self) -> bool:
        return self.shard_clips is not None

    def steps_per_epoch(self) -> int:
        """Exact epochs: batches per rank per epoch (the same on every rank)."""
        return sum(self.shard_clips) // (self.world_size * self.batch_size)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_endless"}  # generators do not pickle

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.start_epoch + self._num_iters
        first = self._num_iters == 0
        self._num_iters += 1
        configure_s3(self.s3)
        if not self.resampled:
            skip = self.skip.get(worker, 0) if first else 0
            for b in _Reader(self, worker, num_workers, epoch).batches():
                if skip and "data" in b:  # taken before the checkpoint: made again (same draws), not yielded
                    skip -= 1
                    continue
                yield b
            return
        # Resampled: one endless stream per (seed, rank, worker, start epoch), cut into epochs of a fixed
        # number of batches (webdataset's with_epoch, counted per worker). Keeping it alive across epochs
        # avoids refilling the shuffle buffer at every epoch boundary.
        if getattr(self, "_endless", None) is None:
            reader = _Reader(self, worker, num_workers, epoch)
            self._endless = (reader, reader.batches())
        reader, batches = self._endless
        for _, b in zip(range(self.batches_per_worker), batches):
            yield b
        yield {"counts": reader.take_counts(), "worker": worker}


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


class ClipsTooShortError(ValueError):
    """The shards' clips (the manifest's clip_length) are shorter than the frames asked for."""

    def __init__(self, location: str, clip_length: int, num_frames: int):
        self.location, self.clip_length, self.num_frames = location, clip_length, num_frames
        super().__init__(f"the clips in {location} are {clip_length} frames long (the shards' clip length), shorter "
                         f"than the {num_frames} frames needed (data.num_frames): build shards with --clip-length "
                         f"{num_frames} or more")


@dataclass
class Source:
    """A checked shard location: the shard URLs to read and, when the manifest lists them, their clip counts."""

    location: str
    shards: list[str]
    clips: list[int] | None  # clips per shard (the manifest's shard list), None without a manifest
    manifest: dict | None
    direct: bool  # frames stored at exactly the training resolution (decode straight into the batch)


def locate(cfg: DataConfig, resolution: int, num_frames: int | None = None) -> Source:
    """Find the shards of `cfg.source` and check the manifest against what training asks for.

    Raises one-line errors (FileNotFoundError / ValueError) for: no shards, shards the manifest lists
    but storage lacks, frames smaller than `resolution`, clips shorter than `num_frames`, an unknown
    format or encoding. With a manifest, its shard list is what is read (tars it does not list are
    ignored, with a note). The driver calls this (`check_source`) before any worker starts.
    """
    location = resolve_source(cfg, resolution)
    s3 = s3_settings(cfg)
    found = list_shards(location, s3)
    manifest = read_manifest(location, s3)
    num_frames = cfg.num_frames if num_frames is None else num_frames
    where = f"data.source={location!r}"
    if manifest is None:
        return Source(location, found, None, None, False)
    fmt = str(manifest.get("format", ""))
    if fmt and fmt.split("/")[0] != "digan-clips":
        raise ValueError(f"{where}: manifest.json has format {fmt!r}, not digan-clips/N (docs/shard-format.md)")
    if fmt and fmt != "digan-clips/1":
        raise ValueError(f"{where}: shard format {fmt!r} is newer than this loader reads (digan-clips/1)")
    options = manifest.get("options") or {}
    have = options.get("resolution")
    if have is not None and have < resolution:
        raise ValueError(f"{where} holds {have}px clips but the model needs {resolution}px: "
                         f"build shards at --resolution {resolution} (frames are never upscaled)")
    clip_length = options.get("clip_length")
    if clip_length is not None and clip_length < num_frames:
        raise ClipsTooShortError(location, clip_length, num_frames)
    encoding = options.get("encoding")
    if encoding is not None and encoding not in ENCODINGS:
        raise ValueError(f"{where}: manifest encoding {encoding!r} is not one of {', '.join(ENCODINGS)}")
    entries = manifest.get("shards")
    if not entries:
        return Source(location, found, None, manifest, have == resolution)
    by_name = {u.rsplit("/", 1)[-1]: u for u in found}
    names = [e["name"] for e in entries]
    missing = [n for n in names if n not in by_name]
    if missing:
        raise FileNotFoundError(f"{where}: manifest.json lists {len(names)} shards, {len(missing)} missing from "
                                f"storage ({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}): rebuild or "
                                "restore them")
    extra = sorted(set(by_name) - set(names))
    if extra:
        print(f"digan.data: {where}: ignoring {len(extra)} shard(s) manifest.json does not list "
              f"({', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''})", file=sys.stderr)
    shards = [by_name[n] for n in names]
    return Source(location, shards, [int(e["num_clips"]) for e in entries], manifest, have == resolution)


def check_source(cfg: DataConfig, resolution: int) -> Source:
    """The driver's check before any worker starts (same checks as the workers' loaders)."""
    src = locate(cfg, resolution)
    if cfg.resampled and not (cfg.epoch_clips or (src.manifest or {}).get("num_clips")):
        raise ValueError(f"data.source={src.location!r} has no manifest.json: set data.epoch_clips")
    return src


def build_pair_loader(cfg: DataConfig, resolution: int, batch_per_worker: int, rank: int = 0, world_size: int = 1,
                      seed: int = 0) -> StreamLoader:
    """DIGAN training pairs of one rank: iterates `(pair float32 [B,2,3,R,R] in [-1,1], dt float32 [B])`.

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
    """
    src = check_source(cfg, resolution)
    readers = world_size * max(1, cfg.num_workers)
    bpw, clips = None, None
    if cfg.resampled:
        epoch_clips = cfg.epoch_clips or src.manifest["num_clips"]  # check_source made sure there is one
        bpw = max(1, math.ceil(epoch_clips / (readers * batch_per_worker)))
    else:
        clips = src.clips if src.clips is not None else count_clips(src.shards, s3_settings(cfg))
        if sum(clips) < world_size * batch_per_worker:
            raise ValueError(f"data.source={src.location!r}: {sum(clips)} clips, fewer than one global batch "
                             f"({world_size} x {batch_per_worker})")
    ds = ClipStream(src.shards, "pair", resolution, cfg.num_frames, batch_per_worker, rank, world_size, seed,
                    cfg.resampled, bpw, cfg.shuffle_buffer, partial=False, s3=s3_settings(cfg), direct=src.direct,
                    shard_clips=clips, stall_timeout_s=cfg.stall_timeout_s)
    return StreamLoader(ds, cfg.num_workers, _start_method(cfg, src.shards))


def build_clip_loader(cfg: DataConfig, resolution: int, batch: int, num_frames: int, rank: int = 0,
                      world_size: int = 1, seed: int = 0) -> StreamLoader:
    """Whole real clips for evaluation: iterates uint8 [B,T,R,R,3] (T = num_frames, RGB, channels last).

    One shuffled pass over this rank's shards per iteration (a new seeded order each pass); clips
    longer than num_frames give their first num_frames frames, shorter ones are skipped and counted.
    ClipsTooShortError (a ValueError) when the manifest says every clip is shorter than num_frames.
    """
    src = locate(cfg, resolution, num_frames)
    ds = ClipStream(src.shards, "clip", resolution, num_frames, batch, rank, world_size, seed, False, None,
                    cfg.shuffle_buffer, partial=True, s3=s3_settings(cfg), direct=src.direct,
                    stall_timeout_s=cfg.stall_timeout_s)
    return StreamLoader(ds, cfg.num_workers, _start_method(cfg, src.shards))


def count_clips(shards: list[str], s3: S3Settings) -> list[int]:
    """Records per shard, by reading the tars' headers (for exact epochs over shards without a manifest)."""
    configure_s3(s3)
    out = []
    for url in shards:
        n = 0
        with gopen(url, "rb", bufsize=1 << 20) as stream:
            for _ in iter_records(stream, url, lambda *_: None, lambda rec: set()):
                n += 1
        out.append(n)
    return out
