"""Where a soup's trainable numbers live in the trainer, low-rank experts (paper §2.6) included.

A soup trains as three flat tensors:
- S [p]: the shared parameters, ordered [low-rank matrices | dense-expert matrices | vectors];
- E [n, p − q]: the dense experts of the parameters in S's suffix [q, p);
- F [f]: the factors A [n, out, r] and B [n, in, r] of every low-rank matrix (none if rank 0).
With dense experts q = 0 and S's order is soe_sdk.flat.FlatLayout.for_model's. Only Θ's
low-rank prefix, Θ[:q] = S[:q] + Σ_j α_j A_j B_jᵀ, is formed with autograd: one backward of
it against ∇Θ[:q] gives ∇F and that prefix's share of ∂ℓ/∂α (trainer/state.py).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from soe_sdk.config import SoupConfig
from soe_sdk.flat import FlatLayout
from soe_sdk.soup import combine_parameter, is_low_rank


def _flat(entries: Sequence[tuple[str, tuple[int, ...]]], decayed: int) -> FlatLayout:
    """A FlatLayout of `entries` in this order; the first `decayed` of them get weight decay."""
    offsets, pos, decay_end = [], 0, 0
    for i, (_, shape) in enumerate(entries):
        offsets.append(pos)
        pos += int(torch.Size(shape).numel())
        if i < decayed:
            decay_end = pos
    return FlatLayout(tuple(n for n, _ in entries), tuple(s for _, s in entries), tuple(offsets), pos, decay_end)


@dataclass(frozen=True)
class SoupLayout:
    """The layouts of S, E and F for one soup configuration."""

    shared: FlatLayout
    experts: FlatLayout
    factors: FlatLayout
    lowrank: tuple[str, ...]  # parameters whose experts are A Bᵀ, in S's order

    @classmethod
    def for_soup(cls, config: SoupConfig) -> "SoupLayout":
        shapes = config.model.parameter_shapes()
        n, r = config.router.n, config.expert_rank
        lowrank = [k for k, s in shapes.items() if n and is_low_rank(config, s)]
        matrices = [(k, s) for k, s in shapes.items() if len(s) == 2 and k not in lowrank]
        vectors = [(k, s) for k, s in shapes.items() if len(s) != 2]
        factors = [(f"{k}.{side}", (n, shapes[k][axis], r)) for k in lowrank for side, axis in (("A", 0), ("B", 1))]
        return cls(shared=_flat([(k, shapes[k]) for k in lowrank] + matrices + vectors, len(lowrank) + len(matrices)),
                   experts=_flat(matrices + vectors, len(matrices)),
                   factors=_flat(factors, len(factors)),
                   lowrank=tuple(lowrank))

    @property
    def start(self) -> int:
        """q: where E's columns begin inside S."""
        return self.shared.size - self.experts.size

    def lowrank_theta(self, shared: Tensor, factors: Tensor, alpha: Tensor) -> Tensor:
        """Θ[:q] = S[:q] + Σ_j α_j A_j B_jᵀ, flat; differentiable in `factors` and `alpha`."""
        s, f = self.shared.views(shared), self.factors.views(factors)
        parts = [combine_parameter(s[k], (f[f"{k}.A"], f[f"{k}.B"]), alpha).reshape(-1) for k in self.lowrank]
        return torch.cat(parts) if parts else shared[:0]

    def archive_tensors(self, shared: Tensor, experts: Tensor | None, factors: Tensor | None) -> dict[str, Tensor]:
        """Full S, E, F as `shared.*` / `experts.*` tensors under their archive names (no router)."""
        out = {f"shared.{k}": v for k, v in self.shared.views(shared).items()}
        if experts is not None and experts.shape[0]:
            out.update({f"experts.{k}": v for k, v in self.experts.views(experts).items()})
        if self.lowrank and factors is not None:
            out.update({f"experts.{k}": v for k, v in self.factors.views(factors).items()})
        return out
