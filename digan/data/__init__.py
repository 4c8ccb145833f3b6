"""digan.data: streaming WebDataset loaders over clip shards (folder or s3://) and the demo dataset.

    loader = build_pair_loader(cfg.data, resolution, batch_per_worker, rank, world_size, seed)
    for pair, dt in loader: ...          # pair float32 [B,2,3,R,R] in [-1,1], dt float32 [B]
    loader.stats(); loader.state_dict(); loader.load_state_dict(state)
    clips = build_clip_loader(cfg.data, resolution, batch, num_frames, rank, world_size, seed)
    ensure_demo_shards(cfg.data, resolution) -> folder

Names resolve lazily (S3 access itself lives in `digan.storage.s3`).
"""

import importlib

_EXPORTS = {"build_pair_loader": "loader", "build_clip_loader": "loader", "StreamLoader": "loader",
            "list_shards": "source", "read_manifest": "source", "resolve_source": "source",
            "ensure_demo_shards": "demo", "S3Settings": "digan.storage.s3", "ClipsTooShortError": "source",
            "DataError": "reader", "S3OutageError": "digan.storage.s3", "check_source": "source", "locate": "source"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        module = _EXPORTS[name]
        return getattr(importlib.import_module(module if "." in module else f"digan.data.{module}"), name)
    raise AttributeError(f"module 'digan.data' has no attribute {name!r}")
