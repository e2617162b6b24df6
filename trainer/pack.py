"""A finished run → one `.soe` archive: soup tensors, centroids, h_generic, tokenizer, provenance."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from soe_sdk.config import EmbedderSpec, SoupConfig
from soe_sdk.errors import SoeError
from soe_sdk.soup import write_soup

from . import checkpoint as ckpt
from .layout import SoupLayout
from .shards import DomainShards
from .state import packed_router


TRAINING_SETTINGS = ("lr", "min_lr_ratio", "expert_lr_scale", "router_lr_scale", "router_freeze_at",
                     "expert_start_at", "router_input_scale", "centre_alpha", "expert_init_scale", "router_init",
                     "router_init_scale",
                     "expert_preconditioner", "centre_expert_gradients", "expert_params", "expert_beta1", "branch_share", "trunk_steps",
                     "branch_steps", "trunk_lr", "batch_size", "grad_accum",
                     "seq_len", "precision")  # recorded in the provenance


def _full_flat(ckpt_dir: Path, step: int, state: dict) -> dict[str, torch.Tensor]:
    """Parameters of a checkpoint; bank-sharded ones are stitched from every rank's slice."""
    if state.get("sharding") != "bank":
        tensors, _ = ckpt.load_checkpoint(ckpt_dir, step)
        return tensors
    parts = [ckpt.load_checkpoint(ckpt_dir, step, rank=r)[0] for r in range(state["world"])]
    out = dict(parts[0])
    p = state["p"]
    out["S"] = torch.cat([x["S"] for x in parts])[:p]
    out["E"] = torch.cat([x["E"] for x in parts], dim=1)[:, :p]
    return out


def pack(workdir: str | Path, out: str | Path, run: str = "soup") -> str:
    """Write WORKDIR/runs/RUN's latest checkpoint as an archive at `out`; return its SHA-256."""
    workdir = Path(workdir)
    run_dir = workdir / "runs" / run
    ckpt_dir = run_dir / "checkpoints"
    step = ckpt.latest_step(ckpt_dir)
    if step is None:
        raise SoeError(f"{run_dir}: no checkpoint to pack (train first)")
    state = ckpt.load_checkpoint(ckpt_dir, step, rank=0 if _is_bank(ckpt_dir, step) else None)[1]
    config = SoupConfig.from_dict(state["config"])
    flat = _full_flat(ckpt_dir, step, state)
    tensors = SoupLayout.for_soup(config).archive_tensors(flat["S"], flat["E"], flat.get("F"))
    run_meta = state.get("run", {})
    tensors.update(packed_router({k: v for k, v in flat.items() if k.startswith("router.")},
                                 float(run_meta.get("router_input_scale", 1.0)), flat.get("alpha_centre")))

    prep_path = workdir / "prepare.json"
    prep = json.loads(prep_path.read_text()) if prep_path.exists() else {}
    tokens = step * run_meta.get("batch_size", 0) * run_meta.get("grad_accum", 1) * run_meta.get("seq_len", 0)
    if run_meta.get("sharding") == "ddp":
        tokens *= run_meta.get("world", 1)
    provenance = {"corpus": prep.get("corpus"), "run": run, "steps": step, "tokens": tokens,
                  "preset": run_meta.get("preset"), "seed": run_meta.get("seed"),
                  "meta_distribution": None if run_meta.get("fixed_h") else
                  {"kind": "support", "s": run_meta.get("support_size"),
                   "choice": run_meta.get("support_choice", "uniform"),
                   "neighbour_share": run_meta.get("neighbour_share"),
                   "generic_share": run_meta.get("generic_share", 0.0),
                   "domain_groups": run_meta.get("domain_groups")},
                  "fixed_h": bool(run_meta.get("fixed_h")), "clusters": prep.get("clusters"),
                  "optimizer": {key: run_meta.get(key) for key in TRAINING_SETTINGS}}
    final_eval = _last_eval(run_dir / "metrics.jsonl")
    if final_eval:
        provenance["final_eval"] = final_eval
    shards = DomainShards.open(workdir)
    storage = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    dtype = storage.get(str(run_meta.get("storage_dtype", "float32")), torch.float32)
    return write_soup(out, tensors, config, centroids=np.load(workdir / "centroids.npy"),
                      h_generic=shards.h_generic, embedder=_embedder_spec(prep),
                      tokenizer_json=(workdir / "tokenizer.json").read_text(), provenance=provenance,
                      storage_dtype=dtype)


def _embedder_spec(prep: dict) -> EmbedderSpec:
    """The embedder as prepare ran it, including how many characters of each document it read."""
    spec = dict(prep.get("embedder", {}))
    if prep.get("embed_chars"):
        spec["max_chars"] = int(prep["embed_chars"])
    return EmbedderSpec.from_dict(spec)


def _is_bank(ckpt_dir: Path, step: int) -> bool:
    return (ckpt_dir / ckpt.checkpoint_name(step, 0)).exists()


def _last_eval(metrics: Path) -> dict | None:
    if not metrics.exists():
        return None
    last = None
    for line in metrics.read_text().splitlines():
        if '"eval"' in line:
            last = json.loads(line)["eval"]
    return last
