"""The fused merge kernel: out = base + α @ rows straight from float32, float16 or bfloat16 storage.

The compiled kernel (`_merge_kernel.c`) widens 16-bit rows in registers as it reads them, so
a float16 archive is read once at half the bytes of float32, with no conversion pass; large
combinations are split by columns across torch's threads (the kernel releases the GIL). When
the kernel was not built (no C compiler at install time) or the tensors do not qualify (not on
the CPU, output not float32, inner stride ≠ 1), `fused_combination` returns False and the
caller falls back to torch.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

try:
    from . import _merge_kernel
except ImportError:  # built without a C compiler: torch does the merge
    _merge_kernel = None

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_ITEM_BYTES = (4, 2, 2)  # by dtype code
# A combination of at least this many row elements is split into column ranges, one per torch
# thread (the kernel releases the GIL); below it a thread hand-off costs more than it saves.
PARALLEL_ELEMENTS = 1 << 22
_COLUMN_ALIGN = 16384  # ranges start on the kernel's block boundaries
_RANGE_COLUMNS = 4 * _COLUMN_ALIGN  # columns per range handed to a thread (≤ 1 ms of work for 16 rows)
_pool: ThreadPoolExecutor | None = None
_pool_owner = (0, 0)  # (pid, workers) of the pool: a forked child has none of its threads, so it makes its own
_ENABLED = os.environ.get("SOE_FUSED_MERGE", "1") != "0"  # SOE_FUSED_MERGE=0: always merge through torch


def built() -> bool:
    """True when the compiled kernel was built at install time (whether or not it is switched on)."""
    return _merge_kernel is not None


def available() -> bool:
    """True when merges on the CPU use the compiled kernel."""
    return built() and _ENABLED


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
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    return (available() and dtype == torch.float32 and device_type == "cpu"
            and rows.device.type == "cpu" and rows.dtype in _DTYPE_CODES)


class BoundCombination:
    """out = base + α @ rows for fixed base and rows, checked once: each call only passes α and out.

    A merge plan binds every small parameter once, so instantiating a model of many small
    tensors costs one kernel call per tensor and almost no Python. Holds references to
    `base` and `rows`, so their memory (e.g. the archive's mapping) stays alive.
    """

    __slots__ = ("base", "rows", "_args")

    def __init__(self, base: Tensor, rows: Tensor) -> None:
        self.base, self.rows = base, rows
        m, q = rows.shape
        self._args = (q, base.data_ptr(), _DTYPE_CODES[base.dtype], rows.data_ptr(), _DTYPE_CODES[rows.dtype],
                      rows.stride(0), m)

    def __call__(self, alpha: Tensor, out: Tensor, threads: int | None = None) -> Tensor:
        """Write the combination with coefficients `alpha` (float32, contiguous, CPU) into `out` ([q] float32),
        on up to `threads` threads (default: torch's, for combinations large enough to split)."""
        q, base, base_code, rows, rows_code, stride, m = self._args
        if out.numel() != q or alpha.numel() != m or out.dtype != torch.float32 or alpha.dtype != torch.float32:
            raise ValueError(f"bound combination of {m} rows × {q}: got α of {alpha.numel()} and out of {out.numel()}")
        _combine(out.data_ptr(), q, base, base_code, rows, rows_code, stride, m, alpha.data_ptr(), threads)
        return out


def combine_all(combinations: Sequence[tuple[BoundCombination, Tensor]], alpha: Tensor) -> None:
    """Run every (bound combination, out) pair with the same `alpha`, one pair per thread at a time.

    For the many small parameters of a model: each is too small to split by columns, so they
    run side by side instead, on torch's threads, and a merge of small tensors uses every core.
    """
    run_parallel([lambda c=c, out=out: c(alpha, out, threads=1) for c, out in combinations])


def _combine(out: int, q: int, base: int, base_code: int, rows: int, rows_code: int, stride: int, m: int,
             alpha: int, threads: int | None = None) -> None:
    """The kernel on raw pointers; large combinations are split by columns across `threads` (default torch's)."""
    def part(lo: int, hi: int) -> None:
        _merge_kernel.combine(out + 4 * lo, hi - lo, base + _ITEM_BYTES[base_code] * lo if base else 0, base_code,
                              rows + _ITEM_BYTES[rows_code] * lo, rows_code, stride, m, alpha)

    split_columns(part, q, threads=1 if m * q < PARALLEL_ELEMENTS else threads)


def split_columns(part: Callable[[int, int], None], q: int, threads: int | None = None) -> None:
    """Run `part(lo, hi)` on column ranges that cover [0, q), in parallel on up to `threads` threads
    (default: torch's), for C kernels that release the GIL. The ranges start on multiples of 16384."""
    threads = min(threads or torch.get_num_threads(), max(1, q // _COLUMN_ALIGN))
    if threads < 2:
        part(0, q)
        return
    width = min(_RANGE_COLUMNS, -(-q // threads // _COLUMN_ALIGN) * _COLUMN_ALIGN)
    run_parallel([lambda lo=lo: part(lo, min(lo + width, q)) for lo in range(0, q, width)], threads)


def run_parallel(tasks: Sequence[Callable[[], None]], threads: int | None = None) -> None:
    """Run every task once, on up to `threads` threads (default: torch's), for work in C that
    releases the GIL. Tasks must not call `run_parallel` themselves (they would wait on the pool
    they occupy).

    Tasks are handed out one at a time as threads become free: right after a torch operation,
    its OpenMP workers keep spinning on the cores for a few milliseconds, and a thread that
    shares its core with one then simply takes fewer tasks instead of holding up the others.
    """
    threads = min(threads or torch.get_num_threads(), len(tasks))
    if threads < 2:
        for task in tasks:
            task()
        return
    global _pool, _pool_owner
    if _pool is None or _pool_owner[0] != os.getpid() or _pool_owner[1] < threads - 1:
        _pool = ThreadPoolExecutor(threads - 1, thread_name_prefix="soe-columns")
        _pool_owner = (os.getpid(), threads - 1)
    queue = iter(tasks)

    def work() -> None:
        for task in queue:  # the iterator is shared: each task goes to exactly one thread
            task()

    futures = [_pool.submit(work) for _ in range(threads - 1)]
    try:
        work()
    finally:  # never return while a helper still runs a task
        for future in futures:
            future.result()


def bind(base: Tensor, rows: Tensor) -> BoundCombination | None:
    """A `BoundCombination` of these CPU tensors, or None when the kernel cannot take them."""
    m, q = rows.shape
    if not (usable(rows, torch.float32) and base.device.type == "cpu" and base.dtype in _DTYPE_CODES
            and base.is_contiguous() and base.numel() == q and (q <= 1 or rows.stride(1) == 1)):
        return None
    return BoundCombination(base, rows)


def releasing_combination(base: Tensor | None, alpha: Tensor, rows: Tensor, out: Tensor,
                          mapping: tuple[int, int]) -> bool:
    """out = (base if given, else out itself) + Σ_i alpha[i]·rows[i] in one pass that hands back
    the pages of `base` and `rows` inside the file mapping `mapping` (its start and end addresses)
    as soon as they are read.

    For parameters too large to keep mapped: every row is read once, no page is faulted twice,
    and each row keeps only about one 2 MB granule mapped at a time. The rows (not the columns)
    are split across torch's threads, so more threads do not map more granules. Same shapes as
    `fused_combination`. Returns False, touching nothing, when the kernel cannot take these tensors.
    """
    m, q = rows.shape
    if not (usable(rows, out.dtype, out.device) and out.is_contiguous() and out.numel() == q and alpha.numel() == m
            and (q <= 1 or rows.stride(1) == 1)):
        return False
    if base is not None and not (base.device.type == "cpu" and base.dtype in _DTYPE_CODES and base.numel() == q
                                 and base.is_contiguous()):
        return False
    coefficients = _float32_coefficients(alpha)
    _merge_kernel.combine_release(out.data_ptr(), q, 0 if base is None else base.data_ptr(),
                                  0 if base is None else _DTYPE_CODES[base.dtype], rows.data_ptr(),
                                  _DTYPE_CODES[rows.dtype], rows.stride(0), m, coefficients.data_ptr(), *mapping,
                                  torch.get_num_threads())
    return True


def _float32_coefficients(alpha: Tensor) -> Tensor:
    """α as the kernel reads it: float32, contiguous, on the CPU, detached."""
    if alpha.dtype == torch.float32 and alpha.device.type == "cpu" and alpha.is_contiguous() and not alpha.requires_grad:
        return alpha
    return alpha.detach().to("cpu", torch.float32).contiguous()


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
    coefficients = _float32_coefficients(alpha)
    _combine(out.data_ptr(), q, 0 if base is None else base.data_ptr(), 0 if base is None else _DTYPE_CODES[base.dtype],
             rows.data_ptr(), _DTYPE_CODES[rows.dtype], rows.stride(0), m, coefficients.data_ptr())
    return True
