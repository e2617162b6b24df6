"""Reproduce the paper's main comparisons at CPU scale on ../shared/corpus.

    python benchmarks/reproduce_paper.py --soup soe_sdk/assets/demo-soup.soe \
        --generic soe_sdk/assets/demo-generic.soe --corpus ../shared/corpus

Time budget: ~20 min on 2 CPU cores (embedding the 7 train sets dominates; cached after the
first run in OUT/cache). Writes OUT/results.json, OUT/main_table.md and PNG plots, and prints
one JSON line per measurement.

Measured, per specialist set (eval loss in nats/token on its held-out `eval` split):
- generic: the n = 0 model trained on mix(h_generic) with the same tokens and steps;
- soup φ(h): h from the set's `train` docs (Algorithm 3, hard and soft assignment);
- soup refined α: α tuned on the train docs starting from φ(h) (paper §2.7);
- number of train docs used to estimate h (Fig. 6 right); fine-tuning budgets (Fig. 5);
- generic eval set: φ(h_generic) against the generic model.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import soe_sdk  # noqa: E402
from soe_sdk.domains import domain_histogram  # noqa: E402
from soe_sdk.embedding import Embedder  # noqa: E402
from soe_sdk.model import next_token_loss  # noqa: E402
from soe_sdk.refine import finetune, refine_alpha  # noqa: E402
from soe_sdk.tokens import split_heldout, windows  # noqa: E402

def read_jsonl_gz(path: Path, limit: int | None = None) -> list[str]:
    texts = []
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            texts.append(json.loads(line)["text"])
            if limit and len(texts) >= limit:
                break
    return texts


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


@torch.no_grad()
def eval_loss(params: dict, config, val: torch.Tensor) -> float:
    total = 0.0
    for i in range(0, len(val), 32):
        rows = val[i:i + 32]
        total += float(next_token_loss(params, config, rows)) * rows.numel()
    return total / val.numel()


def embed_cached(embedder: Embedder, texts: list[str], cache: Path) -> np.ndarray:
    if cache.exists():
        return np.load(cache)
    vectors = embedder.encode(texts, progress=True)  # the spec's max_chars: as the centroids were made
    np.save(cache, vectors)
    return vectors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--soup", type=Path, default=Path("soe_sdk/assets/demo-soup.soe"))
    parser.add_argument("--generic", type=Path, default=Path("soe_sdk/assets/demo-generic.soe"))
    parser.add_argument("--corpus", type=Path, default=Path("../shared/corpus"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--eval-windows", type=int, default=128, help="eval windows per set (128+1 tokens each)")
    parser.add_argument("--refine-steps", type=int, default=60)
    parser.add_argument("--finetune-budgets", default="0,32768,131072")
    parser.add_argument("--doc-counts", default="1,3,10,30,100,300,1000")
    parser.add_argument("--sets", default="", help="comma-separated subset of specialist sets")
    args = parser.parse_args()
    if not args.corpus.exists():
        sys.exit(f"error: {args.corpus}: corpus not found")
    args.out.mkdir(parents=True, exist_ok=True)
    cache = args.out / "cache"
    cache.mkdir(exist_ok=True)
    torch.manual_seed(0)
    t_start = time.time()

    soup, generic = soe_sdk.load(args.soup), soe_sdk.load(args.generic)
    config, tok = soup.model_config, soup.tokenizer()
    theta_generic = generic.instantiate(torch.zeros(0))
    embedder = Embedder.from_spec(soup.embedder)
    seq = config.max_seq_len
    names = sorted(p.name for p in (args.corpus / "specialist").iterdir())
    if args.sets:
        names = [n for n in names if n in args.sets.split(",")]
    results: dict = {"soup": str(args.soup), "generic": str(args.generic), "sets": {}}

    generic_eval = windows(tok, read_jsonl_gz(args.corpus / "generic_eval.jsonl.gz"), seq, args.eval_windows)
    theta_hgen = soup.instantiate(soup.coefficients(soup.h_generic))
    results["generic_eval"] = {"generic": eval_loss(theta_generic, config, generic_eval),
                               "soup_h_generic": eval_loss(theta_hgen, config, generic_eval)}
    emit({"set": "generic_eval", **results["generic_eval"]})

    budgets = [int(b) for b in args.finetune_budgets.split(",") if b]
    counts = [int(c) for c in args.doc_counts.split(",") if c]
    for name in names:
        train_docs = read_jsonl_gz(args.corpus / "specialist" / name / "train.jsonl.gz")
        eval_windows = windows(tok, read_jsonl_gz(args.corpus / "specialist" / name / "eval.jsonl.gz"), seq,
                               args.eval_windows)
        vectors = embed_cached(embedder, train_docs, cache / f"{name}.train.npy")
        row: dict = {"train_docs": len(train_docs)}
        row["generic"] = eval_loss(theta_generic, config, eval_windows)
        h_hard = domain_histogram(vectors, soup.centroids, mode="hard")
        h_soft = domain_histogram(vectors, soup.centroids, mode="soft")
        alpha = soup.coefficients(h_hard)
        theta_spe = soup.instantiate(alpha)
        row["soup_hard"] = eval_loss(theta_spe, config, eval_windows)
        row["soup_soft"] = eval_loss(soup.instantiate(soup.coefficients(h_soft)), config, eval_windows)
        # the same soup, not specialised: what φ(h) itself adds on this set
        row["soup_h_generic"] = eval_loss(theta_hgen, config, eval_windows)
        row["alpha_shift"] = float(torch.linalg.vector_norm(alpha - soup.coefficients(soup.h_generic)))
        row["top_domains"] = [[int(i), round(float(h_hard[i]), 3)] for i in np.argsort(-h_hard)[:5]]

        fit_docs, val_docs = split_heldout(train_docs, 0.2)
        fit_w, val_w = windows(tok, fit_docs, seq), windows(tok, val_docs, seq, 64)
        refined, fit = refine_alpha(soup, alpha, fit_w, val_w, max_steps=args.refine_steps, max_seconds=120)
        row["soup_refined"] = eval_loss(soup.instantiate(refined), config, eval_windows)
        row["refine"] = {"val_before": fit.val_before, "val_after": fit.val_after, "steps": fit.steps,
                         "stopped": fit.stopped}

        rng = np.random.default_rng(0)
        sweep = {}
        for count in counts:
            if count > len(train_docs):
                continue
            repeats = 3 if count < 100 else 1
            losses = []
            for _ in range(repeats):
                pick = rng.choice(len(train_docs), size=count, replace=False)
                h = domain_histogram(vectors[pick], soup.centroids, mode="hard")
                losses.append(eval_loss(soup.instantiate(soup.coefficients(h)), config, eval_windows))
            sweep[count] = float(np.mean(losses))
        row["docs_sweep"] = sweep

        ft: dict = {"generic": {}, "soup": {}}
        ft_lr: dict = {"generic": {}, "soup": {}}
        for budget in budgets:
            for label, start in (("generic", theta_generic), ("soup", theta_spe)):
                if budget == 0:
                    ft[label][budget] = row["generic" if label == "generic" else "soup_hard"]
                    continue
                # each model gets the learning rate its own held-out slice prefers (the SDK's default)
                tuned, fit = finetune(start, config, fit_w, val_w, max_tokens=budget)
                ft[label][budget] = eval_loss(tuned, config, eval_windows)
                ft_lr[label][budget] = fit.lr
        row["finetune"] = ft
        row["finetune_lr"] = ft_lr
        results["sets"][name] = row
        emit({"set": name, **{k: v for k, v in row.items() if k in ("generic", "soup_hard", "soup_soft", "soup_refined")},
              "elapsed_s": round(time.time() - t_start)})

    results["elapsed_s"] = round(time.time() - t_start)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    write_table(results, args.out / "main_table.md")
    plot(results, args.out)
    print((args.out / "main_table.md").read_text())


def gain(base: float, new: float) -> str:
    return f"{(base - new) / base:+.1%}"


def write_table(results: dict, path: Path) -> None:
    lines = ["| set | generic | soup φ(h_generic) | soup φ(h) hard | soup φ(h) soft | soup refined α | ‖α − α_generic‖ |",
             "|---|---|---|---|---|---|---|"]
    gains_hard, gains_ref, gains_spec = [], [], []
    for name, r in results["sets"].items():
        g = r["generic"]
        gains_hard.append((g - r["soup_hard"]) / g)
        gains_ref.append((r["soup_hard"] - r["soup_refined"]) / r["soup_hard"])
        gains_spec.append((r["soup_h_generic"] - r["soup_hard"]) / r["soup_h_generic"])
        lines.append(f"| {name} | {g:.3f} | {r['soup_h_generic']:.3f} ({gain(g, r['soup_h_generic'])}) | "
                     f"{r['soup_hard']:.3f} ({gain(g, r['soup_hard'])}) | "
                     f"{r['soup_soft']:.3f} ({gain(g, r['soup_soft'])}) | {r['soup_refined']:.3f} ({gain(g, r['soup_refined'])}) | "
                     f"{r['alpha_shift']:.3f} |")
    ge = results["generic_eval"]
    lines.append(f"| generic_eval | {ge['generic']:.3f} | {ge['soup_h_generic']:.3f} "
                 f"({gain(ge['generic'], ge['soup_h_generic'])}) | | | | |")
    wins = sum(x > 0 for x in gains_hard)
    lines += ["", f"Soup φ(h) beats generic on {wins}/{len(gains_hard)} sets; mean gain {np.mean(gains_hard):+.2%}.",
              f"Refined α gains a further {np.mean(gains_ref):+.2%} on average over φ(h).",
              f"Specialisation itself (φ(h) of the set vs φ(h_generic), same soup): {np.mean(gains_spec):+.2%} on average."]
    counts = sorted({int(c) for r in results["sets"].values() for c in r["docs_sweep"]})
    lines += ["", "Loss vs number of train docs used to estimate h (soup φ(h), hard; – = set has fewer docs):", "",
              "| set | " + " | ".join(str(c) for c in counts) + " |", "|---|" + "---|" * len(counts)]
    for name, r in results["sets"].items():
        sweep = {int(c): v for c, v in r["docs_sweep"].items()}
        lines.append(f"| {name} | " + " | ".join(f"{sweep[c]:.3f}" if c in sweep else "–" for c in counts) + " |")
    gaps = {name: abs(sw[100] - sw[max(sw)]) / sw[max(sw)] for name, r in results["sets"].items()
            for sw in [{int(c): v for c, v in r["docs_sweep"].items()}] if 100 in sw}
    if gaps:
        lines += ["", "h from 100 docs vs from all docs (1000, or the set's size when smaller): largest gap "
                  f"{max(gaps.values()):.2%} ({max(gaps, key=gaps.get)}), mean {np.mean(list(gaps.values())):.2%}."]
    lines += ["", "Fine-tuning (eval loss after fine-tuning on train docs with early stopping; budget in tokens; "
              "each model's learning rate chosen from 1e-4, 3e-4, 1e-3, 3e-3 on its held-out slice, in brackets):", "",
              "| set | model | " + " | ".join(str(b) for b in next(iter(results["sets"].values()))["finetune"]["soup"]) + " |",
              "|---|---|" + "---|" * len(next(iter(results["sets"].values()))["finetune"]["soup"])]
    for name, r in results["sets"].items():
        for label in ("generic", "soup"):
            rates = r.get("finetune_lr", {}).get(label, {})
            lines.append(f"| {name} | {label} | " + " | ".join(
                f"{v:.3f}" + (f" ({rates[b]:g})" if b in rates else "") for b, v in r["finetune"][label].items()) + " |")
    path.write_text("\n".join(lines) + "\n")


def plot(results: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(results["sets"])
    methods = [("generic", "generic"), ("soup_hard", "soup φ(h)"), ("soup_refined", "soup refined α")]
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.27
    for i, (key, label) in enumerate(methods):
        ax.bar(np.arange(len(sets)) + (i - 1) * width, [results["sets"][s][key] for s in sets], width, label=label)
    ax.set_xticks(np.arange(len(sets)), sets, rotation=20)
    ax.set(ylabel="eval loss (nats/token)", title="Specialist eval loss (lower is better)")
    lows = [min(results["sets"][s][k] for k, _ in methods) for s in sets]
    ax.set_ylim(min(lows) * 0.9, max(results["sets"][s]["generic"] for s in sets) * 1.03)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "main_comparison.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for s in sets:
        sweep = results["sets"][s]["docs_sweep"]
        rel = [(v - results["sets"][s]["generic"]) / results["sets"][s]["generic"] for v in sweep.values()]
        axes[0].plot([int(c) for c in sweep], rel, marker="o", label=s)
        ft = results["sets"][s]["finetune"]
        axes[1].plot([int(b) + 1 for b in ft["generic"]], list(ft["generic"].values()), "--", alpha=0.6)
        axes[1].plot([int(b) + 1 for b in ft["soup"]], list(ft["soup"].values()), "-", marker=".", label=s)
    axes[0].axhline(0, color="k", lw=0.8)
    axes[0].set(xscale="log", xlabel="train docs used to estimate h", ylabel="relative loss vs generic",
                title="Fig. 6 (right): docs needed for h")
    axes[1].set(xscale="log", xlabel="fine-tuning tokens + 1", ylabel="eval loss",
                title="Fig. 5: fine-tuning (solid soup, dashed generic)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "docs_and_finetuning.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
