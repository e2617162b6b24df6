"""The functional GPT: shapes, module parity, KV cache, padding, generation."""
from __future__ import annotations

import pytest
import torch

from soe_sdk.model import GPT, empty_cache, forward, generate, init_parameters, next_token_loss

from .conftest import TINY_MODEL as CFG


def _params(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=gen)
            for k, v in init_parameters(CFG, gen).items()}


def test_parameter_shapes_match_config() -> None:
    params = init_parameters(CFG)
    assert {k: tuple(v.shape) for k, v in params.items()} == CFG.parameter_shapes()
    assert sum(v.numel() for v in params.values()) == CFG.num_parameters()


def test_forward_shapes_and_dtype() -> None:
    ids = torch.randint(0, CFG.vocab_size, (3, 11))
    logits, cache = forward(_params(), CFG, ids, use_cache=True)
    assert logits.shape == (3, 11, CFG.vocab_size) and logits.dtype == torch.float32
    assert cache is not None and len(cache) == CFG.n_layers
    assert cache[0][0].shape == (3, CFG.n_heads, 11, CFG.head_dim)


def test_external_parameters_equal_module_forward() -> None:
    params = _params()
    module = GPT(CFG, params)
    ids = torch.randint(0, CFG.vocab_size, (2, 9))
    torch.testing.assert_close(module(ids)[0], forward(params, CFG, ids)[0], rtol=0, atol=0)
    # a merged Θ that still carries autograd history runs without being copied into a module
    theta = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    next_token_loss(theta, CFG, ids).backward()
    assert all(v.grad is not None and torch.isfinite(v.grad).all() for v in theta.values())


def test_kv_cache_decoding_matches_full_forward() -> None:
    params = _params(1)
    ids = torch.randint(0, CFG.vocab_size, (2, 14))
    full, _ = forward(params, CFG, ids)
    cache = empty_cache(CFG, 2)
    steps = []
    logits, cache = forward(params, CFG, ids[:, :5], past_key_values=cache, use_cache=True)
    steps.append(logits)
    for t in range(5, 14):
        logits, cache = forward(params, CFG, ids[:, t:t + 1], past_key_values=cache, use_cache=True)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_left_padding_does_not_change_real_tokens() -> None:
    params = _params(2)
    ids = torch.randint(1, CFG.vocab_size, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    positions = torch.clamp(mask.cumsum(-1) - 1, min=0)
    out, _ = forward(params, CFG, padded, attention_mask=mask, position_ids=positions)
    ref, _ = forward(params, CFG, ids)
    torch.testing.assert_close(out[:, 3:], ref, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(out).all()


def test_greedy_generate_matches_argmax_of_full_forward() -> None:
    params = _params(3)
    prompt = torch.randint(0, CFG.vocab_size, (1, 4))
    out = generate(params, CFG, prompt, max_new_tokens=8)
    assert out.shape == (1, 12)
    for t in range(4, 12):
        logits, _ = forward(params, CFG, out[:, :t])
        assert int(logits[0, -1].argmax()) == int(out[0, t])


def test_generate_stops_at_context_length_and_samples_reproducibly() -> None:
    params = _params(4)
    prompt = torch.randint(0, CFG.vocab_size, (1, CFG.max_seq_len - 3))
    assert generate(params, CFG, prompt, max_new_tokens=50).shape[1] == CFG.max_seq_len
    a = generate(params, CFG, prompt[:, :4], 10, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(7))
    b = generate(params, CFG, prompt[:, :4], 10, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_too_long_input_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="max_seq_len"):
        forward(_params(), CFG, torch.zeros(1, CFG.max_seq_len + 1, dtype=torch.long))
