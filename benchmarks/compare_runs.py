"""Compare training runs' held-out evaluations with a baseline run's, step by step.

    python benchmarks/compare_runs.py W/runs/soup-a/metrics.jsonl W/runs/soup-b/metrics.jsonl \
        --baseline benchmarks/results/demo-generic-metrics.jsonl

For every evaluation step a run shares with the baseline it prints, per eval set, the relative
gain (baseline − run) / baseline in %, positive when the run is better; the mean over the
specialist sets and how many of them the run wins. For soup runs whose log has them
(`soe-train` writes them since 2026-11-24) it adds "specialisation": the gain of each set's own
α = φ(h_set) over the generic α = φ(h_generic) on that set, same soup and step, and the spread
‖φ(h_set) − φ(h_generic)‖. A run named `crisp-<set>` (a plain model trained on one set's
mixture) is also scored on its own set ("own set"). One JSON line per (run, step), then a
table. This is how the probe tables of benchmarks/results/README.md were made (the probes'
evaluation records are kept in benchmarks/results/probes/).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def evaluations(path: Path) -> dict[int, dict[str, Any]]:
    """step → that step's evaluation record of a `soe-train` metrics.jsonl."""
    out: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if '"eval"' in line:
            record = json.loads(line)
            out[int(record["step"])] = record
    return out


def relative_gain(reference: float, value: float) -> float:
    return 100.0 * (reference - value) / reference


def compare(run: dict[str, Any], baseline: dict[str, Any] | None) -> dict[str, Any]:
    """Gains of one evaluation record against the baseline's record at the same step."""
    row: dict[str, Any] = {}
    if baseline is not None:
        gains = {name: relative_gain(baseline["eval"][name], loss) for name, loss in run["eval"].items()
                 if name in baseline["eval"]}
        specialist = [g for name, g in gains.items() if name != "generic"]
        row.update(gain=gains, generic_gain=gains.get("generic"),
                   specialist_mean=sum(specialist) / len(specialist) if specialist else None,
                   wins=sum(g > 0 for g in specialist), sets=len(specialist))
    if "eval_at_generic_alpha" in run:
        own = {name: relative_gain(loss, run["eval"][name]) for name, loss in run["eval_at_generic_alpha"].items()}
        row.update(specialisation=own, specialisation_mean=sum(own.values()) / len(own) if own else None,
                   alpha_shift=run["alpha_shift"])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="metrics.jsonl files of the runs to compare")
    parser.add_argument("--baseline", type=Path, default=Path("benchmarks/results/demo-generic-metrics.jsonl"))
    parser.add_argument("--plot", type=Path, help="also write a PNG of each run's gains against the step")
    parser.add_argument("--own-set-plot", type=Path,
                        help="also write a PNG of each crisp-<set> run's gain on its own set against the step")
    args = parser.parse_args()
    reference = evaluations(args.baseline) if args.baseline.exists() else {}
    table = []
    for path in args.runs:
        name = path.parent.name if path.name == "metrics.jsonl" else path.stem
        for step, record in sorted(evaluations(path).items()):
            row = {"run": name, "step": step, **compare(record, reference.get(step))}
            own = own_set(name, row.get("gain", {}))
            if own is not None:
                row.update(own_set=own, own_set_gain=row["gain"][own])
            print(json.dumps(row), flush=True)
            table.append(row)

    fmt = lambda x: "" if x is None else f"{x:+.2f} %"  # noqa: E731
    print(f"\n{'run':<24}{'step':>6}{'generic_eval':>14}{'specialist mean':>17}{'wins':>7}{'specialisation':>16}"
          f"{'max ‖Δα‖':>10}")
    for row in table:
        wins = f"{row['wins']}/{row['sets']}" if "wins" in row else ""
        shift = f"{max(row['alpha_shift'].values()):.3f}" if row.get("alpha_shift") else ""
        print(f"{row['run']:<24}{row['step']:>6}{fmt(row.get('generic_gain')):>14}{fmt(row.get('specialist_mean')):>17}"
              f"{wins:>7}{fmt(row.get('specialisation_mean')):>16}{shift:>10}")
    for row in table:
        if "own_set" in row:
            print(f"{row['run']:<24}{row['step']:>6}  own set {row['own_set']}: {fmt(row['own_set_gain'])}")
    print(f"gains relative to {args.baseline} at the same step; positive = better than the baseline")
    if args.plot:
        plot_gains(table, args.baseline, args.plot)
    if args.own_set_plot:
        plot_own_sets(table, args.baseline, args.own_set_plot)


def own_set(run: str, gains: dict[str, float]) -> str | None:
    """The eval set a `crisp-<set>` run was trained for (`<set>` may be the start of its name), else None."""
    if not run.startswith("crisp-"):
        return None
    prefix = run.removeprefix("crisp-")
    matches = [name for name in gains if name != "generic" and name.startswith(prefix)]
    return matches[0] if len(matches) == 1 else None


def plot_gains(table: list[dict[str, Any]], baseline: Path, out: Path) -> None:
    """Generic-eval and specialist-mean gain against the step, one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, run in enumerate(dict.fromkeys(row["run"] for row in table)):
        rows = [row for row in table if row["run"] == run and "specialist_mean" in row]
        steps = [row["step"] for row in rows]
        ax.plot(steps, [row["specialist_mean"] for row in rows], "-o", color=f"C{i}", label=f"{run}: specialist mean")
        ax.plot(steps, [row["generic_gain"] for row in rows], "--", color=f"C{i}", label=f"{run}: generic_eval")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel(f"gain over {baseline.parent.name if baseline.name == 'metrics.jsonl' else baseline.stem} (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def plot_own_sets(table: list[dict[str, Any]], baseline: Path, out: Path) -> None:
    """Each crisp-<set> run's gain on its own set (solid) and on generic_eval (dashed) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, run in enumerate(dict.fromkeys(row["run"] for row in table if "own_set" in row)):
        rows = [row for row in table if row["run"] == run and "own_set" in row]
        steps = [row["step"] for row in rows]
        ax.plot(steps, [row["own_set_gain"] for row in rows], "-o", color=f"C{i}", label=rows[0]["own_set"])
        ax.plot(steps, [row["generic_gain"] for row in rows], "--", color=f"C{i}", linewidth=0.8)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel(f"gain over {baseline.parent.name if baseline.name == 'metrics.jsonl' else baseline.stem} (%)")
    ax.set_title("CRISP on each set's own mixture: that set (solid), generic_eval (dashed)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
