"""Writing one export folder atomically: build beside the target, then rename into place.

Every format goes through `write_export`, so every folder gets the same `tokenizer.json`,
`specialist.json` and `README.md`, and a failed export never leaves a partial folder.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from soe_sdk.config import ModelConfig
from soe_sdk.errors import ExportError

EOT = "<|endoftext|>"


@dataclass
class ExportResult:
    """What an export produced: the final folder, its files (name → bytes) and validation figures."""

    out_dir: Path
    format: str
    files: dict[str, int] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)


@dataclass
class FolderSpec:
    """The format-specific parts of an export folder."""

    format: str
    title: str  # e.g. "ONNX (fp32)"
    usage: str  # markdown: how to load the folder in its ecosystem
    build: Callable[[Path], dict[str, Any]]  # writes the model files into a folder, returns validation figures


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def write_tokenizer_config(folder: Path, config: ModelConfig) -> None:
    """tokenizer_config.json for `PreTrainedTokenizerFast` (also read by onnxruntime-genai)."""
    write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOT, "eos_token": EOT, "unk_token": EOT, "pad_token": EOT,
        "model_max_length": config.max_seq_len,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
    })


def model_card(metadata: dict[str, Any], config: ModelConfig, title: str, usage: str,
               validation: dict[str, Any]) -> str:
    """A short README.md: what the model is and how to load this folder."""
    name = metadata.get("name") or "Soup-of-Experts specialist"
    lines = [
        f"# {name} — {title}",
        "",
        "A small GPT-2-style language model specialised from a Soup-of-Experts by soe-sdk",
        "(parameters Θ = S + Σ α_j E_j for the domain mix of the user's documents).",
        "",
        f"- layers {config.n_layers}, width {config.d_model}, heads {config.n_heads}, MLP {config.d_mlp}",
        f"- vocabulary {config.vocab_size} (byte-level BPE, `{EOT}` = id 0 is BOS/EOS), context {config.max_seq_len} tokens",
        f"- {config.num_parameters():,} parameters; provenance and domain weights in `specialist.json`",
        "",
        "## Load it",
        "",
        usage.strip(),
        "",
    ]
    if validation:
        lines += ["## Export check", "", "Measured against the PyTorch model at export time:", "", "```json",
                  json.dumps(validation, indent=1), "```", ""]
    return "\n".join(lines)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 RENAME_EXCHANGE).

    False when the platform or file system cannot, or `b` vanished meanwhile.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOENT, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def swap_into_place(staged: Path, out_dir: Path) -> None:
    """Put `staged` at `out_dir`.

    An existing folder is exchanged with `staged` atomically where the OS allows it (so
    `out_dir` is never missing, even to a concurrent writer or a process killed mid-swap),
    otherwise renamed away first; either way the previous folder is deleted last.
    """
    if out_dir.exists() and _exchange(staged, out_dir):
        shutil.rmtree(staged, ignore_errors=True)  # `staged` now holds the previous export
        return
    if not out_dir.exists():
        try:
            os.rename(staged, out_dir)
            return
        except OSError as exc:  # a concurrent writer created `out_dir` first: replace theirs
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not _exchange(staged, out_dir):
                raise
            shutil.rmtree(staged, ignore_errors=True)
            return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.rename(out_dir, old / "previous")
    try:
        os.rename(staged, out_dir)
    except OSError:
        os.rename(old / "previous", out_dir)  # put the previous export back
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_export(out_dir: str | Path, spec: FolderSpec, config: ModelConfig, tokenizer_json: str,
                 metadata: dict[str, Any]) -> ExportResult:
    """Build the folder for `spec` in a temp folder beside `out_dir`, then rename it into place."""
    out_dir = Path(out_dir).expanduser().absolute()
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir}: exists and is not a folder")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    except OSError as exc:
        raise ExportError(f"{out_dir}: cannot create the export folder ({exc.strerror or exc})") from None
    try:
        (staged / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")  # builds may load it
        validation = spec.build(staged)
        (staged / "README.md").write_text(model_card(metadata, config, spec.title, spec.usage, validation),
                                          encoding="utf-8")
        files = {p.name: p.stat().st_size for p in sorted(staged.iterdir()) if p.is_file()}
        info = dict(metadata)
        info.update({"format": spec.format, "model_config": config.to_dict(), "files": files,
                     "validation": validation})
        write_json(staged / "specialist.json", info)
        files["specialist.json"] = (staged / "specialist.json").stat().st_size
        swap_into_place(staged, out_dir)
    except ExportError:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    except OSError as exc:
        shutil.rmtree(staged, ignore_errors=True)
        raise ExportError(f"{out_dir}: writing the {spec.format} export failed ({exc.strerror or exc})") from None
    except Exception as exc:  # a library's own I/O error type (e.g. safetensors on a full disk)
        shutil.rmtree(staged, ignore_errors=True)
        detail = (str(exc).strip().splitlines() or [""])[0]
        raise ExportError(f"{out_dir}: writing the {spec.format} export failed "
                          f"({type(exc).__name__}: {detail})") from exc
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return ExportResult(out_dir=out_dir, format=spec.format, files=files, validation=validation)
