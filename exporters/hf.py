"""Hugging Face transformers export: a GPT2LMHeadModel folder (config.json, model.safetensors, tokenizer)."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor

from soe_sdk.config import ModelConfig
from soe_sdk.errors import ExportError

from . import validate
from .folder import ExportResult, FolderSpec, write_export, write_json, write_tokenizer_config

PARITY_TOL = 1e-4
# GPT-2 stores these as Conv1D weights, [in, out]: the transpose of our Linear layout
_CONV1D = {"attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj", "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}


def gpt2_config(config: ModelConfig, eos_token_id: int) -> dict[str, Any]:
    """config.json for transformers' GPT2LMHeadModel with the same shapes and maths."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": config.vocab_size, "n_positions": config.max_seq_len, "n_ctx": config.max_seq_len,
        "n_embd": config.d_model, "n_layer": config.n_layers, "n_head": config.n_heads, "n_inner": config.d_mlp,
        "activation_function": "gelu_new",  # GELU, tanh approximation
        "layer_norm_epsilon": config.layer_norm_eps,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True, "bos_token_id": eos_token_id, "eos_token_id": eos_token_id,
        "torch_dtype": "float32",
    }


def gpt2_state_dict(params: Mapping[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """Our parameters under GPT-2 names (lm_head is tied to wte and not stored)."""
    out: dict[str, Tensor] = {}
    for name, tensor in params.items():
        new = name
        for ours, theirs in _CONV1D.items():
            if f".{ours}.weight" in name:
                new, tensor = name.replace(ours, theirs), tensor.t()
            elif f".{ours}.bias" in name:
                new = name.replace(ours, theirs)
        out["transformer." + new] = tensor.contiguous().clone()
    return out


_USAGE = """```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{folder}")
tokenizer = AutoTokenizer.from_pretrained("{folder}")
ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
print(tokenizer.decode(model.generate(ids, max_new_tokens=40, do_sample=False)[0]))
```

A plain GPT-2 architecture, so tools that read GPT-2 checkpoints (e.g. llama.cpp's `convert_hf_to_gguf.py`,
optimum's ONNX export) take it as is."""


def _hf_runner(folder: Path) -> validate.Runner:
    """Load the folder with transformers, as a user would, and run it."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Loading weights" bar in the middle of an export
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(folder), output_loading_info=True)
    except Exception as exc:  # transformers raises many types
        raise ExportError(f"hf validation: transformers cannot load the folder ({str(exc).splitlines()[0]})") from None
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    unexpected = [k for k in info.get("missing_keys", []) if "lm_head" not in k] + list(info.get("unexpected_keys", []))
    if unexpected or type(model).__name__ != "GPT2LMHeadModel":
        raise ExportError(f"hf validation: checkpoint and architecture disagree ({unexpected[:3] or type(model).__name__})")
    model.eval()

    def run(case: validate.Case) -> tuple[np.ndarray, None]:
        with torch.inference_mode():
            out = model(input_ids=torch.from_numpy(case.input_ids),
                        attention_mask=torch.from_numpy(case.attention_mask),
                        position_ids=torch.from_numpy(case.position_ids), use_cache=False)
        return out.logits.float().numpy(), None

    return run


def export_hf(params: Mapping[str, Tensor], config: ModelConfig, tokenizer_json: str, out_dir: Path, *,
              metadata: dict[str, Any]) -> ExportResult:
    """A transformers folder: GPT2LMHeadModel weights, config, tokenizer; logits checked ≤ 1e-4."""
    params = validate.prepare_params(params, config)
    tokenizer = validate.load_tokenizer(tokenizer_json, config)
    eos = tokenizer.token_to_id(validate.EOT)

    def build(folder: Path) -> dict[str, Any]:
        write_json(folder / "config.json", gpt2_config(config, eos))
        write_json(folder / "generation_config.json", {"bos_token_id": eos, "eos_token_id": eos,
                                                       "pad_token_id": eos})
        save_file(gpt2_state_dict(params, config), str(folder / "model.safetensors"), metadata={"format": "pt"})
        write_tokenizer_config(folder, config)
        return validate.check_parity("hf", params, config, _hf_runner(folder), tol=PARITY_TOL, with_past=False)

    spec = FolderSpec("hf", "Hugging Face transformers (GPT-2)", _USAGE.format(folder=Path(out_dir).name), build)
    return write_export(out_dir, spec, config, tokenizer_json, metadata)
