"""Domains in embedding space: k-means centroids and the domain histogram h (paper, Algorithm 3).

Algorithm 3: for each document x, find i = argmin_i ||Bert(x) − c_i|| and add 1/#D to h_i.
`domain_histogram(mode="soft")` replaces the hard count by a softmax over distances.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .errors import SoeError

_SOFT_BLOCK = 1 << 22  # distances per block in the soft histogram (32 MB of float64), whatever n and k


def _as_matrix(x: np.ndarray, what: str) -> np.ndarray:
    """A C-contiguous float32 [n, d] copy-or-view of `x`, with n, d ≥ 1 and finite values."""
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise SoeError(f"{what}: expected a 2-D array [count, dim], got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise SoeError(f"{what}: is empty (shape {arr.shape})")
    if not np.issubdtype(arr.dtype, np.number):
        raise SoeError(f"{what}: expected numbers, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise SoeError(f"{what}: holds NaN or infinite values")
    return arr


def _pair(embeddings: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = _as_matrix(embeddings, "embeddings")
    c = _as_matrix(centroids, "centroids")
    if x.shape[1] != c.shape[1]:
        raise SoeError(f"embeddings are {x.shape[1]}-dim but the centroids are {c.shape[1]}-dim")
    return x, c


def nearest_centroids(embeddings: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index (int64 [n]) of the centroid nearest in L2 distance to each embedding."""
    import faiss

    x, c = _pair(embeddings, centroids)
    index = faiss.IndexFlatL2(c.shape[1])
    index.add(c)
    _, nearest = index.search(x, 1)
    return nearest[:, 0].astype(np.int64)


def _squared_distances(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """||x_i − c_j||² as float64 [n, k], clipped at 0 against rounding."""
    x64, c64 = x.astype(np.float64), c.astype(np.float64)
    d2 = (x64 * x64).sum(1)[:, None] - 2.0 * x64 @ c64.T + (c64 * c64).sum(1)[None, :]
    return np.maximum(d2, 0.0)


def domain_histogram(embeddings: np.ndarray, centroids: np.ndarray, *, mode: str = "hard",
                     temperature: float = 0.05) -> np.ndarray:
    """Domain weights h (float64 [k], sums to 1) of a set of embedded documents.

    hard: h_j = (1/n) · #{i : argmin_l ||x_i − c_l|| = j}                    (Algorithm 3)
    soft: h_j = (1/n) · Σ_i softmax_j(−||x_i − c_j||² / temperature)
    For unit vectors ||x − c||² = 2 − 2·cos(x, c), so soft is a softmax of cosine
    similarity at temperature/2. Soft tends to hard as temperature → 0.
    """
    x, c = _pair(embeddings, centroids)
    k = c.shape[0]
    if mode == "hard":
        counts = np.bincount(nearest_centroids(x, c), minlength=k).astype(np.float64)
        return counts / counts.sum()
    if mode != "soft":
        raise SoeError(f"domain histogram mode must be 'hard' or 'soft', got {mode!r}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise SoeError(f"domain histogram temperature must be a positive number, got {temperature!r}")
    total = np.zeros(k, dtype=np.float64)
    rows = max(1, _SOFT_BLOCK // k)
    for start in range(0, x.shape[0], rows):
        logits = -_squared_distances(x[start:start + rows], c) / temperature
        logits -= logits.max(axis=1, keepdims=True)  # stable: the largest term becomes exp(0) = 1
        weights = np.exp(logits)
        total += (weights / weights.sum(axis=1, keepdims=True)).sum(axis=0)
    return total / total.sum()


def top_domains(h: np.ndarray, names: Sequence[str] | None = None,
                top: int = 5) -> list[tuple[int | str, float]]:
    """The `top` heaviest domains of h as (index, weight), heaviest first; zero weights left out.

    With `names` (one per domain) each index is replaced by its name.
    """
    weights = np.asarray(h, dtype=np.float64)
    if weights.ndim != 1 or weights.size == 0:
        raise SoeError(f"domain weights: expected a non-empty 1-D array, got shape {weights.shape}")
    if names is not None and len(names) != weights.size:
        raise SoeError(f"domain names: got {len(names)} names for {weights.size} domains")
    if not isinstance(top, int) or top <= 0:
        raise SoeError(f"top must be a positive integer, got {top!r}")
    order = np.argsort(-weights, kind="stable")[:top]
    return [(names[i] if names is not None else int(i), float(weights[i]))
            for i in order if weights[i] > 0]


def _is_normalised(x: np.ndarray) -> bool:
    norms = np.linalg.norm(x, axis=1)
    return bool(np.all(np.abs(norms - 1.0) < 1e-3))


def kmeans(embeddings: np.ndarray, k: int, *, seed: int = 0, niter: int = 20,
           progress: bool = False) -> np.ndarray:
    """k centroids (float32 [k, dim]) of the embeddings by faiss k-means, deterministic for a seed.

    Unit-norm embeddings get spherical k-means (unit-norm centroids). Every point is used
    (no subsampling); needs at least k points.
    """
    import faiss

    x = _as_matrix(embeddings, "embeddings")
    if not isinstance(k, int) or k <= 0:
        raise SoeError(f"kmeans: k must be a positive integer, got {k!r}")
    if x.shape[0] < k:
        raise SoeError(f"kmeans: {x.shape[0]} points cannot make {k} clusters")
    if k == 1:  # faiss needs k ≥ 2 to do anything useful; the mean is the exact answer
        centre = x.mean(axis=0, keepdims=True)
        if _is_normalised(x):
            centre /= max(float(np.linalg.norm(centre)), 1e-12)
        return centre.astype(np.float32)
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, verbose=progress,
                      spherical=_is_normalised(x), min_points_per_centroid=1,
                      max_points_per_centroid=-(-x.shape[0] // k) + 1)
    km.train(x)
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


def hierarchical_kmeans(embeddings: np.ndarray, k1: int, k2: int, *, seed: int = 0, niter: int = 20,
                        progress: bool = False) -> np.ndarray:
    """k1·k2 centroids (float32): k-means into k1 clusters, then each cluster into k2 sub-clusters.

    Rows [i·k2, (i+1)·k2) are the sub-centroids of top cluster i. A top cluster with fewer
    than k2 points takes its points themselves as sub-centroids and repeats them (cyclically)
    to fill its k2 rows, so k stays k1·k2. An exact repeat never wins a nearest-centroid
    search over its first copy, so those extra domains simply stay empty.
    """
    from tqdm.auto import tqdm

    x = _as_matrix(embeddings, "embeddings")
    if not isinstance(k2, int) or k2 <= 0:
        raise SoeError(f"hierarchical kmeans: k2 must be a positive integer, got {k2!r}")
    top = kmeans(x, k1, seed=seed, niter=niter)
    assignment = nearest_centroids(x, top)
    out = np.empty((k1 * k2, x.shape[1]), dtype=np.float32)
    for i in tqdm(range(k1), desc="sub-clustering", disable=not progress):
        members = x[assignment == i]
        rows = slice(i * k2, (i + 1) * k2)
        if members.shape[0] == 0:  # cannot happen after faiss's empty-cluster repair, but be safe
            out[rows] = top[i]
        elif members.shape[0] < k2:
            out[rows] = members[np.arange(k2) % members.shape[0]]
        else:
            out[rows] = kmeans(members, k2, seed=seed + 1 + i, niter=niter)
    return out
