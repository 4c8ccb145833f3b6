"""Where the shards are: `data.source` (a folder, `s3://bucket/prefix` or `demo`) -> checked shard URLs.

`locate` lists the shards, reads the manifest and checks it against what training asks for (resolution,
clip length, format), with one-line errors; the driver calls it (`check_source`) before any worker starts.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from data_shards.records import ENCODINGS, MANIFEST, SHARD_RE
from digan.config import DataConfig
from digan.data.tar import iter_records
from digan.storage import join, list_files, read_bytes
from digan.storage.s3 import S3Settings, configure_s3
from digan.storage.s3_stream import register_gopen
from webdataset.gopen import gopen

register_gopen()  # s3:// shard URLs open as retrying ranged reads


def s3_settings(cfg: DataConfig) -> S3Settings:
    return S3Settings(endpoint_url=cfg.s3_endpoint_url, region=cfg.s3_region, max_retries=cfg.s3_max_retries,
                      retry_budget_s=cfg.s3_retry_budget_s)


# ----------------------------------------------------------------------------------------------------
# Locating shards.


def list_shards(location: str, s3: S3Settings | None = None) -> list[str]:
    """Sorted shard URLs (`shard-NNNNNN.tar`) under a folder or an s3:// prefix."""
    urls = list_files(location, SHARD_RE, s3)
    if not urls:
        raise FileNotFoundError(f"data.source={location.rstrip('/')!r}: no shard-NNNNNN.tar files there "
                                "(build them with `python -m data_shards build ...`)")
    return urls


def read_manifest(location: str, s3: S3Settings | None = None) -> dict | None:
    data = read_bytes(join(location, MANIFEST), s3)
    return json.loads(data) if data is not None else None


def resolve_source(cfg: DataConfig, resolution: int) -> str:
    """`data.source` as a shard location; `demo` builds the embedded dataset first if needed."""
    if cfg.source == "demo":
        from digan.data.demo import ensure_demo_shards

        return ensure_demo_shards(cfg, resolution)
    return cfg.source


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
