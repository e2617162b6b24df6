"""Smaller ONNX variants of the fp32 graph: int8 and int4 weight-only quantization, fp16 weights.

All three keep the graph interface of `exporters.onnx` (fp32 logits and KV cache, int64 ids),
so `exporters.runtime` and onnxruntime-genai run them unchanged. They are lossy: validation
reports argmax agreement and the loss delta on sample text instead of a hard tolerance.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper
from torch import Tensor

from soe_sdk.config import ModelConfig

from .folder import ExportResult
from .onnx import WTE_INIT, export_onnx_variant, untie_embedding

BLOCK_SIZE = 32
ACCURACY_LEVEL = 4  # MatMulNBits computes in int8 on CPU: the fast path
# kept in fp32 in the fp16 variant: normalisation, softmax and the GELU's tanh lose too much in fp16
FP32_OPS = ["LayerNormalization", "Softmax", "Tanh", "Pow", "Sqrt", "Div", "ReduceMean"]


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence the quantizers' per-node INFO logs and their root-logger advice while they run."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _nbits(model: onnx.ModelProto, bits: int) -> onnx.ModelProto:
    """MatMul weights → MatMulNBits (block-wise along the input dimension, symmetric)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=BLOCK_SIZE, is_symmetric=True,
                                     accuracy_level=ACCURACY_LEVEL, op_types_to_quantize=("MatMul",))
    with _quiet():
        quantizer.process()
    return quantizer.model.model


def _share_head_with_embedding(model: onnx.ModelProto, bits: int) -> onnx.ModelProto:
    """Let the embedding lookup read the quantized output-layer weights instead of its own table.

    The output MatMulNBits stores wteᵀ as [vocab, blocks, bytes]: row v is token v's embedding,
    quantized in blocks along d — what GatherBlockQuantized gathers from. The tied table is then
    stored once, as in the fp32 graph, which is most of an int8 file's size on a small model."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    wte = inits[WTE_INIT]
    vocab, d = wte.dims
    head = next(n for n in graph.node if n.op_type == "MatMulNBits"
                and onnx.helper.get_attribute_value(next(a for a in n.attribute if a.name == "N")) == vocab)
    lookup = next(n for n in graph.node if n.op_type == "Gather" and n.input[0] == WTE_INIT)
    scales = numpy_helper.to_array(inits[head.input[2]])
    gather_scales = numpy_helper.from_array(scales.reshape(vocab, -1, 1), f"{WTE_INIT}.gather_scales")
    row_shape = numpy_helper.from_array(np.array([0, 0, d], dtype=np.int64), f"{WTE_INIT}.row_shape")
    blocks = f"{lookup.output[0]}.blocks"
    new_nodes = [
        onnx.helper.make_node("GatherBlockQuantized", [head.input[1], lookup.input[1], gather_scales.name], [blocks],
                              domain="com.microsoft", bits=bits, block_size=BLOCK_SIZE, quantize_axis=2, gather_axis=0,
                              name=f"{lookup.name or 'wte'}_quantized"),
        onnx.helper.make_node("Reshape", [blocks, row_shape.name], list(lookup.output), name=f"{lookup.name or 'wte'}_rows"),
    ]
    at = list(graph.node).index(lookup)
    graph.node.remove(lookup)
    for node in reversed(new_nodes):
        graph.node.insert(at, node)
    graph.initializer.remove(wte)
    graph.initializer.extend([gather_scales, row_shape])
    return model


def _int8(graph: onnx.ModelProto, path: Path) -> None:
    """MatMuls → 8-bit MatMulNBits (block 32); the embedding lookup shares the output layer's weights.

    Weight-only on purpose: quantize_dynamic on MatMul also quantizes activations at run time
    (MatMulInteger), which on a small model gave 15× the logit error of 8-bit MatMulNBits."""
    onnx.save(_share_head_with_embedding(_nbits(untie_embedding(graph), 8), 8), str(path))


def _int4(graph: onnx.ModelProto, path: Path) -> None:
    """MatMuls → 4-bit MatMulNBits (block 32); the embedding lookup shares the output layer's weights."""
    onnx.save(_share_head_with_embedding(_nbits(untie_embedding(graph), 4), 4), str(path))


def _fp16(graph: onnx.ModelProto, path: Path) -> None:
    """fp16 weights and matmuls; graph inputs/outputs and the ops in FP32_OPS stay fp32."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    converted = convert_float_to_float16(graph, keep_io_types=True,
                                         op_block_list=sorted(set(DEFAULT_OP_BLOCK_LIST) | set(FP32_OPS)))
    onnx.save(converted, str(path))


_NOTE = ("Quantized from the fp32 graph; `specialist.json` → `validation` gives the argmax agreement and "
         "the loss change against the fp32 PyTorch model on sample text.")


def export_onnx_int8(params: Mapping[str, Tensor], config: ModelConfig, tokenizer_json: str, out_dir: Path, *,
                     metadata: dict[str, Any]) -> ExportResult:
    """ONNX with int8 weights: 8-bit MatMulNBits (block 32), the tied embedding stored once."""
    return export_onnx_variant(params, config, tokenizer_json, out_dir, metadata=metadata, fmt="onnx-int8",
                               title="ONNX (int8 weights)", transform=_int8, note=_NOTE)


def export_onnx_int4(params: Mapping[str, Tensor], config: ModelConfig, tokenizer_json: str, out_dir: Path, *,
                     metadata: dict[str, Any]) -> ExportResult:
    """ONNX with int4 weights: 4-bit MatMulNBits (block 32, accuracy level 4), the tied embedding stored once."""
    return export_onnx_variant(params, config, tokenizer_json, out_dir, metadata=metadata, fmt="onnx-int4",
                               title="ONNX (int4 weights)", transform=_int4, note=_NOTE)


def export_onnx_fp16(params: Mapping[str, Tensor], config: ModelConfig, tokenizer_json: str, out_dir: Path, *,
                     metadata: dict[str, Any]) -> ExportResult:
    """ONNX with fp16 weights; LayerNorm, softmax, GELU and the fp32 interface kept in fp32."""
    return export_onnx_variant(params, config, tokenizer_json, out_dir, metadata=metadata, fmt="onnx-fp16",
                               title="ONNX (fp16 weights)", transform=_fp16,
                               note=_NOTE.replace("Quantized", "Converted") + " Inputs, outputs and the KV "
                               "cache stay float32; on CPU fp16 saves size, not time.")
