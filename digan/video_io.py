"""Writing (and reading back) generated videos: MP4 via PyAV, GIF via Pillow, PNG frame grids.

Frames are uint8 [T, H, W, 3] (numpy arrays or CPU tensors); `digan.sampling.to_uint8` makes them from
generator output.

`Mp4Writer` streams: each `write(chunk)` encodes the chunk immediately, so a long video is never held in
memory. GIF and PNG need all frames at once (Pillow writes a GIF in one call), so their callers keep the
uint8 frames (a 256-frame 128x128 video is 12.6 MB).
"""

from __future__ import annotations

import io
import math
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image


def _as_numpy(frames) -> np.ndarray:
    arr = frames.numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {arr.dtype} {list(arr.shape)}")
    return np.ascontiguousarray(arr)


def _pad_even(arr: np.ndarray) -> np.ndarray:
    """yuv420p needs even sides: pad odd ones with one black row / column."""
    h, w = arr.shape[1:3]
    if h % 2 or w % 2:
        arr = np.pad(arr, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    return arr


class Mp4Writer:
    """Incremental H.264 MP4 writer (PyAV / libx264, yuv420p). Use as a context manager.

    `crf` is x264's quality (0 = lossless, 18 = visually lossless, the default; 23 = x264's default).
    """

    def __init__(self, path: str | os.PathLike, fps: float = 8.0, crf: int = 18):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fps, self.crf = fps, crf
        self.num_frames = 0
        self._container = av.open(str(self.path), mode="w")
        self._stream = None

    def write(self, frames) -> None:
        """Encode a chunk of uint8 frames [T, H, W, 3]; every chunk must have the same size."""
        arr = _pad_even(_as_numpy(frames))
        if self._stream is None:
            self._stream = self._container.add_stream("libx264", rate=Fraction(self.fps).limit_denominator(1001))
            self._stream.height, self._stream.width = arr.shape[1:3]
            self._stream.pix_fmt = "yuv420p"
            self._stream.options = {"crf": str(self.crf)}
        elif arr.shape[1:3] != (self._stream.height, self._stream.width):
            raise ValueError(f"frame size changed from {self._stream.height}x{self._stream.width} to "
                             f"{arr.shape[1]}x{arr.shape[2]}")
        for frame in arr:
            for packet in self._stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                self._container.mux(packet)
        self.num_frames += len(arr)

    def close(self) -> None:
        if self._container is None:
            return
        try:
            if self._stream is not None:
                for packet in self._stream.encode():  # flush the encoder's delayed frames
                    self._container.mux(packet)
        finally:
            self._container.close()
            self._container = None

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_mp4(path: str | os.PathLike, frames, fps: float = 8.0, crf: int = 18) -> Path:
    """Write uint8 frames [T, H, W, 3] as an H.264 MP4."""
    with Mp4Writer(path, fps, crf) as writer:
        writer.write(frames)
    return Path(path)


def gif_bytes(frames, fps: float = 8.0) -> bytes:
    """uint8 frames [T, H, W, 3] as a looping GIF (Pillow, adaptive palette per frame)."""
    images = [Image.fromarray(f) for f in _as_numpy(frames)]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=max(1, round(1000 / fps)),
                   loop=0)
    return buf.getvalue()


def write_gif(path: str | os.PathLike, frames, fps: float = 8.0) -> Path:
    """Write uint8 frames [T, H, W, 3] as a looping GIF."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gif_bytes(frames, fps))
    return path


def tensorboard_video(writer, tag: str, frames, step: int, fps: float = 8.0) -> None:
    """Log uint8 frames [T, H, W, 3] to a torch SummaryWriter as an animated image (TensorBoard's Images tab
    plays it). What `SummaryWriter.add_video` writes, without its moviepy dependency: a GIF in an image
    summary."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    arr = _as_numpy(frames)
    image = Summary.Image(height=arr.shape[1], width=arr.shape[2], colorspace=3,
                          encoded_image_string=gif_bytes(arr, fps))
    writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)


def frame_grid(frames, num_cols: int | None = None, pad: int = 0) -> np.ndarray:
    """Tile uint8 frames [N, H, W, 3] row-major into one image [rows*H, cols*W, 3] (black padding)."""
    arr = _as_numpy(frames)
    n, h, w, _ = arr.shape
    cols = num_cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = np.zeros((rows * (h + pad) - pad, cols * (w + pad) - pad, 3), dtype=np.uint8)
    for i, f in enumerate(arr):
        r, c = divmod(i, cols)
        out[r * (h + pad): r * (h + pad) + h, c * (w + pad): c * (w + pad) + w] = f
    return out


def video_grid(videos, num_cols: int | None = None, pad: int = 0) -> np.ndarray:
    """Tile V videos [V, T, H, W, 3] into one grid video [T, rows*H, cols*W, 3] (e.g. a sample sheet)."""
    arr = videos.numpy() if isinstance(videos, torch.Tensor) else np.asarray(videos)
    if arr.ndim != 5:
        raise ValueError(f"videos must be uint8 [V, T, H, W, 3], got {list(arr.shape)}")
    return np.stack([frame_grid(arr[:, t], num_cols, pad) for t in range(arr.shape[1])])


def write_png(path: str | os.PathLike, image) -> Path:
    """Write a uint8 [H, W, 3] image as PNG."""
    arr = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(arr.astype(np.uint8, copy=False))).save(path, format="PNG")
    return path


def read_video(path: str | os.PathLike) -> np.ndarray:
    """Decode a video file (MP4, GIF, ...) with PyAV to uint8 [T, H, W, 3]."""
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise ValueError(f"{path}: no video frames")
    return np.stack(frames)
