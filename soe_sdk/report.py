"""What a user reads and looks at after `soe-export`: a summary, report.json, a bar chart of h."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .specialist import Specialist


def report_dict(spec: Specialist, *, export: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything measured during specialisation, JSON-ready."""
    out = spec.card()
    out["timings_s"] = {k: round(v, 3) for k, v in spec.timings.items()}
    out["fits"] = {name: {"val_before": fit.val_before, "val_after": fit.val_after, "steps": fit.steps,
                          "seconds": round(fit.seconds, 2), "stopped": fit.stopped, "history": fit.history,
                          **({"lr": fit.lr, "tried": {str(k): v for k, v in fit.tried.items()}} if fit.tried else {})}
                   for name, fit in spec.fits.items()}
    if export:
        out["export"] = export
    return out


def summary_text(spec: Specialist) -> str:
    """A few lines: documents, top domains, α, held-out losses, stage timings."""
    docs = spec.documents
    alpha = ", ".join(f"{x:+.2f}" for x in spec.alpha.tolist()[:8]) + (" …" if spec.alpha.numel() > 8 else "")
    if spec.alpha.numel() == 0:
        domains = "not estimated: a plain model (n = 0) does not depend on h"
    else:
        domains = (", ".join(f"#{i} {w:.0%}" for i, w in spec.top_domains)
                   + f" (h from {docs.get('embedded_chunks', docs['train_chunks'])} of {docs['train_chunks']} training chunks)")
    lines = [f"documents  {docs['summary']}",
             f"domains    {domains}",
             f"alpha      [{alpha}]" if spec.alpha.numel() else "alpha      (plain model: no experts)"]
    for name, fit in spec.fits.items():
        rate = f", lr {fit.lr:g} of {len(fit.tried)} tried" if len(fit.tried) > 1 else ""
        lines.append(f"{name:<10} held-out loss {fit.val_before:.3f} → {fit.val_after:.3f} "
                     f"({fit.steps} steps, {fit.seconds:.1f}s, {fit.stopped}{rate})")
    losses = spec.losses
    if losses.get("candidates"):
        lines.append("candidates " + ", ".join(f"{name} {loss:.3f}" for name, loss in losses["candidates"].items())
                     + f" → kept {spec.soup_name}")
    gain = 1 - losses["heldout_specialist"] / losses["heldout_generic_soup"]
    lines.append(f"held-out   specialist {losses['heldout_specialist']:.3f} vs generic soup φ(h_generic) "
                 f"{losses['heldout_generic_soup']:.3f} nats/token ({gain:+.1%}) on {docs['heldout_chunks']} held-out chunks")
    lines.append("timings    " + ", ".join(f"{k} {v:.2f}s" for k, v in spec.timings.items()))
    return "\n".join(lines)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (temp file + rename)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2)
    os.replace(tmp, path)


def plot_domain_weights(h: np.ndarray, path: Path, top: int = 20) -> Path:
    """Bar chart of the heaviest domain weights (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort(-h, kind="stable")[:top]
    order = order[h[order] > 0]
    fig, ax = plt.subplots(figsize=(max(4, 0.45 * len(order) + 2), 3.2))
    ax.bar([f"#{i}" for i in order], h[order], color="#3b7dd8")
    ax.set(title=f"domain weights h (top {len(order)} of {len(h)})", ylabel="weight", xlabel="domain")
    ax.tick_params(axis="x", labelrotation=60, labelsize=8)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
