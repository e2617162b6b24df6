"""The soup's per-step optimizer work on the expert bank: torch's fused AdamW row by row vs the
compiled one-pass kernel (trainer/fused_adamw.py), with and without the next merge folded in,
with float32 or bfloat16 moments (`--expert-moments`).

    python benchmarks/expert_update.py [--experts 16] [--width 1340000] [--reps 15]

Every variant runs right after a parallel torch operation, as in training (torch's OpenMP
workers then spin on the cores for a few milliseconds), and the variants alternate rep by rep.
Reference: a plain read-and-write of p, m and v (three in-place torch multiplies), which
moves the same bytes as the update. Prints one JSON line per variant (median ms), then a table.
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

from trainer import fused_adamw  # noqa: E402
from trainer.optim import ExpertGrad, FlatAdamW  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--width", type=int, default=1_340_000, help="p (the cpu-demo model: 1.34M)")
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    n, q = args.experts, args.width
    gen = torch.Generator().manual_seed(0)
    opt = FlatAdamW({"S": torch.randn(q, generator=gen), "E": torch.randn(n, q, generator=gen) * 0.02},
                    {"S": q - q // 50, "E": q - q // 50})
    grad = ExpertGrad()
    grad.add(torch.randn(n, generator=gen), torch.randn(q, generator=gen))
    alpha_next, out = torch.randn(n, generator=gen), torch.empty(q)
    spin_a, spin_b = torch.randn(2_000_000), torch.empty(2_000_000)
    p, m, v = opt.params["E"], opt.exp_avg["E"], opt.exp_avg_sq["E"]

    def torch_rows() -> None:
        previous = fused_adamw.set_enabled(False)
        try:
            opt.step({"S": torch.zeros(q), "E": grad}, 1e-3)
        finally:
            fused_adamw.set_enabled(previous)

    def torch_rows_and_merge() -> None:
        torch_rows()
        torch.addmv(opt.params["S"], p.T, alpha_next, out=out)

    def kernel() -> None:
        opt.step({"S": torch.zeros(q), "E": grad}, 1e-3)

    def kernel_and_merge() -> None:
        opt.step({"S": torch.zeros(q), "E": grad}, 1e-3, lambda: (opt.params["S"], alpha_next, out))

    bf16 = FlatAdamW({"E": p}, {"E": q - q // 50}, moment_dtype={"E": torch.bfloat16})

    def kernel_bf16_and_merge() -> None:
        bf16.step({"E": grad}, 1e-3, lambda: (opt.params["S"], alpha_next, out))

    def stream() -> None:
        p.mul_(1.0)
        m.mul_(1.0)
        v.mul_(1.0)

    variants = {"torch rows": torch_rows, "torch rows + merge": torch_rows_and_merge, "read+write p, m, v": stream}
    if fused_adamw.available():
        variants.update({"kernel": kernel, "kernel + merge": kernel_and_merge,
                         "kernel bf16 m,v + merge": kernel_bf16_and_merge})
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.reps + 1):
        for name, fn in variants.items():
            torch.mul(spin_a, 2.0, out=spin_b)  # a parallel torch op right before, as in a training step
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    medians = {name: 1000 * statistics.median(ts[1:]) for name, ts in times.items()}
    state_mb = 3 * n * q * 4 / 1e6
    for name, ms in medians.items():
        print(json.dumps({"variant": name, "median_ms": ms, "experts": n, "width": q,
                          "threads": torch.get_num_threads(), "state_mb": state_mb}))
    print(f"\n{'variant':<26}{'median ms':>10}")
    for name, ms in medians.items():
        print(f"{name:<26}{ms:>10.2f}")


if __name__ == "__main__":
    main()
