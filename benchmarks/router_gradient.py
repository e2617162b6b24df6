"""What the router's gradient ∂ℓ/∂α = E g (a product that reads the whole bank, and φ's backward)
costs per soup step: φ learning against φ frozen (cpu-demo's last 45 % of steps), where the trainer
skips both.

    python benchmarks/router_gradient.py [--preset cpu-demo] [--reps 60] [--threads 2]

Two soup states of the preset's shape take one training step each in turn (micro-step and optimizer
step, with the next merge folded in, as in training), alternating which goes first. The machine's
speed drifts more than the difference measured, so besides each variant's median step time the
script prints the median of the paired differences (steps taken back to back).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from soe_sdk.config import RouterConfig, SoupConfig  # noqa: E402
from trainer.presets import get_preset  # noqa: E402
from trainer.state import SoupState  # noqa: E402

VARIANTS = ("learning", "frozen")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu-demo")
    parser.add_argument("--reps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    preset = get_preset(args.preset)
    k = preset.clusters[0] * preset.clusters[1]
    config = SoupConfig(preset.model, RouterConfig(k=k, n=preset.experts, hidden=preset.router_hidden))
    states = {name: SoupState.fresh(config, 0, torch.device("cpu"), expert_lr_scale=preset.expert_lr_scale)
              for name in VARIANTS}
    states["frozen"].set_router_lr_scale(0.0)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, preset.model.vocab_size, (preset.batch_size, preset.model.max_seq_len), generator=gen)
    h = torch.softmax(torch.randn(k, generator=gen), 0)

    def step(state: SoupState) -> float:
        state.zero_grad()
        start = time.perf_counter()
        state.micro_step(h, tokens, 1.0)
        state.optimizer_step(state.grad_dict(), 1e-4, h)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for rep in range(args.reps + 3):
        for name in VARIANTS if rep % 2 else VARIANTS[::-1]:
            times[name].append(step(states[name]))
    times = {name: ts[3:] for name, ts in times.items()}  # the first rounds warm caches and threads
    rows = []
    for name in VARIANTS:
        saved = [a - b for a, b in zip(times["learning"], times[name])]
        rows.append({"variant": name, "median_step_ms": 1000 * statistics.median(times[name]),
                     "saved_vs_learning_ms": 1000 * statistics.median(saved), "reps": args.reps,
                     "threads": args.threads, "preset": preset.name, "experts": preset.experts})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'φ':<10}{'median step ms':>16}{'saved vs learning ms (paired)':>32}")
    for row in rows:
        print(f"{row['variant']:<10}{row['median_step_ms']:>16.1f}{row['saved_vs_learning_ms']:>32.2f}")


if __name__ == "__main__":
    main()
