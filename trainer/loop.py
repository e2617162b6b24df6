"""Paper Algorithm 2: pretrain a soup (or an n = 0 baseline) on a prepared workdir.

Every micro-batch draws its own domain weights h (from π, or fixed for a baseline), a batch
from mix(h) (Algorithm 1), merges Θ = S + αᵀE with α = φ(h), and backpropagates. Randomness
is derived from (seed, step, micro-batch), so the data stream is a pure function of the step:
a resumed run, or the same global batch split over ranks, sees exactly the same batches. That
also lets each optimizer step know the next micro-batch's h, and (with the compiled expert
update) merge its Θ in the same pass over the bank (trainer/fused_adamw.py).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from soe_sdk.config import RouterConfig, SoupConfig
from soe_sdk.errors import SoeError
from soe_sdk.flat import FlatLayout

from . import checkpoint as ckpt
from . import distributed as dd
from .evaluate import load_eval_sets, windows_loss
from .layout import SoupLayout
from .optim import ExpertGrad, lr_at
from .presets import Preset
from .sampling import group_mixture, meta_distribution, neighbourhoods, sample_batch, usable_domains
from .shards import DomainShards
from .state import SoupState


@dataclass(frozen=True)
class RunSpec:
    """What to train: a soup (h ~ π) or a baseline with fixed h (n = 0)."""

    name: str = "soup"
    fixed_h: tuple[float, ...] | None = None  # None: draw h ~ π every micro-batch
    experts: int | None = None  # overrides the preset; baselines use 0


def baseline_spec(kind: str, workdir: Path, shards: DomainShards, k1: int) -> RunSpec:
    """`generic`, `crisp:<specialist set>` or `domain:<top-level cluster>` as a RunSpec."""
    if kind == "generic":
        return RunSpec("generic", tuple(shards.h_generic.tolist()), 0)
    if kind.startswith("crisp:"):
        name = kind.split(":", 1)[1]
        path = workdir / "eval" / f"{name}.h_hard.npy"
        if not path.exists():
            raise SoeError(f"{path}: no domain weights for specialist set {name!r}; run prepare with --specialist")
        return RunSpec(f"crisp-{name}", tuple(np.load(path).tolist()), 0)
    if kind.startswith("domain:"):
        cluster = int(kind.split(":", 1)[1])
        k2 = shards.k // k1
        if not 0 <= cluster < k1:
            raise SoeError(f"--baseline {kind}: cluster must be in 0..{k1 - 1}")
        h = np.zeros(shards.k)
        h[cluster * k2:(cluster + 1) * k2] = shards.h_generic[cluster * k2:(cluster + 1) * k2]
        if h.sum() <= 0:
            raise SoeError(f"--baseline {kind}: that cluster holds no tokens")
        return RunSpec(f"domain-{cluster}", tuple((h / h.sum()).tolist()), 0)
    raise SoeError(f"unknown baseline {kind!r}; use generic, crisp:NAME or domain:CLUSTER")


def _micro_rng(seed: int, step: int, micro: int) -> np.random.Generator:
    return np.random.default_rng([seed, step, micro])


def train(workdir: str | Path, preset: Preset, *, spec: RunSpec = RunSpec(), max_steps: int | None = None,
          seed: int = 0, checkpoint_every: int | None = None, device: str | None = None,
          precision: str | None = None, sharding: str = "ddp", progress: bool = True,
          stop_after: int | None = None, init_shared: torch.Tensor | None = None) -> Path:
    """Train (or resume) the run `spec.name` in WORKDIR/runs/; return the run folder.

    `init_shared`: a fresh plain run starts from these parameters instead of a random
    initialisation (a branch starts from its trunk, trainer/branches.py); a resumed run ignores it.

    `stop_after` ends this invocation after that many steps without finishing the run
    (a resumable pause: tests, and `--stop-after` probes); `max_steps` is the run's full length,
    so the learning-rate schedule of a paused run is the full run's.
    """
    if stop_after is not None and stop_after < 1:
        raise SoeError(f"--stop-after {stop_after}: must be a positive number of steps")
    workdir = Path(workdir)
    ctx = dd.setup(device)
    shards = DomainShards.open(workdir)
    total_steps = max_steps or preset.max_steps
    n = preset.experts if spec.experts is None else spec.experts
    config = SoupConfig(model=preset.model, router=RouterConfig(k=shards.k, n=n, hidden=preset.router_hidden),
                        expert_rank=preset.expert_rank)
    if shards.vocab_size > preset.model.vocab_size:
        raise SoeError(f"{workdir}: the tokenizer has {shards.vocab_size} tokens but the model's vocabulary "
                       f"is {preset.model.vocab_size}; prepare with the same preset")
    autocast = autocast_dtype(precision or preset.precision, ctx.device)
    run_dir = workdir / "runs" / spec.name
    ckpt_dir = run_dir / "checkpoints"
    soup_layout = SoupLayout.for_soup(config)
    layout = soup_layout.shared
    bank = sharding == "bank" and ctx.active
    if sharding not in ("ddp", "bank"):
        raise SoeError(f"--sharding {sharding!r}: use ddp or bank")
    if preset.expert_rank < 0:
        raise SoeError(f"--rank {preset.expert_rank}: the expert rank must be 0 (dense) or positive")
    if bank and soup_layout.lowrank:
        raise SoeError(f"--sharding bank does not support low-rank experts (--rank {preset.expert_rank}); "
                       "use --sharding ddp")

    shard = (*dd.slice_bounds(layout.size, ctx), dd.padded_size(layout.size, ctx.world)) if bank else None
    state = SoupState.fresh(config, seed, ctx.device, shard=shard, expert_init_scale=preset.expert_init_scale,
                            betas=(preset.beta1, preset.beta2),
                            weight_decay=preset.weight_decay, expert_lr_scale=preset.expert_lr_scale,
                            expert_weight_decay_scale=preset.expert_weight_decay_scale,
                            router_lr_scale=preset.router_lr_scale, router_input_scale=preset.router_input_scale,
                            centre_alpha=preset.centre_alpha, expert_preconditioner=preset.expert_preconditioner,
                            centre_gradients=preset.centre_expert_gradients, expert_moments=preset.expert_moments,
                            expert_beta1=preset.expert_beta1, expert_params=preset.expert_params)
    groups = _domain_groups(preset, workdir) if "groups" in (preset.router_init, preset.support_choice) else None
    if n and preset.router_init != "random":
        state.set_router(_initial_router(preset, workdir, shards, n, groups))

    if init_shared is not None:
        if n or bank:
            raise SoeError("a run can start from given parameters only as a plain model without bank sharding")
        state.shared.copy_(init_shared.to(state.shared))
    peak_lr = preset.lr if n or preset.baseline_lr is None else preset.baseline_lr
    start = 0
    resumed = ckpt.latest_step(ckpt_dir)
    if resumed is not None:
        tensors, saved = ckpt.load_checkpoint(ckpt_dir, resumed, rank=ctx.rank if bank else None)
        _check_same_run(saved, config, sharding if bank else "ddp", ctx.world if bank else 1, run_dir,
                        preset)
        state.load_tensors({k: v.to(ctx.device) for k, v in tensors.items()}, saved["optimizer_steps"])
        start = resumed
    run_meta = {"run": spec.name, "preset": preset.name, "soup_config": config.to_dict(), "seed": seed,
                "max_steps": total_steps, "support_size": preset.support_size,
                "support_choice": preset.support_choice, "neighbour_share": preset.neighbour_share,
                "generic_share": preset.generic_share,
                "domain_groups": None if groups is None else groups.tolist(),
                "fixed_h": spec.fixed_h is not None,
                "batch_size": preset.batch_size, "grad_accum": preset.grad_accum, "seq_len": preset.model.max_seq_len,
                "world": ctx.world, "sharding": sharding if bank else "ddp", "lr": peak_lr,
                "min_lr_ratio": preset.min_lr_ratio,
                "expert_lr_scale": preset.expert_lr_scale, "router_lr_scale": preset.router_lr_scale,
                "expert_weight_decay_scale": preset.expert_weight_decay_scale,
                "router_freeze_at": preset.router_freeze_at, "expert_start_at": preset.expert_start_at,
                "router_input_scale": preset.router_input_scale, "centre_alpha": preset.centre_alpha,
                "expert_init_scale": preset.expert_init_scale, "router_init": preset.router_init,
                "router_init_scale": preset.router_init_scale,
                "expert_preconditioner": preset.expert_preconditioner, "expert_moments": preset.expert_moments,
                "expert_params": preset.expert_params,
                "centre_expert_gradients": preset.centre_expert_gradients, "expert_beta1": preset.expert_beta1,
                "storage_dtype": preset.storage_dtype,
                "precision": "fp32" if autocast is None else "bf16"}
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "run.json").write_text(json.dumps(run_meta, indent=2))
    metrics = _MetricsLog(run_dir / "metrics.jsonl", start, enabled=ctx.is_main)
    eval_sets = load_eval_sets(workdir, preset.model.max_seq_len, preset.eval_tokens, shards.h_generic, shards.dtype)
    every = checkpoint_every or preset.checkpoint_every
    micro_total = preset.grad_accum * (1 if bank else ctx.world)
    seq = preset.model.max_seq_len
    usable = usable_domains(shards, seq)
    draw_h = _meta_sampler(preset, shards, workdir, usable, groups)
    h_of = (lambda rng: np.asarray(spec.fixed_h)) if spec.fixed_h is not None else draw_h  # the micro-batch's h
    if not 0.0 <= preset.router_freeze_at <= 1.0:
        raise SoeError(f"--router-freeze-at {preset.router_freeze_at}: must be a fraction between 0 and 1")
    router_freeze_step = round(preset.router_freeze_at * total_steps)  # the first step at which φ is frozen
    if not 0.0 <= preset.expert_start_at < 1.0:
        raise SoeError(f"--expert-start-at {preset.expert_start_at}: must be a fraction in [0, 1)")
    expert_start_step = round(preset.expert_start_at * total_steps)  # the first step at which experts learn
    tokens_per_step = micro_total * preset.batch_size * seq
    end = total_steps if stop_after is None else min(total_steps, start + stop_after)
    bar = tqdm(total=end, initial=start, desc=f"train {spec.name}", disable=not (progress and ctx.is_main),
               unit="step", dynamic_ncols=True)
    t0, last_t = time.time(), time.time()
    for step in range(start, end):
        _fault_injection_hook(ctx.rank, step + 1)
        state.zero_grad()
        losses: list[float] = []
        for micro in range(micro_total):
            if not bank and micro % ctx.world != ctx.rank:
                continue
            rng = _micro_rng(seed, step, micro)
            h = h_of(rng)
            batch = sample_batch(shards, h, preset.batch_size, seq, rng)
            if bank:
                rows = np.array_split(np.arange(preset.batch_size), ctx.world)[ctx.rank]
                local = batch[rows].to(ctx.device)
                scale = len(rows) / preset.batch_size / micro_total
                loss = state.micro_step(torch.as_tensor(h), local, scale,
                                        gather=lambda t: dd.all_gather_flat(t, layout.size, ctx),
                                        scatter=lambda g: dd.reduce_scatter_flat(g, ctx),
                                        reduce_alpha=dd.all_reduce_sum, autocast_dtype=autocast)
            else:
                loss = state.micro_step(torch.as_tensor(h), batch.to(ctx.device), 1.0 / micro_total,
                                        autocast_dtype=autocast)
            if not math.isfinite(loss):
                last = ckpt.latest_step(ckpt_dir)  # steps count from 1, as in metrics.jsonl and checkpoint names
                raise SoeError(f"non-finite loss {loss} at step {step + 1} (micro-batch {micro}, domains "
                               f"{np.flatnonzero(h).tolist()[:8]}); "
                               + (f"last good checkpoint: step {last} in {ckpt_dir}" if last is not None
                                  else f"no checkpoint yet in {ckpt_dir}"))
            losses.append(loss)
        grads = state.grad_dict()
        if ctx.active and not bank:
            for name, g in grads.items():
                if isinstance(g, ExpertGrad):  # every rank's (α, ∇Θ) pairs: world·M·q floats, not n·q
                    g.gather(dd.all_gather_rows)
                else:
                    dd.all_reduce_sum(g)
        state.update_centre(grads["E"].alphas)  # after the gather: every rank's micro-batches
        norm = _clip(grads, preset.grad_clip, state, bank)
        lr = lr_at(step, lr=peak_lr, warmup=preset.warmup_steps, total=total_steps, min_ratio=preset.min_lr_ratio)
        if step >= router_freeze_step:
            state.set_router_lr_scale(0.0)
        state.set_expert_lr_scale(preset.expert_lr_scale if step >= expert_start_step else 0.0)
        first_micro = 0 if bank else ctx.rank  # this rank's first micro-batch of the next step
        ahead = n and step + 1 < end and first_micro < micro_total
        next_h = torch.as_tensor(h_of(_micro_rng(seed, step + 1, first_micro))) if ahead else None
        state.optimizer_step(grads, lr, next_h)
        mean_loss = _mean_over_ranks(losses, ctx)
        now = time.time()
        metrics.write({"step": step + 1, "loss": mean_loss, "lr": lr, "grad_norm": norm,
                       "tokens": (step + 1) * tokens_per_step, "step_time": now - last_t,
                       "elapsed": now - t0, "time": now, **({"merged_ahead": state.prefetched_merges} if n else {})})
        last_t = now
        bar.update(1)
        bar.set_postfix(loss=f"{mean_loss:.3f}")
        done = step + 1
        if eval_sets and (done % preset.eval_every == 0 or done == total_steps):
            metrics.write({"step": done, **evaluate_soup(state, layout, config, eval_sets, ctx, bank, autocast,
                                                          shards.h_generic)})
        if done % every == 0 or done == total_steps or done == end:
            _save(state, ckpt_dir, done, ctx, bank, {"config": config.to_dict(), "sharding": sharding if bank else "ddp",
                                                      "world": ctx.world if bank else 1, "lo": state.lo,
                                                      "hi": state.hi, "p": layout.size, "run": run_meta})
    bar.close()
    if ctx.is_main and end == total_steps:
        from .plots import plot_metrics
        plot_metrics(run_dir / "metrics.jsonl", run_dir / "curves.png")
    return run_dir


def _domain_groups(preset: Preset, workdir: Path) -> np.ndarray:
    """Each domain's group (one per expert), for --router-init groups and --support-choice groups."""
    from .router_init import domain_groups
    if preset.experts < 1:
        raise SoeError("--router-init groups / --support-choice groups need at least one expert (one group each)")
    return domain_groups(np.load(workdir / "centroids.npy"), preset.experts)


def _meta_sampler(preset: Preset, shards: DomainShards, workdir: Path, usable: np.ndarray,
                  groups: np.ndarray | None) -> Callable[[np.random.Generator], np.ndarray]:
    """h ~ π as the preset's support choice defines it (a function of the micro-batch's rng); with
    generic_share > 0, that share of the draws is h_generic itself."""
    share = preset.generic_share
    if not 0.0 <= share <= 1.0:
        raise SoeError(f"--generic-share {share}: must be between 0 and 1")
    draw = _support_sampler(preset, shards, workdir, usable, groups)
    if share == 0.0:  # no extra draw from the rng: runs without the option keep their data stream
        return draw
    generic = np.where(usable, shards.h_generic, 0.0)
    generic = generic / generic.sum()
    return lambda rng: generic if rng.random() < share else draw(rng)


def _support_sampler(preset: Preset, shards: DomainShards, workdir: Path, usable: np.ndarray,
                     groups: np.ndarray | None) -> Callable[[np.random.Generator], np.ndarray]:
    k, s, choice = shards.k, preset.support_size, preset.support_choice
    if choice == "groups":
        assert groups is not None
        return lambda rng: group_mixture(groups, shards.h_generic, s, rng, usable=usable)
    if choice == "uniform":
        return lambda rng: meta_distribution(k, s, rng, usable=usable)
    if choice == "natural":
        return lambda rng: meta_distribution(k, s, rng, usable=usable, domain_weights=shards.h_generic)
    if choice == "neighbours":
        if not 0.0 <= preset.neighbour_share <= 1.0:
            raise SoeError(f"--neighbour-share {preset.neighbour_share}: must be between 0 and 1")
        near = neighbourhoods(np.load(workdir / "centroids.npy"), 2 * s)
        share = preset.neighbour_share
        return lambda rng: (meta_distribution(k, s, rng, usable=usable, neighbours=near) if rng.random() < share
                            else meta_distribution(k, s, rng, usable=usable))
    raise SoeError(f"--support-choice {choice!r}: use uniform, natural, neighbours or groups")


def _initial_router(preset: Preset, workdir: Path, shards: DomainShards, n: int,
                    groups: np.ndarray | None) -> dict[str, torch.Tensor]:
    from .router_init import centroid_features, group_features, linear_router
    if preset.router_init == "centroids":
        features = centroid_features(np.load(workdir / "centroids.npy"), shards.h_generic, n, preset.router_init_scale)
    elif preset.router_init == "groups":
        assert groups is not None
        features = group_features(groups, n, preset.router_init_scale)
    else:
        raise SoeError(f"--router-init {preset.router_init!r}: use random, centroids or groups")
    # training feeds φ with c·h (router_input_scale); divide so that the trained map is still F h
    return linear_router(features / preset.router_input_scale, preset.router_hidden)


def _fault_injection_hook(rank: int, step: int) -> None:
    """Test hook: SOE_TEST_KILL_RANK_AT_STEP=RANK:STEP makes that rank exit abruptly as it starts
    that step, as a crashed node would (tests/robustness/test_distributed.py)."""
    if os.environ.get("SOE_TEST_KILL_RANK_AT_STEP") == f"{rank}:{step}":
        print(f"SOE_TEST_KILL_RANK_AT_STEP: rank {rank} dies at step {step}", file=sys.stderr, flush=True)
        os._exit(1)


def autocast_dtype(precision: str | None, device: torch.device) -> torch.dtype | None:
    if precision is None:
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    raise SoeError(f"--precision {precision!r}: use fp32 or bf16")


def _check_same_run(saved: dict[str, Any], config: SoupConfig, sharding: str, world: int, run_dir: Path,
                    preset: Preset) -> None:
    if saved.get("config") != config.to_dict():
        raise SoeError(f"{run_dir}: the checkpoint was trained with another configuration; "
                       "use another run name or delete the run folder")
    run = saved.get("run", {})
    checked = [("router_input_scale", 1.0), ("centre_alpha", False), ("support_choice", "uniform"),
               ("generic_share", 0.0), ("expert_beta1", None),
               ("expert_preconditioner", "own"), ("centre_expert_gradients", False), ("expert_moments", "float32"),
               ("expert_params", "all")]
    if preset.support_choice == "neighbours":
        checked.append(("neighbour_share", 0.5))
    for key, default in checked:
        if run.get(key, default) != getattr(preset, key):
            flag = key.replace("_", "-")
            raise SoeError(f"{run_dir}: the checkpoint was trained with {key} = {run.get(key, default)}, not "
                           f"{getattr(preset, key)}; resume with the same --{flag} setting")
    if saved.get("sharding") != sharding or saved.get("world") != world:
        raise SoeError(f"{run_dir}: the checkpoint was written with --sharding {saved.get('sharding')} on "
                       f"{saved.get('world')} rank(s); resume with the same setting")


def _clip(grads: dict[str, torch.Tensor | ExpertGrad], max_norm: float, state: SoupState, bank: bool) -> float:
    sq = lambda t: float(torch.linalg.vector_norm(t)) ** 2 if t.numel() else 0.0  # noqa: E731
    flat_sq = sq(grads["S"]) + grads["E"].sq_norm()
    replicated_sq = sum(sq(v) for k, v in grads.items() if k not in ("S", "E"))  # router (and factors F)
    if bank:
        flat_sq = float(dd.all_reduce_sum(torch.tensor([flat_sq], dtype=torch.float64))[0])
    norm = math.sqrt(flat_sq + replicated_sq)
    if max_norm > 0 and norm > max_norm:
        for g in grads.values():
            if isinstance(g, ExpertGrad):
                g.scale *= max_norm / (norm + 1e-6)
            else:
                g.mul_(max_norm / (norm + 1e-6))
    return norm


def _mean_over_ranks(losses: list[float], ctx: dd.DistContext) -> float:
    local = torch.tensor([sum(losses), len(losses)], dtype=torch.float64)
    if ctx.active:  # ddp: ranks hold different micro-batches; bank: different rows of each
        dd.all_reduce_sum(local)
    return float(local[0] / local[1])


def _full_theta_fn(state: SoupState, layout: FlatLayout, ctx: dd.DistContext, bank: bool):
    def theta(alpha: torch.Tensor) -> torch.Tensor:
        local = state.merge_local(alpha)
        return dd.all_gather_flat(local, layout.size, ctx) if bank else local
    return theta


@torch.no_grad()
def evaluate_soup(state: SoupState, layout: FlatLayout, config: SoupConfig, eval_sets, ctx: dd.DistContext,
                  bank: bool, autocast: torch.dtype | None, h_generic: np.ndarray) -> dict[str, Any]:
    """Held-out losses at φ(h_set) ("eval"); for a soup also what specialisation adds: each set's
    loss at φ(h_generic) ("eval_at_generic_alpha") and ‖φ(h_set) − φ(h_generic)‖ ("alpha_shift")."""
    theta_of = _full_theta_fn(state, layout, ctx, bank)
    alpha_generic = state.alpha(torch.as_tensor(h_generic)).detach()
    record: dict[str, Any] = {"eval": {}}
    if state.n:
        record.update(eval_at_generic_alpha={}, alpha_shift={})
        params_generic = layout.views(theta_of(alpha_generic))
    for es in eval_sets:
        alpha = state.alpha(torch.as_tensor(es.h)).detach()
        params = params_generic if state.n and es.name == "generic" else layout.views(theta_of(alpha))
        record["eval"][es.name] = windows_loss(params, config.model, es.windows, autocast_dtype=autocast)
        if state.n and es.name != "generic":
            record["eval_at_generic_alpha"][es.name] = windows_loss(params_generic, config.model, es.windows,
                                                                    autocast_dtype=autocast)
            record["alpha_shift"][es.name] = float(torch.linalg.vector_norm(alpha - alpha_generic))
    return record


def _save(state: SoupState, ckpt_dir: Path, step: int, ctx: dd.DistContext, bank: bool, meta: dict[str, Any]) -> None:
    meta = dict(meta, optimizer_steps=state.optimizer.step_count)
    if bank:
        ckpt.save_checkpoint(ckpt_dir, step, state.tensors(), meta, rank=ctx.rank, publish=False)
        dd.barrier()
        if ctx.is_main:
            ckpt.publish_checkpoint(ckpt_dir, step)
        dd.barrier()
    elif ctx.is_main:
        ckpt.save_checkpoint(ckpt_dir, step, state.tensors(), meta)


class _MetricsLog:
    """Append-only JSONL; on resume, lines past the checkpoint's step are dropped first."""

    def __init__(self, path: Path, start: int, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= start:
                        kept.append(line)
                except json.JSONDecodeError:
                    break  # a torn last line from a killed process
        path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
