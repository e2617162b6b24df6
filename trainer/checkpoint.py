"""Atomic checkpoints: parameters, optimizer moments, sampler RNG and step, in one verified file.

A checkpoint is written with the archive writer (temp file + fsync + rename; SHA-256 per
tensor), then `LATEST` is atomically pointed at it, so a process killed at any moment
leaves either the previous or the new checkpoint — never a torn one. Only the newest
`keep` checkpoints stay on disk.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from soe_sdk.archive import Archive, write_archive
from soe_sdk.errors import SoeError

LATEST = "LATEST"


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def checkpoint_name(step: int, rank: int | None = None) -> str:
    return f"step-{step:08d}" + ("" if rank is None else f".rank{rank}") + ".ckpt"


def save_checkpoint(directory: Path, step: int, tensors: dict[str, torch.Tensor], state: dict[str, Any],
                    *, rank: int | None = None, publish: bool = True, keep: int = 2) -> Path:
    """Write one checkpoint file; with `publish`, point LATEST at `step` and prune old ones."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / checkpoint_name(step, rank)
    for name, tensor in tensors.items():  # a NaN checkpoint would become the "last good" one
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            last = latest_step(directory)
            raise SoeError(f"{path}: not written, tensor {name!r} holds NaN or Inf at step {step}; "
                           + (f"last good checkpoint: step {last}" if last is not None else "no earlier checkpoint"))
    write_archive(path, {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                  {"kind": "checkpoint", "step": step, "state": state})
    if publish:
        publish_checkpoint(directory, step, keep)
    return path


def publish_checkpoint(directory: Path, step: int, keep: int = 2) -> None:
    """Make `step` the checkpoint a resume starts from, then delete all but the newest `keep`."""
    _atomic_write_text(directory / LATEST, f"{step}\n")
    # Temp files of writers killed mid-write (every rank has finished writing `step` by now).
    for stale in directory.glob(".step-*.ckpt.*.tmp"):
        stale.unlink(missing_ok=True)
    steps = sorted({int(p.name.split("-")[1].split(".")[0]) for p in directory.glob("step-*.ckpt")})
    for old in steps[:-keep] if keep > 0 else []:
        if old != step:
            for p in directory.glob(f"step-{old:08d}*.ckpt"):
                p.unlink(missing_ok=True)


def latest_step(directory: Path) -> int | None:
    """The step LATEST points at, or None if there is no published checkpoint."""
    marker = directory / LATEST
    if not marker.exists():
        return None
    try:
        return int(marker.read_text().strip())
    except ValueError:
        raise SoeError(f"{marker}: not a step number; delete it to start over") from None


def load_checkpoint(directory: Path, step: int, *, rank: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and verify a checkpoint; return (tensors, state)."""
    archive = Archive(directory / checkpoint_name(step, rank))
    meta = archive.metadata
    if meta.get("kind") != "checkpoint" or meta.get("step") != step:
        raise SoeError(f"{archive.path}: not the checkpoint of step {step}")
    tensors = {name: archive.tensor(name).clone() for name in archive.names()}
    return tensors, meta["state"]
