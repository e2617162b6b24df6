"""AdamW over the expert bank in one pass (`_adamw_kernel.c`), optionally merging the next Θ.

Each expert row's gradient Σ_m A[m, j]·g_m is formed block by block in cache, the row, its
first and second moments (float32, or bfloat16 with `--expert-moments bfloat16`) are updated,
and — when the next step's α' is already known — α'_j times the updated row is added into
S + …, so the next merge needs no pass over the bank of its own. The column range is split
across torch's threads. When the kernel was not built (no C compiler at install time) or the
tensors do not qualify (not on the CPU, not contiguous, parameters not float32), `update_rows`
returns False and the caller falls back to torch.
"""
from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from soe_sdk.fused import split_columns

try:
    from . import _adamw_kernel
except ImportError:  # built without a C compiler: torch's fused AdamW does the update
    _adamw_kernel = None

_ENABLED = os.environ.get("SOE_FUSED_ADAMW", "1") != "0"  # SOE_FUSED_ADAMW=0: always update through torch


def available() -> bool:
    """True when expert updates on the CPU use the compiled kernel."""
    return _adamw_kernel is not None and _ENABLED


def set_enabled(enabled: bool) -> bool:
    """Turn the kernel on or off for this process (for comparisons and tests); returns the previous state."""
    global _ENABLED
    previous, _ENABLED = _ENABLED, enabled
    return previous


def _fits(t: Tensor, dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> bool:
    return t.device.type == "cpu" and t.dtype in dtypes and t.is_contiguous()


def update_rows(p: Tensor, m: Tensor, v: Tensor, coefficients: Tensor, grads: Tensor, *, lr: float,
                betas: tuple[float, float], eps: float, weight_decay: float, decay_end: int, step: int,
                merge: tuple[Tensor, Tensor, Tensor] | None = None) -> bool:
    """AdamW (as torch's, decoupled decay on columns [0, decay_end)) of the rows p [n, q] with moments
    m, v, whose gradient rows are coefficientsᵀ @ grads (coefficients [M, n], grads [M, q]). The moments
    are float32, or both bfloat16 (updated in float32, stored rounded to nearest).

    `merge` = (base [q], α' [n], out [q]) also writes out = base + α' @ p_new in the same pass.
    Returns False, touching nothing, when the kernel cannot take these tensors.
    """
    if not available() or p.dim() != 2:
        return False
    n, q = p.shape
    tensors = [p, coefficients, grads] + (list(merge) if merge is not None else [])
    if not all(_fits(t) for t in tensors) or m.shape != p.shape or v.shape != p.shape or m.dtype != v.dtype:
        return False
    if not (_fits(m, (torch.float32, torch.bfloat16)) and _fits(v, (torch.float32, torch.bfloat16))):
        return False
    micro = grads.shape[0]
    if coefficients.shape != (micro, n) or grads.shape[1] != q or micro < 1:
        return False
    if merge is not None and not (merge[0].numel() == q and merge[1].numel() == n and merge[2].numel() == q):
        return False
    b1, b2 = betas
    step_size = lr / (1 - b1 ** step)
    inv_bc2_sqrt = 1 / math.sqrt(1 - b2 ** step)
    base, alpha, out = (t.data_ptr() for t in merge) if merge is not None else (0, 0, 0)
    pointers = (p.data_ptr(), m.data_ptr(), v.data_ptr(), m.dtype == torch.bfloat16)

    def part(lo: int, hi: int) -> None:
        _adamw_kernel.update_rows(*pointers, n, q, lo, hi, decay_end, grads.data_ptr(), micro, q,
                                  coefficients.data_ptr(), 1 - lr * weight_decay, b1, b2, eps, step_size,
                                  inv_bc2_sqrt, alpha, base, out)

    split_columns(part, q)
    return True


def merge_rows(base: Tensor, alpha: Tensor, rows: Tensor, out: Tensor) -> bool:
    """out = base + alpha @ rows (rows [n, q], base and out [q], float32 on the CPU) with the same
    arithmetic as the merge `update_rows` folds into an update, so the two agree bit for bit.
    Returns False, touching nothing, when the kernel cannot take these tensors."""
    if not available() or rows.dim() != 2:
        return False
    n, q = rows.shape
    if not (all(_fits(t) for t in (base, alpha, rows, out)) and base.numel() == q and out.numel() == q
            and alpha.numel() == n):
        return False

    def part(lo: int, hi: int) -> None:
        _adamw_kernel.merge_rows(rows.data_ptr(), n, q, lo, hi, alpha.data_ptr(), base.data_ptr(), out.data_ptr())

    split_columns(part, q)
    return True
