"""Improving a specialist on the user's own documents (paper §2.7 and §3.3).

- `refine_alpha`: minimise ψ(α) = next-token loss of Combine(S, E, α) over α only,
  starting from φ(h), with Adam; early stopping on held-out windows. The best α seen on
  the held-out windows is returned, and φ(h) itself counts as a candidate, so refinement
  never ends with a higher validation loss than it started with.
- `finetune`: all parameters of the instantiated Θ, same early stopping, within a token budget;
  by default several learning rates are tried from the same start and the one with the best
  held-out loss is kept (a soup's Θ and a plain model's want different rates: a merged Θ has
  larger weights, so the same step changes it relatively less).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .config import ModelConfig
from .model import next_token_loss
from .soup import Soup, combine_parameter


@dataclass
class FitResult:
    """What an optimisation on the user's documents did."""

    val_before: float
    val_after: float
    steps: int
    seconds: float
    stopped: str  # "early-stop", "step budget", "time budget", "token budget", "diverged", "no data"
    history: list[dict[str, float]] = field(default_factory=list)
    lr: float | None = None  # the learning rate kept, when several were tried
    tried: dict[float, float] = field(default_factory=dict)  # learning rate → best held-out loss it reached

    @property
    def fell_back(self) -> bool:
        return self.val_after >= self.val_before


def _val_loss(params: dict[str, Tensor], config: ModelConfig, val: Tensor, batch: int = 16) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(val), batch):
            rows = val[start:start + batch]
            total += float(next_token_loss(params, config, rows)) * rows.numel()
            count += rows.numel()
    return total / max(count, 1)


class _Batches:
    """Endless shuffled mini-batches of training windows (seeded)."""

    def __init__(self, train: Tensor, batch_size: int, seed: int) -> None:
        self.train, self.batch_size = train, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.order: list[int] = []

    def next(self) -> Tensor:
        if len(self.order) < self.batch_size:
            self.order += torch.randperm(len(self.train), generator=self.gen).tolist()
        idx, self.order = self.order[:self.batch_size], self.order[self.batch_size:]
        return self.train[idx]


def _early_stopped(step_once: Callable[[], float], evaluate: Callable[[], float], snapshot: Callable[[], Any],
                   *, before: float, max_steps: int, max_seconds: float | None, eval_every: int, patience: int,
                   budget: str, desc: str, progress: bool) -> tuple[Any, FitResult]:
    """The loop both fits share: step, evaluate every `eval_every` steps, keep the best
    snapshot (the starting point counts), stop on patience, divergence or budget."""
    start_time = time.time()
    best, best_val = snapshot(), before
    history: list[dict[str, float]] = [{"step": 0, "val": before}]
    stale, stopped, step = 0, budget, 0
    bar = tqdm(total=max_steps, desc=desc, unit="step", disable=not progress)
    for step in range(1, max_steps + 1):
        loss = step_once()
        bar.update(1)
        if not math.isfinite(loss):
            stopped = "diverged"
            break
        if step % eval_every == 0 or step == max_steps:
            current = evaluate()
            history.append({"step": step, "val": current, "train": loss})
            bar.set_postfix(val=f"{current:.3f}")
            if current < best_val - 1e-4:
                best, best_val, stale = snapshot(), current, 0
            else:
                stale += 1
                if stale >= patience:
                    stopped = "early-stop"
                    break
        if max_seconds is not None and time.time() - start_time > max_seconds:
            stopped = "time budget"
            break
    bar.close()
    return best, FitResult(before, best_val, step, time.time() - start_time, stopped, history)


def refine_alpha(soup: Soup, alpha0: Tensor, train: Tensor, val: Tensor, *, max_steps: int = 60,
                 max_seconds: float = 45.0, lr: float = 0.05, batch_size: int = 8, eval_every: int = 5,
                 patience: int = 3, seed: int = 0, progress: bool = False) -> tuple[Tensor, FitResult]:
    """Adam on α only; returns (best α on the held-out windows, what happened).

    If the optimisation diverges, the best α seen so far — at worst φ(h) — is returned and
    `FitResult.stopped` says "diverged".
    """
    names = list(soup.model_config.parameter_shapes())
    shared = {k: soup.shared_tensor(k) for k in names}
    banks = {k: soup.expert_tensors(k) for k in names}
    alpha = alpha0.detach().clone().to(soup.device).requires_grad_(True)
    train, val = train.to(soup.device), val.to(soup.device)

    def merged(a: Tensor) -> dict[str, Tensor]:
        return {k: combine_parameter(shared[k], banks[k], a) for k in names}

    evaluate = lambda: _val_loss(merged(alpha.detach()), soup.model_config, val)  # noqa: E731
    before = evaluate() if len(val) else math.nan
    if len(train) == 0 or len(val) == 0 or soup.n == 0:
        return alpha.detach().cpu(), FitResult(before, before, 0, 0.0, "no data")
    opt = torch.optim.Adam([alpha], lr=lr)
    batches = _Batches(train, batch_size, seed)

    def step_once() -> float:
        loss = next_token_loss(merged(alpha), soup.model_config, batches.next())
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss.detach()) if torch.isfinite(alpha).all() else math.nan

    best, result = _early_stopped(step_once, evaluate, lambda: alpha.detach().clone(), before=before,
                                  max_steps=max_steps, max_seconds=max_seconds, eval_every=eval_every,
                                  patience=patience, budget="step budget", desc="refining α", progress=progress)
    return best.cpu(), result


FINETUNE_LRS = (1e-4, 3e-4, 1e-3, 3e-3)  # tried by `finetune` unless told otherwise


def finetune(params: dict[str, Tensor], config: ModelConfig, train: Tensor, val: Tensor, *, max_tokens: int,
             lr: float | Sequence[float] = FINETUNE_LRS, batch_size: int = 8, eval_every: int = 10,
             patience: int = 3, seed: int = 0, max_seconds: float | None = None,
             progress: bool = False) -> tuple[dict[str, Tensor], FitResult]:
    """Fine-tune every parameter with AdamW for at most `max_tokens` training tokens;
    returns (the parameters with the best held-out loss, what happened).

    With several learning rates (the default), each runs from the same start with the same
    batches and early stopping (`max_seconds` is per rate), and the one whose best held-out
    loss is lowest wins; `FitResult.lr` names it and `FitResult.tried` lists them all.
    """
    rates = [float(lr)] if isinstance(lr, (int, float)) else [float(x) for x in lr]
    if not rates:
        raise ValueError("finetune: give at least one learning rate")
    best: tuple[dict[str, Tensor], FitResult] | None = None
    tried: dict[float, float] = {}
    for rate in rates:
        tuned, fit = _finetune_at(params, config, train, val, max_tokens=max_tokens, lr=rate,
                                  batch_size=batch_size, eval_every=eval_every, patience=patience, seed=seed,
                                  max_seconds=max_seconds, progress=progress)
        fit.lr = rate
        tried[rate] = fit.val_after
        if best is None or fit.val_after < best[1].val_after:  # ties keep the earlier (lower) rate
            best = (tuned, fit)
        if fit.stopped == "no data":  # nothing to fit: every rate would say the same
            break
    tuned, fit = best
    fit.tried = tried
    return tuned, fit


def _finetune_at(params: dict[str, Tensor], config: ModelConfig, train: Tensor, val: Tensor, *, max_tokens: int,
                 lr: float, batch_size: int, eval_every: int, patience: int, seed: int, max_seconds: float | None,
                 progress: bool) -> tuple[dict[str, Tensor], FitResult]:
    theta = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    evaluate = lambda: _val_loss(theta, config, val)  # noqa: E731
    before = evaluate() if len(val) else math.nan
    if len(train) == 0 or len(val) == 0 or max_tokens <= 0:
        return {k: v.detach() for k, v in theta.items()}, FitResult(before, before, 0, 0.0, "no data")
    opt = torch.optim.AdamW(list(theta.values()), lr=lr, weight_decay=0.0)
    batches = _Batches(train, batch_size, seed)

    def step_once() -> float:
        loss = next_token_loss(theta, config, batches.next())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(theta.values()), 1.0)
        opt.step()
        return float(loss.detach())

    steps_budget = max(1, max_tokens // (batch_size * (train.shape[1] - 1)))
    return _early_stopped(step_once, evaluate, lambda: {k: v.detach().clone() for k, v in theta.items()},
                          before=before, max_steps=steps_budget, max_seconds=max_seconds, eval_every=eval_every,
                          patience=patience, budget="token budget", desc=f"fine-tuning (lr {lr:g})",
                          progress=progress)
