"""A router φ that starts as a linear map of h built from the domains' centroid geometry.

With a random φ, two mixtures share expert updates according to a random kernel, so each
specialist sums the gradients of unrelated batches. Here α(h) = F h, where column i of F is
domain i's centroid, centred on the corpus mean and projected onto the n leading principal
directions of the centroids: mixtures whose documents read alike get similar α, and expert
updates α_j ⊗ ∇Θ are shared between them. F is scaled so that the corpus-weighted mean of
‖F e_i‖² is `scale`², and α(h_generic) = 0, so the generic mixture instantiates S itself.

`domain_groups` / `group_features` give the other linear router: the k domains clustered into n
groups by their centroids, and α_j = the mass h puts on group j. Each expert is then the delta of
one group of related domains, trained on batches drawn from that group (`--support-choice groups`).

An MLP with GELU represents a linear map exactly: GELU(x) − GELU(−x) = x.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from soe_sdk.domains import kmeans, nearest_centroids
from soe_sdk.errors import SoeError


def centroid_features(centroids: np.ndarray, h_generic: np.ndarray, n: int, scale: float) -> np.ndarray:
    """F [n, k]: each domain's centred centroid on the n leading (corpus-weighted) principal axes."""
    k = centroids.shape[0]
    if n > min(k, centroids.shape[1]):
        raise SoeError(f"--router-init centroids: {n} experts need at least {n} domains and embedding "
                       f"dimensions (have k = {k}, d = {centroids.shape[1]})")
    c = centroids.astype(np.float64)
    w = h_generic.astype(np.float64) / h_generic.sum()
    centred = c - w @ c
    _, vectors = np.linalg.eigh((centred * w[:, None]).T @ centred)
    axes = vectors[:, ::-1][:, :n]
    features = (centred @ axes).T
    norm = np.sqrt((w * (features ** 2).sum(0)).sum())
    if norm <= 0:
        raise SoeError("--router-init centroids: the centroids are all equal; nothing to build α from")
    return features * (scale / norm)


def domain_groups(centroids: np.ndarray, n: int, restarts: int = 8) -> np.ndarray:
    """int64 [k]: each domain's group, by k-means of the k centroids into n groups.

    The best of `restarts` seeded k-means runs (least within-group squared distance): with only k
    points, one run often settles in a poor local optimum. Deterministic.
    """
    c = np.asarray(centroids, dtype=np.float32)
    if not 1 <= n <= c.shape[0]:
        raise SoeError(f"domain groups: {n} groups need between 1 and k = {c.shape[0]} domains")
    best, best_cost = None, np.inf
    for seed in range(restarts):
        centres = kmeans(c, n, seed=seed)
        groups = nearest_centroids(c, centres)
        cost = float(((c - centres[groups]) ** 2).sum())
        if cost < best_cost:
            best, best_cost = groups, cost
    assert best is not None, "restarts must be ≥ 1"
    return best


def group_features(groups: np.ndarray, n: int, scale: float = 1.0) -> np.ndarray:
    """F [n, k] with F[j, i] = scale where domain i is in group j: α = F h is h's mass on each group."""
    features = np.zeros((n, len(groups)), dtype=np.float64)
    features[np.asarray(groups), np.arange(len(groups))] = scale
    return features


def linear_router(features: np.ndarray, hidden: int) -> dict[str, Tensor]:
    """φ's four tensors such that φ(h) = features @ h exactly (needs hidden ≥ 2n)."""
    n, k = features.shape
    if hidden < 2 * n:
        raise SoeError(f"--router-init centroids: the router needs a hidden width ≥ 2n = {2 * n} (has {hidden})")
    f = torch.as_tensor(features, dtype=torch.float32)
    fc1 = torch.zeros(hidden, k)
    fc1[:n], fc1[n:2 * n] = f, -f
    fc2 = torch.zeros(n, hidden)
    eye = torch.eye(n)
    fc2[:, :n], fc2[:, n:2 * n] = eye, -eye
    return {"router.fc1.weight": fc1, "router.fc1.bias": torch.zeros(hidden),
            "router.fc2.weight": fc2, "router.fc2.bias": torch.zeros(n)}
