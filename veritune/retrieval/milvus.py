"""Connections to Milvus (a Milvus Lite file or a Milvus server, one code path) and the metrics
the collection is searched with.

`uri` is either a Milvus Lite path ending in `.db` or a server URL (`http://host:19530`). In
milvus-lite 3.x the `.db` path is a *directory* served by an in-process gRPC server, one process
per directory (it holds a `LOCK`). Closing the last client of a local db in this process stops
that server and releases the lock, so another process (the server, a later stage) can open it.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

# How the collection is searched, so how the index builds it: cosine over unit vectors, BM25 over words.
METRIC_TYPE = "COSINE"
LEXICAL_METRIC = "BM25"
MAX_TOPK = 16_384  # Milvus limit on `limit` in one search

_SERVER_SCHEMES = ("http://", "https://", "tcp://", "unix:")


def is_local_uri(uri: str) -> bool:
    """True for a Milvus Lite path, False for a server URL."""
    return not uri.startswith(_SERVER_SCHEMES)


_lite_lock = threading.Lock()
_lite_clients: dict[str, int] = {}  # absolute .db path -> open clients in this process


def connect(uri: str) -> Any:
    """A MilvusClient with its own channel; pair every call with `disconnect`."""
    from pymilvus import MilvusClient
    from pymilvus.exceptions import ConnectionConfigException

    if not is_local_uri(uri):
        return MilvusClient(uri=uri, dedicated=True)
    if not uri.endswith(".db"):
        raise ValueError(
            f"a Milvus Lite uri must be a path ending in .db, got {uri!r} "
            f"(or a server URL starting with {', '.join(_SERVER_SCHEMES)})"
        )
    if not Path(uri).parent.is_dir():
        raise FileNotFoundError(f"cannot open Milvus Lite db {uri}: its directory {Path(uri).parent} does not exist")
    key = os.path.abspath(uri)
    with _lite_lock:
        try:
            client = MilvusClient(uri=uri, dedicated=True)
        except ConnectionConfigException as e:
            raise RuntimeError(
                f"cannot open Milvus Lite db {uri}: {e.message}. Milvus Lite lets one process at a time "
                "open a db (is the server or another stage running on it?); use a Milvus server "
                "(index.uri: http://host:19530) for concurrent access."
            ) from None
        _lite_clients[key] = _lite_clients.get(key, 0) + 1
    return client


def disconnect(client: Any, uri: str) -> None:
    """Close `client`; after the last client of a local db, stop its server and free the lock."""
    client.close()
    if not is_local_uri(uri):
        return
    from milvus_lite.server_manager import server_manager_instance

    key = os.path.abspath(uri)
    with _lite_lock:
        _lite_clients[key] -= 1
        if _lite_clients[key] == 0:
            del _lite_clients[key]
            server_manager_instance.release_server(key)
