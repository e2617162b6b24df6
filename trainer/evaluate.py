"""Held-out losses during training: generic eval with φ(h_generic), specialist evals with φ(h_spe)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from soe_sdk.config import ModelConfig
from soe_sdk.model import next_token_loss


def token_windows(tokens: np.ndarray, seq_len: int, max_tokens: int) -> Tensor:
    """Consecutive non-overlapping windows of seq_len+1 tokens from the start of `tokens`."""
    width = seq_len + 1
    count = min(len(tokens), max_tokens) // width
    if count == 0:
        raise ValueError(f"need at least {width} tokens for one evaluation window, got {len(tokens)}")
    return torch.from_numpy(np.asarray(tokens[:count * width], dtype=np.int64).reshape(count, width))


@dataclass
class EvalSet:
    """A named held-out token set and the domain weights the soup is instantiated with for it."""

    name: str
    windows: Tensor  # [count, seq_len + 1]
    h: np.ndarray


def load_eval_sets(workdir: Path, seq_len: int, max_tokens: int, h_generic: np.ndarray,
                   dtype: np.dtype, soft: bool = False) -> list[EvalSet]:
    """The generic set (eval/generic.bin) and every specialist set eval/<name>.bin with its h."""
    sets: list[EvalSet] = []
    folder = workdir / "eval"
    if (folder / "generic.bin").exists():
        sets.append(EvalSet("generic", token_windows(np.memmap(folder / "generic.bin", dtype=dtype, mode="r"),
                                                     seq_len, max_tokens), h_generic))
    for h_path in sorted(folder.glob(f"*.h_{'soft' if soft else 'hard'}.npy")):
        name = h_path.name.split(".h_")[0]
        tokens_path = folder / f"{name}.bin"
        if tokens_path.exists():
            sets.append(EvalSet(name, token_windows(np.memmap(tokens_path, dtype=dtype, mode="r"), seq_len,
                                                    max_tokens), np.load(h_path)))
    return sets


@torch.no_grad()
def windows_loss(params: dict[str, Tensor], config: ModelConfig, windows: Tensor, batch_size: int = 32,
                 autocast_dtype: torch.dtype | None = None) -> float:
    """Mean next-token loss over all windows (token-weighted)."""
    device = next(iter(params.values())).device
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size].to(device)
        if autocast_dtype is not None:
            with torch.autocast(device.type, dtype=autocast_dtype):
                loss = next_token_loss(params, config, batch)
        else:
            loss = next_token_loss(params, config, batch)
        total += float(loss) * batch.numel()
        count += batch.numel()
    return total / count
