"""The factored expert gradient and the flat AdamW: the same update as the materialised gradient."""
from __future__ import annotations

import pytest
import torch

from soe_sdk.errors import SoeError

from trainer.optim import ExpertGrad, FlatAdamW


def _pairs(m: int, n: int, q: int, seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=gen) for _ in range(m)], [torch.randn(q, generator=gen) for _ in range(m)]


def test_expert_grad_rows_and_norm_equal_the_materialised_sum() -> None:
    for m in (1, 3):
        alphas, grads = _pairs(m, n=5, q=37, seed=m)
        expected = sum(torch.outer(a, g) for a, g in zip(alphas, grads))
        eg = ExpertGrad()
        for a, g in zip(alphas, grads):
            eg.add(a, g)
        eg.scale = 0.25
        expected = expected * 0.25
        torch.testing.assert_close(eg.dense(5, 37), expected)
        buffer = torch.empty(37)
        for j, row in enumerate(eg.rows(buffer)):
            torch.testing.assert_close(row, expected[j])
        assert j == 4
        assert abs(eg.sq_norm() - float(expected.double().pow(2).sum())) < 1e-6 * float(expected.pow(2).sum())


def test_adamw_step_with_a_factored_gradient_equals_the_dense_step() -> None:
    n, q, end = 4, 50, 30
    alphas, grads = _pairs(2, n, q, seed=7)
    eg = ExpertGrad()
    for a, g in zip(alphas, grads):
        eg.add(a, g)
    start = torch.randn(n, q, generator=torch.Generator().manual_seed(1))
    factored = FlatAdamW({"E": start.clone()}, {"E": end}, weight_decay=0.1)
    dense = FlatAdamW({"E": start.clone()}, {"E": end}, weight_decay=0.1)
    for lr in (1e-2, 5e-3):
        factored.step({"E": eg}, lr)
        dense.step({"E": eg.dense(n, q)}, lr)
    torch.testing.assert_close(factored.params["E"], dense.params["E"], rtol=0, atol=1e-6)
    torch.testing.assert_close(factored.exp_avg_sq["E"], dense.exp_avg_sq["E"], rtol=1e-5, atol=1e-12)
    # decoupled decay only on the prefix: with a zero gradient the suffix does not move
    zero = ExpertGrad()
    zero.add(torch.zeros(n), torch.zeros(q))
    before = factored.params["E"].clone()
    fresh = FlatAdamW({"E": before.clone()}, {"E": end}, weight_decay=0.5)
    fresh.step({"E": zero}, 0.1)
    torch.testing.assert_close(fresh.params["E"][:, :end], before[:, :end] * (1 - 0.1 * 0.5))
    torch.testing.assert_close(fresh.params["E"][:, end:], before[:, end:])


def test_bank_sharded_init_equals_the_slices_of_the_full_soup() -> None:
    from soe_sdk.config import ModelConfig, RouterConfig, SoupConfig
    from trainer.distributed import padded_size
    from trainer.state import SoupState

    config = SoupConfig(ModelConfig(vocab_size=300, max_seq_len=32, d_model=32, n_layers=2, n_heads=2, d_mlp=64),
                        RouterConfig(k=4, n=3, hidden=8))
    full = SoupState.fresh(config, 11, torch.device("cpu"))
    p = full.shared.numel()
    size = padded_size(p, 3)
    pad = lambda t: torch.nn.functional.pad(t, (0, size - p))  # noqa: E731
    for rank in range(3):
        lo, hi = rank * size // 3, (rank + 1) * size // 3
        part = SoupState.fresh(config, 11, torch.device("cpu"), shard=(lo, hi, size))
        assert torch.equal(part.shared, pad(full.shared)[lo:hi])
        assert torch.equal(part.experts, pad(full.experts)[:, lo:hi])
        for name, value in full.router.items():
            assert torch.equal(part.router[name], value)


def test_a_frozen_router_gets_no_gradient_and_the_step_is_otherwise_the_same() -> None:
    """Once φ is frozen a micro-step computes no ∂ℓ/∂α (no E g, no backward into φ), and S and E
    receive exactly the gradients they receive while φ learns."""
    from soe_sdk.config import ModelConfig, RouterConfig, SoupConfig
    from trainer.state import SoupState

    config = SoupConfig(ModelConfig(vocab_size=300, max_seq_len=32, d_model=32, n_layers=2, n_heads=2, d_mlp=64),
                        RouterConfig(k=4, n=3, hidden=8))
    gen = torch.Generator().manual_seed(4)
    h, tokens = torch.softmax(torch.randn(4, generator=gen), 0), torch.randint(0, 300, (2, 32), generator=gen)
    grads = {}
    for frozen in (False, True):
        state = SoupState.fresh(config, 11, torch.device("cpu"))
        if frozen:
            state.set_router_lr_scale(0.0)
        assert state.router_learning is not frozen
        state.zero_grad()
        state.micro_step(h, tokens, 1.0)
        grads[frozen] = state.grad_dict()
        assert all((p.grad is None) is frozen for p in state.router.values())
        if frozen:
            before = {k: v.detach().clone() for k, v in state.router.items()}
            state.optimizer_step(grads[frozen], 1e-2)
            assert all(torch.equal(v.detach(), before[k]) for k, v in state.router.items())
    assert torch.equal(grads[True]["S"], grads[False]["S"])
    assert torch.equal(grads[True]["E"].dense(3, grads[True]["E"].grads[0].numel()),
                       grads[False]["E"].dense(3, grads[False]["E"].grads[0].numel()))
    assert float(grads[False]["router.fc2.weight"].abs().sum()) > 0
    assert float(grads[True]["router.fc2.weight"].abs().sum()) == 0


def test_experts_on_vectors_only_leave_every_matrix_at_the_shared_value() -> None:
    """With expert_params="vectors" the experts of every matrix start and stay at 0 through real
    steps (Θ = S there), while the 1-D parameters' experts learn and φ still gets ∂ℓ/∂α."""
    from soe_sdk.config import ModelConfig, RouterConfig, SoupConfig
    from trainer.state import SoupState

    config = SoupConfig(ModelConfig(vocab_size=300, max_seq_len=32, d_model=32, n_layers=2, n_heads=2, d_mlp=64),
                        RouterConfig(k=4, n=3, hidden=8))
    gen = torch.Generator().manual_seed(5)
    state = SoupState.fresh(config, 11, torch.device("cpu"), expert_params="vectors")
    shapes = config.model.parameter_shapes()
    c = state.expert_from
    assert c == sum(int(torch.Size(s).numel()) for s in shapes.values() if len(s) == 2)
    for step in range(3):
        h = torch.softmax(torch.randn(4, generator=gen), 0)
        state.zero_grad()
        state.micro_step(h, torch.randint(0, 300, (2, 32), generator=gen), 1.0)
        grads = state.grad_dict()
        # the 1-D experts start at 0, so φ's first gradient E g is 0 too
        assert (float(grads["router.fc2.weight"].abs().sum()) > 0) is (step > 0)
        state.optimizer_step(grads, 1e-2)
    views = state.layout.experts.views(state.experts.detach())
    for name, shape in shapes.items():
        moved = float(views[name].abs().max())
        assert (moved == 0.0) if len(shape) == 2 else (moved > 0.0), name
    with pytest.raises(SoeError, match="expert-params"):
        SoupState.fresh(config, 11, torch.device("cpu"), expert_params="matrices")


def test_per_parameter_learning_rate_scales() -> None:
    start = torch.randn(10, generator=torch.Generator().manual_seed(2))
    grad = torch.ones(10)
    moves = {}
    for scale in (0.0, 1.0, 10.0):
        opt = FlatAdamW({"E": start.clone(), "S": start.clone()}, {}, weight_decay=0.0, lr_scale={"E": scale})
        opt.step({"E": grad, "S": grad}, 1e-3)
        moves[scale] = float((start - opt.params["E"]).abs().max())
        torch.testing.assert_close(opt.params["S"], start - 1e-3, rtol=0, atol=1e-6)  # unscaled
    assert moves[0.0] == 0.0
    assert abs(moves[10.0] - 10 * moves[1.0]) < 1e-6


def test_zero_expert_init_starts_at_theta_equals_s_and_centring_tracks_the_mean_alpha() -> None:
    from soe_sdk.config import ModelConfig, RouterConfig, SoupConfig
    from trainer.state import SoupState

    config = SoupConfig(ModelConfig(vocab_size=300, max_seq_len=32, d_model=32, n_layers=2, n_heads=2, d_mlp=64),
                        RouterConfig(k=4, n=3, hidden=8))
    zero = SoupState.fresh(config, 11, torch.device("cpu"), expert_init_scale=0.0)
    assert torch.equal(zero.merge_local(torch.tensor([1.0, -2.0, 3.0])), zero.shared)

    state = SoupState.fresh(config, 11, torch.device("cpu"), centre_alpha=True, router_input_scale=4.0)
    draws = [torch.tensor([0.7, 0.1, 0.1, 0.1]), torch.tensor([0.1, 0.1, 0.1, 0.7])]
    raw = torch.stack([state.alpha(h).detach() for h in draws])  # centre still 0: raw φ(4h)
    for _ in range(2000):  # one optimizer step per pair of micro-batches; the router does not move
        state.update_centre([state.alpha(h).detach() for h in draws])
    torch.testing.assert_close(state.alpha_centre, raw.mean(0), rtol=0, atol=1e-4)
    centred = torch.stack([state.alpha(h).detach() for h in draws])
    torch.testing.assert_close(centred.mean(0), torch.zeros(3), rtol=0, atol=1e-4)
    torch.testing.assert_close(centred[0] - centred[1], raw[0] - raw[1])  # differences between h are kept


def test_shared_preconditioner_moves_each_expert_in_proportion_to_its_alpha() -> None:
    """An expert row preconditioned by S's √v: with gradient α_j·g its step is α_j × S's step
    (exactly, at the first step and without decay), and a zero α leaves the expert still."""
    q, n = 40, 3
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(q, generator=gen)
    alpha = torch.tensor([1.0, 0.25, 0.0])
    shared, experts = torch.randn(q, generator=gen), torch.randn(n, q, generator=gen)
    opt = FlatAdamW({"S": shared.clone(), "E": experts.clone()}, {}, weight_decay=0.0,
                    shared_moments={"E": ("S", 0)})
    eg = ExpertGrad()
    eg.add(alpha, g)
    opt.step({"S": g, "E": eg}, 1e-2)
    s_step = opt.params["S"] - shared
    for j in range(n):
        torch.testing.assert_close(opt.params["E"][j] - experts[j], alpha[j] * s_step, rtol=1e-4, atol=1e-7)
    assert torch.equal(opt.exp_avg_sq["E"], torch.zeros(n, q))  # the experts keep no second moment of their own
    # with their own moments (the default), Adam normalises: the α = 0.25 expert moves as far as α = 1
    own = FlatAdamW({"S": shared.clone(), "E": experts.clone()}, {}, weight_decay=0.0)
    own.step({"S": g, "E": eg}, 1e-2)
    torch.testing.assert_close(own.params["E"][1] - experts[1], own.params["E"][0] - experts[0], rtol=1e-3, atol=1e-6)


def test_expert_beta1_sets_how_long_an_expert_averages_its_gradient() -> None:
    """Shared preconditioner with the experts' own β₁: the first step is α_j × S's step whatever β₁
    (bias correction), and once the gradient turns round, an expert with β₁ = 0.99 still moves the old
    way for far longer than S with 0.9."""
    q = 16
    gen = torch.Generator().manual_seed(5)
    g = torch.randn(q, generator=gen)
    opt = FlatAdamW({"S": torch.zeros(q), "E": torch.zeros(1, q)}, {}, weight_decay=0.0,
                    shared_moments={"E": ("S", 0)}, beta1_of={"E": 0.99})

    def step(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        eg = ExpertGrad()
        eg.add(torch.tensor([1.0]), grad)
        before = (opt.params["S"].clone(), opt.params["E"][0].clone())
        opt.step({"S": grad.clone(), "E": eg}, 1e-2)
        return opt.params["S"] - before[0], opt.params["E"][0] - before[1]

    s_step, e_step = step(g)
    torch.testing.assert_close(e_step, s_step, rtol=1e-5, atol=1e-8)
    for _ in range(20):
        step(g)
    for _ in range(10):  # the gradient reverses: S turns round within a few steps, the slow expert does not
        s_step, e_step = step(-g)
    assert float((e_step * g).sum()) < 0 < float((s_step * g).sum())  # a step against g: descending the old gradient
    import pytest

    from soe_sdk.config import ModelConfig, RouterConfig, SoupConfig
    from soe_sdk.errors import SoeError
    from trainer.state import SoupState
    config = SoupConfig(ModelConfig(vocab_size=32, max_seq_len=8, d_model=8, n_layers=1, n_heads=2, d_mlp=16),
                        RouterConfig(k=4, n=2, hidden=4))
    with pytest.raises(SoeError, match="expert-beta1"):  # own moments: the kernel's β₁ is the preset's
        SoupState.fresh(config, 0, torch.device("cpu"), expert_beta1=0.99)


def test_centroid_router_is_linear_in_h_and_zero_at_the_generic_mixture() -> None:
    import numpy as np

    from soe_sdk.soup import router_forward
    from trainer.router_init import centroid_features, linear_router

    rng = np.random.default_rng(0)
    centroids = rng.normal(size=(12, 20))
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    h_generic = rng.dirichlet(np.ones(12))
    features = centroid_features(centroids, h_generic, n=4, scale=2.0)
    router = linear_router(features, hidden=10)
    hs = torch.as_tensor(rng.dirichlet(np.ones(12), size=5), dtype=torch.float32)
    torch.testing.assert_close(router_forward(router, hs), hs @ torch.as_tensor(features, dtype=torch.float32).T,
                               rtol=1e-5, atol=1e-5)
    assert float(router_forward(router, torch.as_tensor(h_generic, dtype=torch.float32)).abs().max()) < 1e-5
    assert abs(float((h_generic * (features ** 2).sum(0)).sum()) - 4.0) < 1e-9  # RMS ‖α‖ of one domain = scale
    # similar centroids get similar α: the two closest domains are nearer in α than the two farthest
    sim = centroids @ centroids.T - 2 * np.eye(12)
    near, far = np.unravel_index(sim.argmax(), sim.shape), np.unravel_index((sim + 4 * np.eye(12)).argmin(), sim.shape)
    dist = lambda a, b: float(np.linalg.norm(features[:, a] - features[:, b]))  # noqa: E731
    assert dist(*near) < dist(*far)
    import pytest

    from soe_sdk.errors import SoeError
    with pytest.raises(SoeError, match="hidden width"):
        linear_router(features, hidden=7)


def test_group_router_gives_each_group_the_mass_h_puts_on_it() -> None:
    import numpy as np

    from soe_sdk.soup import router_forward
    from trainer.router_init import domain_groups, group_features, linear_router

    rng = np.random.default_rng(4)
    # three well-separated families of centroids: k-means into 3 groups finds them
    family = np.repeat(np.arange(3), [3, 4, 2])
    centroids = np.eye(3)[family] * 10 + 0.1 * rng.standard_normal((9, 3))
    groups = domain_groups(centroids.astype(np.float32), 3)
    assert all(len(set(groups[family == f])) == 1 for f in range(3)) and len(set(groups)) == 3
    features = group_features(groups, 3)
    hs = rng.dirichlet(np.ones(9), size=6)
    alpha = router_forward(linear_router(features, hidden=6), torch.as_tensor(hs, dtype=torch.float32))
    expected = np.stack([np.bincount(groups, weights=h, minlength=3) for h in hs])
    torch.testing.assert_close(alpha, torch.as_tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-5)
    import pytest

    from soe_sdk.errors import SoeError
    with pytest.raises(SoeError, match="10 groups"):
        domain_groups(centroids.astype(np.float32), 10)


def test_centred_expert_gradients_drop_the_running_mean_gradient() -> None:
    """With centred gradients an expert learns Σ_m α_mj (g_m − m̂/M): a gradient that every micro-batch
    shares (here: the same g twice, and a step that repeats S's mean) moves no expert, whatever α is."""
    q, n = 30, 2
    gen = torch.Generator().manual_seed(5)
    g = torch.randn(q, generator=gen)
    shared, experts = torch.randn(q, generator=gen), torch.randn(n, q, generator=gen)
    opt = FlatAdamW({"S": shared.clone(), "E": experts.clone()}, {}, weight_decay=0.0,
                    shared_moments={"E": ("S", 0)}, centred_gradients=frozenset({"E"}))
    eg = ExpertGrad()
    for alpha in (torch.tensor([0.9, -0.3]), torch.tensor([0.2, 0.5])):  # two micro-batches, same gradient
        eg.add(alpha, g / 2)
    opt.step({"S": g, "E": eg}, 1e-2)
    torch.testing.assert_close(opt.params["E"], experts, rtol=0, atol=1e-7)
    assert not torch.equal(opt.params["S"], shared)
    # a micro-batch gradient that differs from the mean does move the experts, with the sign of α
    eg = ExpertGrad()
    eg.add(torch.tensor([1.0, -1.0]), 3 * g)
    before = opt.params["E"].clone()
    opt.step({"S": 3 * g, "E": eg}, 1e-2)
    moved = opt.params["E"] - before
    assert float(moved.abs().max()) > 0
    torch.testing.assert_close(moved[0], -moved[1])


def test_expert_weight_decay_scale_pulls_only_the_experts_harder() -> None:
    """With zero gradients an AdamW step only decays: S's prefix by (1 − lr·wd), the experts' by
    (1 − lr·wd·scale), through the compiled kernel, torch's row-wise update and the shared preconditioner."""
    from trainer import fused_adamw

    n, q, end, lr, wd = 3, 40, 30, 0.1, 0.2
    gen = torch.Generator().manual_seed(4)
    shared, experts = torch.randn(q, generator=gen), torch.randn(n, q, generator=gen)
    zero = ExpertGrad()
    zero.add(torch.zeros(n), torch.zeros(q))
    for kernel in (True, False):
        for shared_moments in ({}, {"E": ("S", 0)}):
            previous = fused_adamw.set_enabled(kernel)
            try:
                opt = FlatAdamW({"S": shared.clone(), "E": experts.clone()}, {"S": end, "E": end}, weight_decay=wd,
                                decay_scale={"E": 5.0}, shared_moments=shared_moments)
                opt.step({"S": torch.zeros(q), "E": zero}, lr)
            finally:
                fused_adamw.set_enabled(previous)
            torch.testing.assert_close(opt.params["S"][:end], shared[:end] * (1 - lr * wd))
            torch.testing.assert_close(opt.params["E"][:, :end], experts[:, :end] * (1 - lr * wd * 5.0))
            assert torch.equal(opt.params["E"][:, end:], experts[:, end:])
