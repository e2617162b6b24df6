"""A torch-free runner for an exported ONNX specialist folder: onnxruntime + tokenizers + numpy only.

    from exporters.runtime import OnnxSpecialist
    model = OnnxSpecialist.load("my-specialist-onnx")
    print(model.generate("The meeting", max_new_tokens=40))

Importing this module must never import torch (a deployed specialist does not ship it).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer


class LoadError(Exception):
    """The folder is not a usable ONNX specialist export (one line naming the file)."""


def mean_cross_entropy(logits: np.ndarray, targets: np.ndarray) -> float:
    """Mean cross-entropy of `targets` [...] under `logits` [..., vocab] (computed in float64)."""
    flat = logits.reshape(-1, logits.shape[-1]).astype(np.float64)
    top = flat.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(flat - top).sum(axis=1)) + top[:, 0]
    picked = flat[np.arange(flat.shape[0]), targets.reshape(-1)]
    return float(np.mean(log_norm - picked))


class OnnxSpecialist:
    """One ONNX specialist: the model graph (prompt and decode in one), its tokenizer, its limits."""

    def __init__(self, session: ort.InferenceSession, tokenizer: Tokenizer, *, eos_token_id: int,
                 context_length: int) -> None:
        self.session = session
        self.tokenizer = tokenizer
        self.eos_token_id = eos_token_id
        self.context_length = context_length
        inputs = {i.name: i for i in session.get_inputs()}
        self.n_layers = sum(1 for name in inputs if name.startswith("past_key_values.") and name.endswith(".key"))
        key = inputs["past_key_values.0.key"].shape  # [batch, heads, past, head_dim]
        self.n_heads, self.head_dim = int(key[1]), int(key[3])
        self._output_names = [o.name for o in session.get_outputs()]

    @classmethod
    def load(cls, folder: str | Path, *, model_file: str = "model.onnx", threads: int | None = None) -> "OnnxSpecialist":
        """Open an export folder (model.onnx, tokenizer.json, genai_config.json)."""
        folder = Path(folder)
        paths = {name: folder / name for name in (model_file, "tokenizer.json", "genai_config.json")}
        for path in paths.values():
            if not path.is_file():
                raise LoadError(f"{path}: missing (not an ONNX specialist export folder)")
        try:
            genai = json.loads(paths["genai_config.json"].read_text(encoding="utf-8"))["model"]
            eos, context = int(genai["eos_token_id"]), int(genai["context_length"])
        except (ValueError, KeyError, TypeError) as exc:
            raise LoadError(f"{paths['genai_config.json']}: unreadable ({exc})") from None
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            session = ort.InferenceSession(str(paths[model_file]), options, providers=["CPUExecutionProvider"])
            tokenizer = Tokenizer.from_file(str(paths["tokenizer.json"]))
        except Exception as exc:  # onnxruntime and tokenizers raise their own exception types
            raise LoadError(f"{folder}: cannot load ({str(exc).splitlines()[0]})") from None
        return cls(session, tokenizer, eos_token_id=eos, context_length=context)

    def empty_past(self, batch: int = 1) -> list[np.ndarray]:
        shape = (batch, self.n_heads, 0, self.head_dim)
        return [np.zeros(shape, np.float32) for _ in range(2 * self.n_layers)]

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
            past: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One graph call: logits [batch, seq, vocab] and presents (k0, v0, k1, v1, …)."""
        feed = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64),
                "position_ids": position_ids.astype(np.int64)}
        for i in range(self.n_layers):
            feed[f"past_key_values.{i}.key"] = past[2 * i]
            feed[f"past_key_values.{i}.value"] = past[2 * i + 1]
        logits, *present = self.session.run(self._output_names, feed)
        return logits, present

    def logits(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Logits [seq, vocab] for one token sequence, or [batch, seq, vocab] for a 2-D array."""
        array = np.asarray(ids, dtype=np.int64)
        batch = array[None] if array.ndim == 1 else array
        if batch.shape[1] > self.context_length:
            raise ValueError(f"{batch.shape[1]} tokens exceed the context length {self.context_length}")
        seq = batch.shape[1]
        positions = np.broadcast_to(np.arange(seq, dtype=np.int64), batch.shape)
        out, _ = self.run(batch, np.ones(batch.shape, np.int64), positions, self.empty_past(batch.shape[0]))
        return out[0] if array.ndim == 1 else out

    def generate_ids(self, ids: Sequence[int], max_new_tokens: int = 50, *, temperature: float = 0.0,
                     top_k: int | None = None, seed: int | None = None) -> list[int]:
        """New token ids after `ids`, decoded with the KV cache; stops at EOS or the context length."""
        tokens = list(ids) or [self.eos_token_id]  # an empty prompt starts from the document boundary
        rng = np.random.default_rng(seed)
        budget = min(max_new_tokens, self.context_length - len(tokens))
        past = self.empty_past()
        step = np.asarray([tokens], np.int64)
        new: list[int] = []
        for _ in range(max(budget, 0)):
            start = past[0].shape[2]
            positions = np.arange(start, start + step.shape[1], dtype=np.int64)[None]
            mask = np.ones((1, start + step.shape[1]), np.int64)
            logits, past = self.run(step, mask, positions, past)
            nxt = self._pick(logits[0, -1].astype(np.float64), temperature, top_k, rng)
            new.append(nxt)
            if nxt == self.eos_token_id:
                break
            step = np.asarray([[nxt]], np.int64)
        return new

    @staticmethod
    def _pick(last: np.ndarray, temperature: float, top_k: int | None, rng: np.random.Generator) -> int:
        if temperature <= 0:
            return int(last.argmax())
        scores = last / temperature
        if top_k is not None and top_k < scores.size:
            kth = np.partition(scores, -top_k)[-top_k]
            scores = np.where(scores < kth, -np.inf, scores)
        probs = np.exp(scores - scores.max())
        return int(rng.choice(scores.size, p=probs / probs.sum()))

    def generate(self, prompt: str, max_new_tokens: int = 50, temperature: float = 0.0,
                 top_k: int | None = None, seed: int | None = None) -> str:
        """The continuation of `prompt` (without the prompt); greedy when temperature is 0."""
        ids = self.tokenizer.encode(prompt).ids
        new = self.generate_ids(ids, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)
        if new and new[-1] == self.eos_token_id:
            new = new[:-1]
        return self.tokenizer.decode(new)

    def loss(self, texts: Sequence[str]) -> float:
        """Mean next-token cross-entropy over `texts`, each followed by EOS as in training, read in
        consecutive windows of context_length + 1 tokens (token-weighted)."""
        stream: list[int] = []
        for text in texts:
            stream += self.tokenizer.encode(text).ids + [self.eos_token_id]
        width = self.context_length + 1
        total, count = 0.0, 0
        for start in range(0, len(stream) - 1, width):
            window = np.asarray(stream[start:start + width], np.int64)
            if window.size < 2:
                break
            logits = self.logits(window[:-1])
            total += mean_cross_entropy(logits, window[1:]) * (window.size - 1)
            count += window.size - 1
        if count == 0:
            raise ValueError("loss: the texts hold no token to predict")
        return total / count
