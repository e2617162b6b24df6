"""End-to-end budget: wall-clock of `soe-export` on a folder of ~1000 chunks, stage by stage.

    python benchmarks/end_to_end.py                          # demo soup, python-docs, onnx-int8
    python benchmarks/end_to_end.py --soup my.soe --set mixed --chunks 1000 --format onnx

Writes documents of one specialist corpus set (or of all of them, `--set mixed`) as .txt
files until they hold about `--chunks` chunks of ≤ 1000 characters, then runs the real CLI
as a subprocess, once plain and once with `--refine`:

    soe-export --docs DIR --format FMT --out OUT --soup ARCHIVE --quiet [--refine]

and reports the wall-clock (process start to exit, so imports and model loading count) next
to the stage timings the CLI writes to report.json (read, embed, assign, refine, merge,
score, export, validate). Skips (exit 0) when the corpus is absent.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from soe_sdk.documents import chunk_text  # noqa: E402
from soe_sdk.specialist import default_soup_path  # noqa: E402

CORPUS = Path("/work/shared/corpus/specialist")
STAGES = ("read", "embed", "assign", "refine", "merge", "score", "export", "validate")


def write_docs(folder: Path, sets: list[str], chunks: int) -> int:
    """Corpus documents as .txt files, round-robin over `sets`, until they hold ≈ `chunks` chunks."""
    folder.mkdir(parents=True)
    readers = [gzip.open(CORPUS / name / "train.jsonl.gz", "rt", encoding="utf-8") for name in sets]
    total, index = 0, 0
    try:
        while total < chunks and readers:
            reader = readers[index % len(readers)]
            line = reader.readline()
            if not line:
                readers.remove(reader)
                continue
            text = json.loads(line)["text"]
            total += len(chunk_text(text, 1000)) if text.strip() else 0
            (folder / f"doc{index:05d}.txt").write_text(text, encoding="utf-8")
            index += 1
    finally:
        for reader in readers:
            reader.close()
    return total


def command() -> list[str]:
    script = shutil.which("soe-export")
    return [script] if script else [sys.executable, "-m", "soe_sdk.cli", "export"]


def run(docs: Path, out: Path, soup: Path, fmt: str, refine: bool) -> dict:
    argv = command() + ["--docs", str(docs), "--format", fmt, "--out", str(out), "--soup", str(soup), "--quiet"]
    if refine:
        argv.append("--refine")
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"soe-export failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    report = json.loads((out / "report.json").read_text())
    timings = report.get("timings_s", {})
    return {"refine": refine, "format": fmt, "wall_s": wall, "timings_s": timings,
            "untimed_s": wall - sum(timings.values()),  # interpreter start, imports, loading, report, chart
            "chunks": report["docs"]["count"], "losses": report.get("losses", {}),
            "load_average_1m": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--soup", type=Path, default=default_soup_path())
    parser.add_argument("--set", default="python-docs", help="a specialist corpus set, or 'mixed' for all of them")
    parser.add_argument("--chunks", type=int, default=1000)
    parser.add_argument("--format", default="onnx-int8")
    parser.add_argument("--tmp", default=tempfile.gettempdir())
    parser.add_argument("--no-refine", action="store_true", help="skip the --refine run")
    args = parser.parse_args()
    if not CORPUS.is_dir():
        print(json.dumps({"skipped": f"{CORPUS} is absent"}))
        return
    if not args.soup.exists():
        raise SystemExit(f"{args.soup}: no such soup archive (pass --soup)")
    sets = sorted(p.name for p in CORPUS.iterdir() if (p / "train.jsonl.gz").exists()) if args.set == "mixed" \
        else [args.set]

    root = Path(tempfile.mkdtemp(prefix="soe-e2e-", dir=args.tmp))
    rows = []
    try:
        docs = root / "docs"
        expected = write_docs(docs, sets, args.chunks)
        print(json.dumps({"setup": True, "soup": str(args.soup), "sets": sets, "files": len(list(docs.iterdir())),
                          "chunks_written": expected, "command": " ".join(command()), "cpus": os.cpu_count(),
                          "load_average_1m": os.getloadavg()[0],
                          "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}), flush=True)
        for refine in ([False] if args.no_refine else [False, True]):
            row = run(docs, root / f"out-{int(refine)}", args.soup, args.format, refine)
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    header = "".join(f"{s:>9}" for s in STAGES)
    print(f"\n{'run':<10}{'chunks':>7}{'wall':>8}{header}{'other':>8}  held-out loss spec / generic")
    for r in rows:
        t = r["timings_s"]
        cells = "".join(f"{t[s]:>9.2f}" if s in t else f"{'-':>9}" for s in STAGES)
        spec, generic = (r["losses"].get(k, float("nan")) for k in ("heldout_specialist", "heldout_generic_soup"))
        label = "refine" if r["refine"] else "plain"
        print(f"{label:<10}{r['chunks']:>7}{r['wall_s']:>8.1f}{cells}{r['untimed_s']:>8.1f}"
              f"  {spec:.3f} / {generic:.3f}")
    print("seconds; wall = the whole soe-export process; other = wall minus the timed stages "
          "(interpreter start, imports, soup and embedder loading, report and chart)")


if __name__ == "__main__":
    main()
