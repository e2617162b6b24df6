"""Exporters: one module per format, all with the signature
`export_<fmt>(params, config, tokenizer_json, out_dir, *, metadata) -> ExportResult`.

Format modules are imported on demand, so `import exporters.runtime` stays free of torch.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

    from soe_sdk.config import ModelConfig

    from .folder import ExportResult

# format name → (module, function)
_EXPORTERS = {
    "onnx": ("onnx", "export_onnx"),
    "onnx-int8": ("quantize", "export_onnx_int8"),
    "onnx-int4": ("quantize", "export_onnx_int4"),
    "onnx-fp16": ("quantize", "export_onnx_fp16"),
    "hf": ("hf", "export_hf"),
    "gguf": ("gguf", "export_gguf"),
    "safetensors": ("safetensors", "export_safetensors"),
}
FORMATS: tuple[str, ...] = tuple(_EXPORTERS)


def export(params: dict[str, Tensor], config: ModelConfig, tokenizer_json: str, out_dir: str | Path,
           format: str, metadata: dict[str, Any] | None = None) -> ExportResult:
    """Write the specialist in `format` (one of FORMATS) to `out_dir`, atomically and validated."""
    from soe_sdk.errors import ExportError

    if format not in _EXPORTERS:
        raise ExportError(f"format {format!r}: unknown, choose one of {', '.join(FORMATS)}")
    module, function = _EXPORTERS[format]
    exporter = getattr(importlib.import_module(f".{module}", __name__), function)
    return exporter(params, config, tokenizer_json, Path(out_dir), metadata=dict(metadata or {}))


def __getattr__(name: str) -> Any:
    if name == "ExportResult":
        from .folder import ExportResult

        return ExportResult
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["FORMATS", "export", "ExportResult"]
