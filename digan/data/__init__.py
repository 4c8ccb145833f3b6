"""digan.data: streaming WebDataset loaders over clip shards (folder or s3://) and the demo dataset.

    loader = build_pair_loader(cfg.data, resolution, batch_per_worker, rank, world_size, seed)
    for pair, dt in loader: ...          # pair float32 [B,2,3,R,R] in [-1,1], dt float32 [B]
    loader.stats(); loader.state_dict(); loader.load_state_dict(state)
    clips = build_clip_loader(cfg.data, resolution, batch, num_frames, rank, world_size, seed)
    ensure_demo_shards(cfg.data, resolution) -> folder

Names resolve lazily, so `digan.data.s3` can be imported without torch or webdataset.
"""

import importlib

_EXPORTS = {"build_pair_loader": "loader", "build_clip_loader": "loader", "StreamLoader": "loader",
            "list_shards": "loader", "read_manifest": "loader", "resolve_source": "loader",
            "ensure_demo_shards": "demo", "S3Settings": "s3", "ClipsTooShortError": "loader",
            "DataError": "loader", "S3OutageError": "s3", "check_source": "loader", "locate": "loader"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"digan.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'digan.data' has no attribute {name!r}")
