"""Running under torchrun: process-group setup and the two ways to split a soup over ranks.

- ddp: every rank holds the whole soup and takes every world-th micro-batch; summed
  gradients ((n+1)·p floats, plus low-rank factors and φ) are all-reduced once per step.
  Fine while 4·(n+1)·p floats (parameters, gradients, two AdamW moments) fit on one device.
- bank: every rank owns the same 1/N slice of the flat S and of every expert (and their
  AdamW moments). Per micro-batch (all ranks share its h and split its rows):
  local merge → all-gather Θ → forward/backward on local rows → reduce-scatter ∇Θ →
  ∇E_slice = α ⊗ ∇Θ_slice, and the n numbers ∂ℓ/∂α = Σ_ranks E_slice ∇Θ_slice are
  all-reduced. Traffic per micro-batch ≈ one all-gather + one reduce-scatter of p floats
  (the cost of one all-reduce of a plain model's gradient) whatever n is; memory ≈
  4·(n+1)·p/N floats per rank plus a full Θ and ∇Θ. Dense experts only: low-rank soups
  (--rank) are refused. See docs/scaling.md.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class Traffic:
    """Bytes this rank handed to each kind of collective: the tensors' logical sizes.

    On the wire a ring all-gather or reduce-scatter moves (N−1)/N of that per rank and a
    ring all-reduce 2(N−1)/N. Read by benchmarks/scaling.py; `reset()` starts a new count.
    """

    all_gather: int = 0
    reduce_scatter: int = 0
    all_reduce: int = 0
    calls: int = 0

    def add(self, kind: str, tensor: Tensor) -> None:
        setattr(self, kind, getattr(self, kind) + tensor.numel() * tensor.element_size())
        self.calls += 1

    def reset(self) -> None:
        self.all_gather = self.reduce_scatter = self.all_reduce = self.calls = 0


TRAFFIC = Traffic()


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def setup(device: str | None = None, timeout_s: float = 300.0) -> DistContext:
    """Join the torchrun process group if launched by torchrun (NCCL on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        # A bounded timeout: a dead rank makes the others fail instead of hanging forever.
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistContext(rank, world, dev)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def padded_size(p: int, world: int) -> int:
    return -(-p // world) * world


def slice_bounds(p: int, ctx: DistContext) -> tuple[int, int]:
    """[lo, hi) of this rank's slice of a flat vector padded to a multiple of the world size."""
    per = padded_size(p, ctx.world) // ctx.world
    return ctx.rank * per, (ctx.rank + 1) * per


def pad_to(flat: Tensor, size: int) -> Tensor:
    if flat.shape[-1] == size:
        return flat
    pad = torch.zeros(*flat.shape[:-1], size - flat.shape[-1], dtype=flat.dtype, device=flat.device)
    return torch.cat([flat, pad], dim=-1)


def all_gather_flat(local: Tensor, p: int, ctx: DistContext) -> Tensor:
    """Concatenate every rank's slice; drop the padding."""
    out = torch.empty(local.numel() * ctx.world, dtype=local.dtype, device=local.device)
    dist.all_gather_into_tensor(out, local.contiguous())
    TRAFFIC.add("all_gather", out)
    return out[:p]


def reduce_scatter_flat(full: Tensor, ctx: DistContext) -> Tensor:
    """Sum `full` over ranks and keep this rank's slice."""
    size = padded_size(full.numel(), ctx.world)
    padded = pad_to(full, size).contiguous()
    out = torch.empty(size // ctx.world, dtype=full.dtype, device=full.device)
    dist.reduce_scatter_tensor(out, padded, op=dist.ReduceOp.SUM)
    TRAFFIC.add("reduce_scatter", padded)
    return out


def all_gather_rows(t: Tensor) -> Tensor:
    """Stack every rank's rows ([rows, ...] each, same shape on all ranks) in rank order."""
    t = t.contiguous()
    out = torch.empty(t.shape[0] * dist.get_world_size(), *t.shape[1:], dtype=t.dtype, device=t.device)
    dist.all_gather_into_tensor(out, t)
    TRAFFIC.add("all_gather", out)
    return out


def all_reduce_sum(t: Tensor) -> Tensor:
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    TRAFFIC.add("all_reduce", t)
    return t


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
