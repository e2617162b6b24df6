"""Sampling from mix(h) (paper Algorithm 1) and from the meta-distribution π (paper §2.4)."""
from __future__ import annotations

import numpy as np
import torch

from soe_sdk.errors import SoeError

from .shards import DomainShards


def usable_domains(shards: DomainShards, seq_len: int) -> np.ndarray:
    """Boolean mask [k]: domains holding at least one window of seq_len + 1 tokens."""
    return shards.counts >= seq_len + 1


def _usable_weights(shards: DomainShards, h: np.ndarray, seq_len: int) -> np.ndarray:
    h = np.asarray(h, dtype=np.float64)
    if h.shape != (shards.k,):
        raise SoeError(f"domain weights: expected shape ({shards.k},), got {h.shape}")
    if not np.all(np.isfinite(h)) or np.any(h < 0):
        raise SoeError("domain weights: must be finite and non-negative")
    # domains too short for one window cannot be sampled: their mass goes to the others
    h = np.where(usable_domains(shards, seq_len), h, 0.0)
    total = h.sum()
    if total <= 0:
        raise SoeError(f"domain weights: all mass is on domains with fewer than {seq_len + 1} tokens")
    return h / total


def sample_batch_with_domains(shards: DomainShards, h: np.ndarray, batch_size: int, seq_len: int,
                              rng: np.random.Generator) -> tuple[torch.Tensor, np.ndarray]:
    """(tokens LongTensor [B, seq_len + 1], domain id of each row): Algorithm 1, row by row."""
    p = _usable_weights(shards, h, seq_len)
    domains = rng.choice(shards.k, size=batch_size, p=p)
    # a start in [0, count - (seq_len + 1)], uniformly; inclusive upper bound via count - seq_len
    starts = rng.integers(0, shards.counts[domains] - seq_len)
    out = np.empty((batch_size, seq_len + 1), dtype=np.int64)
    for row, (d, s) in enumerate(zip(domains, starts)):
        out[row] = shards.domain(int(d))[s:s + seq_len + 1]
    return torch.from_numpy(out), domains


def sample_batch(shards: DomainShards, h: np.ndarray, batch_size: int, seq_len: int,
                 rng: np.random.Generator) -> torch.Tensor:
    """A batch from mix(h): LongTensor [B, seq_len + 1] of random windows (inputs = [:, :-1], targets = [:, 1:])."""
    return sample_batch_with_domains(shards, h, batch_size, seq_len, rng)[0]


def neighbourhoods(centroids: np.ndarray, size: int) -> np.ndarray:
    """int64 [k, size]: for each domain, the `size` domains with the most similar centroids
    (cosine), itself first."""
    c = np.asarray(centroids, dtype=np.float64)
    c = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    sim = c @ c.T
    np.fill_diagonal(sim, np.inf)  # itself first, even among duplicate centroids
    return np.argsort(-sim, axis=1, kind="stable")[:, :min(size, len(c))].astype(np.int64)


def meta_distribution(k: int, s: int, rng: np.random.Generator, usable: np.ndarray | None = None,
                      domain_weights: np.ndarray | None = None,
                      neighbours: np.ndarray | None = None) -> np.ndarray:
    """One draw h ~ π: s distinct usable domains, weights uniform then normalised.

    The domains are chosen uniformly; or, given `domain_weights` (e.g. h_generic), with
    probability proportional to them (without replacement), so that big domains appear in
    mixtures as often as they do in the corpus; or, given `neighbours` ([k, m] from
    `neighbourhoods`), as one uniformly chosen anchor domain plus s − 1 of its m nearest
    usable domains — a topical mixture, shaped like the histogram of a real document set.
    Returns float64 [k] with exactly s non-zeros summing to 1.
    """
    candidates = np.arange(k) if usable is None else np.flatnonzero(np.asarray(usable, dtype=bool))
    if usable is not None and np.asarray(usable).shape != (k,):
        raise SoeError(f"usable mask: expected shape ({k},), got {np.asarray(usable).shape}")
    if not 1 <= s <= candidates.size:
        raise SoeError(f"support size s={s}: must be between 1 and the {candidates.size} usable domains")
    if neighbours is not None:
        chosen = _neighbourhood_draw(candidates, s, rng, neighbours, usable)
    else:
        p = _choice_probabilities(domain_weights, candidates, k, s)
        chosen = rng.choice(candidates, size=s, replace=False, p=p)
    weights = 1.0 - rng.random(s)  # in (0, 1]: never an exact zero, so exactly s non-zeros
    h = np.zeros(k, dtype=np.float64)
    h[chosen] = weights / weights.sum()
    return h


def group_mixture(groups: np.ndarray, domain_weights: np.ndarray, s: int, rng: np.random.Generator,
                  usable: np.ndarray | None = None) -> np.ndarray:
    """One draw h ~ π over groups of domains (`groups`: int [k], each domain's group).

    s distinct groups are chosen with probability proportional to their mass in `domain_weights`
    (e.g. h_generic), given uniform random weights, and each group's weight is spread over its
    usable domains as `domain_weights` spreads it: with s = 1 the batch comes from one group of
    related domains, in the corpus's own proportions. Returns float64 [k] summing to 1.
    """
    groups = np.asarray(groups, dtype=np.int64)
    w = np.asarray(domain_weights, dtype=np.float64)
    k = len(groups)
    if w.shape != (k,) or not np.all(np.isfinite(w)) or np.any(w < 0):
        raise SoeError(f"domain weights of π: expected {k} finite non-negative values")
    if usable is not None:
        w = np.where(np.asarray(usable, dtype=bool), w, 0.0)
    mass = np.bincount(groups, weights=w, minlength=int(groups.max()) + 1)
    if not 1 <= s <= np.count_nonzero(mass):
        raise SoeError(f"support size s={s}: must be between 1 and the {np.count_nonzero(mass)} groups with weight")
    chosen = rng.choice(len(mass), size=s, replace=False, p=mass / mass.sum())
    weights = 1.0 - rng.random(s)
    share = np.zeros(len(mass))
    share[chosen] = weights / weights.sum()
    return w * (share / np.where(mass > 0, mass, 1.0))[groups]


def _choice_probabilities(domain_weights: np.ndarray | None, candidates: np.ndarray, k: int,
                          s: int) -> np.ndarray | None:
    if domain_weights is None:
        return None
    w = np.asarray(domain_weights, dtype=np.float64)
    if w.shape != (k,) or not np.all(np.isfinite(w)) or np.any(w < 0):
        raise SoeError(f"domain weights of π: expected {k} finite non-negative values")
    w = w[candidates]
    if np.count_nonzero(w) < s:
        raise SoeError(f"support size s={s}: only {np.count_nonzero(w)} usable domains have weight")
    return w / w.sum()


def _neighbourhood_draw(candidates: np.ndarray, s: int, rng: np.random.Generator, neighbours: np.ndarray,
                        usable: np.ndarray | None) -> np.ndarray:
    anchor = int(rng.choice(candidates))
    ok = np.ones(neighbours.shape[0], dtype=bool) if usable is None else np.asarray(usable, dtype=bool)
    pool = [int(d) for d in neighbours[anchor] if ok[d] and d != anchor]
    if len(pool) < s - 1:
        raise SoeError(f"support size s={s}: domain {anchor} has only {len(pool)} usable neighbours "
                       f"in its neighbourhood of {neighbours.shape[1]}")
    return np.concatenate([[anchor], rng.choice(pool, size=s - 1, replace=False)]).astype(np.int64)
