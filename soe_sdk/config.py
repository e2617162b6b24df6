"""Configuration dataclasses: the one source of truth for shapes, shared by trainer, SDK and exporters."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import SoeError


def _from_dict(cls: type, data: dict[str, Any], what: str) -> Any:
    """Build a dataclass from a dict, rejecting unknown keys with a clear message."""
    if not isinstance(data, dict):
        raise SoeError(f"{what}: expected an object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise SoeError(f"{what}: unknown field(s) {', '.join(unknown)}")
    try:
        return cls(**data)
    except (TypeError, ValueError) as exc:
        raise SoeError(f"{what}: {exc}") from None


@dataclass(frozen=True)
class ModelConfig:
    """A GPT-2-style decoder: learned positions, pre-LayerNorm, GELU MLP, tied embeddings."""

    vocab_size: int = 4096
    max_seq_len: int = 128
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_mlp: int = 512
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads", "d_mlp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        # Bounds far above any real small model: a forged config must not make a loader allocate forever.
        limits = {"vocab_size": 1 << 24, "max_seq_len": 1 << 20, "d_model": 1 << 16, "n_layers": 1024,
                  "n_heads": 1024, "d_mlp": 1 << 18}
        for name, limit in limits.items():
            if getattr(self, name) > limit:
                raise ValueError(f"{name}={getattr(self, name)} exceeds the supported maximum {limit}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name → shape of every parameter, in a fixed order (the order of the archive)."""
        d, f = self.d_model, self.d_mlp
        shapes: dict[str, tuple[int, ...]] = {
            "wte.weight": (self.vocab_size, d),
            "wpe.weight": (self.max_seq_len, d),
        }
        for i in range(self.n_layers):
            p = f"h.{i}."
            shapes.update({
                p + "ln_1.weight": (d,), p + "ln_1.bias": (d,),
                p + "attn.qkv.weight": (3 * d, d), p + "attn.qkv.bias": (3 * d,),
                p + "attn.proj.weight": (d, d), p + "attn.proj.bias": (d,),
                p + "ln_2.weight": (d,), p + "ln_2.bias": (d,),
                p + "mlp.fc.weight": (f, d), p + "mlp.fc.bias": (f,),
                p + "mlp.proj.weight": (d, f), p + "mlp.proj.bias": (d,),
            })
        shapes.update({"ln_f.weight": (d,), "ln_f.bias": (d,)})
        return shapes

    def num_parameters(self) -> int:
        total = 0
        for shape in self.parameter_shapes().values():
            count = 1
            for s in shape:
                count *= s
            total += count
        return total

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        return _from_dict(cls, data, "model config")


@dataclass(frozen=True)
class RouterConfig:
    """The MLP φ: domain weights h (k) → hidden → expert coefficients α (n)."""

    k: int = 16
    n: int = 16
    hidden: int = 128

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or self.k <= 0:
            raise ValueError(f"k must be a positive integer, got {self.k!r}")
        if not isinstance(self.n, int) or self.n < 0:
            raise ValueError(f"n must be a non-negative integer, got {self.n!r}")
        if not isinstance(self.hidden, int) or self.hidden <= 0:
            raise ValueError(f"hidden must be a positive integer, got {self.hidden!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RouterConfig":
        return _from_dict(cls, data, "router config")


@dataclass(frozen=True)
class EmbedderSpec:
    """Which sentence-embedding model produced the domain centroids, and how it was run.

    The SDK must embed the user's documents the same way, or nearest-centroid assignment
    is meaningless.
    """

    name: str = "sentence-transformers/all-MiniLM-L6-v2"
    dim: int = 384
    normalize: bool = True
    max_seq_length: int = 256
    precision: str = "bf16"  # "fp32" or "bf16" (autocast on CPU); see soe_sdk/embedding.py
    max_chars: int | None = None  # embed only the first max_chars characters of each text (None: all)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EmbedderSpec":
        return _from_dict(cls, data, "embedder spec")


@dataclass(frozen=True)
class SoupConfig:
    """Everything that fixes the shapes of a soup: the model, the router, low-rank experts."""

    model: ModelConfig = field(default_factory=ModelConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    expert_rank: int = 0  # 0 = dense experts; r > 0 = each expert matrix stored as A Bᵀ of rank r

    @property
    def n_experts(self) -> int:
        return self.router.n

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(), "router": self.router.to_dict(),
                "expert_rank": self.expert_rank}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SoupConfig":
        if not isinstance(data, dict):
            raise SoeError("soup config: expected an object")
        return cls(model=ModelConfig.from_dict(data.get("model", {})),
                   router=RouterConfig.from_dict(data.get("router", {})),
                   expert_rank=int(data.get("expert_rank", 0)))
