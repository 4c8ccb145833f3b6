"""Videos -> WebDataset clip shards + manifest, in parallel, resumable, skipping bad inputs.

Worker processes decode and encode whole videos (`_process`); the parent writes their clip records in
source order into `shard-%06d.tar` files, so the output depends only on the inputs and options, not on
the number of workers or on timing. Each finished shard is published (rename or S3 put) and then
recorded in a small journal, `_build_state.json`, with the position of the next clip; a killed build
re-run with the same arguments continues from there and keeps every published shard. The manifest
(`manifest.json`, written last) marks a complete build. An interrupted build (Ctrl-C, an error) removes
its temp files and raises `BuildInterrupted` with the number of published shards; a hard-killed one
leaves them to the next build into the same destination, which removes them first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import multiprocessing
import signal
import tarfile
from dataclasses import dataclass

from tqdm import tqdm

from data_shards.records import ENCODINGS, MANIFEST, SHARD_PATTERN, clip_record
from data_shards.sources import SkipVideo, VideoSource, clip_windows, min_frames, read_source
from data_shards.storage import Destination

JOURNAL = "_build_state.json"
FORMAT = "digan-clips/1"


class BuildError(RuntimeError):
    """A build that cannot start or continue; the message says why and what to do."""


class BuildInterrupted(KeyboardInterrupt):
    """Ctrl-C during a build: its temp files are gone, `num_shards` shards are published and kept."""

    def __init__(self, num_shards: int):
        super().__init__(f"interrupted: {num_shards} shards published; re-run the same command to resume")
        self.num_shards = num_shards


@dataclass
class BuildOptions:
    """What a shard build produces (all recorded in the manifest)."""

    resolution: int = 128  # frame side after centre crop + antialiased resize
    clip_length: int = 16  # frames per clip
    frame_skip: int = 1  # keep every k-th native frame (TaiChi: 4, interleaved in disjoint mode)
    windows: str = "disjoint"  # disjoint (non-overlapping chunks) | overlap (a window every clip_stride frames)
    clip_stride: int = 1  # overlap only: native frames between consecutive clip starts
    encoding: str = "jpg"  # jpg (q95) | png (lossless) | mp4 (h264, for long clips)
    shard_size_mb: float = 256.0  # a shard is closed once it holds this many MiB
    max_clips_per_shard: int = 0  # also close it at this many clips; 0 = by size only

    def validate(self) -> "BuildOptions":
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        need(self.resolution >= 8, f"--resolution {self.resolution}: must be >= 8")
        need(self.clip_length >= 2, f"--clip-length {self.clip_length}: a clip needs at least 2 frames")
        need(self.frame_skip >= 1, f"--frame-skip {self.frame_skip}: must be >= 1")
        need(self.windows in ("disjoint", "overlap"), f"--windows {self.windows!r}: choose disjoint or overlap")
        need(self.clip_stride >= 1, f"--clip-stride {self.clip_stride}: must be >= 1")
        need(self.encoding in ENCODINGS, f"--encoding {self.encoding!r}: choose {', '.join(ENCODINGS)}")
        need(self.encoding != "mp4" or self.resolution % 2 == 0, "--encoding mp4 needs an even --resolution")
        need(self.shard_size_mb > 0, f"--shard-size-mb {self.shard_size_mb}: must be > 0")
        need(self.max_clips_per_shard >= 0, f"--max-clips-per-shard {self.max_clips_per_shard}: must be >= 0")
        return self


# ----------------------------------------------------------------------------------------------------
# Worker side: one video -> its encoded clip records (or the reason it was skipped).


def _process(task: tuple[int, VideoSource, dict]) -> dict:
    index, src, opts = task
    o = BuildOptions(**opts)
    out = {"index": index, "source": src.source}
    try:
        frames, fps, sha, cut = read_source(src, o.resolution)
        windows = clip_windows(len(frames), o.clip_length, o.frame_skip, o.windows, o.clip_stride)
        if not windows:
            n = len(frames)
            why = (f"truncated or corrupt: decode error after {n} frames ({cut['decode_error']})"
                   if "decode_error" in cut else
                   f"truncated: decoded {n} of {cut['header_frames']} frames" if cut else f"too short: {n} frames")
            raise SkipVideo(f"{why}, a clip needs {min_frames(o.clip_length, o.frame_skip, o.windows)}")
    except SkipVideo as e:
        return dict(out, skipped=str(e))
    clip_fps = fps / o.frame_skip if fps else None
    video_id = src.source.rsplit(".", 1)[0] if src.kind == "video" else src.source
    records = []
    for j, idx in enumerate(windows):
        meta = {"source": src.source, "video_id": video_id, "split": src.split, "label": src.label,
                "label_index": src.label_index, "fps": clip_fps, "frame_skip": o.frame_skip,
                "frame_indices": idx}
        records.append(clip_record(f"c{index:06d}_{j:04d}", frames[idx], meta, o.encoding))
    return dict(out, sha256=sha, num_frames=len(frames), fps=fps, cut=cut, records=records)


# ----------------------------------------------------------------------------------------------------
# Parent side: ordered shard writing, journal, manifest.


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444  # fixed metadata: same inputs -> same bytes
    tar.addfile(info, io.BytesIO(data))


class _ShardWriter:
    """Appends records to the current shard; `close()` publishes it and returns its manifest entry."""

    def __init__(self, dest: Destination, index: int):
        self.dest, self.index = dest, index
        self.tmp = self.tar = None
        self.num_clips = 0

    def add(self, record: dict) -> None:
        if self.tar is None:
            self.tmp = self.dest.temp_path(SHARD_PATTERN % self.index)
            self.tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)
            self.num_clips = 0
        key = record["__key__"]
        _add_member(self.tar, f"{key}.json", record["json"])
        for suffix in sorted(k for k in record if k not in ("__key__", "json")):
            _add_member(self.tar, f"{key}.{suffix}", record[suffix])
        self.num_clips += 1

    def size_bytes(self) -> int:
        return self.tar.fileobj.tell() if self.tar is not None else 0

    def close(self) -> dict | None:
        if self.tar is None:
            return None
        self.tar.close()
        h, size = hashlib.sha256(), 0
        with open(self.tmp, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
                size += len(block)
        name = SHARD_PATTERN % self.index
        self.dest.commit(self.tmp, name)
        entry = {"name": name, "num_clips": self.num_clips, "bytes": size, "sha256": h.hexdigest()}
        self.tar = self.tmp = None
        self.index += 1
        return entry


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: no worker tracebacks


def _results(tasks: list, workers: int):
    if workers <= 1:
        yield from map(_process, tasks)
        return
    # forkserver: workers never inherit the parent's threads or its s3fs (this may run inside Ray).
    with multiprocessing.get_context("forkserver").Pool(workers, initializer=_ignore_sigint) as pool:
        yield from pool.imap(_process, tasks, chunksize=1)


def _previous_build(dest: Destination, identity: dict) -> tuple[dict | None, dict]:
    """(the manifest of a finished build of the same inputs, or None; the journal to resume, or a fresh one).
    A finished or unfinished build of other inputs or options at `dest` is refused (BuildError)."""
    done = dest.read_json(MANIFEST)
    if done is not None:
        if done.get("identity") == identity:
            return done, {}
        raise BuildError(f"{dest.url} already holds a complete build with other inputs or options; "
                         "choose a new destination")
    state = dest.read_json(JOURNAL)
    if state is not None and state.get("identity") != identity:
        raise BuildError(f"{dest.url} holds an unfinished build with other inputs or options; "
                         "re-run it with the same arguments to resume, or choose a new destination")
    return None, state or {"identity": identity, "shards": [], "videos": [], "skipped": [], "next": [0, 0]}


def class_table(sources: list[VideoSource]) -> list[str | None]:
    """Class names by label_index, from the labelled sources (None for an index none of them has)."""
    names = {s.label_index: s.label for s in sources if s.label_index is not None}
    return [names.get(i) for i in range(max(names) + 1)] if names else []


def _manifest(identity: dict, num_sources: int, state: dict, classes: list[str | None]) -> dict:
    """The finished build's manifest.json: options, shards with their clip counts, sources used and skipped,
    class names by label_index (empty for unlabelled inputs)."""
    skipped = sorted(state["skipped"], key=lambda s: s["source"])
    reasons: dict[str, int] = {}
    for s in skipped:
        kind = s["reason"].split(":")[0]
        reasons[kind] = reasons.get(kind, 0) + 1
    return {
        "identity": identity, "format": FORMAT, "options": identity["options"], "input": identity["input"],
        "num_videos": num_sources, "num_videos_used": len(state["videos"]), "num_skipped": len(skipped),
        "skipped_by_reason": reasons, "num_clips": sum(s["num_clips"] for s in state["shards"]),
        "num_shards": len(state["shards"]), "shards": state["shards"],
        "sources": sorted(state["videos"], key=lambda v: v["source"]), "skipped": skipped, "classes": classes,
    }


# long function: one resumable pass, whose state (journal, open shard, pending lists) the loop and its
# checkpoint closure share
def build_shards(sources: list[VideoSource], dest: str | Destination, options: BuildOptions, *,
                 workers: int = 2, input_info: dict | None = None, progress: bool = True) -> dict:
    """Build (or resume, or confirm) the shards of `sources` at `dest`; returns the manifest dict."""
    options.validate()
    dest = dest if isinstance(dest, Destination) else Destination(dest)
    identity = {"format": FORMAT, "options": dataclasses.asdict(options), "input": input_info or {},
                "sources_sha256": hashlib.sha256("\n".join(s.source for s in sources).encode()).hexdigest()}
    done, state = _previous_build(dest, identity)
    if done is not None:
        return done
    dest.clean_temp()
    next_video, next_clip = state["next"]
    writer = _ShardWriter(dest, len(state["shards"]))
    limit_bytes = options.shard_size_mb * (1 << 20)
    pending_videos, pending_skips = [], []
    num_clips = sum(s["num_clips"] for s in state["shards"])
    opts = dataclasses.asdict(options)
    tasks = [(i, sources[i], opts) for i in range(next_video, len(sources))]
    bar = tqdm(total=len(sources), initial=next_video, unit="video", desc=f"shards -> {dest.url}",
               disable=not progress, dynamic_ncols=True)

    def checkpoint(next_pos: list[int]) -> None:
        entry = writer.close()
        if entry is not None:
            state["shards"].append(entry)
        state["videos"].extend(pending_videos)
        state["skipped"].extend(pending_skips)
        pending_videos.clear()
        pending_skips.clear()
        state["next"] = next_pos
        dest.write_json(JOURNAL, state)

    results = _results(tasks, workers)
    try:
        for res in results:
            i = res["index"]
            if "skipped" in res:
                pending_skips.append({"source": res["source"], "reason": res["skipped"]})
            else:
                records = res.pop("records")
                for j, rec in enumerate(records):
                    if i == next_video and j < next_clip:
                        continue  # already in a published shard before the interruption
                    writer.add(rec)
                    num_clips += 1
                    if writer.size_bytes() >= limit_bytes or writer.num_clips == options.max_clips_per_shard:
                        checkpoint([i, j + 1])
                pending_videos.append({"source": res["source"], "sha256": res["sha256"],
                                       "num_frames": res["num_frames"], "fps": res["fps"],
                                       "num_clips": len(records), **res["cut"]})
            bar.update(1)
            bar.set_postfix(clips=num_clips, skipped=len(state["skipped"]) + len(pending_skips))
        checkpoint([len(sources), 0])
        manifest = _manifest(identity, len(sources), state, class_table(sources))
        dest.write_json(MANIFEST, manifest)
        dest.remove(JOURNAL)
    except KeyboardInterrupt:
        raise BuildInterrupted(len(state["shards"])) from None
    finally:
        results.close()  # stops the worker pool now, not when the generator is collected
        bar.close()
        if writer.tar is not None:  # interrupted mid-shard: the journal still points before it
            writer.tar.close()
        dest.clean_temp()
    return manifest
