"""Texts → fixed-length token windows, and a deterministic train/held-out split of chunks."""
from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

EOT = "<|endoftext|>"


def split_heldout(chunks: Sequence[str], fraction: float = 0.2, minimum: int = 1) -> tuple[list[str], list[str]]:
    """(train, held-out): a chunk is held out by a hash of its text, so the split is stable
    under reordering and re-runs. At least `minimum` chunks are held out when possible."""
    keyed = sorted(chunks, key=lambda c: hashlib.sha256(c.encode("utf-8", "surrogatepass")).hexdigest())
    count = min(max(minimum, round(len(keyed) * fraction)), max(len(keyed) - 1, 0))
    return keyed[count:], keyed[:count]


def token_stream(tokenizer, texts: Sequence[str]) -> np.ndarray:
    """All texts tokenized, each followed by the end-of-text token, as one int64 array."""
    eot = tokenizer.token_to_id(EOT)
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(list(texts)):
        ids.extend(encoding.ids)
        if eot is not None:
            ids.append(eot)
    return np.asarray(ids, dtype=np.int64)


def windows(tokenizer, texts: Sequence[str], seq_len: int, max_windows: int | None = None) -> Tensor:
    """Non-overlapping windows [count, seq_len + 1] covering the texts' token stream.

    A stream shorter than one window is returned as a single shorter window, so even one
    short document can be scored.
    """
    stream = token_stream(tokenizer, texts)
    width = seq_len + 1
    count = len(stream) // width
    if count == 0:
        return torch.from_numpy(stream[None, :width].copy()) if len(stream) >= 2 else torch.zeros(0, 2, dtype=torch.long)
    if max_windows is not None:
        count = min(count, max_windows)
    return torch.from_numpy(stream[:count * width].reshape(count, width).copy())
