"""Memory and communication of soup training vs n: measured per rank, next to docs/scaling.md's formulas.

For each sharding (ddp, bank) and each n, runs a few optimizer steps under
`torchrun --nproc_per_node=N` on a small generated workdir and records, per rank:
- peak RSS while training (Linux VmHWM, reset once the soup is built, read before the first
  checkpoint) minus the RSS just before the soup was built; also the peak while building it
  and while writing the checkpoint;
- bytes handed to each collective per optimizer step (trainer.distributed.TRAFFIC);
- the median step time.
Predictions (float32, p parameters per model, q of them with dense experts, R router (+ low-rank
factor) parameters, N ranks, M micro-batches per optimizer step):
  ddp   memory 12·((n+1)·p + R) + 4·(p + R) + 4·M·q + 8·p
        traffic all-reduce 4·(p + R), all-gather 4·M·(q + n) per step
  bank  memory 12·(n+1)·p/N + 16·R + 4·(M+1)·p/N + 8·p
        traffic per micro-batch all-gather 4·p + reduce-scatter 4·p + all-reduce 4·n
(12 bytes per trainable number: value and two AdamW moments; 4·(p + R) the dense gradients;
the expert gradient is kept as M pairs (α, ∇Θ) — 4·M·q, or 4·M·p/N for a bank slice; 8·p is
the merged Θ and its gradient ∇Θ, full size on every rank).

    python benchmarks/scaling.py [--experts 2 8 32] [--nproc 2] [--steps 4] [--rank 8]

Prints one JSON line per (sharding, n, rank) and a table of measured vs predicted.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODEL = dict(vocab_size=512, max_seq_len=64, d_model=128, n_layers=4, n_heads=4, d_mlp=512)
BATCH = 8  # sequences per micro-batch; two micro-batches per step in both shardings


def _status(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS: current, VmHWM: peak since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux ≥ 4.0: VmHWM := VmRSS


def synthetic_workdir(root: Path) -> Path:
    """Tokenizer and 4 domain shards of generated text (each domain its own vocabulary)."""
    import random

    from trainer.shards import write_domain_shards
    from trainer.tokenizer import train_tokenizer

    words = [("river mill harvest village evening letter weather".split()),
             ("def return class import lambda yield value index".split()),
             ("fichier commande option valeur page manuel liste".split()),
             ("select insert update where order group join table".split())]
    rng = random.Random(0)
    texts, labels = [], []
    for label, vocab in enumerate(words):
        for _ in range(60):
            texts.append(" ".join(rng.choice(vocab) for _ in range(300)))
            labels.append(label)
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(texts, MODEL["vocab_size"])
    (root / "tokenizer.json").write_text(tokenizer.to_str())
    write_domain_shards(tokenizer, texts, labels, 4, root, progress=False)
    return root


def probe(args: argparse.Namespace) -> None:
    """One rank of one torchrun job: train `args.steps` steps, write this rank's figures."""
    import torch

    torch.set_num_threads(1)
    from soe_sdk.config import ModelConfig
    from trainer import distributed as dd
    from trainer import loop
    from trainer.presets import get_preset

    marks: dict[str, float] = {}
    base_state = loop.SoupState

    class ProbedState(base_state):
        @classmethod
        def fresh(cls, *a, **kw):
            marks["before_init"] = _status("VmRSS")
            _reset_peak()
            state = base_state.fresh(*a, **kw)
            marks["init_peak"] = _status("VmHWM")
            _reset_peak()
            dd.TRAFFIC.reset()
            return state

    save = loop._save

    def probed_save(*a, **kw):
        if "train_peak" not in marks:
            marks["train_peak"] = _status("VmHWM")
            marks.update({f"traffic_{k}": v for k, v in vars(dd.TRAFFIC).items()})
            _reset_peak()
        save(*a, **kw)
        marks["save_peak"] = _status("VmHWM")

    loop.SoupState, loop._save = ProbedState, probed_save
    accum = 1 if args.sharding == "ddp" else args.nproc  # same global batch: nproc micro-batches of BATCH rows
    preset = get_preset("tiny").replace(model=ModelConfig(**MODEL), experts=args.experts, expert_rank=args.rank,
                                        batch_size=BATCH, grad_accum=accum, eval_every=10**9,
                                        checkpoint_every=10**9, warmup_steps=1)
    run = f"{args.sharding}-n{args.experts}-r{args.rank}"
    run_dir = loop.train(args.workdir, preset, spec=loop.RunSpec(run), max_steps=10**6, stop_after=args.steps,
                         sharding=args.sharding, progress=False)
    ctx = dd.setup()
    times = [json.loads(line)["step_time"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()[1:]]
    marks["step_time"] = statistics.median(times) if times else float("nan")
    record = {"sharding": args.sharding, "n": args.experts, "rank_r": args.rank, "world": ctx.world,
              "proc": ctx.rank, "steps": args.steps, **marks}
    with open(f"{args.result}.{ctx.rank}", "w") as handle:
        handle.write(json.dumps(record))
    dd.teardown()


def predict(sharding: str, n: int, r: int, world: int) -> dict[str, float]:
    """docs/scaling.md's formulas for this model, in bytes per rank (memory) and per step (traffic)."""
    from soe_sdk.config import ModelConfig, RouterConfig, SoupConfig
    from trainer.distributed import padded_size
    from trainer.layout import SoupLayout
    from trainer.presets import get_preset

    hidden = get_preset("tiny").router_hidden
    layout = SoupLayout.for_soup(SoupConfig(ModelConfig(**MODEL), RouterConfig(k=4, n=n, hidden=hidden), r))
    p = layout.shared.size
    router = 4 * hidden + hidden + hidden * n + n
    q = layout.experts.size
    dense_grads = p + layout.factors.size + router  # gradients held as full tensors
    trainable = p + n * q + layout.factors.size + router
    micro = world  # two micro-batches per step in both shardings (see main)
    if sharding == "ddp":
        memory = 12 * trainable + 4 * dense_grads + 4 * micro * q + 8 * p
        traffic = {"all_reduce": 4 * dense_grads + 16, "all_gather": 4 * micro * (q + n)}
    else:
        pp = padded_size(p, world)
        memory = 12 * (n + 1) * pp / world + 16 * router + 4 * (micro + 1) * pp / world + 8 * p
        traffic = {"all_gather": micro * 4 * pp, "reduce_scatter": micro * 4 * pp, "all_reduce": micro * 4 * n + 8 + 16}
    return {"p": p, "memory": memory, **{f"traffic_{k}": v for k, v in traffic.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rank", type=int, default=0, help="also run ddp with low-rank experts of this rank")
    parser.add_argument("--workdir", type=Path, help="(internal) workdir of a probe")
    parser.add_argument("--sharding", default="ddp", help="(internal)")
    parser.add_argument("--result", help="(internal) probe output prefix")
    parser.add_argument("--probe", action="store_true", help="(internal) run as one torchrun rank")
    args = parser.parse_args()
    if args.probe:
        args.experts = args.experts[0]
        probe(args)
        return

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = synthetic_workdir(Path(tmp) / "work")
        jobs = [("ddp", n, 0) for n in args.experts] + [("bank", n, 0) for n in args.experts]
        if args.rank:
            jobs += [("ddp", n, args.rank) for n in args.experts]
        for sharding, n, r in jobs:
            result = Path(tmp) / f"{sharding}-{n}-{r}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                   __file__, "--probe", "--workdir", str(work), "--experts", str(n), "--rank", str(r),
                   "--sharding", sharding, "--steps", str(args.steps), "--result", str(result)]
            t0 = time.time()
            out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
            if out.returncode != 0:
                sys.exit(f"probe {sharding} n={n} r={r} failed:\n{out.stderr[-3000:]}")
            pred = predict(sharding, n, r, args.nproc)
            for proc in range(args.nproc):
                rec = json.loads(Path(f"{result}.{proc}").read_text())
                rec.update(wall=time.time() - t0, predicted=pred)
                print(json.dumps(rec), flush=True)
                rows.append(rec)

    mb = lambda b: b / 2**20  # noqa: E731
    print(f"\n{'sharding':8} {'n':>3} {'r':>2} {'rank':>4} | {'train MB':>8} {'pred MB':>8} {'diff MB':>7} | "
          f"{'init MB':>7} {'ckpt MB':>7} | {'traffic MB/step':>15} {'pred':>8} | {'step s':>6}")
    for rec in rows:
        pred = rec["predicted"]
        train_mb = mb(rec["train_peak"] - rec["before_init"])
        traffic = sum(rec.get(f"traffic_{k}", 0) for k in ("all_gather", "reduce_scatter", "all_reduce")) / rec["steps"]
        ptraffic = sum(v for k, v in pred.items() if k.startswith("traffic_"))
        print(f"{rec['sharding']:8} {rec['n']:>3} {rec['rank_r']:>2} {rec['proc']:>4} | {train_mb:8.1f} "
              f"{mb(pred['memory']):8.1f} {train_mb - mb(pred['memory']):7.1f} | "
              f"{mb(rec['init_peak'] - rec['before_init']):7.1f} {mb(rec['save_peak'] - rec['before_init']):7.1f} | "
              f"{mb(traffic):15.2f} {mb(ptraffic):8.2f} | {rec['step_time']:6.3f}")


if __name__ == "__main__":
    main()
