"""Smaller ONNX variants of the fp32 graph: int8 and int4 weight-only quantization, fp16 weights.

All three keep the graph interface of `exporters.onnx` (fp32 logits and KV cache, int64 ids),
so `exporters.runtime` and onnxruntime-genai run them unchanged. They are lossy: validation
reports argmax agreement and the loss delta on sample text instead of a hard tolerance.
"""
from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import onnx
from torch import Tensor

from soe_sdk.config import ModelConfig

from .folder import ExportResult
from .onnx import export_onnx_variant, untie_embedding

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


def _nbits(model: onnx.ModelProto, bits: int, gather: bool) -> onnx.ModelProto:
    """MatMul weights → MatMulNBits (block-wise, symmetric); optionally Gather tables too (4 bits only)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    ops = ("MatMul", "Gather") if gather else ("MatMul",)
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=BLOCK_SIZE, is_symmetric=True,
                                     accuracy_level=ACCURACY_LEVEL, op_types_to_quantize=ops,
                                     quant_axes=(("MatMul", 0), ("Gather", 1)))
    with _quiet():
        quantizer.process()
    return quantizer.model.model


def _int8(graph: onnx.ModelProto, path: Path) -> None:
    """Embedding tables → int8 per row (quantize_dynamic, Gather only); MatMuls → 8-bit MatMulNBits.

    quantize_dynamic on MatMul would also quantize activations at run time (MatMulInteger): on a
    small model that gave 15× the logit error of weight-only 8-bit MatMulNBits."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        staged = Path(scratch) / "gather-int8.onnx"
        with _quiet():
            quantize_dynamic(untie_embedding(graph), staged, op_types_to_quantize=["Gather"],
                             weight_type=QuantType.QInt8, per_channel=True)
        onnx.save(_nbits(onnx.load(str(staged)), 8, gather=False), str(path))


def _int4(graph: onnx.ModelProto, path: Path) -> None:
    """MatMuls → 4-bit MatMulNBits, embedding tables → GatherBlockQuantized, blocks of 32."""
    onnx.save(_nbits(untie_embedding(graph), 4, gather=True), str(path))


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
    """ONNX with int8 weights: 8-bit MatMulNBits (block 32) and int8 embedding tables."""
    return export_onnx_variant(params, config, tokenizer_json, out_dir, metadata=metadata, fmt="onnx-int8",
                               title="ONNX (int8 weights)", transform=_int8, note=_NOTE)


def export_onnx_int4(params: Mapping[str, Tensor], config: ModelConfig, tokenizer_json: str, out_dir: Path, *,
                     metadata: dict[str, Any]) -> ExportResult:
    """ONNX with int4 weights: MatMulNBits and GatherBlockQuantized, block 32, accuracy level 4."""
    return export_onnx_variant(params, config, tokenizer_json, out_dir, metadata=metadata, fmt="onnx-int4",
                               title="ONNX (int4 weights)", transform=_int4, note=_NOTE)


def export_onnx_fp16(params: Mapping[str, Tensor], config: ModelConfig, tokenizer_json: str, out_dir: Path, *,
                     metadata: dict[str, Any]) -> ExportResult:
    """ONNX with fp16 weights; LayerNorm, softmax, GELU and the fp32 interface kept in fp32."""
    return export_onnx_variant(params, config, tokenizer_json, out_dir, metadata=metadata, fmt="onnx-fp16",
                               title="ONNX (fp16 weights)", transform=_fp16,
                               note=_NOTE.replace("Quantized", "Converted") + " Inputs, outputs and the KV "
                               "cache stay float32; on CPU fp16 saves size, not time.")
