"""End-to-end budget: wall-clock of `soe-export` on a folder of ~1000 chunks, stage by stage.

    python benchmarks/end_to_end.py                          # demo soup, python-docs, onnx-int8
    python benchmarks/end_to_end.py --soup my.soe --set mixed --chunks 1000 --format onnx
    python benchmarks/end_to_end.py --chunks 100 300 1000 3000 --no-refine   # growth with the document count

Writes documents of one specialist corpus set (or of all of them, `--set mixed`) as .txt
files until they hold about `--chunks` chunks of ≤ 1000 characters, then runs the real CLI
as a subprocess, once plain and once with `--refine`:

    soe-export --docs DIR --format FMT --out OUT --soup ARCHIVE --quiet [--refine]

and reports the wall-clock (process start to exit, so imports and model loading count) and
the process's peak RSS next to the stage timings the CLI writes to report.json (read, embed,
assign, refine, merge, score, export, validate). With several `--chunks` values every size
runs plain and the `--refine` run uses the size closest to 1000. Skips (exit 0) when the
corpus is absent.
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
    with tempfile.TemporaryFile() as stderr:
        child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own peak RSS, not the max over all children
        child.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        stderr.seek(0)
        if child.returncode != 0:
            raise SystemExit(f"soe-export failed ({child.returncode}): {stderr.read().decode()[-2000:]}")
    report = json.loads((out / "report.json").read_text())
    timings = report.get("timings_s", {})
    return {"refine": refine, "format": fmt, "wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024,
            "timings_s": timings,
            "untimed_s": wall - sum(timings.values()),  # interpreter start, imports, loading, report, chart
            "chunks": report["docs"]["count"], "losses": report.get("losses", {}),
            "load_average_1m": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--soup", type=Path, default=default_soup_path())
    parser.add_argument("--set", default="python-docs", help="a specialist corpus set, or 'mixed' for all of them")
    parser.add_argument("--chunks", type=int, nargs="+", default=[1000])
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
    refine_at = min(args.chunks, key=lambda c: abs(c - 1000))
    try:
        for size in args.chunks:
            docs = root / f"docs-{size}"
            expected = write_docs(docs, sets, size)
            print(json.dumps({"setup": True, "soup": str(args.soup), "sets": sets, "files": len(list(docs.iterdir())),
                              "chunks_written": expected, "command": " ".join(command()), "cpus": os.cpu_count(),
                              "load_average_1m": os.getloadavg()[0],
                              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}), flush=True)
            for refine in ([False] if args.no_refine or size != refine_at else [False, True]):
                row = run(docs, root / f"out-{size}-{int(refine)}", args.soup, args.format, refine)
                print(json.dumps(row), flush=True)
                rows.append(row)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    header = "".join(f"{s:>9}" for s in STAGES)
    print(f"\n{'run':<10}{'chunks':>7}{'wall':>8}{'RSS MB':>8}{header}{'other':>8}  held-out loss spec / generic")
    for r in rows:
        t = r["timings_s"]
        cells = "".join(f"{t[s]:>9.2f}" if s in t else f"{'-':>9}" for s in STAGES)
        spec, generic = (r["losses"].get(k, float("nan")) for k in ("heldout_specialist", "heldout_generic_soup"))
        label = "refine" if r["refine"] else "plain"
        print(f"{label:<10}{r['chunks']:>7}{r['wall_s']:>8.1f}{r['peak_rss_mb']:>8.0f}{cells}{r['untimed_s']:>8.1f}"
              f"  {spec:.3f} / {generic:.3f}")
    print("seconds; wall = the whole soe-export process; other = wall minus the timed stages "
          "(interpreter start, imports, soup and embedder loading, report and chart)")


if __name__ == "__main__":
    main()
