"""A soup trained in two phases: a shared trunk, then one branch per expert (`branch_share` > 0).

Joint training (Algorithm 2 throughout) did not turn h into specialisation at the cpu-demo budget:
the experts' updates, summed over many noisy mixtures, cost the shared model more than they gave
the specialists (benchmarks/results/README.md). This recipe keeps the paper's archive and its
instantiation Θ = S + Σ_j α_j E_j, and splits the same number of steps in two:

1. the trunk: S alone, a plain model on the natural mixture h_generic, for (1 − b)·T steps;
2. the branches: S and φ frozen, the remaining b·T steps shared evenly by the n experts. Expert j
   is S fine-tuned on the mixture of its group of domains (trainer/router_init.domain_groups),
   stored as E_j = Θ_j − S. That is Algorithm 2 with π drawing one group at a time, α one-hot,
   and S and φ at learning rate 0, each expert's steps run back to back with its own AdamW state.

φ is the fixed linear map α_j = h's mass on group j, so α sums to 1 and a specialist is the
mass-weighted average of the branches, S + Σ_j α_j (Θ_j − S) = Σ_j α_j Θ_j. Every phase is an
ordinary resumable run (WORKDIR/runs/NAME-trunk, NAME-branchJJ), and the assembled soup is the
checkpoint of WORKDIR/runs/NAME that `soe-train pack` reads.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from soe_sdk.config import RouterConfig, SoupConfig
from soe_sdk.errors import SoeError

from . import checkpoint as ckpt
from . import distributed as dd
from .evaluate import load_eval_sets
from .layout import SoupLayout
from .loop import RunSpec, autocast_dtype, evaluate_soup, train
from .presets import Preset
from .router_init import domain_groups, group_features, linear_router
from .sampling import usable_domains
from .shards import DomainShards
from .state import SoupState


def branch_steps(total: int, share: float, groups_with_data: int) -> tuple[int, list[int]]:
    """(trunk steps, steps of each branch): b·T steps at the end, split as evenly as possible."""
    if not 0.0 < share < 1.0:
        raise SoeError(f"--branch-share {share}: must be a fraction strictly between 0 and 1")
    branched = round(share * total)
    if branched < groups_with_data:
        raise SoeError(f"--branch-share {share}: {branched} of {total} steps cannot give each of the "
                       f"{groups_with_data} experts a step; raise --branch-share or --max-steps")
    return total - branched, [len(part) for part in np.array_split(np.arange(branched), groups_with_data)]


def group_h(groups: np.ndarray, weights: np.ndarray, j: int) -> np.ndarray | None:
    """Group j's mixture: `weights` restricted to its domains and renormalised (None if it has no mass)."""
    h = np.where(np.asarray(groups) == j, weights, 0.0)
    return h / h.sum() if h.sum() > 0 else None


def train_branched(workdir: str | Path, preset: Preset, *, name: str = "soup", max_steps: int | None = None,
                   seed: int = 0, device: str | None = None, precision: str | None = None,
                   progress: bool = True) -> Path:
    """Train (or resume) the trunk and every branch, then assemble the soup in WORKDIR/runs/NAME."""
    workdir = Path(workdir)
    n, total = preset.experts, max_steps or preset.max_steps
    if n < 1 or preset.expert_rank:
        raise SoeError("--branch-share needs dense experts (n ≥ 1, --rank 0): each expert is a branch")
    shards = DomainShards.open(workdir)
    groups = domain_groups(np.load(workdir / "centroids.npy"), n)
    weights = np.where(usable_domains(shards, preset.model.max_seq_len), shards.h_generic, 0.0)
    mixtures = {j: h for j in range(n) if (h := group_h(groups, weights, j)) is not None}
    trunk_steps, steps = branch_steps(total, preset.branch_share, len(mixtures))
    branch_lr = preset.branch_lr or preset.baseline_lr or preset.lr

    common = {"seed": seed, "device": device, "precision": precision, "progress": progress}
    trunk_dir = train(workdir, preset, spec=RunSpec(f"{name}-trunk", tuple(shards.h_generic.tolist()), 0),
                      max_steps=trunk_steps, **common)
    shared = _final_parameters(trunk_dir)
    config = SoupConfig(model=preset.model, router=RouterConfig(k=shards.k, n=n, hidden=preset.router_hidden))
    layout = SoupLayout.for_soup(config)
    experts = torch.zeros(n, layout.experts.size)
    for (j, h), count in zip(mixtures.items(), steps):
        # a short warmup: the branch starts from an annealed model, not from scratch
        branch = preset.replace(baseline_lr=branch_lr, warmup_steps=max(1, count // 10))
        run = train(workdir, branch, spec=RunSpec(f"{name}-branch{j:02d}", tuple(h.tolist()), 0), max_steps=count,
                    init_shared=shared, **{**common, "seed": seed + 1 + j})
        experts[j] = (_final_parameters(run) - shared)[layout.start:]

    ctx = dd.setup(device)
    run_dir = workdir / "runs" / name
    if ctx.is_main:
        _assemble(workdir, shards, preset, run_dir, config, layout, shared, experts, groups, ctx, total,
                  meta={"run": name, "preset": preset.name, "soup_config": config.to_dict(), "seed": seed,
                        "max_steps": total, "support_size": 1, "support_choice": "groups", "generic_share": 0.0,
                        "domain_groups": groups.tolist(), "fixed_h": False, "batch_size": preset.batch_size,
                        "grad_accum": preset.grad_accum, "seq_len": preset.model.max_seq_len, "world": 1,
                        "sharding": "ddp", "lr": branch_lr, "trunk_lr": preset.baseline_lr or preset.lr,
                        "min_lr_ratio": preset.min_lr_ratio, "router_init": "groups", "router_freeze_at": 0.0,
                        "branch_share": preset.branch_share, "trunk_steps": trunk_steps, "branch_steps": steps,
                        "storage_dtype": preset.storage_dtype, "precision": precision or preset.precision})
    if ctx.active:
        dd.barrier()
    return run_dir


def _final_parameters(run_dir: Path) -> torch.Tensor:
    step = ckpt.latest_step(run_dir / "checkpoints")
    if step is None:
        raise SoeError(f"{run_dir}: the phase finished without a checkpoint; delete the folder and train again")
    return ckpt.load_checkpoint(run_dir / "checkpoints", step)[0]["S"]


def _assemble(workdir: Path, shards: DomainShards, preset: Preset, run_dir: Path, config: SoupConfig,
              layout: SoupLayout, shared: torch.Tensor, experts: torch.Tensor, groups: np.ndarray,
              ctx: dd.DistContext, total: int, meta: dict) -> None:
    """Write the soup S, E, φ as run NAME's final checkpoint, with the trunk's log and a final evaluation."""
    router = linear_router(group_features(groups, config.router.n), config.router.hidden)
    state = SoupState(config, layout, shared.clone().to(ctx.device), experts.to(ctx.device),
                      {k: v.to(ctx.device) for k, v in router.items()})
    eval_sets = load_eval_sets(workdir, preset.model.max_seq_len, preset.eval_tokens, shards.h_generic, shards.dtype)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.json").write_text(json.dumps(meta, indent=2))
    ckpt.save_checkpoint(run_dir / "checkpoints", total, state.tensors(),
                         {"config": config.to_dict(), "sharding": "ddp", "world": 1, "lo": 0, "hi": layout.shared.size,
                          "p": layout.shared.size, "run": meta, "optimizer_steps": 0})
    # the trunk's log is the soup's up to the branch phase (Θ = S for every h while E = 0)
    trunk_log = workdir / "runs" / f"{meta['run']}-trunk" / "metrics.jsonl"
    lines = trunk_log.read_text().splitlines() if trunk_log.exists() else []
    autocast = autocast_dtype(meta["precision"], ctx.device)
    final = {"step": total, **evaluate_soup(state, layout.shared, config, eval_sets, ctx, False, autocast,
                                         shards.h_generic)} if eval_sets else None
    text = "".join(line + "\n" for line in lines) + (json.dumps(final) + "\n" if final else "")
    tmp = run_dir / "metrics.jsonl.tmp"
    tmp.write_text(text)
    tmp.replace(run_dir / "metrics.jsonl")
