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


def meta_distribution(k: int, s: int, rng: np.random.Generator, usable: np.ndarray | None = None) -> np.ndarray:
    """One draw h ~ π: s distinct usable domains chosen uniformly, weights uniform then normalised.

    Returns float64 [k] with exactly s non-zeros summing to 1.
    """
    candidates = np.arange(k) if usable is None else np.flatnonzero(np.asarray(usable, dtype=bool))
    if usable is not None and np.asarray(usable).shape != (k,):
        raise SoeError(f"usable mask: expected shape ({k},), got {np.asarray(usable).shape}")
    if not 1 <= s <= candidates.size:
        raise SoeError(f"support size s={s}: must be between 1 and the {candidates.size} usable domains")
    chosen = rng.choice(candidates, size=s, replace=False)
    weights = 1.0 - rng.random(s)  # in (0, 1]: never an exact zero, so exactly s non-zeros
    h = np.zeros(k, dtype=np.float64)
    h[chosen] = weights / weights.sum()
    return h
