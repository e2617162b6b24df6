"""The compiled expert AdamW (trainer/_adamw_kernel.c): the same update as torch's fused AdamW,
the next step's merge folded into the same pass, and training that takes that merge."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from soe_sdk.config import ModelConfig, RouterConfig, SoupConfig
from soe_sdk.fused import split_columns
from trainer import checkpoint as ckpt
from trainer import fused_adamw
from trainer.loop import RunSpec, train
from trainer.optim import ExpertGrad, FlatAdamW
from trainer.presets import get_preset
from trainer.state import SoupState

from .conftest import make_workdir

if not fused_adamw.available():
    pytest.skip("the expert AdamW kernel was not built (no C compiler at install time)", allow_module_level=True)


@pytest.fixture()
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.fixture()
def torch_adamw():
    """Run the block with the kernel switched off (the reference path), then switch it back on."""
    def run(fn):
        previous = fused_adamw.set_enabled(False)
        try:
            return fn()
        finally:
            fused_adamw.set_enabled(previous)
    return run


def _expert_grad(micro: int, n: int, q: int, seed: int) -> ExpertGrad:
    gen = torch.Generator().manual_seed(seed)
    grad = ExpertGrad()
    for _ in range(micro):
        grad.add(torch.randn(n, generator=gen), torch.randn(q, generator=gen))
    grad.scale = 0.5  # as clipping leaves it
    return grad


@pytest.mark.parametrize("micro", [1, 3])
@pytest.mark.parametrize("decay_end", [0, 70_001, 150_007])
def test_kernel_update_equals_torch_fused_adamw(micro: int, decay_end: int, two_threads, torch_adamw) -> None:
    """Three steps on a bank wide enough to be split across threads, with lr and gradients changing
    every step; parameters and both moments match torch's update to float32 rounding."""
    n, q = 5, 150_007
    start = torch.randn(n, q, generator=torch.Generator().manual_seed(1)) * 0.1
    kernel = FlatAdamW({"E": start.clone()}, {"E": decay_end}, weight_decay=0.1)
    reference = FlatAdamW({"E": start.clone()}, {"E": decay_end}, weight_decay=0.1)
    for step, lr in enumerate((1e-2, 3e-3, 1e-3)):
        grad = _expert_grad(micro, n, q, seed=10 + step)
        kernel.step({"E": grad}, lr)
        torch_adamw(lambda: reference.step({"E": grad}, lr))
    assert not torch.equal(kernel.params["E"], start)
    torch.testing.assert_close(kernel.params["E"], reference.params["E"], rtol=0, atol=2e-6)
    for moments in ("exp_avg", "exp_avg_sq"):  # float32 rounding, relative to the moment's scale
        ours, theirs = getattr(kernel, moments)["E"], getattr(reference, moments)["E"]
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6 * float(theirs.abs().max()))
    if 0 < decay_end < q:  # with a zero gradient, only the decayed prefix moves
        still = FlatAdamW({"E": kernel.params["E"].clone()}, {"E": decay_end}, weight_decay=0.5)
        before = still.params["E"].clone()
        zero = ExpertGrad()
        zero.add(torch.zeros(n), torch.zeros(q))
        still.step({"E": zero}, 0.1)
        torch.testing.assert_close(still.params["E"][:, :decay_end], before[:, :decay_end] * (1 - 0.1 * 0.5))
        assert torch.equal(still.params["E"][:, decay_end:], before[:, decay_end:])


def test_next_merge_is_written_in_the_same_pass(two_threads) -> None:
    """With `next_merge`, out = base + α'ᵀE_new, where base is S after its own update (S is updated first)."""
    n, q = 4, 100_003
    gen = torch.Generator().manual_seed(2)
    opt = FlatAdamW({"E": torch.randn(n, q, generator=gen), "S": torch.randn(q, generator=gen)}, {"E": q, "S": q})
    alpha_next, out = torch.randn(n, generator=gen), torch.full((q,), float("nan"))
    seen = {}

    def next_merge():
        seen["S"] = opt.params["S"].clone()
        return opt.params["S"], alpha_next, out

    merged = opt.step({"E": _expert_grad(2, n, q, seed=3), "S": torch.randn(q, generator=gen)}, 1e-2, next_merge)
    assert merged
    assert torch.equal(seen["S"], opt.params["S"])  # S had been updated when the merge was asked for
    expected = opt.params["S"].double() + alpha_next.double() @ opt.params["E"].double()
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)


def test_kernel_declines_what_it_cannot_take() -> None:
    n, q = 3, 1000
    grad = _expert_grad(1, n, q, seed=4)
    a, g = grad.stacked()
    for p in (torch.randn(n, q, dtype=torch.float64), torch.randn(q, n).T):  # float64; not contiguous
        m, v = torch.zeros_like(p), torch.zeros_like(p)
        before = p.clone()
        assert not fused_adamw.update_rows(p, m, v, a.to(p.dtype), g.to(p.dtype), lr=1e-2, betas=(0.9, 0.95),
                                           eps=1e-8, weight_decay=0.1, decay_end=q, step=1)
        assert torch.equal(p, before) and not m.any()
    p = torch.randn(n, q)
    assert not fused_adamw.update_rows(p, torch.zeros_like(p), torch.zeros_like(p), a[:, :2].contiguous(), g,
                                       lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, decay_end=q, step=1)


def test_split_columns_hands_out_every_column_exactly_once() -> None:
    for q, threads in ((16_383, 2), (300_001, 2), (300_001, 3), (1_000_000, 4)):
        counts = torch.zeros(q, dtype=torch.int32)
        calls = []

        def part(lo: int, hi: int) -> None:
            calls.append((lo, hi))
            counts[lo:hi] += 1  # ranges are disjoint, so threads never write the same element

        split_columns(part, q, threads=threads)
        assert bool((counts == 1).all()), (q, threads)
        assert all(lo % 16384 == 0 for lo, _ in calls)


CONFIG = SoupConfig(ModelConfig(vocab_size=300, max_seq_len=32, d_model=32, n_layers=2, n_heads=2, d_mlp=64),
                    RouterConfig(k=4, n=3, hidden=8))


def _one_step(state: SoupState, h: torch.Tensor, tokens: torch.Tensor, next_h: torch.Tensor | None) -> None:
    state.zero_grad()
    state.micro_step(h, tokens, 1.0)
    state.optimizer_step(state.grad_dict(), 1e-2, next_h)


def test_micro_step_takes_the_merge_made_ahead_only_for_its_own_h() -> None:
    state = SoupState.fresh(CONFIG, 5, torch.device("cpu"))
    tokens = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    h1, h2 = torch.tensor([0.7, 0.1, 0.1, 0.1]), torch.tensor([0.1, 0.1, 0.1, 0.7])
    _one_step(state, h1, tokens, next_h=h2)
    ahead = state._next_theta[1].clone()
    torch.testing.assert_close(ahead, state.merge_local(state.alpha(h2)), rtol=0, atol=1e-6)
    _one_step(state, h2, tokens, next_h=h2)  # takes the merge made for h2
    assert state.prefetched_merges == 1
    _one_step(state, h1, tokens, next_h=None)  # made for h2, asked for h1: merges afresh
    assert state.prefetched_merges == 1 and state._next_theta is None


def test_training_with_the_kernel_equals_training_through_torch(tmp_path: Path, torch_adamw) -> None:
    """The same tiny soup run twice, 12 steps with 2 micro-batches each: the kernel (and the merges
    it makes ahead) and torch's AdamW end at the same parameters and moments."""
    work = make_workdir(tmp_path / "work")
    preset = get_preset("tiny").replace(max_steps=12, grad_accum=2, eval_every=10**6)
    runs, ahead = {}, {}
    for name, run in (("kernel", lambda: train(work, preset, spec=RunSpec("kernel"), checkpoint_every=12,
                                              progress=False)),
                      ("torch", lambda: torch_adamw(lambda: train(work, preset, spec=RunSpec("torch"),
                                                                   checkpoint_every=12, progress=False)))):
        run_dir = run()
        runs[name] = ckpt.load_checkpoint(run_dir / "checkpoints", 12)[0]
        ahead[name] = [json.loads(line).get("merged_ahead") for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # in this process's run: every step after the first found its first micro-batch's Θ merged ahead
    assert [a for a in ahead["kernel"] if a is not None][-1] == 11
    assert [a for a in ahead["torch"] if a is not None][-1] == 0
    for key in ("S", "E", "opt.m.E", "opt.v.E", "router.fc1.weight"):
        scale = float(runs["torch"][key].abs().max())
        torch.testing.assert_close(runs["kernel"][key], runs["torch"][key], rtol=0, atol=1e-4 * scale)
