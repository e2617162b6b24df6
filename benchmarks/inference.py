"""Inference speed of one specialist: PyTorch eager vs ONNX fp32 / int8 / int4, with held-out loss.

    python benchmarks/inference.py                               # the bundled demo soup
    python benchmarks/inference.py --soup my.soe --set go-stdlib --threads 2

The specialist is built the way `soe-export` builds it (specialize(): embed the documents,
nearest-centroid histogram h, α = φ(h)) from the train split of one specialist corpus set;
its held-out loss is measured on that set's eval split (never seen by specialize). Without
the corpus it falls back to the soup's generic mix φ(h_generic) and a few built-in texts.

For each backend, batch 1:
- prompt tokens/s: one forward pass over a `--prompt-tokens` prompt (no cache), median of reps;
- decode tokens/s: `--new-tokens` single-token steps with the KV cache after an 8-token prompt;
- loss: mean next-token cross-entropy over the same windows of context+1 tokens for every backend.
Prints one JSON line per backend and a table.
"""
from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from exporters import export  # noqa: E402
from exporters.runtime import OnnxSpecialist, mean_cross_entropy  # noqa: E402
from soe_sdk.documents import chunk_text  # noqa: E402
from soe_sdk.model import empty_cache, forward  # noqa: E402
from soe_sdk.specialist import default_soup_path  # noqa: E402

CORPUS = "/work/shared/corpus/specialist"
FORMATS = ["onnx", "onnx-int8", "onnx-int4"]
FALLBACK_TEXTS = [
    "def mean(values):\n    if not values:\n        raise ValueError('empty')\n    return sum(values) / len(values)\n",
    "The council approved the plan after a short debate, and work on the new school will start in spring.",
    "SELECT customer_id, SUM(amount) FROM payments GROUP BY customer_id HAVING SUM(amount) > 100;",
]


def read_set(name: str, split: str, max_chunks: int) -> list[str]:
    path = Path(CORPUS) / name / f"{split}.jsonl.gz"
    chunks: list[str] = []
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            chunks += chunk_text(json.loads(line)["text"], 1000)
            if len(chunks) >= max_chunks:
                break
    return chunks[:max_chunks]


def build_specialist(soup_path: Path, corpus_set: str, train_chunks: int):
    """(params, config, tokenizer_json, held-out texts, description)."""
    import soe_sdk
    from soe_sdk.specialist import specialize

    if glob.glob(f"{CORPUS}/{corpus_set}/train.jsonl.gz"):
        spec = specialize(read_set(corpus_set, "train", train_chunks), soup=soup_path)
        return (spec.params, spec.config, spec.tokenizer_json, read_set(corpus_set, "eval", 200),
                f"specialize() on {train_chunks} train chunks of {corpus_set}, loss on its eval split")
    soup = soe_sdk.load(soup_path)
    params = soup.instantiate(soup.coefficients(soup.h_generic))
    return params, soup.model_config, soup.tokenizer_json, FALLBACK_TEXTS, "generic mix (corpus absent)"


def eval_windows(tokenizer, texts: list[str], context: int, eos: int, max_windows: int) -> list[np.ndarray]:
    """Consecutive windows of context+1 tokens over the texts (each followed by EOS)."""
    stream: list[int] = []
    for text in texts:
        stream += tokenizer.encode(text).ids + [eos]
    width = context + 1
    return [np.asarray(stream[i:i + width], np.int64) for i in range(0, len(stream) - 1, width)
            if len(stream[i:i + width]) >= 2][:max_windows]


class TorchBackend:
    """The specialist Θ run by soe_sdk.model.forward (PyTorch eager, fp32)."""

    def __init__(self, params, config) -> None:
        self.params, self.config = params, config

    @torch.inference_mode()
    def logits(self, ids: np.ndarray) -> np.ndarray:
        out, _ = forward(self.params, self.config, torch.from_numpy(ids)[None])
        return out[0].numpy()

    @torch.inference_mode()
    def decode(self, prompt: list[int], steps: int) -> float:
        cache = empty_cache(self.config, 1)
        logits, cache = forward(self.params, self.config, torch.tensor([prompt]), past_key_values=cache, use_cache=True)
        nxt = logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(steps):
            logits, cache = forward(self.params, self.config, nxt, past_key_values=cache, use_cache=True)
            nxt = logits[:, -1:].argmax(-1)
        return time.perf_counter() - start


class OnnxBackend:
    """An exported folder run by exporters.runtime (onnxruntime, no torch)."""

    def __init__(self, model: OnnxSpecialist) -> None:
        self.model = model

    def logits(self, ids: np.ndarray) -> np.ndarray:
        return self.model.logits(ids)

    def decode(self, prompt: list[int], steps: int) -> float:
        m = self.model
        ids = np.asarray([prompt], np.int64)
        logits, past = m.run(ids, np.ones_like(ids), np.arange(len(prompt), dtype=np.int64)[None], m.empty_past())
        nxt = int(logits[0, -1].argmax())
        start = time.perf_counter()
        for _ in range(steps):
            pos = past[0].shape[2]
            logits, past = m.run(np.asarray([[nxt]], np.int64), np.ones((1, pos + 1), np.int64),
                                 np.asarray([[pos]], np.int64), past)
            nxt = int(logits[0, -1].argmax())
        return time.perf_counter() - start


def measure(backend, windows: list[np.ndarray], prompt: np.ndarray, new_tokens: int, reps: int) -> dict:
    total = sum(mean_cross_entropy(backend.logits(w[:-1]), w[1:]) * (len(w) - 1) for w in windows)
    loss = total / sum(len(w) - 1 for w in windows)
    backend.logits(prompt)  # warm-up
    prompt_s = statistics.median([_timed(backend.logits, prompt) for _ in range(reps)])
    decode_s = statistics.median([backend.decode(prompt[:8].tolist(), new_tokens) for _ in range(reps)])
    return {"loss": loss, "prompt_tokens_per_s": len(prompt) / prompt_s, "decode_tokens_per_s": new_tokens / decode_s}


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--soup", type=Path, default=default_soup_path())
    parser.add_argument("--set", default="python-docs",
                        help="specialist corpus set for the documents and held-out loss")
    parser.add_argument("--train-chunks", type=int, default=300)
    parser.add_argument("--eval-windows", type=int, default=48)
    parser.add_argument("--prompt-tokens", type=int, default=0, help="default: the context length")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch and onnxruntime threads")
    args = parser.parse_args()
    if not args.soup.exists():
        raise SystemExit(f"{args.soup}: no such soup archive (pass --soup)")
    torch.set_num_threads(args.threads)

    params, config, tokenizer_json, texts, source = build_specialist(args.soup, args.set, args.train_chunks)
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_str(tokenizer_json)
    eos = tokenizer.token_to_id("<|endoftext|>")
    windows = eval_windows(tokenizer, texts, config.max_seq_len, eos, args.eval_windows)
    length = max(8, min(args.prompt_tokens or config.max_seq_len, config.max_seq_len))
    prompt = np.concatenate(windows)[:length] if windows else np.full(length, eos, np.int64)
    new_tokens = min(args.new_tokens, config.max_seq_len - 8)
    print(json.dumps({"setup": True, "soup": str(args.soup), "source": source, "model": config.to_dict(),
                      "threads": args.threads, "eval_windows": len(windows), "prompt_tokens": len(prompt),
                      "new_tokens": new_tokens, "load_average_1m": os.getloadavg()[0],
                      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}), flush=True)

    rows = []
    row = {"backend": "pytorch-eager", "file_mb": config.num_parameters() * 4 / 2**20,
           **measure(TorchBackend(params, config), windows, prompt, new_tokens, args.reps)}
    print(json.dumps(row), flush=True)
    rows.append(row)
    with tempfile.TemporaryDirectory() as scratch:
        cpu_params = {k: v.detach().cpu() for k, v in params.items()}
        for fmt in FORMATS:
            result = export(cpu_params, config, tokenizer_json, Path(scratch) / fmt, fmt, {"name": "benchmark"})
            model = OnnxSpecialist.load(result.out_dir, threads=args.threads)
            row = {"backend": fmt, "file_mb": result.files["model.onnx"] / 2**20,
                   **measure(OnnxBackend(model), windows, prompt, new_tokens, args.reps)}
            print(json.dumps(row), flush=True)
            rows.append(row)

    base = rows[0]["loss"]
    print(f"\n{'backend':<15}{'MB':>8}{'loss':>8}{'Δloss':>9}{'prompt tok/s':>14}{'decode tok/s':>14}")
    for r in rows:
        print(f"{r['backend']:<15}{r['file_mb']:>8.1f}{r['loss']:>8.3f}{r['loss'] - base:>+9.4f}"
              f"{r['prompt_tokens_per_s']:>14.0f}{r['decode_tokens_per_s']:>14.0f}")
    print(f"({source}; batch 1, {args.threads} thread(s), prompt {len(prompt)} tokens, decode {new_tokens} tokens)")


if __name__ == "__main__":
    main()
