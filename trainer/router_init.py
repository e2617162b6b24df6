"""A router φ that starts as a linear map of h built from the domains' centroid geometry.

With a random φ, two mixtures share expert updates according to a random kernel, so each
specialist sums the gradients of unrelated batches. Here α(h) = F h, where column i of F is
domain i's centroid, centred on the corpus mean and projected onto the n leading principal
directions of the centroids: mixtures whose documents read alike get similar α, and expert
updates α_j ⊗ ∇Θ are shared between them. F is scaled so that the corpus-weighted mean of
‖F e_i‖² is `scale`², and α(h_generic) = 0, so the generic mixture instantiates S itself.

An MLP with GELU represents a linear map exactly: GELU(x) − GELU(−x) = x.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

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
