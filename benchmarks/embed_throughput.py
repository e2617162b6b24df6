"""Embedding throughput: plain sentence-transformers fp32 vs the SDK's Embedder fast path.

Also checks that the fast path keeps Algorithm 3 intact: the fraction of chunks whose
nearest centroid (k-means on fp32 embeddings of a larger sample) is unchanged, and the
cosine between the two embeddings of each chunk.

    python benchmarks/embed_throughput.py [--n 300] [--reps 3] [--k 64]

Prints one JSON line per measurement, a table, and a final JSON summary line.
"""
from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from soe_sdk.config import EmbedderSpec  # noqa: E402
from soe_sdk.domains import kmeans, nearest_centroids  # noqa: E402
from soe_sdk.embedding import Embedder, cpu_has_native_bf16, resolve_model_path  # noqa: E402

CORPUS_GLOB = "/work/shared/corpus/specialist/*/train.jsonl.gz"
WORDS = ("river mill harvest query index table function return packet router galaxy telescope "
         "sauce butter verse chapter commit branch merge kernel thread lock option manual page").split()


def corpus_chunks(count: int, seed: int, chunk_chars: int) -> tuple[list[str], str]:
    """`count` texts mixed across the specialist corpora (or generated text when they are absent)."""
    per_file = []
    for path in sorted(glob.glob(CORPUS_GLOB)):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for line in f if line.strip()]
        if chunk_chars > 0:
            texts = [t[i:i + chunk_chars] for t in texts for i in range(0, len(t), chunk_chars)]
        random.Random(seed).shuffle(texts)
        per_file.append(texts)
    if per_file:
        mixed = [t for group in zip(*per_file) for t in group]  # round-robin keeps the domains balanced
        mixed += [t for texts in per_file for t in texts[min(map(len, per_file)):]]
        return mixed[:count], f"corpus ({len(per_file)} specialist sets)"
    rng = random.Random(seed)
    generated = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 400))) for _ in range(count)]
    return generated, "generated"


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def agreement(reference: np.ndarray, other: np.ndarray, centroids: np.ndarray) -> dict:
    cos = (reference * other).sum(1) / (np.linalg.norm(reference, axis=1) * np.linalg.norm(other, axis=1))
    same = nearest_centroids(reference, centroids) == nearest_centroids(other, centroids)
    return {"same_centroid_fraction": float(same.mean()), "mean_cosine": float(cos.mean()),
            "min_cosine": float(cos.min())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="chunks timed per run")
    parser.add_argument("--reps", type=int, default=3, help="timed runs per method (median reported)")
    parser.add_argument("--k", type=int, default=64, help="k-means centroids for the agreement check")
    parser.add_argument("--centroid-sample", type=int, default=1000, help="chunks the centroids are fit on")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--chunk-chars", type=int, default=0, help="cut corpus texts into pieces this long (0: whole)")
    parser.add_argument("--bf16-subset", type=int, default=24,
                        help="also time forced bf16 autocast on this many chunks (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    spec = EmbedderSpec()
    texts, source = corpus_chunks(max(args.n, args.centroid_sample), args.seed, args.chunk_chars)
    bench = texts[:args.n]
    emit({"measure": "setup", "source": source, "chunks": len(bench), "mean_chars": statistics.mean(map(len, bench)),
          "torch_threads": torch.get_num_threads(), "cpu_native_bf16": cpu_has_native_bf16(),
          "load_average_1m": os.getloadavg()[0]})

    from sentence_transformers import SentenceTransformer

    plain = SentenceTransformer(resolve_model_path(spec.name), device="cpu")
    plain.max_seq_length = spec.max_seq_length
    fast = Embedder.from_spec(spec, device="cpu")
    plain.encode(bench[:8])
    fast.encode(bench[:8])

    # Interleaved runs, so load from other processes on the machine hits both methods alike.
    seconds: dict[str, list[float]] = {"plain_fp32": [], f"embedder_{fast.precision}": []}
    outputs: dict[str, np.ndarray] = {}
    for rep in range(args.reps):
        for method in seconds:
            if method == "plain_fp32":
                vectors, elapsed = timed(plain.encode, bench)
            else:
                vectors, elapsed = timed(fast.encode, bench, batch_size=args.batch_size)
            outputs.setdefault(method, np.asarray(vectors, dtype=np.float32))
            seconds[method].append(elapsed)
            emit({"measure": "throughput", "method": method, "rep": rep, "chunks": len(bench),
                  "seconds": round(elapsed, 3), "chunks_per_s": round(len(bench) / elapsed, 2),
                  "load_average_1m": os.getloadavg()[0]})

    extra = texts[args.n:args.centroid_sample]
    sample = np.concatenate([outputs["plain_fp32"]] + ([plain.encode(extra)] if extra else []))
    centroids = kmeans(sample, min(args.k, len(sample)), seed=args.seed)
    fast_name = f"embedder_{fast.precision}"
    agree = agreement(outputs["plain_fp32"], outputs[fast_name], centroids)
    emit({"measure": "agreement", "method": fast_name, "k": len(centroids), "centroid_sample": len(sample), **agree})

    rows = []
    base = statistics.median(seconds["plain_fp32"])
    for method, runs in seconds.items():
        median = statistics.median(runs)
        rows.append((method, len(bench), len(bench) / median, base / median))

    if args.bf16_subset > 0 and fast.precision != "bf16":
        subset = bench[:args.bf16_subset]
        forced = Embedder.from_spec(spec, device="cpu", precision="bf16")
        forced.encode(subset[:2])
        _, t_plain = timed(plain.encode, subset)
        vectors, t_bf16 = timed(forced.encode, subset, batch_size=args.batch_size)
        sub_agree = agreement(outputs["plain_fp32"][:len(subset)], vectors, centroids)
        emit({"measure": "forced_bf16", "chunks": len(subset), "plain_chunks_per_s": round(len(subset) / t_plain, 2),
              "bf16_chunks_per_s": round(len(subset) / t_bf16, 2), "speedup": round(t_plain / t_bf16, 3), **sub_agree})
        rows.append(("embedder_bf16_forced", len(subset), len(subset) / t_bf16, t_plain / t_bf16))

    print(f"\n{'method':<24}{'chunks':>8}{'chunks/s':>11}{'speedup':>9}")
    for method, count, rate, speedup in rows:
        print(f"{method:<24}{count:>8}{rate:>11.2f}{speedup:>8.2f}x")
    print(f"same nearest centroid (k={len(centroids)}): {agree['same_centroid_fraction']:.4f}   "
          f"mean cosine: {agree['mean_cosine']:.6f}   min cosine: {agree['min_cosine']:.6f}\n")
    emit({"summary": True, "fast_method": fast_name, "speedup": round(base / statistics.median(seconds[fast_name]), 3),
          "same_centroid_fraction": agree["same_centroid_fraction"], "mean_cosine": agree["mean_cosine"],
          "plain_chunks_per_s": round(len(bench) / base, 2), "cpu_native_bf16": cpu_has_native_bf16()})


if __name__ == "__main__":
    main()
