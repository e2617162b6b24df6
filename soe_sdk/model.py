"""The GPT-2-style decoder, written as a function of a parameter mapping.

`forward(params, config, input_ids, ...)` runs the network on any mapping name → tensor:
a module's parameters, a merged Θ = S + Σ α_j E_j, or a Θ that still carries autograd
history back to the soup (that is how the trainer and α refinement differentiate through
the merge without copying into a module).

Parameter names and shapes are fixed by `ModelConfig.parameter_shapes()`; linear weights
use the `torch.nn.Linear` layout [out, in]. The output layer is tied to `wte.weight`.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig

Params = Mapping[str, Tensor]
KVCache = list[tuple[Tensor, Tensor]]  # per layer: (key, value), each [batch, heads, past, head_dim]


def init_parameters(config: ModelConfig, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """GPT-2 initialisation: N(0, 0.02) weights, N(0, 0.02/√(2L)) residual projections, zero biases, unit LayerNorm."""
    params: dict[str, Tensor] = {}
    residual_std = 0.02 / math.sqrt(2 * config.n_layers)
    for name, shape in config.parameter_shapes().items():
        if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name == "ln_f.weight":
            tensor = torch.ones(shape)
        elif name.endswith(".bias"):
            tensor = torch.zeros(shape)
        else:
            std = residual_std if name.endswith("proj.weight") else 0.02
            tensor = torch.randn(shape, generator=generator) * std
        params[name] = tensor
    return params


def empty_cache(config: ModelConfig, batch: int, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> KVCache:
    """A zero-length KV cache: the first decoding step takes it, so prompt and decode share one path."""
    shape = (batch, config.n_heads, 0, config.head_dim)
    return [(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
            for _ in range(config.n_layers)]


def _attention_mask(attention_mask: Tensor | None, past: int, q_len: int, batch: int,
                    device: torch.device) -> Tensor:
    """Boolean [batch, 1, q, past+q] mask: causal, minus padded keys; the diagonal always stays
    open so a fully padded row never yields NaN."""
    total = past + q_len
    q_pos = torch.arange(past, total, device=device).unsqueeze(1)
    k_pos = torch.arange(total, device=device).unsqueeze(0)
    allowed = (k_pos <= q_pos).unsqueeze(0).expand(batch, q_len, total)
    if attention_mask is not None:
        keys = attention_mask.to(torch.bool).unsqueeze(1)  # [batch, 1, total]
        allowed = allowed & keys
        allowed = allowed | (k_pos == q_pos).unsqueeze(0)
    return allowed.unsqueeze(1)


def forward(params: Params, config: ModelConfig, input_ids: Tensor, *,
            attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
            past_key_values: KVCache | None = None,
            use_cache: bool = False) -> tuple[Tensor, KVCache | None]:
    """Logits [batch, seq, vocab] for `input_ids` [batch, seq], and the updated KV cache if asked.

    `attention_mask` [batch, past+seq] marks real tokens with 1 (padding 0); `position_ids`
    default to past+0 … past+seq−1. With `past_key_values` the new keys/values are appended.
    """
    batch, q_len = input_ids.shape
    past = 0 if past_key_values is None else past_key_values[0][0].shape[2]
    if past + q_len > config.max_seq_len:
        raise ValueError(f"sequence of {past + q_len} tokens exceeds max_seq_len={config.max_seq_len}")
    device = input_ids.device
    if position_ids is None:
        position_ids = torch.arange(past, past + q_len, device=device).unsqueeze(0).expand(batch, q_len)
    x = F.embedding(input_ids, params["wte.weight"]) + F.embedding(position_ids, params["wpe.weight"])

    simple_causal = attention_mask is None and past == 0
    mask = None if simple_causal else _attention_mask(attention_mask, past, q_len, batch, device)
    heads, head_dim, d = config.n_heads, config.head_dim, config.d_model
    eps = config.layer_norm_eps
    present: KVCache = []
    for i in range(config.n_layers):
        p = f"h.{i}."
        h = F.layer_norm(x, (d,), params[p + "ln_1.weight"], params[p + "ln_1.bias"], eps)
        qkv = F.linear(h, params[p + "attn.qkv.weight"], params[p + "attn.qkv.bias"])
        q, k, v = qkv.view(batch, q_len, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        if past_key_values is not None:
            past_k, past_v = past_key_values[i]
            k = torch.cat([past_k.to(k.dtype), k], dim=2)
            v = torch.cat([past_v.to(v.dtype), v], dim=2)
        if use_cache:
            present.append((k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=simple_causal)
        y = y.transpose(1, 2).reshape(batch, q_len, d)
        x = x + F.linear(y, params[p + "attn.proj.weight"], params[p + "attn.proj.bias"])
        h = F.layer_norm(x, (d,), params[p + "ln_2.weight"], params[p + "ln_2.bias"], eps)
        h = F.gelu(F.linear(h, params[p + "mlp.fc.weight"], params[p + "mlp.fc.bias"]), approximate="tanh")
        x = x + F.linear(h, params[p + "mlp.proj.weight"], params[p + "mlp.proj.bias"])
    x = F.layer_norm(x, (d,), params["ln_f.weight"], params["ln_f.bias"], eps)
    logits = F.linear(x, params["wte.weight"])
    return logits, (present if use_cache else None)


def next_token_loss(params: Params, config: ModelConfig, tokens: Tensor,
                    attention_mask: Tensor | None = None) -> Tensor:
    """Mean cross-entropy of predicting tokens[:, 1:] from tokens[:, :-1] (padding ignored)."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    mask = None if attention_mask is None else attention_mask[:, :-1]
    logits, _ = forward(params, config, inputs, attention_mask=mask)
    if attention_mask is not None:
        targets = targets.masked_fill(attention_mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=-100)


@torch.inference_mode()
def generate(params: Params, config: ModelConfig, input_ids: Tensor, max_new_tokens: int = 32, *,
             temperature: float = 0.0, top_k: int | None = None,
             generator: torch.Generator | None = None, eos_token_id: int | None = None) -> Tensor:
    """Extend `input_ids` [batch, seq] by up to `max_new_tokens`, using the KV cache.

    temperature 0 means greedy decoding; otherwise sample from softmax(logits / temperature),
    optionally restricted to the `top_k` most likely tokens. The context is capped at
    `max_seq_len`: generation stops when it is full.
    """
    tokens = input_ids
    budget = min(max_new_tokens, config.max_seq_len - tokens.shape[1])
    cache = empty_cache(config, tokens.shape[0], tokens.device, params["wte.weight"].dtype)
    step_input = tokens
    for _ in range(max(budget, 0)):
        logits, cache = forward(params, config, step_input, past_key_values=cache, use_cache=True)
        last = logits[:, -1, :].float()
        if temperature <= 0:
            nxt = last.argmax(dim=-1, keepdim=True)
        else:
            last = last / temperature
            if top_k is not None and top_k < last.shape[-1]:
                kth = torch.topk(last, top_k, dim=-1).values[:, -1:]
                last = last.masked_fill(last < kth, float("-inf"))
            nxt = torch.multinomial(torch.softmax(last, dim=-1), 1, generator=generator)
        tokens = torch.cat([tokens, nxt], dim=1)
        step_input = nxt
        if eos_token_id is not None and bool((nxt == eos_token_id).all()):
            break
    return tokens


class GPT(nn.Module):
    """A module wrapper over the functional model, for plain training and for `from_params`."""

    def __init__(self, config: ModelConfig, params: Params | None = None) -> None:
        super().__init__()
        self.config = config
        source = params if params is not None else init_parameters(config)
        # ParameterDict keys may not contain '.', so store under an escaped name.
        self.weights = nn.ParameterDict({k.replace(".", "__"): nn.Parameter(v.detach().clone())
                                         for k, v in source.items()})

    def params(self) -> dict[str, Tensor]:
        return {k.replace("__", "."): v for k, v in self.weights.items()}

    def forward(self, input_ids: Tensor, **kwargs) -> tuple[Tensor, KVCache | None]:  # type: ignore[override]
        return forward(self.params(), self.config, input_ids, **kwargs)
