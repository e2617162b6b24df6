"""The trainer's view of a soup: S as one flat vector [p], the dense bank E as one matrix [n, p].

Flat storage turns the soup's extra work into a few large BLAS calls per micro-batch:

    Θ = S + αᵀE              (merge, one GEMV)
    ∇S += g,  ∇E += α gᵀ     (rank-1 update)
    ∂ℓ/∂α = E g              (one GEMV; then backprop through the router φ)

where g = ∇_Θ ℓ comes from one ordinary backward pass through the merged model, instead
of autograd building n per-expert graphs. Matrices are laid out first so weight decay
applies to the prefix [0, decay_end) only. A contiguous slice of the flat vector is also
the unit of bank sharding (see trainer/distributed.py).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import ModelConfig


@dataclass(frozen=True)
class FlatLayout:
    """Where each model parameter lives inside the flat vector."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    size: int
    decay_end: int  # parameters [0, decay_end) are matrices and get weight decay

    @classmethod
    def for_model(cls, config: ModelConfig) -> "FlatLayout":
        shapes = config.parameter_shapes()
        ordered = [n for n, s in shapes.items() if len(s) == 2] + [n for n, s in shapes.items() if len(s) != 2]
        offsets, pos, decay_end = [], 0, 0
        for name in ordered:
            offsets.append(pos)
            pos += _numel(shapes[name])
            if len(shapes[name]) == 2:
                decay_end = pos
        return cls(tuple(ordered), tuple(shapes[n] for n in ordered), tuple(offsets), pos, decay_end)

    def views(self, flat: Tensor) -> dict[str, Tensor]:
        """Name → view into `flat` ([..., p] → [..., *shape]); gradients flow back to `flat`."""
        lead = flat.shape[:-1]
        return {name: flat[..., off:off + _numel(shape)].view(*lead, *shape)
                for name, shape, off in zip(self.names, self.shapes, self.offsets)}

    def flatten(self, tensors: Mapping[str, Tensor], prefix: str = "", lead: tuple[int, ...] = ()) -> Tensor:
        """Concatenate `prefix + name` tensors into one [*lead, p] vector in layout order."""
        return torch.cat([tensors[prefix + name].reshape(*lead, -1).float() for name in self.names], dim=-1)


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for s in shape:
        count *= s
    return count
