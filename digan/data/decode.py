"""Decoding stored frames: JPEG/PNG frames and mp4 clips -> uint8 [R, R, 3] at the training resolution."""

from __future__ import annotations

import io

import numpy as np
import simplejpeg
from PIL import Image

from data_shards.sources import square_resize


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
