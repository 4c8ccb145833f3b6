"""data_shards: raw video collections -> WebDataset clip shards (`python -m data_shards --help`).

See `data_shards.records` for the record format, `data_shards.build` for the builder and
`data_shards.demo` for the embedded demo dataset. Exports resolve lazily so the builder's worker
processes import only what they use.
"""

import importlib

_EXPORTS = {"BuildError": "build", "BuildOptions": "build", "build_shards": "build", "build_demo": "demo",
            "VideoSource": "sources", "discover": "sources"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"data_shards.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'data_shards' has no attribute {name!r}")
