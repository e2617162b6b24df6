"""Dense vs low-rank experts at equal archive size (paper §2.6), trained with the same code and budget.

    python benchmarks/lowrank_vs_dense.py --corpus ../shared/corpus [--preset tiny] [--steps 600]

Prepares (or reuses) a workdir on the corpus with the preset, then trains three runs with the
same steps, batch and seed: the generic n = 0 model, a dense soup of `--dense-experts` experts,
and a low-rank soup of rank `--rank` with as many experts as fit in the dense soup's size.
Both soups are packed into real `.soe` archives, whose sizes are reported. Quality is the
trainer's held-out evaluation at the last step: the generic eval set with φ(h_generic), and
each specialist set with φ(h) from its train docs (Algorithm 3). Prints one JSON line per run,
a table, and writes OUT/lowrank_vs_dense.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from soe_sdk.config import RouterConfig, SoupConfig  # noqa: E402
from trainer.layout import SoupLayout  # noqa: E402
from trainer.loop import RunSpec, baseline_spec, train  # noqa: E402
from trainer.pack import pack  # noqa: E402
from trainer.prepare import prepare  # noqa: E402
from trainer.presets import get_preset  # noqa: E402
from trainer.shards import DomainShards  # noqa: E402


def soup_numbers(preset, k: int, n: int, rank: int) -> int:
    """Numbers a soup stores besides its router: S, dense experts and low-rank factors."""
    config = SoupConfig(model=preset.model, router=RouterConfig(k=k, n=n, hidden=preset.router_hidden),
                        expert_rank=rank)
    layout = SoupLayout.for_soup(config)
    return layout.shared.size + n * layout.experts.size + layout.factors.size


def last_eval(run_dir: Path) -> dict[str, float]:
    evals = [json.loads(line)["eval"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in line]
    return evals[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=Path("../shared/corpus"))
    parser.add_argument("--work", type=Path, default=Path("benchmarks/results/cache/lowrank-work"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--dense-experts", type=int, default=4)
    parser.add_argument("--rank", type=int, default=4)
    args = parser.parse_args()
    if not (args.corpus / "pretrain").exists():
        sys.exit(f"error: {args.corpus}/pretrain: corpus not found")
    preset = get_preset(args.preset)
    specialists = sorted(p for p in (args.corpus / "specialist").iterdir() if p.is_dir())
    t0 = time.time()
    prepare(args.corpus / "pretrain", args.work, preset, eval_path=args.corpus / "generic_eval.jsonl.gz",
            specialist_dirs=specialists, progress=False)
    shards = DomainShards.open(args.work)
    dense_size = soup_numbers(preset, shards.k, args.dense_experts, 0)
    n_lowrank = args.dense_experts
    while soup_numbers(preset, shards.k, n_lowrank + 1, args.rank) <= dense_size:
        n_lowrank += 1

    runs = {
        "generic": (baseline_spec("generic", args.work, shards, preset.clusters[0]), preset),
        f"dense n={args.dense_experts}": (RunSpec("dense", None, args.dense_experts), preset),
        f"low-rank r={args.rank} n={n_lowrank}": (RunSpec("lowrank", None, n_lowrank),
                                                 preset.replace(expert_rank=args.rank)),
    }
    results: dict = {"preset": preset.name, "steps": args.steps, "k": shards.k, "runs": {}}
    for label, (spec, p) in runs.items():
        start = time.time()
        run_dir = train(args.work, p, spec=spec, max_steps=args.steps, seed=0, progress=False)
        row = {"experts": spec.experts, "rank": p.expert_rank, "train_s": round(time.time() - start, 1),
               "eval": last_eval(run_dir)}
        if spec.experts:
            archive = args.out / "cache" / f"{spec.name}.soe"
            pack(args.work, archive, spec.name)
            row["archive_bytes"] = archive.stat().st_size
            row["soup_numbers"] = soup_numbers(p, shards.k, spec.experts, p.expert_rank)
        results["runs"][label] = row
        print(json.dumps({"run": label, **row}), flush=True)
    results["elapsed_s"] = round(time.time() - t0)
    (args.out / "lowrank_vs_dense.json").write_text(json.dumps(results, indent=2))
    table = write_table(results, args.out / "lowrank_vs_dense.md")
    plot(results, args.out / "lowrank_vs_dense.png")
    print(table)


def write_table(results: dict, path: Path) -> str:
    runs = results["runs"]
    sets = list(next(iter(runs.values()))["eval"])
    generic = runs["generic"]["eval"]
    lines = [f"Held-out loss after {results['steps']} steps of preset `{results['preset']}` (k = {results['k']}); "
             "specialist sets with φ(h) from their train docs, `generic` with φ(h_generic); gain vs the generic model.",
             "", "| set | " + " | ".join(runs) + " |", "|---" * (len(runs) + 1) + "|"]
    for s in sets:
        cells = [f"{generic[s]:.3f}"] + [f"{r['eval'][s]:.3f} ({100 * (generic[s] - r['eval'][s]) / generic[s]:+.1f}%)"
                                         for label, r in runs.items() if label != "generic"]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines.append("| archive MB | – | " + " | ".join(f"{r['archive_bytes'] / 1e6:.2f}" for label, r in runs.items()
                                                  if label != "generic") + " |")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    runs = results["runs"]
    generic = runs["generic"]["eval"]
    sets = [s for s in generic if s != "generic"]
    soups = [label for label in runs if label != "generic"]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(soups)
    for i, label in enumerate(soups):
        gains = [100 * (generic[s] - runs[label]["eval"][s]) / generic[s] for s in sets]
        mb = runs[label]["archive_bytes"] / 1e6
        ax.bar(np.arange(len(sets)) + i * width, gains, width, label=f"{label} ({mb:.2f} MB)")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(np.arange(len(sets)) + width * (len(soups) - 1) / 2, sets, rotation=30, ha="right")
    ax.set_ylabel("loss gain vs generic (%)")
    ax.set_title("Dense vs low-rank experts at equal archive size")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
