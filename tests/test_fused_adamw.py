"""The compiled expert AdamW (trainer/_adamw_kernel.c): the same update as torch's fused AdamW,
the next step's merge folded into the same pass, and training that takes that merge."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from soe_sdk.config import ModelConfig, RouterConfig, SoupConfig
from soe_sdk.errors import SoeError
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
    every step; parameters and both moments match torch's update to float32 rounding.

    Where a row's gradient Σ_m α_mj g_m cancels almost completely (its terms 10⁴× larger than their
    sum), either path's rounding of it is as right as the other's, and Adam normalises that noise
    into a full step: there the parameters need only agree to within the steps taken."""
    n, q = 5, 150_007
    lrs = (1e-2, 3e-3, 1e-3)
    start = torch.randn(n, q, generator=torch.Generator().manual_seed(1)) * 0.1
    kernel = FlatAdamW({"E": start.clone()}, {"E": decay_end}, weight_decay=0.1)
    reference = FlatAdamW({"E": start.clone()}, {"E": decay_end}, weight_decay=0.1)
    cancelled = torch.zeros(n, q, dtype=torch.bool)
    for step, lr in enumerate(lrs):
        grad = _expert_grad(micro, n, q, seed=10 + step)
        a, g = torch.stack(grad.alphas), torch.stack(grad.grads)
        cancelled |= (a[:, :, None] * g[:, None, :]).abs().sum(0) > 1e4 * (a.T @ g).abs()
        kernel.step({"E": grad}, lr)
        torch_adamw(lambda: reference.step({"E": grad}, lr))
    assert not torch.equal(kernel.params["E"], start)
    assert int(cancelled.sum()) <= 1e-3 * n * q  # random rows: about 2 in 10⁴ elements
    torch.testing.assert_close(kernel.params["E"][~cancelled], reference.params["E"][~cancelled], rtol=0, atol=2e-6)
    gap = (kernel.params["E"] - reference.params["E"])[cancelled].abs()
    assert gap.numel() == 0 or float(gap.max()) <= 2 * sum(lrs)
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


@pytest.mark.parametrize("moments", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [4, 16])
def test_a_merge_made_alone_equals_the_merge_folded_into_an_update(two_threads, moments: torch.dtype, n: int) -> None:
    """Bit for bit, on whatever instruction set this CPU runs: a resumed run merges its first Θ on
    its own where the uninterrupted run took the folded one."""
    q = 70_001
    gen = torch.Generator().manual_seed(5)
    p, base, alpha = torch.randn(n, q, generator=gen), torch.randn(q, generator=gen), torch.randn(n, generator=gen)
    m, v = torch.zeros(n, q, dtype=moments), torch.zeros(n, q, dtype=moments)
    folded, alone = torch.empty(q), torch.full((q,), float("nan"))
    assert fused_adamw.update_rows(p, m, v, torch.randn(1, n, generator=gen), torch.randn(1, q, generator=gen),
                                   lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, decay_end=q // 2, step=3,
                                   merge=(base, alpha, folded))
    assert fused_adamw.merge_rows(base, alpha, p, alone)
    assert torch.equal(alone, folded)
    torch.testing.assert_close(alone.double(), base.double() + alpha.double() @ p.double(), rtol=0, atol=1e-5)
    assert not fused_adamw.merge_rows(base, alpha[:-1], p, alone)  # α of the wrong length: declined


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


def test_bfloat16_moments_kernel_equals_the_widened_torch_update(two_threads, torch_adamw) -> None:
    """bfloat16 moments: the kernel and torch's AdamW on widened copies store the same rounded
    moments, and the parameters follow the float32-moment trajectory to within bfloat16 rounding."""
    n, q, decay_end = 4, 150_007, 70_001
    start = torch.randn(n, q, generator=torch.Generator().manual_seed(6)) * 0.1
    runs = {name: FlatAdamW({"E": start.clone()}, {"E": decay_end}, weight_decay=0.1,
                            moment_dtype={} if name == "float32" else {"E": torch.bfloat16})
            for name in ("kernel", "torch", "float32")}
    for step, lr in enumerate((1e-2, 3e-3, 1e-3)):
        grad = _expert_grad(2, n, q, seed=20 + step)
        runs["kernel"].step({"E": grad}, lr)
        runs["float32"].step({"E": grad}, lr)
        torch_adamw(lambda: runs["torch"].step({"E": grad}, lr))
    kernel, reference, full = runs["kernel"], runs["torch"], runs["float32"]
    assert kernel.exp_avg["E"].dtype == kernel.exp_avg_sq["E"].dtype == torch.bfloat16
    moved = float((full.params["E"] - start).abs().max())
    # equal to float32 rounding, except where a moment rounded the other way at an earlier step
    # (one bfloat16 step, < 1 % of one update)
    gap = (kernel.params["E"] - reference.params["E"]).abs()
    assert float((gap > 2e-6).float().mean()) < 1e-3 and float(gap.max()) < 0.01 * moved
    for moments in ("exp_avg", "exp_avg_sq"):
        # the same float32 value rounded, except where an earlier step rounded the other way (an
        # absolute difference that later steps carry along: bfloat16 rounding of the moment's scale)
        ours, theirs = getattr(kernel, moments)["E"].float(), getattr(reference, moments)["E"].float()
        assert float((ours != theirs).float().mean()) < 1e-3
        torch.testing.assert_close(ours, theirs, rtol=0, atol=2 ** -8 * float(theirs.abs().max()))
        wide = getattr(full, moments)["E"]
        torch.testing.assert_close(ours, wide, rtol=0, atol=2 ** -7 * float(wide.abs().max()))
    assert float((kernel.params["E"] - full.params["E"]).abs().max()) < 0.01 * moved


def test_bfloat16_moments_round_to_nearest_even_and_keep_nan() -> None:
    """The kernel's rounding is torch's: for moments that land between bfloat16 values, on ties,
    and for a NaN gradient (which must not turn into an infinity)."""
    q = 4096
    gen = torch.Generator().manual_seed(7)
    p = torch.zeros(1, q)
    m = torch.zeros(1, q, dtype=torch.bfloat16)
    v = torch.zeros(1, q, dtype=torch.bfloat16)
    g = torch.randn(1, q, generator=gen)
    g[0, :64] = 1.0 + 2 ** -8 * torch.arange(64) / 32  # a run of values spanning ties
    g[0, 100] = float("nan")
    assert fused_adamw.update_rows(p, m, v, torch.ones(1, 1), g, lr=1e-3, betas=(0.0, 0.0), eps=1e-8,
                                   weight_decay=0.0, decay_end=0, step=1)
    # with β1 = β2 = 0 the moments are g and g² computed in float32, then rounded
    expected_m, expected_v = g.bfloat16(), (g * g).bfloat16()
    finite = torch.isfinite(g)
    assert torch.equal(m[finite], expected_m[finite]) and torch.equal(v[finite], expected_v[finite])
    assert bool(m[0, 100].isnan()) and bool(v[0, 100].isnan())


def test_training_with_bfloat16_moments_resumes_exactly(tmp_path: Path) -> None:
    """A tiny soup with bfloat16 expert moments: checkpoints keep them as bfloat16, a run paused
    and resumed ends bit for bit where the uninterrupted run does, and resuming it with the other
    moment dtype is refused."""
    work = make_workdir(tmp_path / "work")
    preset = get_preset("tiny").replace(max_steps=8, eval_every=10**6, expert_moments="bfloat16")
    straight = train(work, preset, spec=RunSpec("straight"), checkpoint_every=8, progress=False)
    train(work, preset, spec=RunSpec("paused"), checkpoint_every=4, stop_after=4, progress=False)
    with pytest.raises(SoeError, match="expert_moments"):
        train(work, preset.replace(expert_moments="float32"), spec=RunSpec("paused"), progress=False)
    paused = train(work, preset, spec=RunSpec("paused"), checkpoint_every=4, progress=False)
    a = ckpt.load_checkpoint(straight / "checkpoints", 8)[0]
    b = ckpt.load_checkpoint(paused / "checkpoints", 8)[0]
    assert a["opt.m.E"].dtype == a["opt.v.E"].dtype == torch.bfloat16 and a["opt.m.S"].dtype == torch.float32
    assert json.loads((straight / "run.json").read_text())["expert_moments"] == "bfloat16"
    for key in ("S", "E", "opt.m.E", "opt.v.E"):
        assert torch.equal(a[key], b[key]), key
