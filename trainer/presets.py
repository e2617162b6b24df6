"""Named training configurations: `tiny` (tests, minutes on a CPU), `cpu-demo` (the bundled demo
soup, ≤ 90 min on 2 CPU cores) and `paper-110m` (the paper's Tables 2–3, for GPU nodes)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from soe_sdk.config import ModelConfig
from soe_sdk.errors import SoeError


@dataclass(frozen=True)
class Preset:
    """Everything `soe-train prepare` and `soe-train train` need besides the corpus."""

    name: str
    model: ModelConfig = field(default_factory=ModelConfig)
    # data preparation
    vocab_size: int = 4096
    clusters: tuple[int, int] = (4, 4)  # (k1, k2): hierarchical k-means, k = k1·k2 domains
    max_docs: int | None = None  # read at most this many corpus documents (None: all)
    embed_chars: int = 2000  # characters of each document that are embedded (clustering and, via the
    # archive's embedder spec, specialisation); short heads make embedding fast on a CPU
    # soup
    experts: int = 16
    expert_rank: int = 0
    router_hidden: int = 128
    support_size: int = 4  # s of the meta-distribution π
    support_choice: str = "uniform"  # how π picks its s domains: "uniform", "natural" (∝ h_generic) or
    # "neighbours" (an anchor and s − 1 of its 2s nearest domains, for a share of the draws)
    # "groups" (s of n groups of related domains, one group per expert, ∝ their mass in h_generic)
    neighbour_share: float = 0.5  # with "neighbours": the share of draws that are neighbourhoods (the rest uniform)
    generic_share: float = 0.0  # share of the draws that are h_generic itself (any support choice)
    # optimisation
    batch_size: int = 16  # sequences per micro-batch (one h per micro-batch)
    grad_accum: int = 1  # micro-batches (each with its own h) per optimizer step
    max_steps: int = 200
    lr: float = 1e-3  # peak learning rate of a soup
    baseline_lr: float | None = None  # of plain models (n = 0: generic, CRISP, domain experts); None: lr
    expert_lr_scale: float = 1.0  # experts (and low-rank factors) learn at lr × this
    expert_weight_decay_scale: float = 1.0  # their decoupled weight decay is weight_decay × this (pulls
    # the experts towards 0, that is Θ towards S, harder than S towards 0)
    router_lr_scale: float = 1.0  # the router φ learns at lr × this
    expert_start_at: float = 0.0  # fraction of the run before which the experts do not learn (0: from the
    # start): S first learns alone, so the experts' h-dependent updates perturb a model that is already good
    router_freeze_at: float = 1.0  # fraction of the run after which φ stops learning (1.0: never); a soup's
    # router otherwise keeps scaling α up as the schedule anneals, so Θ never anneals (benchmarks/results)
    router_input_scale: float = 1.0  # φ is trained on c·h (c = k: a uniform h gives unit inputs, so
    # α reacts to h from step 0); `soe-train pack` folds c into fc1, the archive holds the plain φ(h)
    expert_init_scale: float = 1.0  # × the dense experts' initial N(0, 0.02/√n) values (0: Θ = S at step 0)
    router_init: str = "random"  # "random", "centroids" or "groups": φ starts as α = F h, F from the centroids'
    # principal axes, or F = each domain's group (trainer/router_init.py), so similar mixtures share expert updates
    router_init_scale: float = 1.0  # with "centroids": RMS of ‖α‖ over single domains (weighted by the corpus)
    expert_params: str = "all"  # which parameters have experts: "all", or "vectors" (the 1-D ones: LayerNorm
    # gains and biases, linear biases); the others keep E_j = 0, so Θ differs from S only there
    expert_moments: str = "float32"  # dtype of the expert bank's Adam moments: "float32" or "bfloat16"
    # (updated in float32, stored rounded to nearest: a third fewer bytes in the update's pass over
    # the bank, the soup's largest cost per step beyond the plain model's, and half the moments' memory)
    expert_preconditioner: str = "own"  # "own": Adam moments per expert; "shared": each expert's update is
    # its momentum over S's √v, so it moves in proportion to its α rather than at the full rate
    expert_beta1: float | None = None  # with "shared": β₁ of the experts' own momentum (None: beta1)
    centre_expert_gradients: bool = False  # with "shared": experts learn from ∇Θ − (S's running mean of ∇Θ)
    centre_alpha: bool = False  # merge with α − ᾱ (ᾱ: running mean over π), so experts learn only what
    # varies with h and S the rest; pack folds ᾱ into φ's output bias
    # branch phase (trainer/branches.py): the last branch_share of the steps train each expert alone,
    # from the trunk S (a plain model trained on the natural mixture for the first steps), on its
    # group of domains; φ is then the fixed map α_j = h's mass on group j. 0: joint training throughout
    branch_share: float = 0.0
    branch_lr: float | None = None  # peak learning rate of a branch (None: baseline_lr, else lr)
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_tokens: int = 32_768
    checkpoint_every: int = 100
    storage_dtype: str = "float32"  # dtype of S and E inside the packed archive
    precision: str | None = None  # autocast: "fp32" or "bf16"; None: bf16 on a GPU, fp32 on a CPU

    def replace(self, **changes: object) -> "Preset":
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny",
        model=ModelConfig(vocab_size=512, max_seq_len=64, d_model=64, n_layers=2, n_heads=2, d_mlp=256),
        vocab_size=512, clusters=(2, 2), max_docs=2000, embed_chars=128, experts=4, router_hidden=32, support_size=2,
        batch_size=8, max_steps=60, lr=3e-3, warmup_steps=5, eval_every=20, eval_tokens=4096,
        checkpoint_every=20,
    ),
    "cpu-demo": Preset(
        name="cpu-demo",
        model=ModelConfig(vocab_size=4096, max_seq_len=128, d_model=128, n_layers=4, n_heads=4, d_mlp=512),
        # s = 16: specialist document sets spread over 9–32 of the 64 clusters (exp-entropy of their h);
        # at 1000 steps s = 16 halved the soup's gap to the generic model against s = 4 (benchmarks/results/README.md)
        # expert_lr_scale 0.03: at full rate Adam grows every expert into a copy of the generic update
        # and α stops depending on h; 0.1 cut the soup's gap to the generic model by ~90 % at 1000 steps,
        # 0.03 did better still (1000-step probes 1 / 0.3 / 0.1 / 0.03: −2.4 / −2.3 / −0.3 / +0.5 % specialist mean)
        vocab_size=4096, clusters=(8, 8), embed_chars=128, experts=16, router_hidden=128, support_size=16,
        # lr 1e-3 for the soup, 2e-3 for the baselines: a soup's Θ moves faster than S alone (its
        # experts move with S and φ scales them up), so it wants a lower rate, as in the paper (Table 3)
        # π picks its domains ∝ h_generic, and φ stops learning at step 3025 of 5500: φ otherwise keeps
        # scaling α up while the schedule anneals (frozen from 4500: +0.15 %, from 3025: +0.39 % on the
        # specialist sets, benchmarks/results/README.md)
        support_choice="natural", router_freeze_at=0.55,
        # 5500 steps: 12000 (bf16 autocast, 2.2× the tokens) left the soup behind the generic model on
        # every set, −1.4 % (benchmarks/results/README.md, probe soup12k)
        batch_size=16, grad_accum=1, max_steps=5500, lr=1e-3, baseline_lr=2e-3, expert_lr_scale=0.03, warmup_steps=200,
        eval_every=1000, eval_tokens=16_384, checkpoint_every=500, storage_dtype="float16",
    ),
    "paper-110m": Preset(
        name="paper-110m",
        model=ModelConfig(vocab_size=32768, max_seq_len=1024, d_model=768, n_layers=12, n_heads=12, d_mlp=3072),
        vocab_size=32768, clusters=(64, 64), embed_chars=4000, experts=128, router_hidden=512, support_size=4,
        batch_size=16, grad_accum=8, max_steps=1_024_000, lr=1e-4, baseline_lr=3e-4, min_lr_ratio=0.1, warmup_steps=2000,
        beta2=0.999, grad_clip=0.1, eval_every=5000, eval_tokens=1_048_576, checkpoint_every=5000,
        storage_dtype="bfloat16",
    ),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise SoeError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]
