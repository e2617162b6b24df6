"""Training throughput: a soup (n experts, h ~ π per micro-batch) vs the plain n = 0 model.

    python benchmarks/train_throughput.py [--preset cpu-demo] [--steps 12] [--rounds 3]

Both runs use the same architecture, batch, sequence length and the real training loop
(`trainer.loop.train`: sampling, merge, forward/backward, closed-form expert gradients,
clipping, AdamW) on a synthetic workdir of random tokens in 64 domains. Runs alternate
soup / plain for `--rounds` rounds so that load from other processes hits both alike; the
per-step wall time comes from each run's metrics.jsonl, the first `--warmup` steps of every
run dropped, and the medians are compared. Prints one JSON line per run, a table, and as
the last line a JSON object with soup_tokens_per_s, plain_tokens_per_s and ratio (target ≥ 0.9).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from trainer.loop import RunSpec, train  # noqa: E402
from trainer.presets import get_preset  # noqa: E402
from trainer.shards import DOMAINS_DIR, INDEX_FILE, token_dtype  # noqa: E402

DOMAINS = 64


def synthetic_workdir(root: Path, vocab_size: int, tokens_per_domain: int, seed: int = 0) -> Path:
    """WORKDIR/domains/ as `soe-train prepare` writes it, filled with uniform random tokens."""
    rng = np.random.default_rng(seed)
    folder = root / DOMAINS_DIR
    folder.mkdir(parents=True)
    dtype = token_dtype(vocab_size)
    counts = []
    for d in range(DOMAINS):
        size = int(tokens_per_domain * rng.uniform(0.5, 1.5))  # unequal domains, like a real corpus
        rng.integers(0, vocab_size, size, dtype=np.int64).astype(dtype).tofile(folder / f"{d:04d}.bin")
        counts.append(size)
    index = {"k": DOMAINS, "dtype": dtype.name, "vocab_size": vocab_size, "counts": counts,
             "docs": [max(1, c // 500) for c in counts]}
    (folder / INDEX_FILE).write_text(json.dumps(index))
    return root


def step_times(run_dir: Path, warmup: int) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step_time"] for r in records if "step_time" in r][warmup:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu-demo")
    parser.add_argument("--experts", type=int, help="n for the soup (default: the preset's)")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="first steps of each run left out")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens-per-domain", type=int, default=40_000)
    parser.add_argument("--tmp", default=tempfile.gettempdir())
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")

    preset = get_preset(args.preset)
    experts = preset.experts if args.experts is None else args.experts
    tokens_per_step = preset.batch_size * preset.grad_accum * preset.model.max_seq_len
    print(json.dumps({"setup": True, "preset": preset.name, "model": preset.model.to_dict(), "experts": experts,
                      "tokens_per_step": tokens_per_step, "torch_threads": torch.get_num_threads(),
                      "load_average_1m": os.getloadavg()[0],
                      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}), flush=True)
    root = Path(tempfile.mkdtemp(prefix="soe-train-bench-", dir=args.tmp))
    times: dict[str, list[float]] = {"soup": [], "plain": []}
    try:
        workdir = synthetic_workdir(root, preset.model.vocab_size, args.tokens_per_domain)
        h_generic = None
        for rnd in range(args.rounds):
            for kind in ("soup", "plain"):
                if kind == "soup":
                    spec = RunSpec(f"soup-{rnd}", None, experts)
                else:
                    if h_generic is None:
                        counts = np.asarray(json.loads((workdir / DOMAINS_DIR / INDEX_FILE).read_text())["counts"])
                        h_generic = tuple((counts / counts.sum()).tolist())
                    spec = RunSpec(f"plain-{rnd}", h_generic, 0)
                start = time.perf_counter()
                run_dir = train(workdir, preset, spec=spec, max_steps=max(1000, args.steps), seed=rnd,
                                checkpoint_every=10**9, progress=False, stop_after=args.steps)
                wall = time.perf_counter() - start
                measured = step_times(run_dir, args.warmup)
                times[kind] += measured
                shutil.rmtree(run_dir)
                median = statistics.median(measured)
                print(json.dumps({"run": spec.name, "experts": spec.experts, "steps": len(measured),
                                  "median_step_s": median, "tokens_per_s": tokens_per_step / median,
                                  "wall_s_incl_setup_and_checkpoint": wall,
                                  "load_average_1m": os.getloadavg()[0]}), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    rates = {kind: tokens_per_step / statistics.median(ts) for kind, ts in times.items()}
    print(f"\n{'model':<22}{'steps':>7}{'median s/step':>15}{'tokens/s':>10}")
    for kind, ts in times.items():
        label = f"soup n={experts}" if kind == "soup" else "plain n=0"
        print(f"{label:<22}{len(ts):>7}{statistics.median(ts):>15.4f}{rates[kind]:>10.0f}")
    ratio = rates["soup"] / rates["plain"]
    print(f"ratio soup / plain: {ratio:.3f} (target ≥ 0.9: {'met' if ratio >= 0.9 else 'NOT met'})\n")
    print(json.dumps({"soup_tokens_per_s": rates["soup"], "plain_tokens_per_s": rates["plain"], "ratio": ratio,
                      "experts": experts, "preset": preset.name}))


if __name__ == "__main__":
    main()
