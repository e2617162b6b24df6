"""PNG of a run's training and evaluation curves, written next to its metrics.jsonl."""
from __future__ import annotations

import json
from pathlib import Path


def plot_metrics(metrics_path: Path, out_path: Path) -> Path:
    """Training loss (smoothed) and every eval set's loss against tokens seen."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_x, train_y, evals = [], [], {}
    tokens_at: dict[int, int] = {}
    for line in metrics_path.read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            train_x.append(rec["tokens"])
            train_y.append(rec["loss"])
            tokens_at[rec["step"]] = rec["tokens"]
        for name, value in rec.get("eval", {}).items():
            evals.setdefault(name, []).append((tokens_at.get(rec["step"], rec["step"]), value))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    window = max(1, len(train_y) // 50)
    smooth = [sum(train_y[max(0, i - window + 1):i + 1]) / len(train_y[max(0, i - window + 1):i + 1])
              for i in range(len(train_y))]
    axes[0].plot(train_x, smooth)
    axes[0].set(title="training loss (smoothed)", xlabel="tokens", ylabel="loss")
    for name, points in sorted(evals.items()):
        axes[1].plot([p[0] for p in points], [p[1] for p in points], marker=".", label=name)
    axes[1].set(title="held-out loss (soup at each set's h)", xlabel="tokens", ylabel="loss")
    if evals:
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    tmp = out_path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out_path)
    return out_path
