"""ONNX export: one graph for prompt and decode (KV cache in, presents out), runnable by
onnxruntime, onnxruntime-genai (genai_config.json) and `exporters.runtime`.

The graph is traced with the TorchScript exporter (`dynamo=False`): on this model it keeps
clean dynamic axes and exports in about a second, where the dynamo exporter takes 40+ s and
names every past length separately.
"""
from __future__ import annotations


import io
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from torch import Tensor, nn

from soe_sdk.config import ModelConfig
from soe_sdk.errors import ExportError
from soe_sdk.model import forward

from . import validate
from .folder import ExportResult, FolderSpec, write_export, write_json, write_tokenizer_config
from .runtime import OnnxSpecialist

OPSET = 17  # LayerNormalization is a plain op from 17 on
MODEL_FILE = "model.onnx"
PARITY_TOL = 1e-3
WTE_INIT = "wte.weight"

# writes the final model file from the fp32 graph (quantizers, fp16 conversion, or a plain save)
Transform = Callable[[onnx.ModelProto, Path], None]


def input_names(config: ModelConfig) -> list[str]:
    past = [f"past_key_values.{i}.{kind}" for i in range(config.n_layers) for kind in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past]


def output_names(config: ModelConfig) -> list[str]:
    return ["logits", *[f"present.{i}.{kind}" for i in range(config.n_layers) for kind in ("key", "value")]]


class _Graph(nn.Module):
    """The functional model as a module whose inputs are the graph inputs (past flattened)."""

    def __init__(self, params: Mapping[str, Tensor], config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.names = list(params)
        # attribute names may not hold '.', and the exported initializers keep these names
        for i, name in enumerate(self.names):
            self.register_buffer(f"p{i}", params[name])

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        params = {name: getattr(self, f"p{i}") for i, name in enumerate(self.names)}
        cache = [(past[2 * i], past[2 * i + 1]) for i in range(self.config.n_layers)]
        logits, present = forward(params, self.config, input_ids, attention_mask=attention_mask,
                                  position_ids=position_ids, past_key_values=cache, use_cache=True)
        return (logits, *[t for kv in present or [] for t in kv])


def _dynamic_axes(config: ModelConfig) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total_sequence"},
        "position_ids": {0: "batch", 1: "sequence"},
        "logits": {0: "batch", 1: "sequence"},
    }
    for name in input_names(config)[3:]:
        axes[name] = {0: "batch", 2: "past_sequence"}
    for name in output_names(config)[1:]:
        axes[name] = {0: "batch", 2: "total_sequence"}
    return axes


def _tidy_initializers(model: onnx.ModelProto, names: list[str], params: Mapping[str, Tensor]) -> None:
    """Give initializers their parameter names, and store the tied embedding once: the tracer folds
    `wte`ᵀ into a second initializer for the output MatMul, which becomes a Transpose of the
    embedding (onnxruntime folds it at load)."""
    graph = model.graph
    transposed = {}  # the tracer stores Linear weights pre-transposed for MatMul
    for name, tensor in params.items():
        if tensor.ndim == 2:
            transposed.setdefault(tuple(tensor.shape[::-1]), []).append(name)
    for init in list(graph.initializer):
        if init.name.startswith("p") and init.name[1:].isdigit():
            _rename_value(graph, init.name, names[int(init.name[1:])])
            continue
        value = numpy_helper.to_array(init)
        matches = [n for n in transposed.get(tuple(init.dims), []) if np.array_equal(value, params[n].numpy().T)]
        if matches == [WTE_INIT]:
            graph.initializer.remove(init)
            graph.node.insert(0, onnx.helper.make_node("Transpose", [WTE_INIT], [init.name], perm=[1, 0],
                                                       name="tied_output_transpose"))
        elif len(matches) == 1:
            _rename_value(graph, init.name, matches[0] + "_T")
    if not any(i.name == WTE_INIT for i in graph.initializer):
        raise ExportError("onnx export: the embedding matrix is missing from the traced graph")


def _rename_value(graph: onnx.GraphProto, old: str, new: str) -> None:
    for init in graph.initializer:
        if init.name == old:
            init.name = new
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]


def untie_embedding(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy where the output MatMul reads an explicit wteᵀ initializer (quantizers only touch
    MatMuls with constant weights; the embedding Gather keeps the fp32 matrix)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    wte = next(numpy_helper.to_array(i) for i in graph.initializer if i.name == WTE_INIT)
    for node in [n for n in graph.node if n.op_type == "Transpose" and list(n.input) == [WTE_INIT]]:
        graph.node.remove(node)
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(wte.T), node.output[0]))
    return model


def build_graph(params: Mapping[str, Tensor], config: ModelConfig) -> onnx.ModelProto:
    """The fp32 ONNX graph of the specialist, with the tied embedding stored once."""
    module = _Graph(params, config).eval()
    batch, seq, past = 2, 3, 2  # non-degenerate sizes for tracing; every axis is dynamic
    sample = (torch.ones(batch, seq, dtype=torch.long), torch.ones(batch, past + seq, dtype=torch.long),
              torch.arange(past, past + seq).expand(batch, seq).contiguous(),
              *[torch.zeros(batch, config.n_heads, past, config.head_dim) for _ in range(2 * config.n_layers)])
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode(False):
        warnings.simplefilter("ignore")  # tracer and deprecation chatter; parity is checked below
        torch.onnx.export(module, sample, buffer, input_names=input_names(config),
                          output_names=output_names(config), dynamic_axes=_dynamic_axes(config),
                          opset_version=OPSET, do_constant_folding=True, dynamo=False)
    model = onnx.load_from_string(buffer.getvalue())
    _tidy_initializers(model, module.names, params)
    model.producer_name = "soe-sdk"
    onnx.checker.check_model(model)
    return model


def genai_config(config: ModelConfig, eos_token_id: int, filename: str = MODEL_FILE) -> dict[str, Any]:
    """onnxruntime-genai's genai_config.json for this graph (generic decoder-only model type)."""
    return {
        "model": {
            "type": "decoder",  # og's "gpt2" type expects fused past_N tensors; "decoder" takes key/value pairs
            "bos_token_id": eos_token_id, "eos_token_id": eos_token_id, "pad_token_id": eos_token_id,
            "context_length": config.max_seq_len, "vocab_size": config.vocab_size,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": config.head_dim, "hidden_size": config.d_model,
                "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_heads,
                "num_hidden_layers": config.n_layers,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {
            "do_sample": False, "max_length": config.max_seq_len, "min_length": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": False, "temperature": 1.0,
            "top_k": 1, "top_p": 1.0, "repetition_penalty": 1.0, "length_penalty": 1.0,
            "early_stopping": True, "no_repeat_ngram_size": 0, "diversity_penalty": 0.0,
        },
    }


def session_runner(path: Path, config: ModelConfig, tokenizer: Any) -> validate.Runner:
    """A validation runner over an onnxruntime session on `path` (full graph optimisations, as users get)."""
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ExportError(f"{path.name}: onnxruntime cannot load the exported graph ({str(exc).splitlines()[0]})") from None
    model = OnnxSpecialist(session, tokenizer, eos_token_id=0, context_length=config.max_seq_len)
    return lambda case: model.run(case.input_ids, case.attention_mask, case.position_ids, case.past)


def _usage(folder_hint: str, context: int) -> str:
    return f"""With the torch-free runner shipped in soe-sdk (onnxruntime + tokenizers + numpy):

```python
from exporters.runtime import OnnxSpecialist
model = OnnxSpecialist.load("{folder_hint}")
print(model.generate("Once upon a time", max_new_tokens=40))
```

With onnxruntime-genai (`genai_config.json` is included):

```python
import onnxruntime_genai as og
model = og.Model("{folder_hint}")
tokenizer = og.Tokenizer(model)
params = og.GeneratorParams(model)
params.set_search_options(max_length={context})
generator = og.Generator(model, params)
generator.append_tokens(tokenizer.encode("Once upon a time"))
while not generator.is_done():
    generator.generate_next_token()
print(tokenizer.decode(generator.get_sequence(0)))
```

Graph: inputs `input_ids`, `attention_mask` (past+seq), `position_ids` (int64), `past_key_values.N.key/value`
float32 [batch, heads, past, head_dim] (zero-length on the first step); outputs `logits`, `present.N.key/value`."""


def export_onnx_variant(params: Mapping[str, Tensor], config: ModelConfig, tokenizer_json: str, out_dir: Path, *,
                        metadata: dict[str, Any], fmt: str, title: str, transform: Transform | None = None,
                        note: str = "") -> ExportResult:
    """Shared ONNX pipeline: trace fp32, optionally transform (quantize), validate, write the folder.
    Without a transform parity with PyTorch is exact (≤ 1e-3); with one, quality figures are reported."""
    params = validate.prepare_params(params, config)
    tokenizer = validate.load_tokenizer(tokenizer_json, config)
    eos = tokenizer.token_to_id(validate.EOT)

    def build(folder: Path) -> dict[str, Any]:
        graph = build_graph(params, config)
        path = folder / MODEL_FILE
        if transform is None:
            onnx.save(graph, str(path))
        else:
            transform(graph, path)
        started = time.perf_counter()
        run = session_runner(path, config, tokenizer)
        if transform is None:
            figures = validate.check_parity(fmt, params, config, run, tol=PARITY_TOL)
        else:
            figures = validate.check_quality(fmt, params, config, run, validate.sample_tokens(tokenizer, config))
            figures["decoding"] = validate.check_decoding(fmt, params, config, run)
        figures["seconds"] = round(time.perf_counter() - started, 3)
        write_json(folder / "genai_config.json", genai_config(config, eos))
        write_tokenizer_config(folder, config)
        return figures

    usage = _usage(Path(out_dir).name, config.max_seq_len) + (f"\n\n{note}" if note else "")
    return write_export(out_dir, FolderSpec(fmt, title, usage, build), config, tokenizer_json, metadata)


def export_onnx(params: Mapping[str, Tensor], config: ModelConfig, tokenizer_json: str, out_dir: Path, *,
                metadata: dict[str, Any]) -> ExportResult:
    """`model.onnx` (fp32, opset 17, dynamic batch/sequence, KV cache) + genai_config.json."""
    return export_onnx_variant(params, config, tokenizer_json, out_dir, metadata=metadata, fmt="onnx",
                               title="ONNX (fp32)")
