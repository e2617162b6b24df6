"""Size, held-out loss and decode speed of every ONNX variant of one specialist.

    python benchmarks/export_quality.py                       # a random model of ModelConfig() size
    python benchmarks/export_quality.py --archive soup.soe --h 0.5,0.5,0,0 --texts heldout.txt

Prints one JSON line per format, then a table. Loss is the mean next-token cross-entropy on the
held-out texts (each followed by EOS); tokens/s is greedy decoding with the KV cache, batch 1.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from exporters import export  # noqa: E402
from exporters.runtime import OnnxSpecialist  # noqa: E402
from soe_sdk.config import ModelConfig  # noqa: E402

VARIANTS = ["onnx", "onnx-fp16", "onnx-int8", "onnx-int4"]
HELD_OUT = [
    "The council approved the plan after a short debate, and work on the new school will start in spring.",
    "def mean(values):\n    if not values:\n        raise ValueError('empty')\n    return sum(values) / len(values)\n",
    "Le train de nuit part à vingt-deux heures et arrive à Marseille tôt le lendemain matin.",
    "SELECT customer_id, SUM(amount) FROM payments GROUP BY customer_id HAVING SUM(amount) > 100;",
    "Rain is expected over the weekend, with strong winds along the coast and cooler nights inland.",
]


def random_specialist(config: ModelConfig, seed: int = 0) -> tuple[dict[str, torch.Tensor], ModelConfig, str]:
    """A randomly initialised (and perturbed) model with a BPE tokenizer trained on the held-out texts."""
    from soe_sdk.model import init_parameters

    from trainer.tokenizer import train_tokenizer

    tok = train_tokenizer(HELD_OUT * 4, config.vocab_size)
    gen = torch.Generator().manual_seed(seed)
    params = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in init_parameters(config, gen).items()}
    return params, config, tok.to_str()


def archive_specialist(path: str, h: str | None) -> tuple[dict[str, torch.Tensor], ModelConfig, str]:
    """Θ for domain weights `h` (comma-separated; default: the soup's generic mix) from a .soe archive."""
    import soe_sdk

    soup = soe_sdk.load(path)
    weights = [float(x) for x in h.split(",")] if h else soup.h_generic
    params = soup.instantiate(soup.coefficients(weights))
    return params, soup.model_config, soup.tokenizer_json


def decode_speed(model: OnnxSpecialist, tokens: int, repeats: int = 3) -> float:
    """Best-of-`repeats` greedy decoding speed in new tokens per second."""
    prompt = model.tokenizer.encode(HELD_OUT[0]).ids[:8] or [model.eos_token_id]
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        new = model.generate_ids(prompt, tokens)
        best = max(best, len(new) / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", help=".soe archive (default: a random model)")
    parser.add_argument("--h", help="comma-separated domain weights for --archive")
    parser.add_argument("--texts", help="held-out text file, documents separated by blank lines")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per speed run")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--out", help="keep the exports in this folder (default: a temp folder)")
    args = parser.parse_args()

    params, config, tokenizer_json = (archive_specialist(args.archive, args.h) if args.archive
                                      else random_specialist(ModelConfig()))
    texts = (Path(args.texts).read_text(encoding="utf-8").split("\n\n") if args.texts else HELD_OUT)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.out or scratch)
        rows = []
        for fmt in VARIANTS:
            start = time.perf_counter()
            result = export(params, config, tokenizer_json, root / fmt, fmt, {"name": "benchmark"})
            seconds = time.perf_counter() - start
            model = OnnxSpecialist.load(result.out_dir, threads=args.threads)
            rows.append({"format": fmt, "file_bytes": result.files["model.onnx"], "export_s": round(seconds, 2),
                         "loss": model.loss(texts), "tokens_per_s": decode_speed(model, args.tokens),
                         "argmax_agreement": result.validation.get("argmax_agreement", 1.0)})
    base = rows[0]
    for row in rows:
        row["size_ratio"] = row["file_bytes"] / base["file_bytes"]
        row["loss_delta"] = row["loss"] - base["loss"]
        print(json.dumps({"model": config.to_dict(), **row}))
    print()
    print(f"{'format':<10} {'MB':>7} {'ratio':>6} {'loss':>7} {'Δloss':>8} {'argmax':>7} {'tok/s':>7}")
    for row in rows:
        print(f"{row['format']:<10} {row['file_bytes'] / 1e6:7.2f} {row['size_ratio']:6.2f} {row['loss']:7.3f} "
              f"{row['loss_delta']:+8.4f} {row['argmax_agreement']:7.3f} {row['tokens_per_s']:7.0f}")


if __name__ == "__main__":
    main()
