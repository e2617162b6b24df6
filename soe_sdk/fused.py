"""The fused merge kernel: out = base + α @ rows straight from float32, float16 or bfloat16 storage.

The compiled kernel (`_merge_kernel.c`) widens 16-bit rows in registers as it reads them, so
a float16 archive is read once at half the bytes of float32, with no conversion pass. When
the kernel was not built (no C compiler at install time) or the tensors do not qualify (not on
the CPU, output not float32, inner stride ≠ 1), `fused_combination` returns False and the
caller falls back to torch.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

try:
    from . import _merge_kernel
except ImportError:  # built without a C compiler: torch does the merge
    _merge_kernel = None

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_ENABLED = os.environ.get("SOE_FUSED_MERGE", "1") != "0"  # SOE_FUSED_MERGE=0: always merge through torch


def available() -> bool:
    """True when merges on the CPU use the compiled kernel."""
    return _merge_kernel is not None and _ENABLED


def set_enabled(enabled: bool) -> bool:
    """Turn the kernel on or off for this process (for comparisons and tests); returns the previous state."""
    global _ENABLED
    previous, _ENABLED = _ENABLED, enabled
    return previous


def instruction_set() -> str:
    """What the kernel runs on: 'avx512', 'avx2' or 'scalar'; 'torch' when it is unavailable."""
    return _merge_kernel.isa() if available() else "torch"


def use_instruction_set(name: str) -> str:
    """Force 'avx512', 'avx2', 'scalar' or 'best' (ValueError if the CPU lacks it); returns the one in use."""
    if _merge_kernel is None:
        raise RuntimeError("the fused merge kernel is not built; reinstall soe-sdk with a C compiler present")
    return _merge_kernel.set_isa(name)


def usable(rows: Tensor, dtype: torch.dtype, device: torch.device | str = "cpu") -> bool:
    """Whether `fused_combination` can take these rows into an output of this dtype on this device."""
    return (available() and dtype == torch.float32 and torch.device(device).type == "cpu"
            and rows.device.type == "cpu" and rows.dtype in _DTYPE_CODES)


def fused_combination(base: Tensor | None, alpha: Tensor, rows: Tensor, out: Tensor) -> bool:
    """out = (base if given, else out itself) + Σ_i alpha[i]·rows[i], with float32 accumulation.

    `rows` is [m, q] with unit stride along q (its rows may be strided views of a bank),
    `base` and `out` are [q]; `out` must be a contiguous float32 CPU tensor. Returns False,
    touching nothing, when the kernel cannot take these tensors.
    """
    m, q = rows.shape
    if not (usable(rows, out.dtype, out.device) and out.is_contiguous() and out.numel() == q and alpha.numel() == m
            and (q <= 1 or rows.stride(1) == 1)):
        return False
    if base is out:
        base = None  # accumulate in place
    if base is not None and not (base.device.type == "cpu" and base.dtype in _DTYPE_CODES
                                 and base.numel() == q and base.is_contiguous()):
        return False
    coefficients = alpha if (alpha.dtype == torch.float32 and alpha.device.type == "cpu" and alpha.is_contiguous()
                             and not alpha.requires_grad) else alpha.detach().to("cpu", torch.float32).contiguous()
    _merge_kernel.combine(out.data_ptr(), q,
                          0 if base is None else base.data_ptr(), 0 if base is None else _DTYPE_CODES[base.dtype],
                          rows.data_ptr(), _DTYPE_CODES[rows.dtype], rows.stride(0), m, coefficients.data_ptr())
    return True
