"""AdamW over a handful of large flat tensors, and the warmup + cosine learning-rate schedule.

torch.optim.AdamW cannot decay only a prefix of one flat tensor, and the soup keeps its
parameters flat (soe_sdk/flat.py): so each tensor is updated as two views, the matrix prefix
with decoupled weight decay and the rest without, both through PyTorch's fused AdamW kernel
(one pass over memory instead of one per arithmetic operation).

The expert bank's gradient is never materialised: it is Σ_m α_m ⊗ g_m over the step's
micro-batches (`ExpertGrad`). With the compiled kernel (trainer/fused_adamw.py) each row's
gradient is formed a cache-sized block at a time inside the pass that updates the row, and that
pass can also merge the next step's Θ; without it, each row is formed in a buffer just before
torch's update. Either way no [n, p] buffer exists.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import fused_adamw

NextMerge = tuple[Tensor, Tensor, Tensor]  # (base [q], α' [n], out [q]): out = base + α'ᵀE after the update


def lr_at(step: int, *, lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to `lr`, then cosine decay to `lr * min_ratio` at `total` steps."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@contextmanager
def _widened(t: Tensor, dtype: torch.dtype) -> Iterator[Tensor]:
    """`t` itself when it has `dtype`, else a copy in `dtype` that is rounded back into `t` on exit."""
    if t.dtype == dtype:
        yield t
        return
    wide = t.to(dtype)
    yield wide
    t.copy_(wide)


@dataclass
class ExpertGrad:
    """∇E = Σ_m α_m ⊗ g_m: one (α [n], ∇Θ [q]) pair per micro-batch, kept instead of the [n, q] sum."""

    alphas: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    scale: float = 1.0

    def add(self, alpha: Tensor, grad: Tensor) -> None:
        self.alphas.append(alpha.detach().reshape(-1))
        self.grads.append(grad.detach().reshape(-1))

    def clear(self) -> None:
        self.alphas.clear()
        self.grads.clear()
        self.scale = 1.0

    def gather(self, all_gather_rows: Callable[[Tensor], Tensor]) -> None:
        """Replace the pairs by every rank's pairs (data-parallel ranks hold different micro-batches)."""
        if self.grads:
            self.alphas = list(all_gather_rows(torch.stack(self.alphas)).unbind(0))
            self.grads = list(all_gather_rows(torch.stack(self.grads)).unbind(0))

    def stacked(self) -> tuple[Tensor, Tensor]:
        """(A [M, n] including the scale, G [M, q]); a single micro-batch's G is a view, not a copy."""
        grads = self.grads[0].unsqueeze(0) if len(self.grads) == 1 else torch.stack(self.grads)
        return torch.stack(self.alphas) * self.scale, grads

    def sq_norm(self) -> float:
        """‖∇E‖² = Σ_j A[:, j]ᵀ (G Gᵀ) A[:, j], from the M × M Gram matrix of the micro-batch gradients."""
        if not self.grads:
            return 0.0
        a, g = self.stacked()
        gram = (g @ g.T).double()
        return float((a.double() * (gram @ a.double())).sum())

    def rows(self, out: Tensor) -> Iterator[Tensor]:
        """∇E_0, ∇E_1, … in turn, each Σ_m A[m, j] g_m written into the same buffer `out`."""
        if not self.grads:  # n = 0, or no micro-batch: nothing to update
            return
        a, g = self.stacked()  # once per step, not once per row
        for j in range(a.shape[1]):
            # [1, M] × [M, q] streams G once (a GEMV over Gᵀ would sweep `out` once per micro-batch)
            yield torch.mul(g[0], a[0, j], out=out) if a.shape[0] == 1 else \
                torch.mm(a[:, j].unsqueeze(0), g, out=out.unsqueeze(0)).squeeze(0)

    def dense(self, n: int, q: int) -> Tensor:
        """The materialised [n, q] gradient (for tests and inspection)."""
        if not self.grads:
            return torch.zeros(n, q)
        a, g = self.stacked()
        return a.T @ g


@dataclass
class FlatAdamW:
    """Decoupled AdamW; each parameter decays on its last-axis prefix [0, decay_end)."""

    params: dict[str, Tensor]
    decay_end: dict[str, int]
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    lr_scale: dict[str, float] = field(default_factory=dict)  # per parameter name; 1.0 when absent
    decay_scale: dict[str, float] = field(default_factory=dict)  # × weight_decay per parameter name; 1.0 when absent
    # storage dtype of a parameter's moments (float32 when absent); bfloat16 ones are updated in float32
    moment_dtype: dict[str, torch.dtype] = field(default_factory=dict)
    # name → (source, column): that parameter's rows are preconditioned by the source's second
    # moment from that column on (an expert's gradient α_j·∇Θ over √v of ∇S = ∇Θ), not their own
    shared_moments: dict[str, tuple[str, int]] = field(default_factory=dict)
    # names whose rows, with shared moments, learn from g − m̂ (m̂: the source's bias-corrected first
    # moment): Σ_m α_mj (g_m − m̂) drops the running-mean gradient every micro-batch shares, which
    # α's sampling noise would otherwise spread over the experts with random signs
    centred_gradients: frozenset[str] = frozenset()
    # β₁ of a shared-moment parameter's own momentum (betas[0] when absent): experts whose gradient is
    # mostly batch noise average it over more steps (1 / (1 − β₁)) before it moves them
    beta1_of: dict[str, float] = field(default_factory=dict)
    step_count: int = 0
    exp_avg: dict[str, Tensor] = field(default_factory=dict)
    exp_avg_sq: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, p in self.params.items():
            dtype = self.moment_dtype.get(name, p.dtype)
            self.exp_avg.setdefault(name, torch.zeros_like(p, dtype=dtype))
            self.exp_avg_sq.setdefault(name, torch.zeros_like(p, dtype=dtype))

    @torch.no_grad()
    def step(self, grads: dict[str, Tensor | ExpertGrad], lr: float,
             next_merge: Callable[[], NextMerge | None] | None = None) -> bool:
        """One AdamW update; an `ExpertGrad` is applied after every other parameter, in one pass with
        the compiled kernel, else one expert row at a time.

        `next_merge` is called once the other parameters are updated (so it may use the new S and φ);
        when it returns (base, α', out), the kernel's pass over the bank also writes
        out = base + α'ᵀE_new. Returns whether it did (only the kernel does, for a single `ExpertGrad`
        with its own moments).
        """
        self.step_count += 1
        step = torch.tensor(float(self.step_count))
        experts = [name for name in self.params if isinstance(grads[name], ExpertGrad)]
        merged = False
        for name in [name for name in self.params if name not in experts] + experts:
            p, grad, end = self.params[name], grads[name], self.decay_end.get(name, 0)
            lr_p = lr * self.lr_scale.get(name, 1.0)
            decay = self.weight_decay * self.decay_scale.get(name, 1.0)
            m, v = self.exp_avg[name], self.exp_avg_sq[name]
            if not isinstance(grad, ExpertGrad):
                self._update(p, grad, m, v, end, lr_p, decay, step)
                continue
            if name not in self.shared_moments and grad.grads and fused_adamw.available() and p.device.type == "cpu":
                merge = next_merge() if next_merge is not None and len(experts) == 1 else None
                a, g = grad.stacked()
                if fused_adamw.update_rows(p, m, v, a, g, lr=lr_p, betas=self.betas, eps=self.eps,
                                           weight_decay=decay, decay_end=end, step=self.step_count,
                                           merge=merge):
                    merged = merge is not None
                    continue
            buffer = torch.empty(p.shape[-1], dtype=p.dtype, device=p.device)
            denom = self._shared_denominator(name, p.shape[-1])
            mean, weights = self._shared_mean(name, grad, p.shape[-1])
            b1 = self.beta1_of.get(name, self.betas[0])
            for j, row in enumerate(grad.rows(buffer)):
                if denom is None:
                    self._update(p[j], row, m[j], v[j], end, lr_p, decay, step)
                else:
                    if mean is not None:
                        row.sub_(mean, alpha=weights[j])
                    self._update_shared(p[j], row, m[j], denom, end, lr_p, decay, b1)
        return merged

    def _update(self, p: Tensor, grad: Tensor, m: Tensor, v: Tensor, end: int, lr: float, weight_decay: float,
                step: Tensor) -> None:
        if p.dim() > 1 and 0 < end < p.shape[-1]:  # prefix views of rows are only contiguous one row at a time
            for row in zip(p.flatten(0, -2), grad.flatten(0, -2), m.flatten(0, -2), v.flatten(0, -2)):
                self._update(*row, end, lr, weight_decay, step)
            return
        b1, b2 = self.betas
        step = step.to(p.device)
        with _widened(m, p.dtype) as m_w, _widened(v, p.dtype) as v_w:  # torch's kernel wants the param's dtype
            for sl, decay in ((slice(0, end), weight_decay), (slice(end, None), 0.0)):
                if p[..., sl].numel() == 0:
                    continue
                torch._fused_adamw_([p[..., sl]], [grad[..., sl]], [m_w[..., sl]], [v_w[..., sl]], [], [step],
                                    lr=lr, beta1=b1, beta2=b2, weight_decay=decay, eps=self.eps, amsgrad=False,
                                    maximize=False)

    def _shared_denominator(self, name: str, width: int) -> Tensor | None:
        """√v̂ + ε of the source parameter (already updated this step: S comes before E)."""
        if name not in self.shared_moments:
            return None
        source, column = self.shared_moments[name]
        v = self.exp_avg_sq[source][column:column + width].float()
        return (v / (1 - self.betas[1] ** self.step_count)).sqrt_().add_(self.eps)

    def _shared_mean(self, name: str, grad: ExpertGrad, width: int) -> tuple[Tensor | None, list[float]]:
        """(m̂ of the source over this parameter's columns, mean_m α_mj per row), when its gradients are centred."""
        if name not in self.centred_gradients or name not in self.shared_moments or not grad.grads:
            return None, []
        source, column = self.shared_moments[name]
        mean = self.exp_avg[source][column:column + width].float() / (1 - self.betas[0] ** self.step_count)
        # ∇S is the sum of the M micro-batches' (pre-scaled, clipped) gradients, so m̂/M is one micro-batch's
        # share: Σ_m α_mj (g_m − m̂/M) = row_j − mean_m(α_mj)·m̂
        return mean, torch.stack(grad.alphas).mean(0).tolist()

    def _update_shared(self, p: Tensor, grad: Tensor, m: Tensor, denom: Tensor, end: int, lr: float,
                       weight_decay: float, b1: float) -> None:
        with _widened(m, p.dtype) as m_w:
            m_w.lerp_(grad, 1 - b1)
            if end:
                p[:end].mul_(1 - lr * weight_decay)
            p.addcdiv_(m_w, denom, value=-lr / (1 - b1 ** self.step_count))

    def state_tensors(self) -> dict[str, Tensor]:
        out = {f"opt.m.{k}": v for k, v in self.exp_avg.items()}
        out.update({f"opt.v.{k}": v for k, v in self.exp_avg_sq.items()})
        return out

    def load_state_tensors(self, tensors: dict[str, Tensor], step_count: int) -> None:
        for name in self.params:
            self.exp_avg[name].copy_(tensors[f"opt.m.{name}"])
            self.exp_avg_sq[name].copy_(tensors[f"opt.v.{name}"])
        self.step_count = step_count
