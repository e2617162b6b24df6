"""The Soup-of-Experts: shared parameters S, an expert bank E and the router MLP φ.

    α = φ(h) = W₂ · gelu(W₁ h + b₁) + b₂          (h: k domain weights, α: n coefficients)
    Θ = Combine(S, E, α) = S + Σ_j α_j E_j

α is the raw linear output of φ — unconstrained, so experts can be added or subtracted.

Initialisation (`init_soup`):
- S: the GPT-2 initialisation of a plain model (soe_sdk.model.init_parameters).
- E_j, dense: matrices N(0, 0.02/√n), vectors (biases, LayerNorm) 0 — Σ α_j E_j then starts at
  the scale of one GPT-2 weight times the RMS of α, and the LayerNorm gains start at S's.
- E_j, low-rank (rank r): every matrix W_j = A_j B_jᵀ with A_j ~ N(0, 0.02/√r), B_j = 0 (as in
  LoRA), so Θ = S at step 0 while every factor still receives a gradient.
- φ: PyTorch's default Linear init (uniform ±1/√fan_in) for both layers.

Storage in an archive: `shared.<param>` ([*shape]), `experts.<param>` ([n, *shape]) or, for
low-rank matrices, `experts.<param>.A` ([n, out, r]) and `experts.<param>.B` ([n, in, r]);
`router.fc1.weight` [hidden, k], `router.fc1.bias`, `router.fc2.weight` [n, hidden],
`router.fc2.bias`; `domains.centroids` [k, dim] and `domains.h_generic` [k].
"""
from __future__ import annotations

import hashlib
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .archive import Archive
from . import fused
from .config import EmbedderSpec, ModelConfig, RouterConfig, SoupConfig
from .errors import ArchiveError, SoeError
from .model import init_parameters

ROUTER_NAMES = ("router.fc1.weight", "router.fc1.bias", "router.fc2.weight", "router.fc2.bias")
MERGE_BLOCK_BYTES = 8 << 20  # working set of one block of a dense merge (about a CPU's last-level cache)
RELEASE_ROWS = 4  # expert rows read at once by a page-releasing merge without the fused kernel
# expert rows one pass of the page-releasing kernel reads at once: each keeps one 2 MB granule
# mapped, so a merge maps at most (this + 1) · 2 MB of the file whatever n is
STREAMED_ROWS = 32
MERGE_WINDOW_BYTES = 8 << 20  # output of the small parameters merged side by side (held until yielded)
MERGE_PLANS_KEPT = 8  # merge plans a Soup caches (one per set of kept experts and dtype), newest kept
VERIFY_CHUNK_BYTES = 4 << 20  # bytes hashed between two releases of a tensor's pages
LOW_MEMORY_ABOVE_BYTES = 1 << 30  # default for `low_memory`: release the pages of archives above this size
VERIFY_THREADS = max(1, min(2, os.cpu_count() or 1))  # SHA-256 is compute-bound: hash two tensors at once


def is_low_rank(config: SoupConfig, shape: Sequence[int]) -> bool:
    """Whether a parameter of this shape is stored as low-rank factors in this soup."""
    return config.expert_rank > 0 and len(shape) == 2 and config.expert_rank < min(shape)


def iter_init_soup(config: SoupConfig, seed: int = 0) -> Iterator[tuple[str, Tensor]]:
    """Fresh soup tensors under their archive names, one at a time (see the module docstring).

    Streaming lets a caller keep only part of each tensor (a bank-sharded trainer rank keeps
    its slice), so the whole soup never has to exist in one process."""
    gen = torch.Generator().manual_seed(seed)
    n, r = config.router.n, config.expert_rank
    for name, value in init_parameters(config.model, gen).items():
        yield f"shared.{name}", value
    if n > 0:
        for name, shape in config.model.parameter_shapes().items():
            if is_low_rank(config, shape):
                yield f"experts.{name}.A", torch.randn((n, shape[0], r), generator=gen) * (0.02 / math.sqrt(r))
                yield f"experts.{name}.B", torch.zeros((n, shape[1], r))
            elif len(shape) == 2:
                yield f"experts.{name}", torch.randn((n, *shape), generator=gen) * (0.02 / math.sqrt(n))
            else:
                yield f"experts.{name}", torch.zeros((n, *shape))
    k, hidden = config.router.k, config.router.hidden
    for prefix, fan_in, fan_out in (("router.fc1", k, hidden), ("router.fc2", hidden, max(n, 0))):
        bound = 1.0 / math.sqrt(fan_in)
        yield f"{prefix}.weight", (torch.rand((fan_out, fan_in), generator=gen) * 2 - 1) * bound
        yield f"{prefix}.bias", (torch.rand((fan_out,), generator=gen) * 2 - 1) * bound


def init_soup(config: SoupConfig, seed: int = 0) -> dict[str, Tensor]:
    """Fresh soup tensors under their archive names (see the module docstring)."""
    return dict(iter_init_soup(config, seed))


def router_forward(router: Mapping[str, Tensor], h: Tensor) -> Tensor:
    """α = φ(h) for h of shape [k] or [batch, k]."""
    hidden = F.gelu(F.linear(h, router["router.fc1.weight"], router["router.fc1.bias"]))
    return F.linear(hidden, router["router.fc2.weight"], router["router.fc2.bias"])


def combine_parameter(shared: Tensor, experts: Tensor | tuple[Tensor, Tensor] | None, alpha: Tensor) -> Tensor:
    """S + Σ_j α_j E_j for one parameter; differentiable in every argument.

    `experts` is the dense bank [n, *shape], a low-rank pair (A [n, out, r], B [n, in, r]),
    or None for n = 0. A low-rank sum is formed as [A_1 … A_n] · [α_1 B_1 … α_n B_n]ᵀ,
    never materialising an individual expert.
    """
    if experts is None or alpha.numel() == 0:
        return shared
    if isinstance(experts, tuple):
        a, b = experts
        n, out, r = a.shape
        a_cat = a.permute(1, 0, 2).reshape(out, n * r)
        b_cat = (b * alpha.to(b.dtype).view(n, 1, 1)).permute(1, 0, 2).reshape(b.shape[1], n * r)
        return shared + a_cat @ b_cat.T
    mixed = alpha.to(experts.dtype) @ experts.reshape(experts.shape[0], -1)
    return shared + mixed.view(shared.shape)


def add_combination(base: Tensor, alpha: Tensor, rows: Tensor, out: Tensor | None = None) -> Tensor:
    """base + Σ_i alpha[i]·rows[i] for rows [m, q] with contiguous rows (base, out: [q]).

    One [1, m] × [m, q] GEMM, which streams every row once; the GEMV over rowsᵀ that it
    replaces sweeps the whole output once per row and measured ~3× slower at q ≈ 1M, m = 16.
    `out` may be `base` itself (accumulate in place).
    """
    if out is base:
        return out.unsqueeze(0).addmm_(alpha.unsqueeze(0), rows).squeeze(0)
    target = None if out is None else out.unsqueeze(0)
    return torch.addmm(base.unsqueeze(0), alpha.unsqueeze(0), rows, out=target).squeeze(0)


def merge_dense(shared: Tensor, bank: Tensor, keep: Sequence[int], alpha: Tensor, *,
                dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                block_bytes: int = MERGE_BLOCK_BYTES, release: Callable[[Tensor], None] | None = None,
                mapping: tuple[int, int] | None = None, scratch: Tensor | None = None) -> Tensor:
    """S + Σ_i alpha[i]·bank[keep[i]] for one dense parameter, as a new tensor of `dtype` on `device`.

    Streams column blocks of the flattened parameter and reads only the `keep` rows of
    `bank`: consecutive rows on the CPU go straight from the (memory-mapped) bank into the
    combination (the fused kernel, which widens 16-bit rows as it reads them, else torch's GEMM
    when they already have `dtype`); where neither applies, consecutive rows are
    converted a block at a time into a buffer of about `block_bytes`; scattered rows are added one
    by one into the block, which stays in cache. With `release`, a parameter that spans several
    blocks is merged block by block, `release(view)` is called on each block of `shared` and
    of every kept row once used, and rows are then read RELEASE_ROWS at a time so that few of
    them are mapped at once. When `mapping` (the start and end addresses of a file mapping that
    holds `shared` and `bank`) is also given and the fused kernel can take the rows, the kernel
    merges such a parameter instead, in passes of STREAMED_ROWS rows, and hands its pages back itself.
    `scratch` (1-D, `dtype`, on `device`) is used as the conversion buffer when it is large
    enough, so a merge of many parameters allocates (and page-faults) it once.
    """
    device = torch.device(device)
    numel = shared.numel()
    flat_s = shared.reshape(numel)
    bank2d = bank.reshape(bank.shape[0], numel)
    out = torch.empty(shared.shape, dtype=dtype, device=device)
    flat_out = out.view(numel)
    keep = list(keep)
    count = len(keep)
    alpha = alpha.to(device, dtype)
    first = keep[0] if keep else 0
    consecutive = keep == list(range(first, first + count))
    # direct: rows go straight from the (mapped) bank into the combination, by the fused kernel
    # (which widens 16-bit rows as it reads them), or by torch's GEMM where the kernel cannot run
    direct = consecutive and device.type == "cpu" and bank.device.type == "cpu" and (
        (bank.dtype == dtype and shared.dtype == dtype) or fused.usable(bank, dtype, device))
    width = block_width(count, dtype, block_bytes)
    blocked = width < numel
    if direct and count and not (blocked and release is not None):  # one call, no slicing
        _combine_rows(flat_s, alpha, bank2d[first:first + count], flat_out)
        return out
    coefficients = alpha.tolist() if not consecutive else []
    buffer = None
    if count and consecutive and not direct:
        size = count * min(width, numel)
        usable = (scratch is not None and scratch.numel() >= size and scratch.dtype == dtype
                  and scratch.device == device)
        buffer = scratch if usable else torch.empty(size, dtype=dtype, device=device)
    # A large parameter hands back its pages once used. The OS maps page-cache folios (up to
    # 2 MB) whole. The fused kernel reads STREAMED_ROWS rows per pass over the parameter and
    # drops each granule once behind it (one granule per row mapped, none faulted twice);
    # without it, blocks of a few rows at a time are released (RELEASE_ROWS rows mapped).
    releasing = release is not None and blocked
    if releasing and direct and count and mapping is not None and all(
            fused.releasing_combination(flat_s if g == 0 else None, alpha[g:g + STREAMED_ROWS],
                                        bank2d[first + g:first + min(g + STREAMED_ROWS, count)], flat_out, mapping)
            for g in range(0, count, STREAMED_ROWS)):
        return out
    group = RELEASE_ROWS if releasing else max(count, 1)
    for lo in range(0, numel, width):
        hi = min(lo + width, numel)
        block = flat_out[lo:hi]
        if direct and count:  # row combinations straight from the bank rows
            for g in range(0, count, group):
                rows = bank2d[first + g:first + min(g + group, count), lo:hi]
                _combine_rows(flat_s[lo:hi] if g == 0 else None, alpha[g:g + group], rows, block)
                _release_rows(release if releasing else None, bank2d, range(first + g, first + g + rows.shape[0]),
                              lo, hi)
        elif buffer is not None:  # strided copies convert the block, then one combination
            rows = buffer[:count * (hi - lo)].view(count, hi - lo)
            for g in range(0, count, group):
                rows[g:g + group].copy_(bank2d[first + g:first + min(g + group, count), lo:hi])
                _release_rows(release if releasing else None, bank2d,
                              range(first + g, first + min(g + group, count)), lo, hi)
            block.copy_(flat_s[lo:hi])
            add_combination(block, alpha, rows, out=block)
        else:
            block.copy_(flat_s[lo:hi])
            for c, j in zip(coefficients, keep):
                block.add_(bank2d[j, lo:hi], alpha=c)
                _release_rows(release if releasing else None, bank2d, (j,), lo, hi)
        if releasing:
            release(flat_s[lo:hi])
    return out


def _combine_rows(base: Tensor | None, alpha: Tensor, rows: Tensor, out: Tensor) -> None:
    """out = (base, or out itself when None) + alpha @ rows.

    The fused kernel takes float32 and 16-bit rows alike (widening the latter as it reads them);
    torch's GEMM is the fallback where the kernel cannot run. For float32 rows on an AVX2 EPYC the
    kernel merged the 86 MB benchmark archive at 1.10–1.17× NumPy where the GEMM took 1.56–2.10×
    (benchmarks/README.md, 2026-12-03).
    """
    if fused.fused_combination(base, alpha, rows, out):
        return
    if rows.dtype == out.dtype and (base is None or base.dtype == out.dtype):
        add_combination(out if base is None else base, alpha, rows, out=out)
    else:
        base = out if base is None else base.to(out.dtype)
        add_combination(base, alpha.to(out.dtype), rows.to(out.dtype), out=out)


def _release_rows(release: Callable[[Tensor], None] | None, bank2d: Tensor, rows: Iterable[int],
                  lo: int, hi: int) -> None:
    if release is not None:
        for j in rows:
            release(bank2d[j, lo:hi])


def block_width(count: int, dtype: torch.dtype, block_bytes: int = MERGE_BLOCK_BYTES) -> int:
    """Columns per block of a dense merge over `count` experts computed in `dtype`.

    About `block_bytes` for all rows together, but no more than 512 KB per row (a block of
    the output should stay in a core's cache) and no less than 64 KB (fewer, larger calls).
    """
    itemsize = (torch.finfo(dtype) if dtype.is_floating_point else torch.iinfo(dtype)).bits // 8
    per_row = min(512 << 10, max(64 << 10, block_bytes // max(count, 1)))
    return max(1, min(per_row, block_bytes) // itemsize)


class _MappedPages:
    """Drops pages of one memory-mapped file from this process's resident set (Linux; else a no-op).

    Knows the file's mappings that exist when it is made: create it after the file is mapped.
    Only address ranges that /proc/self/maps shows as mappings of that very file are
    touched, and for a shared file mapping MADV_DONTNEED frees nothing but the page-table
    entries: the OS page cache keeps the data and the next read faults it back in. The
    kernel maps large page-cache folios (up to 2 MB) whole, so ranges are widened to 2 MB
    granules: a neighbour dropped too early only costs one more fault.
    """

    _DONTNEED = 4  # MADV_DONTNEED on Linux
    _GRANULE = 2 << 20
    SMALL_BYTES = 8 << 20  # small tensors are released together, once this much of them was read

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self._ranges: list[tuple[int, int]] = []
        self._madvise = None
        self._small = 0
        if not enabled or not sys.platform.startswith("linux"):
            return
        try:
            import ctypes

            st = os.stat(path)
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
            with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
                for line in maps:
                    fields = line.split()
                    if len(fields) < 5 or int(fields[4]) != st.st_ino:
                        continue
                    major, minor = (int(x, 16) for x in fields[3].split(":"))
                    if (major, minor) == (os.major(st.st_dev), os.minor(st.st_dev)):
                        begin, end = (int(x, 16) for x in fields[0].split("-"))
                        self._ranges.append((begin, end))
        except (OSError, ValueError, AttributeError):
            self._ranges = []
        if self._ranges:
            self._madvise = libc.madvise

    @property
    def active(self) -> bool:
        """False when releasing does nothing (disabled, not Linux, or the file is not mapped)."""
        return self._madvise is not None

    def small(self, nbytes: int) -> None:
        """Count a small tensor as read; release the whole file's pages every SMALL_BYTES of them."""
        self._small += nbytes
        if self._small >= self.SMALL_BYTES:
            self.release_all()

    def release_all(self) -> None:
        self._small = 0
        if self._madvise is not None:
            for begin, stop in self._ranges:
                self._madvise(begin, stop - begin, self._DONTNEED)

    def mapping_of(self, *views: Tensor) -> tuple[int, int] | None:
        """(start, end) address of the mapping of the file that holds all of `views`, or None."""
        if self._madvise is None or any(v.device.type != "cpu" or not v.is_contiguous() or not v.numel()
                                        for v in views):
            return None
        for begin, stop in self._ranges:
            if all(begin <= v.data_ptr() and v.data_ptr() + v.numel() * v.element_size() <= stop for v in views):
                return begin, stop
        return None

    def __call__(self, view: Tensor) -> None:
        mapping = self.mapping_of(view)
        if mapping is None:
            return
        begin, stop = mapping  # mappings are page-aligned, so the clamped range is too
        start = view.data_ptr()
        end = start + view.numel() * view.element_size()
        lo = max(begin, start // self._GRANULE * self._GRANULE)
        hi = min(stop, -(-end // self._GRANULE) * self._GRANULE)
        self._madvise(lo, hi - lo, self._DONTNEED)


@dataclass(frozen=True)
class _ParameterPlan:
    """How one parameter of Θ is merged for a given set of kept experts and dtype (made once).

    Planning does the per-parameter bookkeeping (views of the mapped file, block sizes,
    which path applies) so that a merge of many small parameters costs little more than
    its row combinations.
    """

    name: str
    shape: torch.Size
    inputs: tuple[str, ...]  # archive tensors this parameter reads (checked before it is yielded)
    read_bytes: int  # bytes of the file it touches when it fits in one block
    rows: Tensor | None  # [count, numel] view of the kept (consecutive) expert rows, when one block holds them
    shared: Tensor | None  # flat view of S, with `rows`
    same_dtype: bool  # `rows` and S already have the merge dtype: one combination straight from the file
    combine: fused.BoundCombination | None = None  # the fused kernel bound to `shared` and `rows`, when it applies


def _batches(plan: Sequence[_ParameterPlan]) -> Iterator[list[_ParameterPlan]]:
    """The plan in merge order: runs of kernel-bound parameters grouped into batches of at most
    MERGE_WINDOW_BYTES of output (so a streamed merge holds no more than that at once), every
    other parameter alone."""
    batch: list[_ParameterPlan] = []
    size = 0
    for p in plan:
        nbytes = p.rows.shape[1] * 4 if p.combine is not None else 0
        if batch and (p.combine is None or size + nbytes > MERGE_WINDOW_BYTES):
            yield batch
            batch, size = [], 0
        if p.combine is None:
            yield [p]
        else:
            batch.append(p)
            size += nbytes
    if batch:
        yield batch


def _merge_bound(batch: Sequence[_ParameterPlan], a_keep: Tensor, pages: _MappedPages) -> list[Tensor]:
    """Θ for parameters whose plans bound the fused kernel: one thread per parameter at a time (a
    parameter alone in its batch uses them all).

    Small parameters are each too small to split by columns, so a model of many small tensors
    would otherwise merge on one core."""
    outs = [torch.empty(p.rows.shape[1], dtype=torch.float32) for p in batch]
    if len(batch) == 1:  # alone (e.g. larger than the window): split by columns over every thread
        batch[0].combine(a_keep, outs[0])
    else:
        fused.combine_all([(p.combine, out) for p, out in zip(batch, outs)], a_keep)
    for p in batch:
        pages.small(p.read_bytes)
    return [out.view(p.shape) for p, out in zip(batch, outs)]


def as_domain_weights(h: Any, k: int) -> Tensor:
    """Validate domain weights: k non-negative finite numbers with a positive sum, renormalised."""
    t = torch.as_tensor(np.asarray(h, dtype=np.float64), dtype=torch.float32).flatten()
    if t.numel() != k:
        raise SoeError(f"domain weights have {t.numel()} entries but the soup has k={k} domains")
    if not torch.isfinite(t).all() or (t < 0).any() or float(t.sum()) <= 0:
        raise SoeError("domain weights must be finite, non-negative and not all zero")
    return t / t.sum()


class Soup:
    """A trained soup, read lazily from a `.soe` archive.

    `coefficients(h)` gives α = φ(h); `instantiate(α)` merges a plain model Θ, one
    parameter tensor at a time, reading only the experts whose |α_j| exceeds the tolerance.
    """

    def __init__(self, archive: Archive, device: str | torch.device | None = None, *,
                 low_memory: bool | None = None) -> None:
        self.archive = archive
        self.device = torch.device(device or "cpu")
        # Releasing pages keeps the resident set near Θ's size, but every later merge must map
        # them again, which measured ~2x slower than re-reading pages that stayed mapped.
        self.low_memory = (archive.path.stat().st_size > LOW_MEMORY_ABOVE_BYTES if low_memory is None
                           else bool(low_memory))
        meta = archive.metadata
        try:
            self.config = SoupConfig.from_dict(meta["soup_config"])
            self.embedder = EmbedderSpec.from_dict(meta["embedder"])
        except (KeyError, TypeError, SoeError, ValueError) as exc:
            raise SoeError(f"{archive.path}: corrupted archive (bad soup metadata: {exc})") from None
        self._check_tensor_set()
        self._check_tokenizer()
        self._verified: set[str] = set()  # tensors whose checksum this Soup has checked
        self._pages: _MappedPages | None = None
        self._views: dict[str, Tensor] = {}  # read-only views of the mapped file, made once
        self._plans: dict[tuple[tuple[int, ...], torch.dtype], list[_ParameterPlan]] = {}
        self._router = {name: archive.tensor(name).to(self.device, torch.float32) for name in ROUTER_NAMES}

    def _check_tensor_set(self) -> None:
        expected = set(ROUTER_NAMES) | {"domains.centroids", "domains.h_generic"}
        n, k = self.n, self.k
        for name, shape in self.config.model.parameter_shapes().items():
            expected.add(f"shared.{name}")
            if n:
                expected |= ({f"experts.{name}.A", f"experts.{name}.B"} if is_low_rank(self.config, shape)
                             else {f"experts.{name}"})
        present = set(self.archive.names())
        if present != expected:
            odd = sorted(expected ^ present)[0]
            raise SoeError(f"{self.archive.path}: corrupted archive (tensor {odd!r} is "
                           f"{'missing' if odd in expected else 'unexpected'})")
        hidden = self.config.router.hidden
        shapes = {"router.fc1.weight": (hidden, k), "router.fc1.bias": (hidden,),
                  "router.fc2.weight": (n, hidden), "router.fc2.bias": (n,), "domains.h_generic": (k,)}
        for name, shape in self.config.model.parameter_shapes().items():
            shapes[f"shared.{name}"] = shape
            if n and not is_low_rank(self.config, shape):
                shapes[f"experts.{name}"] = (n, *shape)
        for name, shape in shapes.items():
            if self.archive.shape(name) != tuple(shape):
                raise SoeError(f"{self.archive.path}: corrupted archive (tensor {name!r} has shape "
                               f"{list(self.archive.shape(name))}, expected {list(shape)})")
        if self.archive.shape("domains.centroids") != (k, self.embedder.dim):
            raise SoeError(f"{self.archive.path}: corrupted archive (centroids do not match k={k}, "
                           f"dim={self.embedder.dim})")

    def _check_tokenizer(self) -> None:
        """Parse the tokenizer now, so a bad one is an archive error at load, not a crash later."""
        from tokenizers import Tokenizer
        try:
            vocab = Tokenizer.from_str(self.archive.metadata["tokenizer"]).get_vocab_size()
        except Exception as exc:  # tokenizers raises its own exception types
            raise SoeError(f"{self.archive.path}: corrupted archive (the tokenizer does not load: "
                           f"{str(exc).splitlines()[0][:120]})") from None
        if vocab > self.config.model.vocab_size:
            raise SoeError(f"{self.archive.path}: corrupted archive (tokenizer has {vocab} tokens, model "
                           f"vocabulary {self.config.model.vocab_size})")

    # -- description -----------------------------------------------------------------------
    @property
    def model_config(self) -> ModelConfig:
        return self.config.model

    @property
    def n(self) -> int:
        return self.config.router.n

    @property
    def k(self) -> int:
        return self.config.router.k

    @property
    def metadata(self) -> dict[str, Any]:
        """Everything the archive says about itself (configs, embedder, provenance, checksums)."""
        return self.archive.metadata

    @property
    def tokenizer_json(self) -> str:
        return self.archive.metadata["tokenizer"]

    def tokenizer(self):
        """The soup's HF `tokenizers.Tokenizer`."""
        from tokenizers import Tokenizer
        return Tokenizer.from_str(self.tokenizer_json)

    @property
    def centroids(self) -> np.ndarray:
        return self.archive.tensor("domains.centroids").float().numpy()

    @property
    def h_generic(self) -> np.ndarray:
        return self.archive.tensor("domains.h_generic").double().numpy()

    def parameter_counts(self) -> dict[str, int]:
        """Instantiated model size, expert-bank size and router size, in parameters."""
        count = lambda names: sum(int(np.prod(self.archive.shape(x))) for x in names)  # noqa: E731
        names = self.archive.names()
        return {"instantiated": self.config.model.num_parameters(),
                "experts": count([x for x in names if x.startswith("experts.")]),
                "router": count(ROUTER_NAMES),
                "total": count([x for x in names if not x.startswith("domains.")])}

    # -- the two operations ------------------------------------------------------------------
    def router_params(self) -> dict[str, Tensor]:
        return dict(self._router)

    def coefficients(self, h: Any) -> Tensor:
        """α = φ(h) for domain weights h (k numbers, renormalised to sum to 1)."""
        with torch.no_grad():
            return router_forward(self._router, as_domain_weights(h, self.k).to(self.device))

    def expert_tensors(self, name: str, selected: Sequence[int] | None = None,
                       dtype: torch.dtype = torch.float32) -> Tensor | tuple[Tensor, Tensor] | None:
        """The bank for one parameter (only the `selected` experts), on this soup's device."""
        if self.n == 0:
            return None
        idx = list(range(self.n)) if selected is None else list(selected)
        load = lambda x: _take(self._read(x), idx).to(self.device, dtype)  # noqa: E731
        if f"experts.{name}" in self.archive:
            return load(f"experts.{name}")
        return load(f"experts.{name}.A"), load(f"experts.{name}.B")

    def shared_tensor(self, name: str, dtype: torch.dtype = torch.float32) -> Tensor:
        return self._read(f"shared.{name}").to(self.device, dtype)

    def instantiate(self, alpha: Any, tolerance: float = 0.0, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """Θ = S + Σ_j α_j E_j as a plain name → tensor mapping (a stand-alone model).

        Experts with |α_j| ≤ tolerance are never read. With a tolerance > 0 the skipped
        experts change each parameter by at most Σ_skipped |α_j|·max|E_j|;
        `skipped_error_bound(α, tolerance)` reports that bound. Θ owns its memory (it is
        never a view of the archive file).
        """
        a = self._alpha(alpha)
        keep = [j for j in range(self.n) if abs(float(a[j])) > tolerance]
        a_keep = a[keep].to(self.device, dtype)
        return dict(self.iter_instantiate(a_keep, keep, dtype))

    def iter_instantiate(self, a_keep: Tensor, keep: Sequence[int],
                         dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, Tensor]]:
        """Yield (name, Θ[name]) one parameter at a time: the merge never holds the whole bank.

        Each tensor is streamed from the memory-mapped archive in blocks; with `low_memory`
        their pages are released once used, so the resident memory stays near Θ's size.
        Tensors read for the first time are SHA-256-checked by helper threads while
        parameters merge; a parameter is yielded only after its inputs passed the check.
        """
        keep = list(keep)
        a_keep = a_keep.to(self.device, dtype)
        plan = self._plan(keep, dtype)
        pending = [x for p in plan for x in p.inputs if x not in self._verified]
        pool = ThreadPoolExecutor(VERIFY_THREADS, thread_name_prefix="soe-verify") if pending else None
        # one conversion buffer for the whole merge (untouched, so free, when nothing needs converting)
        scratch = torch.empty(MERGE_BLOCK_BYTES // _itemsize(dtype), dtype=dtype, device=self.device)
        checks: dict[str, Future] = {x: pool.submit(self._verify, x) for x in pending} if pool else {}
        pages = self._release_pages()
        try:
            with torch.no_grad():
                for batch in _batches(plan):
                    if batch[0].combine is not None:  # small parameters, merged side by side
                        thetas = _merge_bound(batch, a_keep, pages)
                    else:
                        thetas = [self._merge(batch[0], a_keep, keep, dtype, scratch, pages)]
                    for p, theta in zip(batch, thetas):
                        for x in p.inputs:
                            if x in checks:
                                checks[x].result()  # re-raises a checksum mismatch
                        yield p.name, theta
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            pages.release_all()

    def _plan(self, keep: list[int], dtype: torch.dtype) -> list[_ParameterPlan]:
        """The per-parameter merge plan for these kept experts and dtype (cached: α changes, plans do not)."""
        key = (tuple(keep), dtype, fused.available())  # a plan made with the kernel binds it; one without does not
        plan = self._plans.pop(key, None)
        if plan is None:
            plan = [self._plan_parameter(name, shape, keep, dtype)
                    for name, shape in self.config.model.parameter_shapes().items()]
        self._plans[key] = plan  # re-inserted: the dict's order is least recently used first
        while len(self._plans) > MERGE_PLANS_KEPT:  # tolerances can make many keep-sets: stay small
            del self._plans[next(iter(self._plans))]
        return plan

    def _plan_parameter(self, name: str, shape: tuple[int, ...], keep: list[int],
                        dtype: torch.dtype) -> _ParameterPlan:
        inputs = tuple(self._input_names(name, keep))
        dense = f"experts.{name}"
        rows = flat_s = None
        same = False
        read = 0
        consecutive = bool(keep) and keep == list(range(keep[0], keep[0] + len(keep)))
        if consecutive and dense in self.archive and self.device.type == "cpu":
            shared = self._view(f"shared.{name}")
            numel = shared.numel()
            if numel <= block_width(len(keep), dtype):  # fits one block: merged in one or two calls
                bank = self._view(dense)
                rows = bank.reshape(bank.shape[0], numel)[keep[0]:keep[-1] + 1]
                flat_s = shared.reshape(numel)
                same = rows.dtype == dtype and flat_s.dtype == dtype
                if not same and not fused.usable(rows, dtype, self.device) \
                        and rows.numel() * _itemsize(dtype) > MERGE_BLOCK_BYTES:
                    rows = flat_s = None  # more rows than the scratch buffer holds: the blocked path
                else:
                    read = flat_s.numel() * flat_s.element_size() + rows.numel() * rows.element_size()
        # the kernel, for 16-bit rows (widened as they are read) and float32 ones alike: torch's GEMM was
        # faster for float32 on one Intel VM but 1.5–2× NumPy on an AMD one, the kernel ≤ 1.5× on both
        # (benchmarks/README.md)
        combine = fused.bind(flat_s, rows) if rows is not None and dtype == torch.float32 else None
        return _ParameterPlan(name, torch.Size(shape), inputs, read, rows, flat_s, same, combine)

    def _input_names(self, name: str, keep: Sequence[int]) -> list[str]:
        names = [f"shared.{name}"]
        if keep:
            dense = f"experts.{name}"
            names += [dense] if dense in self.archive else [f"{dense}.A", f"{dense}.B"]
        return names

    def _merge(self, plan: _ParameterPlan, a_keep: Tensor, keep: list[int], dtype: torch.dtype, scratch: Tensor,
               pages: _MappedPages) -> Tensor:
        if plan.rows is not None:  # one block of consecutive experts on the CPU, without the kernel
            if plan.same_dtype:  # one combination straight from the file
                theta = add_combination(plan.shared, a_keep, plan.rows)
            else:  # convert the rows into the scratch buffer (in cache), then one combination
                count, numel = plan.rows.shape
                rows = scratch[:count * numel].view(count, numel)
                rows.copy_(plan.rows)
                theta = torch.empty(numel, dtype=dtype)
                theta.copy_(plan.shared)
                add_combination(theta, a_keep, rows, out=theta)
            pages.small(plan.read_bytes)
            return theta.view(plan.shape)
        name = plan.name
        shared = self._view(f"shared.{name}")
        if keep and f"experts.{name}" in self.archive:
            bank = self._view(f"experts.{name}")
            theta = merge_dense(shared, bank, keep, a_keep, dtype=dtype, device=self.device,
                                release=pages if pages.active else None, mapping=pages.mapping_of(shared, bank),
                                scratch=scratch)
            if shared.numel() > block_width(len(keep), dtype):
                return theta  # its pages were released block by block
            read = [shared, bank[keep[0]:keep[-1] + 1]]
        elif keep:  # low-rank factors are small: merge them whole
            a, b = (_take(self._view(f"experts.{name}.{x}"), keep) for x in ("A", "B"))
            factors = (a.to(self.device, dtype), b.to(self.device, dtype))
            theta = combine_parameter(shared.to(self.device, dtype), factors, a_keep).contiguous()
            read = [shared, a, b]
        else:
            theta, read = shared.to(self.device, dtype, copy=True), [shared]
        pages.small(sum(t.numel() * t.element_size() for t in read))
        return theta

    def _release_pages(self) -> _MappedPages:
        if self._pages is None:
            self._pages = _MappedPages(self.archive.path, enabled=self.low_memory and self.device.type == "cpu")
        return self._pages

    def _verify(self, name: str) -> None:
        """Check one tensor's SHA-256 against the archive's metadata, streaming (once per Soup)."""
        if name in self._verified:
            return
        raw_view = self._view(name).reshape(-1).view(torch.uint8)
        raw = raw_view.numpy()
        release = self._release_pages()
        digest = hashlib.sha256()
        for lo in range(0, raw.size, VERIFY_CHUNK_BYTES):
            digest.update(raw[lo:lo + VERIFY_CHUNK_BYTES])
            if raw.size > VERIFY_CHUNK_BYTES:
                release(raw_view[lo:lo + VERIFY_CHUNK_BYTES])
        if raw.size <= VERIFY_CHUNK_BYTES:
            release.small(raw.size)
        if digest.hexdigest() != self.archive.metadata["checksums"][name]:
            raise ArchiveError(f"{self.archive.path}: corrupted archive (checksum mismatch in tensor {name!r})")
        self._verified.add(name)

    def _read(self, name: str) -> Tensor:
        """A verified, read-only view of one archive tensor."""
        self._verify(name)
        return self._view(name)

    def _view(self, name: str) -> Tensor:
        """A read-only view of one archive tensor, not checked here (see `_verify`)."""
        view = self._views.get(name)
        if view is None:
            view = self._views[name] = self.archive.tensor(name, verify=False)
        return view

    def skipped_error_bound(self, alpha: Any, tolerance: float) -> float:
        """Upper bound on max |ΔΘ| from skipping the experts with |α_j| ≤ tolerance."""
        a = self._alpha(alpha)
        bound = 0.0
        for j in range(self.n):
            if 0 < abs(float(a[j])) <= tolerance:
                largest = 0.0
                for name, shape in self.config.model.parameter_shapes().items():
                    bank = self.expert_tensors(name, [j])
                    if isinstance(bank, tuple):
                        largest = max(largest, float((bank[0][0] @ bank[1][0].T).abs().max()))
                    elif bank is not None:
                        largest = max(largest, float(bank.abs().max()))
                bound += abs(float(a[j])) * largest
        return bound

    def _alpha(self, alpha: Any) -> Tensor:
        a = torch.as_tensor(alpha, dtype=torch.float32).flatten().cpu()
        if a.numel() != self.n:
            raise SoeError(f"α has {a.numel()} entries but the soup has n={self.n} experts")
        if not torch.isfinite(a).all():
            raise SoeError("α contains NaN or infinite values")
        return a


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _take(bank: Tensor, idx: list[int]) -> Tensor:
    """Rows `idx` of a memory-mapped bank; consecutive rows stay a zero-copy view."""
    if idx and idx == list(range(idx[0], idx[0] + len(idx))):
        return bank[idx[0]:idx[0] + len(idx)]
    return bank[idx]


def load(path: str | Path, device: str | torch.device | None = None, *, low_memory: bool | None = None) -> Soup:
    """Open a `.soe` archive lazily on `device` ("cpu", "cuda", ...).

    `low_memory=True` hands the archive's pages back to the OS as a merge streams through
    them, so the resident memory of `instantiate` stays near the size of Θ instead of
    growing to the size of the file; later merges then run about 2x slower. The default
    (None) turns it on for archives larger than 1 GiB.
    """
    if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
        raise SoeError(f"device {device!r} requested but CUDA is not available; use device='cpu'")
    return Soup(Archive(path), device, low_memory=low_memory)


def write_soup(path: str | Path, tensors: Mapping[str, Tensor], config: SoupConfig, *,
               centroids: np.ndarray | Tensor, h_generic: np.ndarray | Tensor, embedder: EmbedderSpec,
               tokenizer_json: str, provenance: Mapping[str, Any] | None = None,
               storage_dtype: torch.dtype = torch.float32) -> str:
    """Pack soup tensors (names as in `init_soup`) and their context into one `.soe` file.

    S and E are stored in `storage_dtype` (fp16/bf16 halve the file; loading computes in
    fp32); φ, centroids and h_generic stay fp32. Returns the archive's SHA-256.
    """
    from tokenizers import Tokenizer

    from . import __version__
    from .archive import write_archive

    vocab = Tokenizer.from_str(tokenizer_json).get_vocab_size()
    if vocab > config.model.vocab_size:
        raise SoeError(f"{path}: the tokenizer has {vocab} tokens but the model's vocabulary is "
                       f"{config.model.vocab_size}")

    def ordered() -> Iterator[tuple[str, Tensor]]:
        for name in config.model.parameter_shapes():
            yield f"shared.{name}", tensors[f"shared.{name}"].to(storage_dtype)
        for name in config.model.parameter_shapes():
            for key in (f"experts.{name}", f"experts.{name}.A", f"experts.{name}.B"):
                if key in tensors:
                    yield key, tensors[key].to(storage_dtype)
        for key in ROUTER_NAMES:
            yield key, tensors[key].float()
        yield "domains.centroids", torch.as_tensor(np.asarray(centroids), dtype=torch.float32)
        yield "domains.h_generic", torch.as_tensor(np.asarray(h_generic), dtype=torch.float32)

    metadata = {"soup_config": config.to_dict(), "embedder": embedder.to_dict(), "tokenizer": tokenizer_json,
                "provenance": dict(provenance or {}), "sdk_version": __version__,
                "storage_dtype": str(storage_dtype).replace("torch.", "")}
    return write_archive(path, ordered(), metadata)
