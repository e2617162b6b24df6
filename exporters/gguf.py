"""GGUF export for llama.cpp: GPT-2 architecture, f32 tensors, byte-level BPE tokenizer metadata.

Our parameters map one to one onto llama.cpp's GPT-2 tensors (fused q|k|v, Linear layout
[out, in], which GGUF stores with the dimensions reversed). The output layer is tied: llama.cpp
falls back to `token_embd` when `output.weight` is absent, so the matrix is stored once.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from torch import Tensor

from soe_sdk.config import ModelConfig
from soe_sdk.errors import ExportError

from . import validate
from .folder import ExportResult, FolderSpec, write_export

MODEL_FILE = "model.gguf"
_T = gguf.MODEL_TENSOR
_LAYER = {  # our per-layer name → llama.cpp tensor
    "ln_1": _T.ATTN_NORM, "attn.qkv": _T.ATTN_QKV, "attn.proj": _T.ATTN_OUT,
    "ln_2": _T.FFN_NORM, "mlp.fc": _T.FFN_UP, "mlp.proj": _T.FFN_DOWN,
}
_GLOBAL = {"wte": _T.TOKEN_EMBD, "wpe": _T.POS_EMBD, "ln_f": _T.OUTPUT_NORM}


def gguf_name(name: str) -> str:
    """llama.cpp's name for one of our parameters, e.g. h.3.attn.qkv.weight → blk.3.attn_qkv.weight."""
    stem, kind = name.rsplit(".", 1)
    if stem in _GLOBAL:
        return f"{gguf.TENSOR_NAMES[_GLOBAL[stem]]}.{kind}"
    _, layer, part = stem.split(".", 2)
    return f"{gguf.TENSOR_NAMES[_LAYER[part]].format(bid=int(layer))}.{kind}"


def vocabulary(tokenizer_json: str, config: ModelConfig) -> tuple[list[str], list[int], list[str]]:
    """Tokens by id (padded to vocab_size with unused placeholders), their GGUF types, and merges."""
    vocab, merges, special = validate.tokenizer_tables(tokenizer_json)
    by_id: dict[int, str] = {i: tok for tok, i in vocab.items()}
    tokens, types = [], []
    for i in range(config.vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
        else:
            tokens.append(token)
            types.append(int(gguf.TokenType.CONTROL if token in special else gguf.TokenType.NORMAL))
    return tokens, types, merges


def _write(path: Path, params: Mapping[str, Tensor], config: ModelConfig, tokenizer_json: str, eos: int,
           name: str) -> list[tuple[str, np.ndarray]]:
    tokens, types, merges = vocabulary(tokenizer_json, config)
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_name(name)
    writer.add_block_count(config.n_layers)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.d_model)
    writer.add_feed_forward_length(config.d_mlp)
    writer.add_head_count(config.n_heads)
    writer.add_layer_norm_eps(config.layer_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # GPT-2's split regex, as the ByteLevel pre-tokenizer uses
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(eos)
    writer.add_eos_token_id(eos)
    writer.add_add_bos_token(False)  # prompts are used as given, like the PyTorch model
    written = []
    for ours, tensor in params.items():
        array = tensor.numpy().astype(np.float32)
        writer.add_tensor(gguf_name(ours), array)
        written.append((gguf_name(ours), array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


def read_back(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Tensors (numpy shapes) and scalar/string/array metadata of a GGUF file."""
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: np.asarray(t.data).reshape([int(d) for d in reversed(t.shape)]) for t in reader.tensors}
    fields: dict[str, Any] = {}
    for key, field in reader.fields.items():
        try:
            fields[key] = field.contents()
        except Exception:  # header fields without a decodable value
            continue
    return tensors, fields


def _check(path: Path, written: list[tuple[str, np.ndarray]], config: ModelConfig, n_tokens: int) -> dict[str, Any]:
    tensors, fields = read_back(path)
    figures = validate.check_same("gguf", written, tensors)
    keys = gguf.Keys
    expected = {keys.General.ARCHITECTURE: "gpt2", keys.LLM.BLOCK_COUNT: config.n_layers,
                keys.LLM.EMBEDDING_LENGTH: config.d_model, keys.LLM.FEED_FORWARD_LENGTH: config.d_mlp,
                keys.Attention.HEAD_COUNT: config.n_heads, keys.LLM.CONTEXT_LENGTH: config.max_seq_len,
                keys.Tokenizer.MODEL: "gpt2"}
    expected = {key.format(arch="gpt2"): value for key, value in expected.items()}
    for key, value in expected.items():
        if fields.get(key) != value:
            raise ExportError(f"gguf validation failed: {key} reads back as {fields.get(key)!r}, expected {value!r}")
    if len(fields.get("tokenizer.ggml.tokens", [])) != n_tokens:
        raise ExportError("gguf validation failed: the token list does not read back whole")
    figures["metadata_checked"] = sorted(expected)
    return figures


_USAGE = """With llama.cpp (`llama-cli -m {file} -p "Once upon a time" -n 40`) or llama-cpp-python:

```python
from llama_cpp import Llama
llm = Llama(model_path="{folder}/{file}", n_ctx={ctx}, verbose=False)
print(llm("Once upon a time", max_tokens=40, temperature=0)["choices"][0]["text"])
```

Tensors are f32; llama.cpp's `llama-quantize` makes q8_0 / q4_K variants from this file."""


def export_gguf(params: Mapping[str, Tensor], config: ModelConfig, tokenizer_json: str, out_dir: Path, *,
                metadata: dict[str, Any]) -> ExportResult:
    """`model.gguf` (GPT-2 architecture, f32), checked by reading it back."""
    params = validate.prepare_params(params, config)
    tokenizer = validate.load_tokenizer(tokenizer_json, config)
    eos = tokenizer.token_to_id(validate.EOT)
    name = str(metadata.get("name") or "soe-specialist")

    def build(folder: Path) -> dict[str, Any]:
        written = _write(folder / MODEL_FILE, params, config, tokenizer_json, eos, name)
        return _check(folder / MODEL_FILE, written, config, config.vocab_size)

    usage = _USAGE.format(folder=Path(out_dir).name, file=MODEL_FILE, ctx=config.max_seq_len)
    return write_export(out_dir, FolderSpec("gguf", "GGUF (llama.cpp)", usage, build), config, tokenizer_json,
                        metadata)
