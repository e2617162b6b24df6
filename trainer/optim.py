"""AdamW over a handful of large flat tensors, and the warmup + cosine learning-rate schedule.

torch.optim.AdamW cannot decay only a prefix of one flat tensor, and the soup keeps its
parameters flat (trainer/flat.py) — so the update is written out here, in place, with the
same arithmetic as the decoupled-weight-decay Adam of Loshchilov & Hutter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor


def lr_at(step: int, *, lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to `lr`, then cosine decay to `lr * min_ratio` at `total` steps."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class FlatAdamW:
    """Decoupled AdamW; each parameter decays on its last-axis prefix [0, decay_end)."""

    params: dict[str, Tensor]
    decay_end: dict[str, int]
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    step_count: int = 0
    exp_avg: dict[str, Tensor] = field(default_factory=dict)
    exp_avg_sq: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, p in self.params.items():
            self.exp_avg.setdefault(name, torch.zeros_like(p))
            self.exp_avg_sq.setdefault(name, torch.zeros_like(p))

    @torch.no_grad()
    def step(self, grads: dict[str, Tensor], lr: float) -> None:
        self.step_count += 1
        b1, b2 = self.betas
        bc1 = 1 - b1 ** self.step_count
        bc2 = 1 - b2 ** self.step_count
        for name, p in self.params.items():
            g = grads[name]
            m, v = self.exp_avg[name], self.exp_avg_sq[name]
            end = self.decay_end.get(name, 0)
            if self.weight_decay and end:
                p[..., :end].mul_(1 - lr * self.weight_decay)
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v / bc2).sqrt_().add_(self.eps)
            p.addcdiv_(m, denom, value=-lr / bc1)

    def state_tensors(self) -> dict[str, Tensor]:
        out = {f"opt.m.{k}": v for k, v in self.exp_avg.items()}
        out.update({f"opt.v.{k}": v for k, v in self.exp_avg_sq.items()})
        return out

    def load_state_tensors(self, tensors: dict[str, Tensor], step_count: int) -> None:
        for name in self.params:
            self.exp_avg[name].copy_(tensors[f"opt.m.{name}"])
            self.exp_avg_sq[name].copy_(tensors[f"opt.v.{name}"])
        self.step_count = step_count


def clip_grads_(grads: dict[str, Tensor], max_norm: float, extra_sq_norm: Tensor | None = None) -> float:
    """Scale gradients in place so their global L2 norm is at most `max_norm`; return the norm.

    `extra_sq_norm` adds squared norm held elsewhere (other ranks' slices under bank sharding).
    """
    sq = sum((g.float().pow(2).sum() for g in grads.values()), torch.zeros(()))
    if extra_sq_norm is not None:
        sq = sq + extra_sq_norm
    norm = float(sq.sqrt())
    if max_norm > 0 and norm > max_norm:
        for g in grads.values():
            g.mul_(max_norm / (norm + 1e-6))
    return norm
