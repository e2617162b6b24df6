"""Merge speed and memory: `Soup.instantiate(α)` from a memory-mapped archive vs NumPy in memory.

    python benchmarks/merge_bandwidth.py                      # small, medium (fp32 + fp16), large (fp32, ≥ 2 GB)
    python benchmarks/merge_bandwidth.py --sizes small --dtypes float32,float16 --reps 5

For each archive (written to a temporary folder and deleted afterwards) it times, median of
`--reps` runs (more where they take under 0.25 s in all), with every α_j ≠ 0 so every expert is read:

- numpy     `S + α @ E` per parameter on in-memory float32 arrays holding the same values:
            the baseline "read the bytes once" (the target is warm ≤ 1.5× this);
- numpy16   for float16 archives, NumPy on the stored bytes themselves: `S + α @ E` on
            in-memory float16 arrays, each converted to float32 as it is read (NumPy has no
            mixed-precision GEMV), i.e. what NumPy needs to read and combine those bytes once;
- warm      `instantiate(α)` on a Soup whose tensors were already checksum-verified, with
            the default `low_memory` (on above 1 GiB: pages are released as the merge
            streams, so each merge maps them again);
- mapped    the same with `low_memory=False` (pages stay mapped between merges);
- torch     warm `instantiate` with the fused kernel switched off (torch GEMMs, fp16 rows
            converted block by block first): what a build without a C compiler gets;
- cold      `instantiate(α)` on a freshly opened Soup: includes the SHA-256 check of every
            tensor it reads (overlapped with the merge). The file is in the OS page cache,
            so "cold" means first read by this process, not a disk read;
- verify    `Archive.verify_all()` alone, for reference;
- naive     the pre-streaming merge (each bank converted whole to fp32, then one GEMV);
- half      warm `instantiate` with every other α_j = 0 (only those experts are read).

For the largest archive fresh subprocesses also record peak resident memory during a cold
`instantiate` (VmHWM, reset just before the merge), with the default `low_memory` (the
target: < size(Θ) + 300 MB) and with `low_memory=False` for comparison.
Prints one JSON line per measurement and a table.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import soe_sdk  # noqa: E402
from soe_sdk import fused  # noqa: E402
from soe_sdk.config import EmbedderSpec, ModelConfig, RouterConfig, SoupConfig  # noqa: E402
from soe_sdk.soup import combine_parameter, init_soup, write_soup  # noqa: E402

SIZES = {  # name → model; every soup has n = 16 dense experts
    "small": ModelConfig(vocab_size=4096, max_seq_len=128, d_model=128, n_layers=4, n_heads=4, d_mlp=512),
    "medium": ModelConfig(vocab_size=16384, max_seq_len=256, d_model=256, n_layers=6, n_heads=4, d_mlp=1024),
    "large": ModelConfig(vocab_size=32768, max_seq_len=256, d_model=512, n_layers=6, n_heads=8, d_mlp=2048),
}
EXPERTS = 16
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def tiny_tokenizer() -> str:
    """A small real BPE tokenizer (the merge never uses it, but an archive must carry one)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["merge the soup of experts at memory bandwidth"] * 10, trainer)
    return tok.to_str()


def build_archive(path: Path, model: ModelConfig, storage: torch.dtype) -> SoupConfig:
    config = SoupConfig(model, RouterConfig(k=16, n=EXPERTS, hidden=32))
    tensors = init_soup(config, seed=0)
    gen = torch.Generator().manual_seed(1)
    for name in list(tensors):  # non-zero vector experts too, so no expert is trivially empty
        if name.startswith("experts.") and tensors[name].dim() == 2:
            tensors[name] = 0.01 * torch.randn(tensors[name].shape, generator=gen)
    centroids = torch.nn.functional.normalize(torch.randn(16, 384, generator=gen), dim=1)
    write_soup(path, tensors, config, centroids=centroids, h_generic=torch.full((16,), 1 / 16),
               embedder=EmbedderSpec(), tokenizer_json=tiny_tokenizer(), provenance={"corpus": "benchmark"},
               storage_dtype=storage)
    del tensors
    gc.collect()
    return config


def median_time(fn, reps: int, min_seconds: float = 0.25) -> tuple[float, list[float]]:
    """Median of at least `reps` runs, and of as many more as fill `min_seconds`: a merge of a few
    milliseconds needs more samples than five to get past its first runs' allocator warm-up."""
    runs: list[float] = []
    while len(runs) < reps or sum(runs) < min_seconds:
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs), runs


def numpy_arrays(soup, dtype: torch.dtype = torch.float32) -> list[tuple[np.ndarray, np.ndarray]]:
    """(S, E as [n, p]) per parameter, in memory, in `dtype`."""
    out = []
    for name in soup.model_config.parameter_shapes():
        s = soup.archive.tensor(f"shared.{name}").to(dtype).numpy().reshape(-1).copy()
        e = soup.archive.tensor(f"experts.{name}").to(dtype).numpy().reshape(soup.n, -1).copy()
        out.append((s, e))
    return out


def numpy_merge_stored(arrays: list[tuple[np.ndarray, np.ndarray]], alpha: np.ndarray) -> list[np.ndarray]:
    """S + α @ E with each stored (float16) array converted to float32 as it is read."""
    return [s.astype(np.float32) + alpha @ e.astype(np.float32) for s, e in arrays]


def naive_merge(soup, alpha: torch.Tensor) -> dict[str, torch.Tensor]:
    """The merge before streaming: whole bank → fp32, one GEMV, for reference."""
    out = {}
    for name in soup.model_config.parameter_shapes():
        shared = soup.archive.tensor(f"shared.{name}").to(torch.float32)
        bank = soup.archive.tensor(f"experts.{name}").to(torch.float32)
        out[name] = combine_parameter(shared, bank, alpha).contiguous()
    return out


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


RSS_CHILD = r"""
import json, sys, time
from pathlib import Path
import torch
import soe_sdk

def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
soup = soe_sdk.load(sys.argv[1], low_memory={"auto": None, "on": True, "off": False}[sys.argv[2]])
alpha = torch.randn(soup.n, generator=torch.Generator().manual_seed(0))
before = status("VmRSS")
Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
start = time.perf_counter()
theta = soup.instantiate(alpha)
seconds = time.perf_counter() - start
print(json.dumps({"low_memory": soup.low_memory, "rss_before_mb": before, "peak_rss_mb": status("VmHWM"),
                  "rss_after_mb": status("VmRSS"),
                  "theta_mb": sum(v.numel() * v.element_size() for v in theta.values()) / 2**20,
                  "cold_seconds": seconds}))
"""


def peak_rss(path: Path, low_memory: str = "auto") -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", RSS_CHILD, str(path), low_memory], capture_output=True,
                          text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench(size: str, dtype_name: str, reps: int, folder: Path, with_rss: bool) -> dict:
    path = folder / f"{size}-{dtype_name}.soe"
    start = time.perf_counter()
    build_archive(path, SIZES[size], DTYPES[dtype_name])
    build_s = time.perf_counter() - start
    file_bytes = path.stat().st_size
    alpha = torch.randn(EXPERTS, generator=torch.Generator().manual_seed(0))
    half = alpha.clone()
    half[1::2] = 0.0

    soup = soe_sdk.load(path)
    arrays = numpy_arrays(soup)
    a_np = alpha.numpy()
    t_numpy, _ = median_time(lambda: [s + a_np @ e for s, e in arrays], reps)
    del arrays
    t_numpy16 = None
    if DTYPES[dtype_name] == torch.float16:
        arrays = numpy_arrays(soup, torch.float16)
        t_numpy16, _ = median_time(lambda: numpy_merge_stored(arrays, a_np), reps)
        del arrays
    gc.collect()

    # correctness against the reference before any timing of the streamed path
    theta = soup.instantiate(alpha)
    reference = naive_merge(soup, alpha)
    max_diff = max(float((theta[k] - reference[k]).abs().max()) for k in theta)
    del theta, reference

    t_warm, warm_runs = median_time(lambda: soup.instantiate(alpha), reps)
    if soup.low_memory:
        mapped = soe_sdk.load(path, low_memory=False)
        mapped.instantiate(alpha)
        t_mapped, _ = median_time(lambda: mapped.instantiate(alpha), reps)
        del mapped
    else:
        t_mapped = t_warm
    previous = fused.set_enabled(False)
    try:
        t_torch, _ = median_time(lambda: soup.instantiate(alpha), reps)
    finally:
        fused.set_enabled(previous)
    t_half, _ = median_time(lambda: soup.instantiate(half), reps)
    t_naive, _ = median_time(lambda: naive_merge(soup, alpha), reps)
    t_cold, cold_runs = median_time(lambda: soe_sdk.load(path).instantiate(alpha), reps)
    t_verify, _ = median_time(lambda: soe_sdk.load(path).archive.verify_all(), max(1, reps // 2))
    row = {"size": size, "storage": dtype_name, "file_mb": file_bytes / 2**20, "experts": EXPERTS,
           "theta_params": SIZES[size].num_parameters(), "build_s": build_s, "numpy_s": t_numpy,
           "numpy16_s": t_numpy16, "warm_ratio_numpy16": None if t_numpy16 is None else t_warm / t_numpy16,
           "low_memory": soup.low_memory, "kernel": fused.instruction_set(), "warm_s": t_warm,
           "torch_s": t_torch, "torch_ratio": t_torch / t_numpy, "mapped_s": t_mapped, "mapped_ratio": t_mapped / t_numpy,
           "cold_s": t_cold, "verify_s": t_verify, "naive_s": t_naive, "half_alpha_s": t_half,
           "warm_ratio": t_warm / t_numpy, "cold_ratio": t_cold / t_numpy,
           "warm_gb_per_s": file_bytes / t_warm / 1e9, "max_abs_diff_vs_naive": max_diff,
           "warm_runs": warm_runs, "cold_runs": cold_runs}
    if with_rss:
        row["rss"] = peak_rss(path)
        row["rss"]["target_mb"] = row["rss"]["theta_mb"] + 300
        row["rss_mapped"] = peak_rss(path, "off")
    emit(row)
    del soup
    gc.collect()
    path.unlink()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="small,medium,large")
    parser.add_argument("--dtypes", default="float32,float16", help="storage dtypes for every size but large")
    parser.add_argument("--large-dtypes", default="float32", help="storage dtypes for the large (≥ 2 GB) archive")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tmp", default=tempfile.gettempdir())
    args = parser.parse_args()

    emit({"setup": True, "kernel": fused.instruction_set(), "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
          "load_average_1m": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
    folder = Path(tempfile.mkdtemp(prefix="soe-merge-bench-", dir=args.tmp))
    rows = []
    try:
        for size in args.sizes.split(","):
            dtypes = args.large_dtypes if size == "large" else args.dtypes
            for dtype_name in dtypes.split(","):
                rows.append(bench(size, dtype_name, args.reps, folder, with_rss=size == "large"))
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    print(f"\n{'archive':<16}{'MB':>7}{'lowmem':>7}{'numpy':>8}{'warm':>8}{'ratio':>7}{'torch':>8}{'ratio':>7}"
          f"{'mapped':>8}{'ratio':>7}"
          f"{'cold':>8}{'ratio':>7}{'verify':>8}{'naive':>8}{'½α':>7}")
    for r in rows:
        print(f"{r['size'] + '-' + r['storage']:<16}{r['file_mb']:>7.0f}{'yes' if r['low_memory'] else 'no':>7}"
              f"{r['numpy_s']:>8.3f}{r['warm_s']:>8.3f}{r['warm_ratio']:>6.2f}x{r['torch_s']:>8.3f}"
              f"{r['torch_ratio']:>6.2f}x{r['mapped_s']:>8.3f}"
              f"{r['mapped_ratio']:>6.2f}x{r['cold_s']:>8.3f}{r['cold_ratio']:>6.2f}x{r['verify_s']:>8.3f}"
              f"{r['naive_s']:>8.3f}{r['half_alpha_s']:>7.3f}")
    for r in rows:
        if "rss" in r:
            rss = r["rss"]
            verdict = "met" if rss["peak_rss_mb"] < rss["target_mb"] else "NOT met"
            print(f"peak RSS, cold instantiate of {r['size']}-{r['storage']} ({r['file_mb']:.0f} MB) "
                  f"in a fresh process: {rss['peak_rss_mb']:.0f} MB (before the merge {rss['rss_before_mb']:.0f} MB, "
                  f"Θ {rss['theta_mb']:.0f} MB; target < Θ + 300 MB = {rss['target_mb']:.0f} MB: {verdict}); "
                  f"with low_memory=False: {r['rss_mapped']['peak_rss_mb']:.0f} MB")
    for r in rows:
        if r["numpy16_s"] is not None:
            print(f"{r['size']}-{r['storage']}: NumPy on the stored float16 bytes {r['numpy16_s']:.3f} s; "
                  f"warm / that = {r['warm_ratio_numpy16']:.2f}x")
    print(f"seconds are medians; ratio = time / numpy; numpy = S + α @ E on in-memory float32 arrays; "
          f"torch = warm without the fused kernel (it ran on {fused.instruction_set()}); "
          f"½α = warm with every other α_j = 0")


if __name__ == "__main__":
    main()
