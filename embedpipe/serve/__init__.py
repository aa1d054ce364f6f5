"""``embedpipe serve``: an OpenAI-compatible embeddings service with one cache, coalescing, keys and metrics.

``pip install 'embedpipe[serve]'``, then ``embedpipe serve --model openai:text-embedding-3-small`` and
point any OpenAI client at ``http://127.0.0.1:8000/v1``. See README.md, "Service".

Names are imported on first use, so ``embedpipe``'s command line (which registers ``serve``) does not
need FastAPI to run its other commands.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from embedpipe.serve.app import APIError, Service, create_app, service_of
    from embedpipe.serve.batcher import Answer, MicroBatcher, QueueFullError
    from embedpipe.serve.keystore import KeyRecord, KeyStore, KeyStoreError, key_store_from
    from embedpipe.serve.settings import ModelSettings, ServeSettings, load_settings

_HOMES = {
    "APIError": "app", "Service": "app", "create_app": "app", "service_of": "app",
    "Answer": "batcher", "MicroBatcher": "batcher", "QueueFullError": "batcher",
    "KeyRecord": "keystore", "KeyStore": "keystore", "KeyStoreError": "keystore", "key_store_from": "keystore",
    "ModelSettings": "settings", "ServeSettings": "settings", "load_settings": "settings",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'embedpipe.serve' has no attribute {name!r}")
    return getattr(importlib.import_module(f"embedpipe.serve.{home}"), name)


__all__ = [
    "APIError",
    "Answer",
    "KeyRecord",
    "KeyStore",
    "KeyStoreError",
    "MicroBatcher",
    "ModelSettings",
    "QueueFullError",
    "ServeSettings",
    "Service",
    "create_app",
    "key_store_from",
    "load_settings",
    "service_of",
]
