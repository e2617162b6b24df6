"""`soe-train prepare`: corpus → tokenizer, domains (embeddings + hierarchical k-means), per-domain
token shards, eval sets and specialist domain weights, each stage cached in WORKDIR."""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from soe_sdk.config import EmbedderSpec
from soe_sdk.errors import SoeError

from .corpus import SUPPORTED_SUFFIXES, corpus_files, iter_documents
from .presets import Preset
from .shards import DomainShards, token_dtype, write_domain_shards, write_token_file
from .tokenizer import load_tokenizer, train_tokenizer

STAGES_FILE = "stages.json"
SUMMARY_FILE = "prepare.json"
TOKENIZER_FILE = "tokenizer.json"
EVAL_DIR = "eval"
SEED = 0
TOKENIZER_SAMPLE_CHARS = 32_000_000  # BPE merges stabilise long before this; more only costs time
SOFT_TEMPERATURE = 0.05
TOP_DOMAINS = 5
FINGERPRINT_BYTES = 1 << 20  # hashed at each end of every input file


# ---------------------------------------------------------------- small helpers

def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[prepare] {msg}", file=sys.stderr, flush=True)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _fingerprint(path: str | os.PathLike) -> list[list]:
    """Relative names, sizes and a digest of the head and tail of the files behind `path`.

    Content-based, so a corpus that is copied, moved or re-extracted (new mtimes) still reuses
    finished stages; only the first and last MiB are hashed to keep it cheap on large corpora.
    """
    path = Path(path)
    if not path.exists():
        raise SoeError(f"{path}: no such file or folder")
    out = []
    for f in corpus_files(path) if path.is_dir() else [path]:
        size = f.stat().st_size
        digest = hashlib.sha256()
        with open(f, "rb") as fh:
            digest.update(fh.read(FINGERPRINT_BYTES))
            if size > 2 * FINGERPRINT_BYTES:
                fh.seek(size - FINGERPRINT_BYTES)
            digest.update(fh.read(FINGERPRINT_BYTES))
        out.append([str(f.relative_to(path)) if path.is_dir() else f.name, size, digest.hexdigest()[:16]])
    return out


def _save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, arr)
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _split_file(folder: Path, split: str) -> Path:
    """FOLDER/<split>.<ext> for the first supported extension present."""
    for suffix in SUPPORTED_SUFFIXES:
        candidate = folder / f"{split}{suffix}"
        if candidate.is_file():
            return candidate
    raise SoeError(f"{folder}: no {split} file (expected {split}.jsonl.gz, {split}.jsonl, {split}.parquet or {split}.txt)")


def _top(h: np.ndarray, n: int = TOP_DOMAINS) -> list[list]:
    order = np.argsort(-h, kind="stable")[:n]
    return [[int(i), round(float(h[i]), 4)] for i in order if h[i] > 0]


class _Stages:
    """WORKDIR/stages.json: per stage, the hash of its inputs, its timing and a small info dict."""

    def __init__(self, workdir: Path, progress: bool) -> None:
        self.path = workdir / STAGES_FILE
        self.progress = progress
        self.data: dict[str, dict] = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.timings: dict[str, float | str] = {}

    def run(self, name: str, inputs: Any, outputs: Sequence[Path], fn: Callable[[], dict]) -> tuple[str, dict]:
        """Run `fn` unless the recorded hash of `inputs` matches and every output exists."""
        key = _digest(inputs)
        entry = self.data.get(name)
        if entry and entry.get("hash") == key and all(p.exists() for p in outputs):
            _log(self.progress, f"{name}: up to date, skipped")
            self.timings[name] = "cached"
            return key, entry.get("info", {})
        _log(self.progress, f"{name}: running")
        t0 = time.perf_counter()
        info = fn()
        seconds = round(time.perf_counter() - t0, 2)
        self.data[name] = {"hash": key, "seconds": seconds, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                           "info": info}
        _write_json(self.path, self.data)
        self.timings[name] = seconds
        _log(self.progress, f"{name}: done in {seconds:.1f} s")
        return key, info


# ---------------------------------------------------------------- the pipeline

def prepare(corpus: str | os.PathLike, workdir: str | os.PathLike, preset: Preset, *,
            tokenizer_path: str | os.PathLike | None = None, eval_path: str | os.PathLike | None = None,
            specialist_dirs: Sequence[str | os.PathLike] = (), embed_device: str | None = None,
            max_docs: int | None = None, progress: bool = True) -> dict:
    """Prepare WORKDIR for training on `corpus` with `preset`; returns (and writes) the summary.

    `max_docs` (default: the preset's) caps how many corpus documents are read.
    """
    if max_docs is None:
        max_docs = preset.max_docs
    corpus = Path(corpus)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / EVAL_DIR).mkdir(exist_ok=True)
    k1, k2 = preset.clusters
    k = k1 * k2
    spec = EmbedderSpec()
    stages = _Stages(workdir, progress)
    corpus_fp = _fingerprint(corpus)
    if not corpus_fp:
        raise SoeError(f"{corpus}: no documents found (supported: {', '.join(SUPPORTED_SUFFIXES)})")
    specialists = [Path(d) for d in specialist_dirs]
    # validate every input before any stage runs, so a typo does not cost an hour of embedding
    splits = {d: (_split_file(d, "train"), _split_file(d, "eval")) for d in specialists}
    eval_fp = _fingerprint(eval_path) if eval_path is not None else None
    if eval_path is not None and not eval_fp:
        raise SoeError(f"{eval_path}: no documents found (supported: {', '.join(SUPPORTED_SUFFIXES)})")
    names = [d.name for d in specialists]
    if len(set(names)) != len(names):
        raise SoeError(f"specialist folders must have distinct names, got {', '.join(names)}")
    if "generic" in names:
        raise SoeError("a specialist folder may not be called 'generic' (reserved for the generic eval set)")

    def docs() -> Iterator[str]:
        return itertools.islice(iter_documents(corpus), max_docs)

    embedder_cache: list = []

    def embedder():
        if not embedder_cache:
            from soe_sdk.embedding import Embedder  # heavy import: only when a stage embeds
            t0 = time.perf_counter()
            embedder_cache.append(Embedder.from_spec(spec, device=embed_device))
            _log(progress, f"embedder loaded in {time.perf_counter() - t0:.1f} s")
        return embedder_cache[0]

    # (a) tokenizer ------------------------------------------------------------
    tok_path = workdir / TOKENIZER_FILE

    def run_tokenizer() -> dict:
        if tokenizer_path is not None:
            tok = load_tokenizer(tokenizer_path)
        else:
            n_docs, n_chars = 0, 0
            for text in docs():
                n_docs += 1
                n_chars += len(text)
            keep = min(1.0, TOKENIZER_SAMPLE_CHARS / max(n_chars, 1))
            rng = np.random.default_rng(SEED)
            # an unbiased sample of documents from the whole corpus, not just its first files
            sample = (t for t in docs() if rng.random() < keep)
            tok = train_tokenizer(sample, preset.vocab_size, progress=progress)
        if tok.get_vocab_size() > preset.model.vocab_size:
            raise SoeError(f"tokenizer has {tok.get_vocab_size()} tokens but preset {preset.name!r} "
                           f"model.vocab_size is {preset.model.vocab_size}")
        tmp = tok_path.with_name(tok_path.name + ".tmp")
        tok.save(str(tmp))
        os.replace(tmp, tok_path)
        return {"vocab_size": tok.get_vocab_size(), "source": str(tokenizer_path) if tokenizer_path else "trained"}

    tok_inputs = {"corpus": corpus_fp, "max_docs": max_docs, "vocab_size": preset.vocab_size,
                  "model_vocab": preset.model.vocab_size, "sample_chars": TOKENIZER_SAMPLE_CHARS,
                  "tokenizer_path": _fingerprint(tokenizer_path) if tokenizer_path else None}
    tok_hash, tok_info = stages.run("tokenizer", tok_inputs, [tok_path], run_tokenizer)
    tokenizer = load_tokenizer(tok_path)

    # (b) domains: embeddings, then centroids + assignments -------------------
    emb_path, cen_path, asg_path = (workdir / "embeddings.npy", workdir / "centroids.npy",
                                    workdir / "assignments.npy")

    def run_embeddings() -> dict:
        from .clustering import embed_documents

        n_docs = sum(1 for _ in docs())
        if n_docs < k:
            raise SoeError(f"{corpus}: {n_docs} documents, fewer than the k={k} domains of preset {preset.name!r}")
        emb = embed_documents(docs(), embedder(), preset.embed_chars, total=n_docs, progress=progress)
        _save_npy(emb_path, emb)
        return {"n_docs": n_docs}

    emb_inputs = {"corpus": corpus_fp, "max_docs": max_docs, "embedder": spec.to_dict(),
                  "embed_chars": preset.embed_chars}
    emb_hash, emb_info = stages.run("embeddings", emb_inputs, [emb_path], run_embeddings)

    def run_clusters() -> dict:
        from .clustering import cluster_domains

        centroids, assignments = cluster_domains(np.load(emb_path), k1, k2, seed=SEED)
        _save_npy(cen_path, centroids)
        _save_npy(asg_path, assignments)
        return {"k": k}

    cl_inputs = {"embeddings": emb_hash, "clusters": [k1, k2], "seed": SEED}
    cl_hash, _ = stages.run("clusters", cl_inputs, [cen_path, asg_path], run_clusters)
    centroids = np.load(cen_path)

    # (c) per-domain token shards -------------------------------------------------
    h_path = workdir / "h_generic.npy"
    domains_dir = workdir / "domains"

    def run_shards() -> dict:
        assignments = np.load(asg_path)
        index = write_domain_shards(tokenizer, docs(), assignments, k, workdir, progress=progress)
        counts = np.asarray(index["counts"], dtype=np.float64)
        _save_npy(h_path, counts / counts.sum())
        return {"tokens": int(counts.sum())}

    sh_inputs = {"tokenizer": tok_hash, "clusters": cl_hash, "corpus": corpus_fp, "max_docs": max_docs}
    stages.run("shards", sh_inputs, [domains_dir / "index.json", h_path], run_shards)
    shards = DomainShards.open(workdir)

    # (d) eval sets and specialist domain weights ---------------------------------
    eval_dir = workdir / EVAL_DIR
    eval_summary: dict[str, dict] = {}
    if eval_path is not None:
        out = eval_dir / "generic.bin"

        def run_generic() -> dict:
            n = write_token_file(tokenizer, iter_documents(eval_path), out, progress=progress, desc="eval generic")
            return {"tokens": n}

        _, info = stages.run("eval:generic", {"eval": eval_fp, "tokenizer": tok_hash},
                             [out], run_generic)
        eval_summary["generic"] = {"file": out.name, **info}

    for folder in specialists:
        name = folder.name
        train_file, eval_file = splits[folder]
        outs = {"eval": eval_dir / f"{name}.bin", "train": eval_dir / f"{name}.train.bin",
                "h_hard": eval_dir / f"{name}.h_hard.npy", "h_soft": eval_dir / f"{name}.h_soft.npy"}

        def run_specialist(train_file: Path = train_file, eval_file: Path = eval_file,
                           outs: dict[str, Path] = outs, name: str = name) -> dict:
            from soe_sdk.domains import domain_histogram

            from .clustering import embed_documents

            n_eval = write_token_file(tokenizer, iter_documents(eval_file), outs["eval"], desc=f"eval {name}")
            n_train = write_token_file(tokenizer, iter_documents(train_file), outs["train"], desc=f"train {name}")
            n_docs = sum(1 for _ in iter_documents(train_file))
            # Algorithm 3: embed the specialist's train docs exactly like the pretraining docs
            emb = embed_documents(iter_documents(train_file), embedder(), preset.embed_chars,
                                  total=n_docs, progress=progress)
            h_hard = np.asarray(domain_histogram(emb, centroids, mode="hard"), dtype=np.float64)
            h_soft = np.asarray(domain_histogram(emb, centroids, mode="soft", temperature=SOFT_TEMPERATURE),
                                dtype=np.float64)
            _save_npy(outs["h_hard"], h_hard)
            _save_npy(outs["h_soft"], h_soft)
            return {"eval_tokens": n_eval, "train_tokens": n_train, "train_docs": n_docs,
                    "top_domains_hard": _top(h_hard), "top_domains_soft": _top(h_soft)}

        sp_inputs = {"train": _fingerprint(train_file), "eval": _fingerprint(eval_file), "tokenizer": tok_hash,
                     "clusters": cl_hash, "embedder": spec.to_dict(), "embed_chars": preset.embed_chars,
                     "temperature": SOFT_TEMPERATURE}
        _, info = stages.run(f"eval:{name}", sp_inputs, list(outs.values()), run_specialist)
        eval_summary[name] = {"file": outs["eval"].name, "train_file": outs["train"].name,
                              "h_hard": outs["h_hard"].name, "h_soft": outs["h_soft"].name, **info}

    dtype = token_dtype(tokenizer.get_vocab_size()).name
    _write_json(eval_dir / "index.json", {"dtype": dtype, "sets": eval_summary})

    summary = {
        "preset": preset.name,
        "corpus": str(corpus.resolve()),
        "workdir": str(workdir.resolve()),
        "max_docs": max_docs,
        "k": k,
        "clusters": [k1, k2],
        "n_docs": int(shards.docs.sum()),
        "docs_per_domain": shards.docs.tolist(),
        "tokens_per_domain": shards.counts.tolist(),
        "total_tokens": int(shards.counts.sum()),
        "tokens": int(shards.counts.sum()),  # alias read by the CLI
        "h_generic": [round(float(x), 6) for x in shards.h_generic],
        "vocab_size": tokenizer.get_vocab_size(),
        "token_dtype": dtype,
        "tokenizer": tok_info,
        "embedder": spec.to_dict(),
        "embed_chars": preset.embed_chars,
        "embedding": emb_info,
        "soft_temperature": SOFT_TEMPERATURE,
        "eval": eval_summary,
        "timings": stages.timings,  # this run: seconds, or "cached"
        "stage_seconds": {name: entry.get("seconds") for name, entry in stages.data.items()},
    }
    _write_json(workdir / SUMMARY_FILE, summary)
    return summary
