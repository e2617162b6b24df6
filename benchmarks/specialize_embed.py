"""Embedding for specialisation: the SDK's Embedder (archive spec, e.g. max_chars=128) vs plain
sentence-transformers fp32 on the same 1000-character chunks.

    python benchmarks/specialize_embed.py [--soup demo-soup.soe] [--n 300] [--reps 3]

What is compared, on the same chunks (the SDK's own 1000-character chunking of the
specialist corpora, mixed round-robin across sets):

- plain_fp32_full   SentenceTransformer fp32 on the whole chunk (max_seq_length 256 tokens):
                    what embedding the documents without the archive's spec would cost;
- sdk_embedder      `Embedder.from_spec(archive spec)`, exactly what `specialize()` runs: it
                    embeds the first `max_chars` characters, at the precision the spec and
                    this CPU give (bf16 autocast only on CPUs with native bf16, else fp32);
- plain_fp32_heads  SentenceTransformer fp32 on those same first `max_chars` characters.

The speed-up of sdk_embedder over plain_fp32_full comes mostly from embedding shorter
texts, which is also how the archive's centroids were computed. Agreement is measured on
the archive's centroids (or, without an archive, k-means centroids of the plain heads):
the fraction of chunks with the same nearest centroid as plain_fp32_heads (the same inputs:
only arithmetic differs) and as plain_fp32_full (what truncation changes), plus the
total-variation distance between the domain histograms h each one gives.
Prints one JSON line per measurement, a table and a final JSON summary line.
"""
from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from soe_sdk.config import EmbedderSpec  # noqa: E402
from soe_sdk.documents import chunk_text  # noqa: E402
from soe_sdk.domains import domain_histogram, kmeans, nearest_centroids  # noqa: E402
from soe_sdk.embedding import Embedder, cpu_has_native_bf16, resolve_model_path  # noqa: E402
from soe_sdk.specialist import default_soup_path  # noqa: E402

CORPUS_GLOB = "/work/shared/corpus/specialist/*/train.jsonl.gz"
DEMO_SPEC = EmbedderSpec(max_chars=128)  # what the demo soup's centroids were computed with


def corpus_chunks(count: int, per_set_docs: int = 60) -> list[str]:
    """≤ 1000-character chunks (the SDK's chunker) of the specialist corpora, round-robin over sets."""
    per_set = []
    for path in sorted(glob.glob(CORPUS_GLOB)):
        chunks: list[str] = []
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            for i, line in enumerate(handle):
                if i >= per_set_docs or len(chunks) >= count:
                    break
                chunks += chunk_text(json.loads(line)["text"], 1000)
        per_set.append(chunks)
    mixed = [c for group in zip(*per_set) for c in group]
    return mixed[:count]


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return np.asarray(out, dtype=np.float32), time.perf_counter() - start


def agreement(a: np.ndarray, b: np.ndarray, centroids: np.ndarray) -> dict:
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    same = nearest_centroids(a, centroids) == nearest_centroids(b, centroids)
    tv = 0.5 * np.abs(domain_histogram(a, centroids) - domain_histogram(b, centroids)).sum()
    return {"same_centroid_fraction": float(same.mean()), "histogram_tv_distance": float(tv),
            "mean_cosine": float(cos.mean()), "min_cosine": float(cos.min())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--soup", type=Path, default=default_soup_path(),
                        help="archive whose spec and centroids are used")
    parser.add_argument("--n", type=int, default=300, help="chunks per timed run")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    if args.soup.exists():
        import soe_sdk
        soup = soe_sdk.load(args.soup)
        spec, centroids, centroid_source = soup.embedder, soup.centroids, f"archive {args.soup.name} (k={soup.k})"
    else:
        spec, centroids, centroid_source = DEMO_SPEC, None, None
    texts = corpus_chunks(args.n)
    if not texts:
        print(json.dumps({"skipped": "the specialist corpus is absent"}))
        return
    heads = [t[:spec.max_chars] for t in texts] if spec.max_chars else texts

    from sentence_transformers import SentenceTransformer

    plain = SentenceTransformer(resolve_model_path(spec.name), device="cpu")
    plain.max_seq_length = spec.max_seq_length
    sdk = Embedder.from_spec(spec, device="cpu")
    emit({"setup": True, "spec": spec.to_dict(), "sdk_precision": sdk.precision, "chunks": len(texts),
          "mean_chars": statistics.mean(map(len, texts)), "torch_threads": torch.get_num_threads(),
          "cpu_native_bf16": cpu_has_native_bf16(), "load_average_1m": os.getloadavg()[0],
          "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
    plain.encode(texts[:8], batch_size=args.batch_size)
    sdk.encode(texts[:8], batch_size=args.batch_size)

    methods = {
        "plain_fp32_full": lambda: plain.encode(texts, batch_size=args.batch_size, normalize_embeddings=spec.normalize),
        "sdk_embedder": lambda: sdk.encode(texts, batch_size=args.batch_size),
        "plain_fp32_heads": lambda: plain.encode(heads, batch_size=args.batch_size,
                                                 normalize_embeddings=spec.normalize),
    }
    seconds: dict[str, list[float]] = {m: [] for m in methods}
    vectors: dict[str, np.ndarray] = {}
    for rep in range(args.reps):  # interleaved, so load from other processes hits every method alike
        for name, fn in methods.items():
            out, elapsed = timed(fn)
            vectors.setdefault(name, out)
            seconds[name].append(elapsed)
            emit({"measure": "throughput", "method": name, "rep": rep, "seconds": round(elapsed, 3),
                  "chunks_per_s": round(len(texts) / elapsed, 2), "load_average_1m": os.getloadavg()[0]})

    if centroids is None:
        centroids = kmeans(vectors["plain_fp32_heads"], min(64, len(texts) // 4), seed=0)
        centroid_source = f"k-means of the plain fp32 heads (k={len(centroids)}; no archive)"
    same_inputs = agreement(vectors["plain_fp32_heads"], vectors["sdk_embedder"], centroids)
    vs_full = agreement(vectors["plain_fp32_full"], vectors["sdk_embedder"], centroids)
    emit({"measure": "agreement", "reference": "plain_fp32_heads", "centroids": centroid_source, **same_inputs})
    emit({"measure": "agreement", "reference": "plain_fp32_full", "centroids": centroid_source, **vs_full})

    base = statistics.median(seconds["plain_fp32_full"])
    print(f"\n{'method':<20}{'chars':>7}{'chunks/s':>10}{'speed-up':>10}")
    for name, runs in seconds.items():
        chars = spec.max_chars if name != "plain_fp32_full" and spec.max_chars else 1000
        print(f"{name:<20}{'≤' + str(chars):>7}{len(texts) / statistics.median(runs):>10.1f}"
              f"{base / statistics.median(runs):>9.2f}x")
    print(f"sdk_embedder runs at {sdk.precision}; centroids: {centroid_source}")
    for label, agree in (("vs plain fp32 on the same heads", same_inputs), ("vs plain fp32 on whole chunks", vs_full)):
        print(f"sdk_embedder {label:<33} same centroid {agree['same_centroid_fraction']:.4f}, "
              f"TV(h) {agree['histogram_tv_distance']:.4f}, mean cosine {agree['mean_cosine']:.5f}")
    print()
    emit({"summary": True, "sdk_chunks_per_s": len(texts) / statistics.median(seconds["sdk_embedder"]),
          "plain_full_chunks_per_s": len(texts) / base,
          "speedup_vs_plain_full": base / statistics.median(seconds["sdk_embedder"]),
          "same_centroid_vs_plain_heads": same_inputs["same_centroid_fraction"],
          "same_centroid_vs_plain_full": vs_full["same_centroid_fraction"], "sdk_precision": sdk.precision})


if __name__ == "__main__":
    main()
