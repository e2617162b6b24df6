"""Every method of the paper at one small, equal budget: generic, CRISP, domain experts, and
dense vs low-rank soups at equal archive size (paper Fig. 4 and §2.6).

    python benchmarks/tiny_methods.py --corpus ../shared/corpus [--preset tiny] [--steps 600]

Prepares (or reuses) a workdir on the corpus with the preset, then trains, with the same steps,
batch and seed: the generic n = 0 model on mix(h_generic); one CRISP model (n = 0) per
specialist set on mix(h_spe); one domain expert (n = 0) per top-level cluster; a dense soup
of `--dense-experts` experts; and a low-rank soup of rank `--rank` with as many experts as
fit in the dense soup's size (both packed into real `.soe` archives, sizes reported).
Quality is the trainer's held-out evaluation at the last step: each specialist set's eval
split — soups with φ(h) from the set's train docs (Algorithm 3); CRISP with the model trained
for that set; domain experts with the expert of the top-level cluster holding most of h —
and the generic eval set (soups with φ(h_generic)). The CRISP and domain-expert budgets are
per model, so together they cost (sets + clusters) × the soup's compute. Prints one JSON line
per run, a table, and writes OUT/tiny_methods.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

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
    parser.add_argument("--work", type=Path, default=Path("benchmarks/results/cache/tiny-work"))
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

    soups = {
        f"dense n={args.dense_experts}": (RunSpec("dense", None, args.dense_experts), preset),
        f"low-rank r={args.rank} n={n_lowrank}": (RunSpec("lowrank", None, n_lowrank),
                                                 preset.replace(expert_rank=args.rank)),
    }
    names = [p.name for p in specialists]
    k1 = preset.clusters[0]
    baselines = {"generic": "generic", **{f"crisp:{s}": f"crisp:{s}" for s in names},
                 **{f"domain:{c}": f"domain:{c}" for c in range(k1)}}
    results: dict = {"preset": preset.name, "steps": args.steps, "k": shards.k, "k1": k1, "runs": {}}

    def run(label: str, spec: RunSpec, p) -> dict:
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
        return row

    for label, kind in baselines.items():
        run(label, baseline_spec(kind, args.work, shards, k1), preset)
    for label, (spec, p) in soups.items():
        run(label, spec, p)

    # per set: CRISP = its own model; domain experts = the expert of the cluster with most of h
    table = {}
    for s in names:
        h = np.load(args.work / "eval" / f"{s}.h_hard.npy")
        top = int(np.argmax(h.reshape(k1, -1).sum(axis=1)))
        table[s] = {"generic": results["runs"]["generic"]["eval"][s],
                    "crisp": results["runs"][f"crisp:{s}"]["eval"][s],
                    "domain experts": results["runs"][f"domain:{top}"]["eval"][s],
                    **{label: results["runs"][label]["eval"][s] for label in soups}}
    table["generic_eval"] = {"generic": results["runs"]["generic"]["eval"]["generic"],
                             **{label: results["runs"][label]["eval"]["generic"] for label in soups}}
    results["table"] = table
    results["archive_bytes"] = {label: results["runs"][label]["archive_bytes"] for label in soups}
    results["elapsed_s"] = round(time.time() - t0)
    (args.out / "tiny_methods.json").write_text(json.dumps(results, indent=2))
    text = write_table(results, args.out / "tiny_methods.md")
    plot(results, args.out / "tiny_methods.png")
    print(text)


def write_table(results: dict, path: Path) -> str:
    table = results["table"]
    methods = list(table[next(iter(table))])
    lines = [f"Held-out loss (nats/token) after {results['steps']} steps per model, preset `{results['preset']}`, "
             f"k = {results['k']} domains ({results['k1']} top-level); gain vs generic in brackets.", "",
             "| set | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    gains: dict[str, list[float]] = {m: [] for m in methods}
    for s, row in table.items():
        base = row["generic"]
        cells = []
        for m in methods:
            if m not in row:
                cells.append("–")
                continue
            gain = 100 * (base - row[m]) / base
            if s != "generic_eval":
                gains[m].append(gain)
            cells.append(f"{row[m]:.3f}" if m == "generic" else f"{row[m]:.3f} ({gain:+.1f}%)")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines.append("| mean gain, specialist sets | " + " | ".join(
        "–" if m == "generic" else f"{np.mean(gains[m]):+.2f}%" for m in methods) + " |")
    sizes = results["archive_bytes"]
    lines += ["", "Soup archives: " + ", ".join(f"{label}: {b / 1e6:.3f} MB" for label, b in sizes.items()) + "."]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = {s: row for s, row in results["table"].items() if s != "generic_eval"}
    sets = list(table)
    methods = [m for m in table[sets[0]] if m != "generic"]
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        gains = [100 * (table[s]["generic"] - table[s][m]) / table[s]["generic"] for s in sets]
        ax.bar(np.arange(len(sets)) + i * width, gains, width, label=m)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(np.arange(len(sets)) + width * (len(methods) - 1) / 2, sets, rotation=30, ha="right")
    ax.set_ylabel("eval loss gain vs generic (%)")
    ax.set_title(f"All methods at {results['steps']} steps each (preset {results['preset']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
