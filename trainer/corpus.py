"""Stream document texts from a corpus file or folder (.jsonl, .jsonl.gz, .txt, .parquet)."""
from __future__ import annotations

import gzip
import json
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

from soe_sdk.errors import SoeError

SUPPORTED_SUFFIXES = (".jsonl", ".jsonl.gz", ".txt", ".parquet")
_PARQUET_BATCH_ROWS = 1024


def _suffix(path: Path) -> str | None:
    """The supported suffix `path` ends with, or None."""
    name = path.name.lower()
    for suffix in SUPPORTED_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return None


def corpus_files(path: str | os.PathLike) -> list[Path]:
    """The corpus files under `path` (itself if a file; supported files found recursively, sorted)."""
    root = Path(path)
    if root.is_file():
        if _suffix(root) is None:
            raise SoeError(f"{root}: unsupported file type; supported: {', '.join(SUPPORTED_SUFFIXES)}")
        return [root]
    if root.is_dir():
        # hidden files and folders (.git, editor swap files) are never corpus text
        return sorted(p for p in root.rglob("*")
                      if p.is_file() and _suffix(p) is not None
                      and not any(part.startswith(".") for part in p.relative_to(root).parts))
    raise SoeError(f"{root}: no such file or folder")


def _iter_jsonl(path: Path, compressed: bool) -> Iterator[str]:
    opener = gzip.open if compressed else open
    lineno = 0
    try:
        with opener(path, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    raise SoeError(f"{path}:{lineno}: not valid JSON") from None
                if not isinstance(record, dict) or "text" not in record:
                    raise SoeError(f"{path}:{lineno}: no 'text' field")
                text = record["text"]
                if not isinstance(text, str):
                    raise SoeError(f"{path}:{lineno}: 'text' is not a string")
                if text.strip():
                    yield text
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise SoeError(f"{path}:{lineno + 1}: not valid gzip data ({exc})") from None


def _iter_txt(path: Path) -> Iterator[str]:
    # a .txt file is one document; undecodable bytes become U+FFFD rather than aborting the run
    text = path.read_text(encoding="utf-8", errors="replace")
    if text.strip():
        yield text


def _iter_parquet(path: Path) -> Iterator[str]:
    import pyarrow.parquet as pq  # imported lazily: only parquet corpora need it

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise SoeError(f"{path}: not a readable parquet file ({exc})") from None
    if "text" not in pf.schema_arrow.names:
        raise SoeError(f"{path}: no 'text' column")
    for group in range(pf.num_row_groups):
        table = pf.read_row_group(group, columns=["text"])
        for batch in table.to_batches(max_chunksize=_PARQUET_BATCH_ROWS):
            for text in batch.column(0).to_pylist():
                if isinstance(text, bytes):
                    text = text.decode("utf-8", errors="replace")
                if isinstance(text, str) and text.strip():
                    yield text


def _iter_file(path: Path) -> Iterator[str]:
    suffix = _suffix(path)
    if suffix == ".jsonl":
        return _iter_jsonl(path, compressed=False)
    if suffix == ".jsonl.gz":
        return _iter_jsonl(path, compressed=True)
    if suffix == ".txt":
        return _iter_txt(path)
    if suffix == ".parquet":
        return _iter_parquet(path)
    raise SoeError(f"{path}: unsupported file type; supported: {', '.join(SUPPORTED_SUFFIXES)}")


def iter_documents(path: str | os.PathLike) -> Iterator[str]:
    """Yield the non-blank texts of the corpus at `path`, file by file in sorted order."""
    files = corpus_files(path)
    found = False
    for file in files:
        for text in _iter_file(file):
            found = True
            yield text
    if not found:
        raise SoeError(f"{path}: no documents found (supported: {', '.join(SUPPORTED_SUFFIXES)})")
