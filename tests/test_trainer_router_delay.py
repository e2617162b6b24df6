"""The delayed router gradient (`--router-grad-delay`): φ's update at step t + 1 uses step t's
exact ∂ℓ/∂α = E g, formed by the optimizer's pass over the bank (or by a product before it where
the compiled kernel does not run); and a frozen router computes no ∂ℓ/∂α at all."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from soe_sdk.config import ModelConfig, RouterConfig, SoupConfig
from soe_sdk.errors import SoeError
from trainer import checkpoint as ckpt
from trainer import fused_adamw
from trainer.loop import RunSpec, train
from trainer.presets import get_preset
from trainer.state import SoupState

from .conftest import make_workdir

CONFIG = SoupConfig(ModelConfig(vocab_size=300, max_seq_len=32, d_model=32, n_layers=2, n_heads=2, d_mlp=64),
                    RouterConfig(k=4, n=3, hidden=8))
KERNEL = [True, False] if fused_adamw.available() else [False]


def _batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    return [(torch.softmax(torch.randn(4, generator=gen), 0), torch.randint(0, 300, (2, 32), generator=gen))
            for _ in range(count)]


@pytest.mark.parametrize("kernel", KERNEL)
def test_the_delayed_gradient_is_the_exact_gradient_of_the_step_before(kernel: bool) -> None:
    """Two micro-batches: the router .grad a delayed state holds after its update equals the .grad an
    exact state accumulates during the same micro-batches, before clipping and before the update."""
    previous = fused_adamw.set_enabled(kernel)
    try:
        exact = SoupState.fresh(CONFIG, 5, torch.device("cpu"))
        delayed = SoupState.fresh(CONFIG, 5, torch.device("cpu"), router_grad_delay=True)
        for state in (exact, delayed):
            state.zero_grad()
            for h, tokens in _batches(2):
                state.micro_step(h, tokens, 0.5)
        expected = {k: p.grad.clone() for k, p in exact.router.items()}
        assert all(p.grad is None for p in delayed.router.values())  # nothing yet: E g comes with the update
        delayed.optimizer_step(delayed.grad_dict(), 1e-2)
        for k, p in delayed.router.items():
            torch.testing.assert_close(p.grad, expected[k], rtol=1e-4, atol=1e-7, msg=k)
        delayed.zero_grad()  # keeps the delayed gradient for the next step's update
        assert all(p.grad is not None for p in delayed.router.values())
    finally:
        fused_adamw.set_enabled(previous)


def test_a_frozen_router_gets_no_gradient_and_its_delayed_one_is_dropped() -> None:
    state = SoupState.fresh(CONFIG, 5, torch.device("cpu"), router_grad_delay=True)
    (h, tokens), = _batches(1)
    state.zero_grad()
    state.micro_step(h, tokens, 1.0)
    state.set_router_lr_scale(0.0)  # frozen from this update on: the step's E g is not needed any more
    before = {k: p.detach().clone() for k, p in state.router.items()}
    state.optimizer_step(state.grad_dict(), 1e-2)
    assert all(p.grad is None for p in state.router.values())
    state.zero_grad()
    loss = state.micro_step(h, tokens, 1.0)
    assert loss > 0 and all(p.grad is None for p in state.router.values())
    assert float(state.grad_shared.abs().sum()) > 0  # S and E still learn
    state.optimizer_step(state.grad_dict(), 1e-2)
    for k, p in state.router.items():
        assert torch.equal(p.detach(), before[k]), k


def test_low_rank_experts_refuse_the_delay() -> None:
    config = SoupConfig(CONFIG.model, RouterConfig(k=4, n=3, hidden=8), expert_rank=2)
    with pytest.raises(SoeError, match="router-grad-delay"):
        SoupState.fresh(config, 5, torch.device("cpu"), router_grad_delay=True)


def test_training_with_the_delay_follows_the_exact_run_and_resumes_bit_for_bit(tmp_path: Path) -> None:
    """A tiny soup, 10 steps: with the delay φ moves the way the exact run's φ does, the run is recorded,
    and a run paused at step 5 (its delayed gradient in the checkpoint) ends exactly where the
    uninterrupted run does; resuming it without the delay is refused."""
    work = make_workdir(tmp_path / "work")
    base = get_preset("tiny").replace(max_steps=10, eval_every=10**6)
    delay = base.replace(router_grad_delay=True)
    exact = train(work, base, spec=RunSpec("exact"), checkpoint_every=10, progress=False)
    straight = train(work, delay, spec=RunSpec("straight"), checkpoint_every=10, progress=False)
    train(work, delay, spec=RunSpec("paused"), checkpoint_every=5, stop_after=5, progress=False)
    mid = ckpt.load_checkpoint(tmp_path / "work" / "runs" / "paused" / "checkpoints", 5)[0]
    assert any(k.startswith("delayed_grad.router.") for k in mid)
    with pytest.raises(SoeError, match="router_grad_delay"):
        train(work, base, spec=RunSpec("paused"), progress=False)
    paused = train(work, delay, spec=RunSpec("paused"), checkpoint_every=5, progress=False)
    assert json.loads((straight / "run.json").read_text())["router_grad_delay"] is True
    runs = {name: ckpt.load_checkpoint(d / "checkpoints", 10)[0] for name, d in
            (("exact", exact), ("straight", straight), ("paused", paused))}
    for key in ("S", "E", "router.fc1.weight", "router.fc2.weight", "opt.m.router.fc2.weight"):
        assert torch.equal(runs["straight"][key], runs["paused"][key]), key
    initial = SoupState.fresh(SoupConfig(base.model, RouterConfig(k=4, n=base.experts, hidden=base.router_hidden)),
                              json.loads((exact / "run.json").read_text())["seed"], torch.device("cpu"))
    for key in ("router.fc1.weight", "router.fc2.weight"):
        moved_exact = (runs["exact"][key] - initial.router[key].detach()).flatten()
        moved_delay = (runs["straight"][key] - initial.router[key].detach()).flatten()
        assert float(moved_delay.norm()) > 0
        assert float(torch.nn.functional.cosine_similarity(moved_exact, moved_delay, dim=0)) > 0.9, key
