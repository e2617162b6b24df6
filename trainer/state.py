"""The trainable soup: flat S and E, the router φ, and their AdamW state.

`SoupState.micro_step` is paper Algorithm 2's body for one micro-batch: α = φ(h),
Θ = S + αᵀE, one forward/backward through the merged model, and the soup gradients
recovered from ∇Θ in closed form (see trainer/flat.py). A state may hold only a slice
[lo, hi) of the flat vectors: that is how bank sharding splits the soup across ranks.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import Tensor

from soe_sdk.config import SoupConfig
from soe_sdk.model import next_token_loss
from soe_sdk.soup import ROUTER_NAMES, init_soup, router_forward

from soe_sdk.flat import FlatLayout
from .optim import FlatAdamW


class SoupState:
    """Parameters, gradients and optimizer of a (possibly sliced) dense soup on one device."""

    def __init__(self, config: SoupConfig, layout: FlatLayout, shared: Tensor, experts: Tensor,
                 router: dict[str, Tensor], *, lo: int = 0, hi: int | None = None,
                 betas: tuple[float, float] = (0.9, 0.95), weight_decay: float = 0.1) -> None:
        if config.expert_rank:
            raise NotImplementedError("low-rank experts are not trainable yet; use dense experts (rank 0)")
        self.config, self.layout = config, layout
        self.lo, self.hi = lo, layout.size if hi is None else hi
        self.shared, self.experts = shared, experts  # [hi-lo], [n, hi-lo]
        self.router = {k: v.requires_grad_(True) for k, v in router.items()}
        self.grads = {"S": torch.zeros_like(shared), "E": torch.zeros_like(experts)}
        decay_local = max(0, min(layout.decay_end, self.hi) - self.lo)
        params = {"S": shared, "E": experts}
        decay = {"S": decay_local, "E": decay_local}
        if self.n:
            params.update(self.router)
            decay.update({k: (v.shape[-1] if k.endswith("weight") else 0) for k, v in self.router.items()})
        self.optimizer = FlatAdamW(params, decay, betas=betas, weight_decay=weight_decay)

    @classmethod
    def fresh(cls, config: SoupConfig, seed: int, device: torch.device, **kwargs) -> "SoupState":
        tensors = init_soup(config, seed)
        layout = FlatLayout.for_model(config.model)
        shared = layout.flatten(tensors, "shared.").to(device)
        n = config.router.n
        experts = (layout.flatten(tensors, "experts.", (n,)) if n else torch.zeros(0, layout.size)).to(device)
        router = {k: tensors[k].float().to(device) for k in ROUTER_NAMES}
        return cls(config, layout, shared, experts, router, **kwargs)

    @property
    def n(self) -> int:
        return self.config.router.n

    def zero_grad(self) -> None:
        for g in self.grads.values():
            g.zero_()
        for p in self.router.values():
            p.grad = None

    def alpha(self, h: Tensor) -> Tensor:
        """α = φ(h), with autograd into the router."""
        if self.n == 0:
            return torch.zeros(0, device=self.shared.device)
        return router_forward(self.router, h.to(self.shared.device, torch.float32))

    def merge_local(self, alpha: Tensor) -> Tensor:
        """This state's slice of Θ = S + αᵀE."""
        if self.n == 0:
            return self.shared.clone()
        return torch.addmv(self.shared, self.experts.T, alpha.detach())

    def accumulate(self, alpha: Tensor, g_slice: Tensor) -> Tensor:
        """Add ∇S += g, ∇E += α gᵀ for this slice; return this slice's share of ∂ℓ/∂α = E g."""
        self.grads["S"].add_(g_slice)
        if self.n == 0:
            return torch.zeros(0, device=g_slice.device)
        self.grads["E"].addr_(alpha.detach(), g_slice)
        return self.experts @ g_slice

    def micro_step(self, h: Tensor, tokens: Tensor, scale: float,
                   gather: Callable[[Tensor], Tensor] | None = None,
                   scatter: Callable[[Tensor], Tensor] | None = None,
                   reduce_alpha: Callable[[Tensor], Tensor] | None = None,
                   autocast_dtype: torch.dtype | None = None) -> float:
        """One micro-batch of Algorithm 2; gradients (× scale) are accumulated. Returns the loss.

        `gather` turns the local Θ slice into the full Θ, `scatter` turns the full ∇Θ into
        this rank's (summed) slice, `reduce_alpha` sums ∂ℓ/∂α over ranks; all three are the
        identity in a single process.
        """
        alpha = self.alpha(h)
        theta_local = self.merge_local(alpha)
        theta = (gather(theta_local) if gather else theta_local).detach().requires_grad_(True)
        params = self.layout.views(theta)
        device_type = tokens.device.type
        ctx = torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
        with ctx:
            loss = next_token_loss(params, self.config.model, tokens)
        (loss * scale).backward()
        g_full = theta.grad
        g_slice = scatter(g_full) if scatter else g_full
        d_alpha = self.accumulate(alpha, g_slice)
        if self.n:
            if reduce_alpha:
                d_alpha = reduce_alpha(d_alpha)
            alpha.backward(d_alpha)
        return float(loss.detach())

    def grad_dict(self) -> dict[str, Tensor]:
        grads = {"S": self.grads["S"], "E": self.grads["E"]}
        if self.n:
            grads.update({k: (v.grad if v.grad is not None else torch.zeros_like(v)) for k, v in self.router.items()})
        return grads

    # -- (de)serialisation -------------------------------------------------------------------
    def tensors(self) -> dict[str, Tensor]:
        """Parameters and optimizer moments as flat tensors (for checkpoints)."""
        out = {"S": self.shared, "E": self.experts}
        out.update({k: v.detach() for k, v in self.router.items()})
        out.update(self.optimizer.state_tensors())
        return out

    def load_tensors(self, tensors: dict[str, Tensor], step_count: int) -> None:
        with torch.no_grad():
            self.shared.copy_(tensors["S"])
            self.experts.copy_(tensors["E"])
            for k, v in self.router.items():
                v.copy_(tensors[k])
        self.optimizer.load_state_tensors(tensors, step_count)

    def soup_tensors(self) -> dict[str, Tensor]:
        """Full (unsliced) soup tensors under archive names, for packing."""
        assert self.lo == 0 and self.hi == self.layout.size, "gather the shards before packing"
        out = {f"shared.{k}": v.detach().cpu() for k, v in self.layout.views(self.shared).items()}
        if self.n:
            out.update({f"experts.{k}": v.detach().cpu() for k, v in self.layout.views(self.experts).items()})
        out.update({k: v.detach().cpu() for k, v in self.router.items()})
        return out
