"""The trainable soup: flat S, E and low-rank factors F, the router φ, and their AdamW state.

`SoupState.micro_step` is paper Algorithm 2's body for one micro-batch: α = φ(h),
Θ = S + Σ_j α_j E_j, one forward/backward through the merged model, and the soup gradients
recovered from g = ∇Θ. For dense experts that is closed form (soe_sdk/flat.py):
∇S += g, ∇E += α gᵀ (kept as the pair (α, g), see trainer.optim.ExpertGrad), ∂ℓ/∂α = E g
(not computed once φ is frozen: it reads the whole bank).
For low-rank experts (trainer/layout.py) the prefix Θ[:q] is backpropagated against g[:q]
with autograd, into A, B and α. A state may hold only a slice [lo, hi) of S and E: that is
how bank sharding splits a dense soup across ranks.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import Tensor

from soe_sdk.config import SoupConfig
from soe_sdk.errors import SoeError
from soe_sdk.model import next_token_loss
from soe_sdk.soup import ROUTER_NAMES, add_combination, init_soup, iter_init_soup, router_forward

from . import fused_adamw
from .layout import SoupLayout
from .optim import ExpertGrad, FlatAdamW

ALPHA_CENTRE_DECAY = 0.99  # ᾱ averages α over the last ~100 optimizer steps
MOMENT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # --expert-moments


class SoupState:
    """Parameters, gradients and optimizer of a (possibly sliced) soup on one device."""

    def __init__(self, config: SoupConfig, layout: SoupLayout, shared: Tensor, experts: Tensor,
                 router: dict[str, Tensor], *, factors: Tensor | None = None, lo: int = 0, hi: int | None = None,
                 betas: tuple[float, float] = (0.9, 0.95), weight_decay: float = 0.1,
                 expert_lr_scale: float = 1.0, router_lr_scale: float = 1.0, expert_weight_decay_scale: float = 1.0,
                 router_input_scale: float = 1.0, centre_alpha: bool = False,
                 expert_preconditioner: str = "own", centre_gradients: bool = False,
                 expert_moments: str = "float32", expert_beta1: float | None = None,
                 expert_params: str = "all") -> None:
        self.config, self.layout = config, layout
        self.router_input_scale = router_input_scale
        # Centring: Θ = S + Σ_j (α_j − ᾱ_j) E_j with ᾱ a running mean of α over the draws of π.
        # An expert's gradient (α_j − ᾱ_j)·∇Θ then has no share of the average (generic) gradient,
        # which S takes; experts learn only what varies with h. Packing folds ᾱ into φ's last bias.
        self.centre_alpha = centre_alpha
        self.alpha_centre = torch.zeros(config.router.n, device=shared.device)
        self.lo, self.hi = lo, layout.shared.size if hi is None else hi
        if layout.lowrank and (self.lo, self.hi) != (0, layout.shared.size):
            raise SoeError("low-rank experts cannot be bank-sharded; use --sharding ddp")
        self.shared, self.experts = shared, experts  # [hi-lo], [n, E's columns inside [lo, hi)]
        self.e0 = max(self.lo, layout.start) - self.lo  # first column of this slice that has dense experts
        self.expert_from = self._first_expert_column(expert_params, centre_gradients)
        if self.expert_from:
            experts[:, :self.expert_from] = 0.0  # these columns stay 0: zero gradient, moments and decay
        self.factors = factors.requires_grad_(True) if layout.lowrank else None
        self.router = {k: v.requires_grad_(True) for k, v in router.items()}
        self.grad_shared = torch.zeros_like(shared)
        self.grad_experts = ExpertGrad()
        # (α', Θ') merged by the last optimizer step for the next micro-batch's h, until it is used
        self._next_theta: tuple[Tensor, Tensor] | None = None
        self.prefetched_merges = 0  # how many micro-batches used such a Θ' (for tests and benchmarks)
        decay_end = layout.shared.decay_end
        params = {"S": shared, "E": experts}
        decay = {"S": max(0, min(decay_end, self.hi) - self.lo),
                 "E": max(0, min(decay_end, self.hi) - max(self.lo, layout.start))}
        if self.factors is not None:
            params["F"], decay["F"] = self.factors, self.factors.numel()
        if self.n:
            params.update(self.router)
            decay.update({k: (v.shape[-1] if k.endswith("weight") else 0) for k, v in self.router.items()})
        scales = {"E": expert_lr_scale, "F": expert_lr_scale, **{k: router_lr_scale for k in self.router}}
        if expert_preconditioner not in ("own", "shared"):
            raise SoeError(f"--expert-preconditioner {expert_preconditioner!r}: use own or shared")
        shared_moments = {"E": ("S", self.e0)} if expert_preconditioner == "shared" and self.n else {}
        if centre_gradients and not shared_moments:
            raise SoeError("--centre-expert-gradients needs --expert-preconditioner shared (it uses S's moments)")
        if expert_beta1 is not None and not (shared_moments and 0.0 <= expert_beta1 < 1.0):
            raise SoeError(f"--expert-beta1 {expert_beta1}: needs --expert-preconditioner shared and a value in [0, 1)")
        if expert_moments not in MOMENT_DTYPES:
            raise SoeError(f"--expert-moments {expert_moments!r}: use {' or '.join(MOMENT_DTYPES)}")
        self.optimizer = FlatAdamW(params, decay, betas=betas, weight_decay=weight_decay, lr_scale=scales,
                                   moment_dtype={"E": MOMENT_DTYPES[expert_moments]},
                                   decay_scale={"E": expert_weight_decay_scale, "F": expert_weight_decay_scale},
                                   shared_moments=shared_moments,
                                   beta1_of={} if expert_beta1 is None else {"E": expert_beta1},
                                   centred_gradients=frozenset({"E"}) if centre_gradients else frozenset())

    def _first_expert_column(self, expert_params: str, centre_gradients: bool) -> int:
        """The first of this slice's E columns that may learn (0: all of them; see Preset.expert_params)."""
        if expert_params == "all":
            return 0
        if expert_params != "vectors":
            raise SoeError(f"--expert-params {expert_params!r}: use all or vectors")
        if self.layout.lowrank or centre_gradients:
            raise SoeError("--expert-params vectors needs dense experts and no --centre-expert-gradients")
        # E is [matrices | vectors]: the vectors are the suffix after the matrices' decay_end
        vectors_from = self.layout.start + self.layout.experts.decay_end  # in S's columns
        return max(0, min(vectors_from, self.hi) - max(self.lo, self.layout.start))

    @classmethod
    def fresh(cls, config: SoupConfig, seed: int, device: torch.device,
              shard: tuple[int, int, int] | None = None, expert_init_scale: float = 1.0, **kwargs) -> "SoupState":
        """A freshly initialised soup; `shard=(lo, hi, padded_p)` keeps only that slice of S and E.

        `expert_init_scale` multiplies the dense experts' initial values (0: Θ = S at step 0, and
        no random Σ_j α_j E_j perturbs Θ while α varies with h)."""
        layout = SoupLayout.for_soup(config)
        n = config.router.n
        if shard is None:
            tensors = init_soup(config, seed)
            shared = layout.shared.flatten(tensors, "shared.")
            experts = layout.experts.flatten(tensors, "experts.", (n,)) if n else torch.zeros(0, layout.experts.size)
            factors = layout.factors.flatten(tensors, "experts.").to(device) if layout.lowrank else None
            router = {k: tensors.pop(k).float().to(device) for k in ROUTER_NAMES}
            del tensors
            return cls(config, layout, shared.to(device), (experts * expert_init_scale).to(device), router,
                       factors=factors, **kwargs)
        if layout.lowrank:
            raise SoeError("low-rank experts cannot be bank-sharded; use --sharding ddp")
        # Slice while initialising, one parameter's bank at a time: a rank never holds the whole
        # soup (the padding past p stays zero, like the padded all-gather expects).
        lo, hi, _ = shard
        shared, experts, router = torch.zeros(hi - lo), torch.zeros(n, hi - lo), {}
        spans = {name: (offset, int(torch.Size(shape).numel()))
                 for name, shape, offset in zip(layout.shared.names, layout.shared.shapes, layout.shared.offsets)}
        for key, value in iter_init_soup(config, seed):
            group, _, name = key.partition(".")
            if group == "router":
                router[key] = value.float().to(device)
                continue
            offset, size = spans[name]
            a, b = max(lo, offset), min(hi, offset + size)
            if a >= b:
                continue
            if group == "shared":
                shared[a - lo:b - lo] = value.reshape(-1)[a - offset:b - offset]
            else:
                experts[:, a - lo:b - lo] = value.reshape(n, -1)[:, a - offset:b - offset]
        return cls(config, layout, shared.to(device), (experts * expert_init_scale).to(device), router, lo=lo, hi=hi,
                   **kwargs)

    @property
    def n(self) -> int:
        return self.config.router.n

    def set_router_lr_scale(self, scale: float) -> None:
        """φ learns at lr × `scale` from the next optimizer step on (0: φ frozen)."""
        self.optimizer.lr_scale.update({k: scale for k in self.router})

    def set_expert_lr_scale(self, scale: float) -> None:
        """The experts (and low-rank factors) learn at lr × `scale` from the next optimizer step on."""
        self.optimizer.lr_scale.update({k: scale for k in ("E", "F")})

    def set_router(self, tensors: dict[str, Tensor]) -> None:
        """Replace φ's parameters (a fresh run's initialisation, e.g. trainer/router_init.py)."""
        self._next_theta = None
        with torch.no_grad():
            for k, v in self.router.items():
                v.copy_(tensors[k].to(v))

    @property
    def router_learning(self) -> bool:
        """Whether φ still learns; a frozen router needs no ∂ℓ/∂α = E g, which reads the whole bank."""
        return self.n > 0 and any(self.optimizer.lr_scale.get(k, 1.0) != 0.0 for k in self.router)

    def zero_grad(self) -> None:
        self.grad_shared.zero_()
        self.grad_experts.clear()
        for p in self._autograd_params():
            p.grad = None

    def _autograd_params(self) -> list[Tensor]:
        return list(self.router.values()) + ([self.factors] if self.factors is not None else [])

    def alpha(self, h: Tensor) -> Tensor:
        """The coefficients Θ is merged with for h: φ(c·h) − ᾱ (c = router_input_scale, ᾱ = 0 unless
        centring), with autograd into the router."""
        if self.n == 0:
            return torch.zeros(0, device=self.shared.device)
        raw = router_forward(self.router, h.to(self.shared.device, torch.float32) * self.router_input_scale)
        return raw - self.alpha_centre

    def update_centre(self, alphas: list[Tensor]) -> None:
        """ᾱ ← EMA of the raw α of one optimizer step's micro-batches (every rank's, so ranks agree)."""
        if not (self.centre_alpha and self.n and alphas):
            return
        raw_mean = torch.stack(alphas).mean(0) + self.alpha_centre
        self.alpha_centre.lerp_(raw_mean.to(self.alpha_centre.device), 1.0 - ALPHA_CENTRE_DECAY)

    def merge_local(self, alpha: Tensor) -> Tensor:
        """This state's slice of Θ; differentiable (in F and α) only in its low-rank prefix."""
        if self.n == 0:
            return self.shared.clone()
        base, coefficients = self.shared[self.e0:], alpha.detach()
        # the kernel's merge where it applies: it equals the merge the last update folded in, so a
        # resumed run (whose first step cannot have one) continues bit for bit
        dense = torch.empty_like(base) if base.device.type == "cpu" else None
        if dense is None or not fused_adamw.merge_rows(base, coefficients, self.experts, dense):
            dense = add_combination(base, coefficients, self.experts)
        if self.factors is None:
            return dense
        return torch.cat([self.layout.lowrank_theta(self.shared, self.factors, alpha), dense])

    def optimizer_step(self, grads: dict[str, Tensor | ExpertGrad], lr: float, next_h: Tensor | None = None) -> None:
        """One AdamW step. `next_h`: the h of this rank's next micro-batch, if known; the pass that
        updates the bank then also merges that micro-batch's Θ, which `micro_step` takes instead
        of merging again (dense experts, compiled kernel only)."""
        self._next_theta = None

        def next_merge() -> tuple[Tensor, Tensor, Tensor] | None:
            if next_h is None or self.factors is not None or self.n == 0:
                return None
            alpha = self.alpha(next_h).detach()  # φ and ᾱ as this step leaves them
            base = self.shared[self.e0:]
            self._next_theta = (alpha, torch.empty_like(base))
            return base, alpha, self._next_theta[1]

        if not self.optimizer.step(grads, lr, next_merge):
            self._next_theta = None

    def _merged_for(self, alpha: Tensor) -> Tensor:
        """This slice of Θ for α: the one the last optimizer step merged ahead, when it was for this α."""
        ahead, self._next_theta = self._next_theta, None
        if ahead is not None and torch.equal(ahead[0], alpha.detach()):
            self.prefetched_merges += 1
            return ahead[1]
        return self.merge_local(alpha)

    def accumulate(self, alpha: Tensor, g_slice: Tensor, router_grad: bool = True) -> Tensor | None:
        """Add ∇S += g, ∇E += α gᵀ for this slice; return the dense experts' share of ∂ℓ/∂α = E g
        (None without `router_grad`: a frozen φ does not need it)."""
        self.grad_shared.add_(g_slice)
        if self.n == 0:
            return torch.zeros(0, device=g_slice.device)
        g_dense = g_slice[self.e0:]
        c = self.expert_from
        if c:  # experts only on a suffix of the columns: the rest of their gradient is 0, as E is there
            g_experts = torch.zeros_like(g_dense)
            g_experts[c:] = g_dense[c:]
            self.grad_experts.add(alpha, g_experts)
            return self.experts[:, c:] @ g_dense[c:] if router_grad else None
        self.grad_experts.add(alpha, g_dense)
        return self.experts @ g_dense if router_grad else None

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
        learning = self.router_learning
        with nullcontext() if learning else torch.no_grad():  # a frozen φ needs no graph
            alpha = self.alpha(h)
        theta_local = self._merged_for(alpha)
        local = theta_local.detach()
        theta = (gather(local) if gather else local).requires_grad_(True)
        params = self.layout.shared.views(theta)
        ctx = torch.autocast(tokens.device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
        with ctx:
            loss = next_token_loss(params, self.config.model, tokens)
        (loss * scale).backward()
        g_slice = scatter(theta.grad) if scatter else theta.grad
        d_alpha = self.accumulate(alpha, g_slice, router_grad=learning)
        roots, root_grads = [], []
        if theta_local.requires_grad:  # low-rank prefix → ∇A, ∇B and its part of ∂ℓ/∂α
            roots.append(theta_local)
            root_grads.append(g_slice)
        if learning:
            roots.append(alpha)
            root_grads.append(reduce_alpha(d_alpha) if reduce_alpha else d_alpha)
        if roots:
            torch.autograd.backward(roots, root_grads)
        return float(loss.detach())

    def grad_dict(self) -> dict[str, Tensor | ExpertGrad]:
        grads: dict[str, Tensor | ExpertGrad] = {"S": self.grad_shared, "E": self.grad_experts}
        for name, p in self.optimizer.params.items():
            if name not in grads:
                grads[name] = p.grad if p.grad is not None else torch.zeros_like(p)
        return grads

    # -- (de)serialisation -------------------------------------------------------------------
    def tensors(self) -> dict[str, Tensor]:
        """Parameters and optimizer moments as flat tensors (for checkpoints)."""
        out = {"S": self.shared, "E": self.experts}
        if self.factors is not None:
            out["F"] = self.factors.detach()
        out.update({k: v.detach() for k, v in self.router.items()})
        out["alpha_centre"] = self.alpha_centre
        out.update(self.optimizer.state_tensors())
        return out

    def load_tensors(self, tensors: dict[str, Tensor], step_count: int) -> None:
        self._next_theta = None
        with torch.no_grad():
            self.shared.copy_(tensors["S"])
            self.experts.copy_(tensors["E"])
            if self.factors is not None:
                self.factors.copy_(tensors["F"])
            for k, v in self.router.items():
                v.copy_(tensors[k])
            if "alpha_centre" in tensors:  # absent from checkpoints written before centring existed
                self.alpha_centre.copy_(tensors["alpha_centre"])
        self.optimizer.load_state_tensors(tensors, step_count)

    def soup_tensors(self) -> dict[str, Tensor]:
        """Full (unsliced) soup tensors under archive names, for packing."""
        assert self.lo == 0 and self.hi == self.layout.shared.size, "gather the shards before packing"
        factors = None if self.factors is None else self.factors.detach()
        out = {k: v.detach().cpu() for k, v in self.layout.archive_tensors(self.shared, self.experts, factors).items()}
        out.update(packed_router({k: v.detach().cpu() for k, v in self.router.items()}, self.router_input_scale,
                                 self.alpha_centre.cpu()))
        return out


def packed_router(router: dict[str, Tensor], input_scale: float, centre: Tensor | None) -> dict[str, Tensor]:
    """The router as an archive stores it, the plain φ(h): training's φ(c·h) − ᾱ is fc1's weight × c
    and fc2's bias − ᾱ."""
    out = dict(router)
    out["router.fc1.weight"] = router["router.fc1.weight"] * input_scale
    if centre is not None and centre.numel():
        out["router.fc2.bias"] = router["router.fc2.bias"] - centre.to(router["router.fc2.bias"])
    return out
