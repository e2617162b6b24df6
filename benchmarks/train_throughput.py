"""Training throughput: a soup (n experts, h ~ π per micro-batch) vs the plain n = 0 model.

    python benchmarks/train_throughput.py [--preset cpu-demo] [--steps 60] [--slice 1.5]

Both models use the same architecture, batch, sequence length and the real training loop
(`trainer.loop.train`: sampling, merge, forward/backward, closed-form expert gradients,
clipping, AdamW) on a synthetic workdir of random tokens in 64 domains.

The two trainings run as two live processes that take turns: every `--slice` seconds one is
stopped (SIGSTOP) and the other resumed, so both see the same machine at almost the same time
(this VM's speed drifts by ±20 % within a minute, far more than the difference measured). Each
step's wall time and end time come from the run's metrics.jsonl; a step during which a switch
happened is dropped, and so are the first `--warmup` steps of each process. The medians of the
remaining `--steps` steps per model are compared. Prints one JSON line per model, a table, and
as the last line a JSON object with soup_tokens_per_s, plain_tokens_per_s and ratio (target ≥ 0.9).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from trainer.presets import get_preset  # noqa: E402
from trainer.shards import DOMAINS_DIR, INDEX_FILE, token_dtype  # noqa: E402

DOMAINS = 64
KINDS = ("soup", "plain")


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
    # random domain centroids, for presets whose router or π is built from them
    np.save(root / "centroids.npy", rng.standard_normal((DOMAINS, 384)).astype(np.float32))
    return root


def step_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            break
        if "step_time" in record:
            records.append(record)
    return records


def clean_step_times(records: list[dict], switches: list[float], warmup: int) -> list[float]:
    """Step times of the steps after `warmup` that no switch (stop or resume) fell into."""
    out = []
    for record in records[warmup:]:
        end, start = record["time"], record["time"] - record["step_time"]
        if not any(start <= t <= end for t in switches):
            out.append(record["step_time"])
    return out


def preset_for(args: argparse.Namespace):
    """The preset with this run's overrides (the same in the parent and in both workers)."""
    preset = get_preset(args.preset)
    if args.grad_accum:
        preset = preset.replace(grad_accum=args.grad_accum)
    if args.expert_moments:
        preset = preset.replace(expert_moments=args.expert_moments)
    if args.router_frozen:
        preset = preset.replace(router_freeze_at=0.0)
    return preset


def run_worker(kind: str, workdir: Path, preset, experts: int) -> None:
    """One training that runs until it is killed (the parent stops and resumes it)."""
    from trainer.loop import RunSpec, train

    preset = preset.replace(eval_every=10**9)
    if kind == "soup":
        spec = RunSpec("soup", None, experts)
    else:
        counts = np.asarray(json.loads((workdir / DOMAINS_DIR / INDEX_FILE).read_text())["counts"])
        spec = RunSpec("plain", tuple((counts / counts.sum()).tolist()), 0)
    train(workdir, preset, spec=spec, max_steps=10**6, checkpoint_every=10**9, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu-demo")
    parser.add_argument("--experts", type=int, help="n for the soup (default: the preset's)")
    parser.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step, for exploring recipes "
                        "(default: the preset's, which is what the target is about)")
    parser.add_argument("--expert-moments", choices=["float32", "bfloat16"],
                        help="storage dtype of the soup's expert Adam moments (default: the preset's)")
    parser.add_argument("--router-frozen", action="store_true",
                        help="measure steps with φ frozen (cpu-demo's last 45 %% of steps) instead of learning")
    parser.add_argument("--steps", type=int, default=60, help="measured steps per model")
    parser.add_argument("--warmup", type=int, default=3, help="first steps of each training left out")
    parser.add_argument("--slice", type=float, default=1.5, help="seconds each training runs before the other's turn")
    parser.add_argument("--timeout", type=float, default=900, help="give up after this many seconds")
    parser.add_argument("--tokens-per-domain", type=int, default=40_000)
    parser.add_argument("--tmp", default=tempfile.gettempdir())
    parser.add_argument("--worker", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    preset = preset_for(args)
    experts = preset.experts if args.experts is None else args.experts
    if args.worker:
        run_worker(args.worker, Path(args.workdir), preset, experts)
        return

    tokens_per_step = preset.batch_size * preset.grad_accum * preset.model.max_seq_len
    print(json.dumps({"setup": True, "preset": preset.name, "model": preset.model.to_dict(), "experts": experts,
                      "expert_moments": preset.expert_moments, "router_frozen": args.router_frozen,
                      "tokens_per_step": tokens_per_step, "torch_threads": torch.get_num_threads(),
                      "slice_s": args.slice, "load_average_1m": os.getloadavg()[0],
                      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}), flush=True)
    root = Path(tempfile.mkdtemp(prefix="soe-train-bench-", dir=args.tmp))
    workers: dict[str, subprocess.Popen] = {}
    switches: list[float] = []
    times: dict[str, list[float]] = {}
    try:
        workdir = synthetic_workdir(root, preset.model.vocab_size, args.tokens_per_domain)
        for kind in KINDS:
            extra = (["--grad-accum", str(args.grad_accum)] if args.grad_accum else []) + \
                (["--expert-moments", args.expert_moments] if args.expert_moments else []) + \
                (["--router-frozen"] if args.router_frozen else [])
            workers[kind] = subprocess.Popen([sys.executable, __file__, "--preset", args.preset, "--experts",
                                              str(experts), "--worker", kind, "--workdir", str(workdir), *extra])
            if kind != KINDS[0]:
                os.kill(workers[kind].pid, signal.SIGSTOP)
        running, deadline = 0, time.time() + args.timeout
        while True:
            time.sleep(args.slice)
            for kind, proc in workers.items():
                if proc.poll() is not None:
                    raise SystemExit(f"train_throughput: the {kind} training exited with code {proc.returncode}")
            os.kill(workers[KINDS[running]].pid, signal.SIGSTOP)
            switches.append(time.time())
            running ^= 1
            os.kill(workers[KINDS[running]].pid, signal.SIGCONT)
            switches.append(time.time())
            times = {kind: clean_step_times(step_records(workdir / "runs" / kind), switches, args.warmup)
                     for kind in KINDS}
            if min(len(t) for t in times.values()) >= args.steps:
                break
            if time.time() > deadline:
                raise SystemExit(f"train_throughput: fewer than {args.steps} clean steps after {args.timeout:.0f} s")
    finally:
        for proc in workers.values():
            proc.kill()
            proc.wait()
        shutil.rmtree(root, ignore_errors=True)

    medians = {kind: statistics.median(t[:args.steps]) for kind, t in times.items()}
    rates = {kind: tokens_per_step / m for kind, m in medians.items()}
    for kind in KINDS:
        measured = times[kind][:args.steps]
        print(json.dumps({"model": kind, "experts": experts if kind == "soup" else 0, "steps": len(measured),
                          "median_step_s": medians[kind], "p25_step_s": float(np.percentile(measured, 25)),
                          "p75_step_s": float(np.percentile(measured, 75)), "tokens_per_s": rates[kind]}), flush=True)
    print(f"\n{'model':<22}{'steps':>7}{'median s/step':>15}{'tokens/s':>10}")
    for kind in KINDS:
        label = f"soup n={experts}" if kind == "soup" else "plain n=0"
        print(f"{label:<22}{len(times[kind][:args.steps]):>7}{medians[kind]:>15.4f}{rates[kind]:>10.0f}")
    ratio = rates["soup"] / rates["plain"]
    print(f"ratio soup / plain: {ratio:.3f} (target ≥ 0.9: {'met' if ratio >= 0.9 else 'NOT met'}); "
          f"{len(switches) // 2} turns of {args.slice} s\n")
    print(json.dumps({"soup_tokens_per_s": rates["soup"], "plain_tokens_per_s": rates["plain"], "ratio": ratio,
                      "experts": experts, "preset": preset.name, "grad_accum": preset.grad_accum,
                      "expert_moments": preset.expert_moments, "router_frozen": args.router_frozen}))


if __name__ == "__main__":
    main()
