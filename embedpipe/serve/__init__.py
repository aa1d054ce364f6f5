"""``embedpipe serve``: an OpenAI-compatible embeddings service with one cache, coalescing, keys and metrics.

``pip install 'embedpipe[serve]'``, then ``embedpipe serve --model openai:text-embedding-3-small`` and
point any OpenAI client at ``http://127.0.0.1:8000/v1``. See README.md, "Service".
"""

from __future__ import annotations

from embedpipe.serve.app import APIError, Service, create_app, service_of
from embedpipe.serve.batcher import Answer, MicroBatcher, QueueFullError
from embedpipe.serve.keystore import KeyRecord, KeyStore, KeyStoreError, key_store_from
from embedpipe.serve.settings import ModelSettings, ServeSettings, load_settings

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
