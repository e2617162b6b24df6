"""Checks shared by every format: input sanity, exact parity with PyTorch, quality of quantized models."""
from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from soe_sdk.config import ModelConfig
from soe_sdk.errors import ExportError
from soe_sdk.model import forward

from .folder import EOT
from .runtime import mean_cross_entropy

Arrays = list[np.ndarray]
# A runner under test: case → (logits [batch, seq, vocab], presents as k0, v0, k1, v1, … or None).
Runner = Callable[["Case"], tuple[np.ndarray, Arrays | None]]

SAMPLE_TEXT = (
    "The committee met on Tuesday to review the budget for the coming year. After a long discussion, "
    "the members agreed to fund the new library and to repair the bridge over the river. "
    "def total(values):\n    result = 0\n    for value in values:\n        result += value\n    return result\n"
    "Les habitants du village se retrouvent chaque samedi sur la place du marché. "
    "SELECT id, name FROM customers WHERE country = 'FR' ORDER BY name;"
)


def prepare_params(params: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Detached fp32 CPU copies of `params`, after checking names, shapes and finiteness against `config`."""
    expected = config.parameter_shapes()
    missing = sorted(set(expected) - set(params))
    extra = sorted(set(params) - set(expected))
    if missing or extra:
        what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise ExportError(f"params do not match the model config: {what}")
    out: dict[str, torch.Tensor] = {}
    for name, shape in expected.items():
        tensor = params[name]
        if tuple(tensor.shape) != shape:
            raise ExportError(f"params: {name} has shape {tuple(tensor.shape)}, the model config says {shape}")
        tensor = tensor.detach().to("cpu", torch.float32).contiguous()
        if not bool(torch.isfinite(tensor).all()):
            raise ExportError(f"params: {name} holds NaN or infinite values")
        out[name] = tensor
    return out


def load_tokenizer(tokenizer_json: str, config: ModelConfig) -> Tokenizer:
    """Parse the tokenizer and check it fits the model: ids below vocab_size, `<|endoftext|>` = 0."""
    try:
        tokenizer = Tokenizer.from_str(tokenizer_json)
    except Exception as exc:  # tokenizers raises plain Exception subclasses
        raise ExportError(f"tokenizer_json: not a valid tokenizers JSON ({str(exc).splitlines()[0]})") from None
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > config.vocab_size:
        raise ExportError(f"tokenizer_json: {size} tokens but the model has vocab_size={config.vocab_size}")
    if tokenizer.token_to_id(EOT) != 0:
        raise ExportError(f"tokenizer_json: {EOT} must be token id 0")
    return tokenizer


def tokenizer_tables(tokenizer_json: str) -> tuple[dict[str, int], list[str], set[str]]:
    """The BPE vocabulary (with added tokens), merges as 'left right' strings, and the special tokens."""
    data = json.loads(tokenizer_json)
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise ExportError(f"tokenizer_json: a byte-level BPE model is required, got {model.get('type')!r}")
    vocab = dict(model.get("vocab", {}))
    added = data.get("added_tokens", [])
    for token in added:
        vocab[token["content"]] = token["id"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return vocab, merges, {t["content"] for t in added if t.get("special")}


@dataclass
class Case:
    """One parity input: a batch, its mask and positions, an optional past, and which query rows are real."""

    name: str
    input_ids: np.ndarray  # int64 [batch, seq]
    attention_mask: np.ndarray  # int64 [batch, past+seq]
    position_ids: np.ndarray  # int64 [batch, seq]
    past: Arrays  # k0, v0, k1, v1, … float32 [batch, heads, past, head_dim]
    valid: np.ndarray  # bool [batch, seq]

    @property
    def past_len(self) -> int:
        return self.past[0].shape[2]


def reference(params: Mapping[str, torch.Tensor], config: ModelConfig, case: Case) -> tuple[np.ndarray, Arrays]:
    """PyTorch logits and presents for `case`."""
    past = [(torch.from_numpy(case.past[2 * i]), torch.from_numpy(case.past[2 * i + 1]))
            for i in range(config.n_layers)]
    with torch.inference_mode():
        logits, present = forward(params, config, torch.from_numpy(case.input_ids),
                                  attention_mask=torch.from_numpy(case.attention_mask),
                                  position_ids=torch.from_numpy(case.position_ids),
                                  past_key_values=past, use_cache=True)
    flat = [t.numpy() for kv in present or [] for t in kv]
    return logits.numpy(), flat


def _empty_past(config: ModelConfig, batch: int) -> Arrays:
    shape = (batch, config.n_heads, 0, config.head_dim)
    return [np.zeros(shape, np.float32) for _ in range(2 * config.n_layers)]


def parity_cases(params: Mapping[str, torch.Tensor], config: ModelConfig, seed: int = 0) -> list[Case]:
    """A prompt (batch 1), a left-padded batch of 2, and decode steps of 1 and 3 tokens on its cache."""
    rng = np.random.default_rng(seed)
    seq = max(2, min(8, config.max_seq_len // 2))
    pad = seq // 2

    def ids(batch: int, n: int) -> np.ndarray:
        return rng.integers(1, config.vocab_size, size=(batch, n), dtype=np.int64)

    prompt = Case("prompt", ids(1, seq), np.ones((1, seq), np.int64), np.arange(seq, dtype=np.int64)[None],
                  _empty_past(config, 1), np.ones((1, seq), bool))
    mask = np.ones((2, seq), np.int64)
    mask[0, :pad] = 0  # row 0 is left-padded
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    padded = Case("padded", ids(2, seq), mask, positions, _empty_past(config, 2), mask.astype(bool))
    cases = [prompt, padded]
    _, past = reference(params, config, padded)
    for name, new in (("decode-1", 1), ("decode-3", 3)):
        if seq + new > config.max_seq_len:
            continue
        full_mask = np.concatenate([mask, np.ones((2, new), np.int64)], axis=1)
        pos = positions[:, -1:] + 1 + np.arange(new, dtype=np.int64)[None]
        cases.append(Case(name, ids(2, new), full_mask, pos, past, np.ones((2, new), bool)))
    return cases


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0


def check_parity(fmt: str, params: Mapping[str, torch.Tensor], config: ModelConfig, run: Runner, *,
                 tol: float, with_past: bool = True) -> dict[str, Any]:
    """Run every parity case through `run`; raise ExportError unless logits (and presents) match
    PyTorch within `tol` with identical argmax. Returns the figures."""
    figures: dict[str, Any] = {"tolerance": tol, "cases": {}}
    worst = 0.0
    for case in parity_cases(params, config):
        if case.past_len and not with_past:
            continue
        ref_logits, ref_present = reference(params, config, case)
        logits, present = run(case)
        if logits.shape != ref_logits.shape:
            raise ExportError(f"{fmt} validation: case {case.name} gave logits of shape {logits.shape}, "
                              f"expected {ref_logits.shape}")
        row = {"logits_max_abs_diff": _max_diff(logits[case.valid], ref_logits[case.valid]),
               "argmax_identical": bool(np.array_equal(logits[case.valid].argmax(-1),
                                                       ref_logits[case.valid].argmax(-1)))}
        if present is not None:
            if [p.shape for p in present] != [p.shape for p in ref_present]:
                raise ExportError(f"{fmt} validation: case {case.name} gave presents of the wrong shape")
            row["present_max_abs_diff"] = max(_max_diff(a, b) for a, b in zip(present, ref_present))
        figures["cases"][case.name] = row
        diff = max(row["logits_max_abs_diff"], row.get("present_max_abs_diff", 0.0))
        worst = max(worst, diff)
        if not np.isfinite(diff) or diff > tol:
            raise ExportError(f"{fmt} validation failed: case {case.name} differs from PyTorch by {diff:.3g} "
                              f"(tolerance {tol:g})")
        if not row["argmax_identical"]:
            raise ExportError(f"{fmt} validation failed: case {case.name} changes the argmax token")
    figures["max_abs_diff"] = worst
    return figures


def sample_tokens(tokenizer: Tokenizer, config: ModelConfig, text: str = SAMPLE_TEXT) -> np.ndarray:
    """`text` tokenised into windows of up to max_seq_len tokens, int64 [n, length]."""
    ids = tokenizer.encode(text).ids
    length = min(config.max_seq_len, max(2, len(ids)))
    windows = [ids[i:i + length] for i in range(0, max(1, len(ids) - length + 1), length)]
    return np.asarray(windows, dtype=np.int64)


def check_quality(fmt: str, params: Mapping[str, torch.Tensor], config: ModelConfig, run: Runner,
                  tokens: np.ndarray) -> dict[str, Any]:
    """Compare a lossy model (quantized) with PyTorch on real text: finite logits are required;
    argmax agreement and the loss delta are reported."""
    batch, seq = tokens.shape
    case = Case("sample-text", tokens, np.ones((batch, seq), np.int64),
                np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy(),
                _empty_past(config, batch), np.ones((batch, seq), bool))
    ref_logits, _ = reference(params, config, case)
    logits, _ = run(case)
    if logits.shape != ref_logits.shape or not np.isfinite(logits).all():
        raise ExportError(f"{fmt} validation failed: the model gives non-finite or misshapen logits")
    ref_loss = mean_cross_entropy(ref_logits[:, :-1], tokens[:, 1:])
    loss = mean_cross_entropy(logits[:, :-1], tokens[:, 1:])
    return {"sample_tokens": int(tokens.size),
            "argmax_agreement": float((logits.argmax(-1) == ref_logits.argmax(-1)).mean()),
            "logits_max_abs_diff": _max_diff(logits, ref_logits),
            "loss_fp32": ref_loss, "loss": loss, "loss_delta": loss - ref_loss}


def check_decoding(fmt: str, params: Mapping[str, torch.Tensor], config: ModelConfig, run: Runner) -> dict[str, Any]:
    """A cached decode step on the lossy model must give finite logits of the right shape."""
    cases = [c for c in parity_cases(params, config) if c.past_len]
    for case in cases:
        logits, present = run(case)
        ok = logits.shape == (*case.input_ids.shape, config.vocab_size) and np.isfinite(logits).all()
        if not ok or present is None or not all(np.isfinite(p).all() for p in present):
            raise ExportError(f"{fmt} validation failed: cached decoding ({case.name}) gives non-finite output")
    return {"cached_decoding_finite": True, "cases": [c.name for c in cases]}


def check_same(fmt: str, expected: Sequence[tuple[str, np.ndarray]], found: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Tensors read back from a written file must equal what was written (names, shapes, values)."""
    for name, value in expected:
        got = found.get(name)
        if got is None:
            raise ExportError(f"{fmt} validation failed: tensor {name} is missing when read back")
        if tuple(got.shape) != tuple(value.shape) or not np.array_equal(got, value):
            raise ExportError(f"{fmt} validation failed: tensor {name} differs when read back")
    if len(found) != len(expected):
        raise ExportError(f"{fmt} validation failed: {len(found)} tensors read back, {len(expected)} written")
    return {"tensors_read_back": len(expected), "identical": True}
