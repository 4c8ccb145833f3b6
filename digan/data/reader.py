"""The record stream of one reader (a DataLoader worker of one rank): shards -> records -> decoded batches.

It lists its share of the shards, streams their tar records (retrying S3 reads within the outage budget),
shuffles, decodes two frames (training pairs) or whole clips (evaluation), and counts what it reads and
skips and why; bounded waits end in `DataError` with the reason.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from typing import TYPE_CHECKING

import numpy as np
import simplejpeg
import torch

from data_shards.records import frame_member, record_frame_keys
from digan.data.decode import decode_frame, decode_mp4
from digan.data.shares import exact_share, seed_of, shard_urls
from digan.data.tar import iter_records
from digan.storage.s3 import Outage, S3OutageError
from digan.storage.s3_stream import register_gopen
from webdataset.gopen import gopen

register_gopen()  # s3:// shard URLs open as retrying ranged reads

if TYPE_CHECKING:
    from digan.data.loader import ClipStream

COUNT_KEYS = ("records", "samples", "skipped_incomplete", "skipped_decode", "skipped_short", "shard_errors",
              "empty_shards", "padded", "s3_retries", "skipped_unlabelled")


class DataError(RuntimeError):
    """The stream cannot go on (nothing usable for data.stall_timeout_s, every record rejected): fatal."""


_DECODE_ERRORS: tuple = (OSError, ValueError, SyntaxError, EOFError, KeyError, IndexError, TypeError)


class ShardReader:
    """The record stream of one (rank, worker, epoch); counts what it reads and skips, and why."""

    def __init__(self, ds: "ClipStream", worker: int, num_workers: int, epoch: int):
        self.ds, self.worker, self.num_workers, self.epoch = ds, worker, num_workers, epoch
        self.counts = dict.fromkeys(COUNT_KEYS, 0)
        self.rng = random.Random(seed_of(ds.seed, ds.rank, worker, epoch, 2))
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
        self.counts[kind], self.rejected, self.why[kind] = self.counts[kind] + 1, self.rejected + 1, reason
        self.check_stall()

    def check_stall(self) -> None:
        waited = time.monotonic() - self.last_good
        if waited > self.ds.stall_timeout_s:
            raise DataError(f"digan.data: no usable record for {waited:.0f} s (data.stall_timeout_s="
                            f"{self.ds.stall_timeout_s:g}): {self.explain()}")

    def explain(self) -> str:
        """One line: how many records were rejected since the last usable one, and why."""
        names = {"skipped_short": "too short", "skipped_decode": "undecodable", "skipped_incomplete": "incomplete",
                 "shard_errors": "shard errors", "empty_shards": "empty shards", "skipped_unlabelled": "unlabelled"}
        parts = [f"{names[k]} ({self.why[k]})" for k in names if k in self.why]
        return (f"all {self.rejected} records read since the last usable one were rejected: " + "; ".join(parts)
                if parts else "no record arrived (storage slow or unreachable?)")

    # -- shards -> records ------------------------------------------------------------------------

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
        for src in shard_urls(self.ds, self.worker, self.num_workers, self.epoch):
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
        rng = random.Random(seed_of(self.ds.seed, self.ds.rank, self.worker, self.epoch, 3))
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
        label = meta.get("label_index")
        if self.ds.num_classes and not (type(label) is int and 0 <= label < self.ds.num_classes):
            self.reject("skipped_unlabelled", f"e.g. {rec['__key__']}: label_index {label!r}, "
                                              f"model.num_classes={self.ds.num_classes}")
            return None
        rec["__label__"] = label
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
        self.counts["s3_retries"] += Outage.take_retries()
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
        buf, keys, dts, labels = np.empty(shape, np.uint8), [], [], []
        wanted = exact_share(ds, self.worker, self.num_workers, self.epoch)[1] if ds.exact else None
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
                labels.append(rec["__label__"])
                self.good()
                self.counts["samples"] += 1
                if passes:
                    self.counts["padded"] += 1
                else:
                    good_in_share += 1
                keys.append(rec["__key__"])
                if len(keys) == ds.batch_size:
                    yield {"data": self.collate(buf, dts, labels), "keys": keys, "counts": self.take_counts(),
                           "worker": self.worker}
                    buf, keys, dts, labels = np.empty(shape, np.uint8), [], [], []
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
            yield {"data": self.collate(buf[: len(keys)], dts, labels), "keys": keys, "counts": self.take_counts(),
                   "worker": self.worker}
        yield {"counts": self.take_counts(), "worker": self.worker}  # what was skipped after the last batch

    def collate(self, buf: np.ndarray, dts: list[float], labels: list[int | None]):
        if self.ds.mode == "pair":  # (pair, dt) (+ class indices [B] int64 when conditional)
            # reorder to [B,2,3,H,W] while still uint8 (4x fewer bytes to shuffle), then scale to [-1, 1]
            x = torch.from_numpy(np.ascontiguousarray(buf.transpose(0, 1, 4, 2, 3)))
            out = x.float().mul_(2.0 / 255.0).sub_(1.0), torch.tensor(dts, dtype=torch.float32)
            return out + (torch.tensor(labels, dtype=torch.int64),) if self.ds.num_classes else out
        clips = torch.from_numpy(buf)  # [B,T,H,W,3] uint8 (+ class indices [B] when conditional)
        return (clips, torch.tensor(labels, dtype=torch.int64)) if self.ds.num_classes else clips
