"""AdamW over a handful of large flat tensors, and the warmup + cosine learning-rate schedule.

torch.optim.AdamW cannot decay only a prefix of one flat tensor, and the soup keeps its
parameters flat (soe_sdk/flat.py): so the decoupled weight decay is applied here to the
matrix prefix, and the moment update runs through PyTorch's fused AdamW kernel (one pass
over memory instead of one per arithmetic operation).
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
        """One AdamW update: decay the matrix prefix, then PyTorch's fused Adam kernel (one pass)."""
        self.step_count += 1
        b1, b2 = self.betas
        for name, p in self.params.items():
            end = self.decay_end.get(name, 0)
            if self.weight_decay and end:
                p[..., :end].mul_(1 - lr * self.weight_decay)
            step = torch.tensor(float(self.step_count), device=p.device)
            torch._fused_adamw_([p], [grads[name]], [self.exp_avg[name]], [self.exp_avg_sq[name]], [], [step],
                                lr=lr, beta1=b1, beta2=b2, weight_decay=0.0, eps=self.eps, amsgrad=False,
                                maximize=False)

    def state_tensors(self) -> dict[str, Tensor]:
        out = {f"opt.m.{k}": v for k, v in self.exp_avg.items()}
        out.update({f"opt.v.{k}": v for k, v in self.exp_avg_sq.items()})
        return out

    def load_state_tensors(self, tensors: dict[str, Tensor], step_count: int) -> None:
        for name in self.params:
            self.exp_avg[name].copy_(tensors[f"opt.m.{name}"])
            self.exp_avg_sq[name].copy_(tensors[f"opt.v.{name}"])
        self.step_count = step_count
