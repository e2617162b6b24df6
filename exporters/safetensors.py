"""Plain safetensors export: our own parameter names plus config.json (ModelConfig), for soe-sdk and PyTorch."""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors.numpy import load_file
from safetensors.torch import save_file
from torch import Tensor

from soe_sdk.config import ModelConfig
from soe_sdk.errors import ExportError

from . import validate
from .folder import ExportResult, FolderSpec, write_export, write_json

MODEL_FILE = "model.safetensors"

_USAGE = """```python
import json
from safetensors.torch import load_file
from soe_sdk.config import ModelConfig
from soe_sdk.model import forward, generate

config = ModelConfig.from_dict(json.load(open("{folder}/config.json")))
params = load_file("{folder}/model.safetensors")
```

Names and shapes follow `ModelConfig.parameter_shapes()`; linear weights are [out, in]; the output layer
is tied to `wte.weight`."""


def export_safetensors(params: Mapping[str, Tensor], config: ModelConfig, tokenizer_json: str, out_dir: Path, *,
                       metadata: dict[str, Any]) -> ExportResult:
    """`model.safetensors` with soe-sdk names + `config.json`, checked by reading both back."""
    params = validate.prepare_params(params, config)
    validate.load_tokenizer(tokenizer_json, config)

    def build(folder: Path) -> dict[str, Any]:
        save_file(dict(params), str(folder / MODEL_FILE), metadata={"format": "pt", "producer": "soe-sdk"})
        write_json(folder / "config.json", config.to_dict())
        figures = validate.check_same("safetensors", [(k, v.numpy()) for k, v in params.items()],
                                      load_file(str(folder / MODEL_FILE)))
        if ModelConfig.from_dict(json.loads((folder / "config.json").read_text())) != config:
            raise ExportError("safetensors validation failed: config.json does not read back as the model config")
        return figures

    spec = FolderSpec("safetensors", "safetensors (soe-sdk layout)", _USAGE.format(folder=Path(out_dir).name), build)
    return write_export(out_dir, spec, config, tokenizer_json, metadata)
