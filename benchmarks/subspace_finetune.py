"""How much of a specialist set's gain lives in a small subspace of the parameters?

    python benchmarks/subspace_finetune.py [--sets bible-kjv,git-docs] [--steps 300]

Fine-tunes the bundled generic model on each set's `train` docs (80 % to fit, 20 % for early
stopping), updating only one group of parameters at a time, and scores it on the set's `eval`
split: the LayerNorm gains and biases (`ln`), every 1-D parameter (`vectors`: LayerNorms and
linear biases), the token embedding (`wte`, tied to the output layer) and everything (`all`).
Each group gets the best of a few learning rates on the held-out slice. This bounds what experts
restricted to that group could add (`soe-train train --expert-params vectors`). Prints one JSON
line per set and group (gain over the generic model, %), then a table. Needs ../shared/corpus;
about 4 min per set on one thread.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import soe_sdk  # noqa: E402
from soe_sdk.model import next_token_loss  # noqa: E402
from soe_sdk.tokens import split_heldout, windows  # noqa: E402

from reproduce_paper import eval_loss, read_jsonl_gz  # noqa: E402

GROUPS: dict[str, Callable[[str, torch.Size], bool]] = {
    "ln": lambda name, shape: ".ln_" in name or name.startswith("ln_"),
    "vectors": lambda name, shape: len(shape) == 1,
    "wte": lambda name, shape: name == "wte.weight",
    "all": lambda name, shape: True,
}
RATES = {"ln": (1e-3, 3e-3, 1e-2), "vectors": (1e-3, 3e-3, 1e-2), "wte": (1e-3, 3e-3, 1e-2), "all": (3e-4, 1e-3)}


def fit_group(theta0: dict[str, torch.Tensor], config, pick: Callable[[str, torch.Size], bool], lr: float,
              fit: torch.Tensor, val: torch.Tensor, steps: int, eval_every: int = 25,
              patience: int = 3) -> tuple[dict[str, torch.Tensor], float]:
    """Adam on the picked parameters only; returns the parameters with the best held-out loss and that loss."""
    theta = {k: v.clone().requires_grad_(pick(k, v.shape)) for k, v in theta0.items()}
    opt = torch.optim.AdamW([v for v in theta.values() if v.requires_grad], lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    best, best_val, bad = theta0, eval_loss(theta0, config, val), 0
    for step in range(steps):
        loss = next_token_loss(theta, config, fit[torch.randint(len(fit), (16,), generator=gen)])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % eval_every == 0:
            now = eval_loss(theta, config, val)
            if now < best_val:
                best, best_val, bad = {k: v.detach().clone() for k, v in theta.items()}, now, 0
            else:
                bad += 1
                if bad >= patience:
                    break
    return best, best_val


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generic", type=Path, default=Path("soe_sdk/assets/demo-generic.soe"))
    parser.add_argument("--corpus", type=Path, default=Path("../shared/corpus"))
    parser.add_argument("--sets", default="", help="comma-separated subset of the specialist sets")
    parser.add_argument("--groups", default=",".join(GROUPS))
    parser.add_argument("--steps", type=int, default=300, help="at most this many steps of 16 windows")
    args = parser.parse_args()
    if not (args.corpus / "specialist").is_dir():
        sys.exit(f"error: {args.corpus}: corpus not found (expected a specialist/ folder)")
    torch.manual_seed(0)
    generic = soe_sdk.load(args.generic)
    config, tok = generic.model_config, generic.tokenizer()
    theta0 = generic.instantiate(torch.zeros(0))
    names = sorted(p.name for p in (args.corpus / "specialist").iterdir())
    names = [n for n in names if not args.sets or n in args.sets.split(",")]
    groups = [g for g in args.groups.split(",") if g]
    table: dict[str, dict[str, float]] = {}
    for name in names:
        folder = args.corpus / "specialist" / name
        fit_docs, val_docs = split_heldout(read_jsonl_gz(folder / "train.jsonl.gz"), 0.2)
        fit, val = windows(tok, fit_docs, config.max_seq_len), windows(tok, val_docs, config.max_seq_len, 64)
        test = windows(tok, read_jsonl_gz(folder / "eval.jsonl.gz"), config.max_seq_len, 128)
        base = eval_loss(theta0, config, test)
        table[name] = {}
        for group in groups:
            tried = [fit_group(theta0, config, GROUPS[group], lr, fit, val, args.steps) + (lr,) for lr in RATES[group]]
            tuned, _, lr = min(tried, key=lambda t: t[1])
            loss = eval_loss(tuned, config, test)
            table[name][group] = 100 * (base - loss) / base
            print(json.dumps({"set": name, "group": group, "generic": base, "tuned": loss, "lr": lr,
                              "gain_pct": round(table[name][group], 2)}), flush=True)
    print("\n| set | " + " | ".join(groups) + " |\n| --- |" + " ---: |" * len(groups))
    for name, row in table.items():
        print(f"| {name} | " + " | ".join(f"{row[g]:+.2f} %" for g in groups) + " |")


if __name__ == "__main__":
    main()
