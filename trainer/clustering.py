"""Split a corpus into k = k1·k2 pretraining domains: embed document heads, hierarchical k-means,
nearest-centroid assignment (paper §3, as in Grangier et al. 2024b)."""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
from tqdm.auto import tqdm

from soe_sdk.domains import hierarchical_kmeans, nearest_centroids
from soe_sdk.embedding import Embedder
from soe_sdk.errors import SoeError

_CHUNK_DOCS = 1024  # documents handed to the embedder at a time (bounds RAM, drives the progress bar)


def _chunks(texts: Iterable[str], embed_chars: int, size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for text in texts:
        chunk.append(text[:embed_chars])
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def embed_documents(texts: Iterable[str], embedder: Embedder, embed_chars: int, *,
                    total: int | None = None, batch_size: int = 32, progress: bool = True) -> np.ndarray:
    """[N, dim] float32 embeddings of the first `embed_chars` characters of each text."""
    parts: list[np.ndarray] = []
    with tqdm(total=total, desc="embed", unit="doc", disable=not progress) as bar:
        for chunk in _chunks(texts, embed_chars, _CHUNK_DOCS):
            parts.append(np.asarray(embedder.encode(chunk, batch_size=batch_size), dtype=np.float32))
            bar.update(len(chunk))
    if not parts:
        raise SoeError("no documents to embed")
    return np.concatenate(parts, axis=0)


def cluster_domains(embeddings: np.ndarray, k1: int, k2: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(centroids [k1·k2, dim] float32, assignments [N] int64): the domains and each document's domain."""
    centroids = np.asarray(hierarchical_kmeans(embeddings, k1, k2, seed=seed), dtype=np.float32)
    assignments = np.asarray(nearest_centroids(embeddings, centroids), dtype=np.int64)
    return centroids, assignments
