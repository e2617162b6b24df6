"""Read a folder of company documents (or a list of texts) into de-duplicated text chunks.

`load_documents` walks a directory in sorted order, reads every file it understands
(plain text, Markdown, HTML, PDF, DOCX, JSON/JSONL, CSV, source code), splits the text into
chunks of about `chunk_chars` characters and drops exact duplicates. Files it cannot use are
skipped and counted by reason; it never crashes on a file, never reads a file larger than
`max_file_bytes`, and never leaves the root folder through a symlink unless asked to.
"""
from __future__ import annotations

import codecs
import contextlib
import csv
import errno
import hashlib
import io
import json
import logging
import os
import re
import stat
import sys
from collections import Counter
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .errors import DocumentsError

__all__ = [
    "DocumentSet",
    "SkippedFile",
    "chunk_text",
    "extract_text",
    "load_documents",
]

# Reason codes for skipped files (they appear as is in summaries and error messages).
BINARY = "binary"
UNDECODABLE = "undecodable"
CORRUPT_PDF = "corrupt pdf"
ENCRYPTED_PDF = "encrypted pdf"
CORRUPT_DOCX = "corrupt docx"
CORRUPT_JSON = "corrupt json"
CORRUPT_HTML = "corrupt html"
CORRUPT_CSV = "corrupt csv"
UNSUPPORTED = "unsupported format"
PERMISSION_DENIED = "permission denied"
BROKEN_SYMLINK = "broken symlink"
SYMLINK_LOOP = "symlink loop"
OUTSIDE_ROOT = "outside root"
TOO_LARGE = "too large"
EMPTY = "empty"
NO_TEXT = "no text"
HIDDEN = "hidden"
DUPLICATE_PATH = "duplicate path"
NOT_REGULAR = "not a regular file"
UNREADABLE = "unreadable"


@dataclass(frozen=True)
class SkippedFile:
    """A file (or directory, or text) that gave no chunks, and why."""

    path: str
    reason: str


@dataclass
class DocumentSet:
    """The chunks read from a source, where each came from, and what was skipped."""

    chunks: list[str]
    sources: list[str]
    files_read: int
    skipped: list[SkippedFile] = field(default_factory=list)
    duplicates_dropped: int = 0
    fingerprint: str = ""
    from_texts: bool = False  # True when the source was a list of strings, not files

    def __len__(self) -> int:
        return len(self.chunks)

    def skipped_by_reason(self) -> dict[str, int]:
        """Count of skipped entries per reason, most frequent first."""
        return _count_reasons(self.skipped)

    def summary(self) -> str:
        """One line: chunks, files, skips by reason, duplicates dropped."""
        unit = "text" if self.from_texts else "file"
        line = (f"{_plural(len(self.chunks), 'chunk')} from "
                f"{_plural(self.files_read, unit)}")
        if self.skipped:
            reasons = ", ".join(f"{r}: {n}" for r, n in self.skipped_by_reason().items())
            line += f"; skipped {len(self.skipped)} ({reasons})"
        if self.duplicates_dropped:
            line += f"; {_plural(self.duplicates_dropped, 'duplicate chunk')} dropped"
        return line


def load_documents(
    source: str | os.PathLike[str] | Sequence[str],
    *,
    max_file_bytes: int = 50_000_000,
    chunk_chars: int = 1000,
    max_chunks: int | None = None,
    follow_symlinks_outside: bool = False,
    progress: bool = False,
) -> DocumentSet:
    """Read `source` into a DocumentSet of unique text chunks.

    `source` is a directory (walked recursively, in sorted order), a single file, or a
    list/tuple of raw texts (their sources are "<text 0>", "<text 1>", ...).
    Hidden entries (names starting with ".", e.g. .git, .env) are skipped as "hidden", and a
    file or folder reached twice through links is read once ("duplicate path").
    `max_chunks` caps the work: reading stops once that many unique chunks are kept, so
    files after that point in the sorted walk are neither read nor counted.
    Raises DocumentsError when the source is missing or yields no usable text.
    """
    _check_positive_int("max_file_bytes", max_file_bytes)
    _check_positive_int("chunk_chars", chunk_chars)
    if max_chunks is not None:
        _check_positive_int("max_chunks", max_chunks)

    builder = _Builder(chunk_chars, max_chunks)
    if isinstance(source, (list, tuple)):
        label = f"<{len(source)} texts>"
        _load_texts(source, builder)
        from_texts = True
    elif isinstance(source, (str, os.PathLike)):
        label = os.fspath(source)
        _load_path(label, builder, max_file_bytes, follow_symlinks_outside, progress)
        from_texts = False
    else:
        raise DocumentsError(
            f"source: expected a folder, a file or a list of texts, got {type(source).__name__}")

    result = builder.result(from_texts)
    if not result.chunks:
        raise DocumentsError(f"{label}: no readable text ({_why_empty(result)})")
    return result


# ---------------------------------------------------------------- sources

class _Builder:
    """Collects chunks in order, dropping duplicates and stopping at max_chunks."""

    def __init__(self, chunk_chars: int, max_chunks: int | None) -> None:
        self.chunk_chars = chunk_chars
        self.max_chunks = max_chunks
        self.chunks: list[str] = []
        self.sources: list[str] = []
        self.hashes: list[str] = []
        self.seen: set[str] = set()
        self.files_read = 0
        self.skipped: list[SkippedFile] = []
        self.duplicates = 0

    @property
    def full(self) -> bool:
        return self.max_chunks is not None and len(self.chunks) >= self.max_chunks

    def skip(self, path: str, reason: str) -> None:
        self.skipped.append(SkippedFile(path, reason))

    def add_text(self, origin: str, text: str) -> None:
        """Chunk one document's text; a document with no text is skipped as NO_TEXT."""
        pieces = chunk_text(text, self.chunk_chars)
        if not pieces:
            self.skip(origin, NO_TEXT)
            return
        self.files_read += 1
        for piece in pieces:
            if self.full:
                return
            digest = _chunk_hash(piece)
            if digest in self.seen:
                self.duplicates += 1
                continue
            self.seen.add(digest)
            self.chunks.append(piece)
            self.sources.append(origin)
            self.hashes.append(digest)

    def result(self, from_texts: bool) -> DocumentSet:
        fingerprint = hashlib.sha256("\n".join(sorted(self.hashes)).encode("ascii")).hexdigest()
        return DocumentSet(
            chunks=self.chunks,
            sources=self.sources,
            files_read=self.files_read,
            skipped=self.skipped,
            duplicates_dropped=self.duplicates,
            fingerprint=fingerprint,
            from_texts=from_texts,
        )


def _load_texts(texts: Sequence[Any], builder: _Builder) -> None:
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            hint = (" (pass a folder or one file path, not a list of paths)"
                    if isinstance(text, os.PathLike) else "")
            raise DocumentsError(
                f"texts[{i}]: expected a string of text, got {type(text).__name__}{hint}")
    for i, text in enumerate(texts):
        if builder.full:
            break
        origin = f"<text {i}>"
        if not text.strip():
            builder.skip(origin, EMPTY)
        else:
            builder.add_text(origin, text)


def _load_path(path: str, builder: _Builder, max_bytes: int, follow_outside: bool,
               progress: bool) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise DocumentsError(f"{path}: broken symlink") from None
        raise DocumentsError(f"{path}: no such file or directory") from None
    except OSError as exc:
        raise DocumentsError(f"{path}: cannot access ({_reason_for_oserror(exc)})") from None

    if stat.S_ISDIR(st.st_mode):
        files = _walk(path, builder, max_bytes, follow_outside)
    else:
        files = []
        reason = _precheck_file(st, max_bytes)
        if reason:
            builder.skip(path, reason)
        else:
            files.append(path)

    with _progress_bar(len(files), progress) as bar:
        for file_path in files:
            if builder.full:
                break
            try:
                text = _read_file(file_path, max_bytes)
            except _Skip as skip:
                builder.skip(file_path, skip.reason)
            else:
                builder.add_text(file_path, text)
            bar.update(1)


def _walk(root: str, builder: _Builder, max_bytes: int, follow_outside: bool) -> list[str]:
    """List readable regular files under root in sorted depth-first order, skipping the rest.

    Directory symlinks are followed only inside the root (unless follow_outside); a directory
    already walked is never entered again, which is what stops symlink loops.
    """
    root_real = os.path.realpath(root)
    root_st = os.stat(root)
    root_key = (root_st.st_dev, root_st.st_ino)
    seen_dirs: set[tuple[int, int]] = {root_key}
    seen_files: set[tuple[int, int]] = set()
    files: list[str] = []
    # Each entry: (directory path, the (dev, ino) of it and its ancestors).
    stack: list[tuple[str, frozenset[tuple[int, int]]]] = [(root, frozenset({root_key}))]

    while stack:
        directory, ancestors = stack.pop()
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            builder.skip(directory, _reason_for_oserror(exc))
            continue
        subdirs: list[tuple[str, frozenset[tuple[int, int]]]] = []
        for entry in entries:
            path = entry.path
            if entry.name.startswith("."):
                builder.skip(path, HIDDEN)  # .git, .env, editor files: never wanted, maybe secret
                continue
            try:
                if entry.is_symlink():
                    st = os.stat(path)  # follows the link; raises for broken links and loops
                    if not follow_outside and not _is_inside(os.path.realpath(path), root_real):
                        builder.skip(path, OUTSIDE_ROOT)
                        continue
                else:
                    st = entry.stat(follow_symlinks=False)
            except OSError as exc:
                builder.skip(path, _reason_for_oserror(exc, link=True))
                continue
            key = (st.st_dev, st.st_ino)
            if stat.S_ISDIR(st.st_mode):
                if key in ancestors:
                    builder.skip(path, SYMLINK_LOOP)
                elif key in seen_dirs:
                    builder.skip(path, DUPLICATE_PATH)
                else:
                    seen_dirs.add(key)
                    subdirs.append((path, ancestors | {key}))
                continue
            reason = _precheck_file(st, max_bytes)
            if reason is None and key in seen_files:
                reason = DUPLICATE_PATH  # a second link to a file already listed
            if reason:
                builder.skip(path, reason)
                continue
            seen_files.add(key)
            files.append(path)
        stack.extend(reversed(subdirs))  # pop order = sorted order
    return files


def _precheck_file(st: os.stat_result, max_bytes: int) -> str | None:
    """Reason to skip a file from its stat alone (before any read), or None."""
    if not stat.S_ISREG(st.st_mode):
        return NOT_REGULAR  # FIFOs, sockets, devices: opening them may block forever
    if st.st_size > max_bytes:
        return TOO_LARGE
    if st.st_size == 0:
        return EMPTY
    return None


def _is_inside(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:  # different drives on Windows
        return False


def _reason_for_oserror(exc: OSError, link: bool = False) -> str:
    if isinstance(exc, PermissionError):
        return PERMISSION_DENIED
    if exc.errno == errno.ELOOP:
        return SYMLINK_LOOP
    if link and exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return BROKEN_SYMLINK
    return UNREADABLE


@contextlib.contextmanager
def _progress_bar(total: int, enabled: bool) -> Iterator[Any]:
    if not enabled:
        yield _NoBar()
        return
    from tqdm import tqdm

    with tqdm(total=total, unit="file", desc="reading documents", file=sys.stderr) as bar:
        yield bar


class _NoBar:
    def update(self, n: int) -> None:
        pass


# ---------------------------------------------------------------- reading one file

class _Skip(Exception):
    """Raised inside a reader: the file gives no text, for this reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def extract_text(path: str | os.PathLike[str], max_file_bytes: int = 50_000_000) -> str:
    """The text of one file, as load_documents reads it. Raises DocumentsError if unusable."""
    name = os.fspath(path)
    try:
        st = os.stat(name)
    except OSError as exc:
        raise DocumentsError(f"{name}: cannot access ({_reason_for_oserror(exc)})") from None
    reason = _precheck_file(st, max_file_bytes)
    try:
        if reason:
            raise _Skip(reason)
        text = _read_file(name, max_file_bytes)
    except _Skip as skip:
        raise DocumentsError(f"{name}: {skip.reason}") from None
    return text


def _read_file(path: str, max_bytes: int) -> str:
    """Read one regular file (size already checked) and return its text, or raise _Skip."""
    suffix = Path(path).suffix.lower()
    if suffix in _BINARY_SUFFIXES:
        raise _Skip(BINARY)  # no need to open a photo or an archive to know
    if suffix in _UNSUPPORTED_SUFFIXES:
        raise _Skip(UNSUPPORTED)
    try:
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)  # +1: notice a file that grew since stat
    except OSError as exc:
        raise _Skip(_reason_for_oserror(exc)) from None
    if len(data) > max_bytes:
        raise _Skip(TOO_LARGE)
    if not data:
        raise _Skip(EMPTY)

    reader, corrupt = _READERS.get(suffix, (_read_unknown, UNREADABLE))
    try:
        text = reader(data)
    except _Skip:
        raise
    except Exception:  # a malformed file must never stop the whole load
        raise _Skip(corrupt) from None
    return _normalise(text)


def _read_plain(data: bytes) -> str:
    return _decode_bytes(data)


def _read_unknown(data: bytes) -> str:
    # Unknown extension: text only if it has no NUL bytes (or a UTF-16/32 BOM) and decodes.
    if b"\x00" in data[:8192] and not _bom_codec(data):
        raise _Skip(BINARY)
    try:
        return _decode_bytes(data)
    except _Skip:
        raise _Skip(BINARY) from None


def _read_html(data: bytes) -> str:
    parser = _HtmlText()
    parser.feed(_decode_bytes(data))
    parser.close()
    return parser.text()


def _read_pdf(data: bytes) -> str:
    from pypdf import PdfReader

    if b"%PDF-" not in data[:1024]:  # the header must sit in the first KiB; spares pypdf a long scan of junk
        raise _Skip(CORRUPT_PDF)
    with _quiet_logger("pypdf"):  # broken PDFs log many warnings pypdf recovers from
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            try:
                # Many "protected" PDFs open with an empty password; a falsy result means no.
                opened = bool(reader.decrypt(""))
            except Exception:  # e.g. an AES cipher without its optional dependency
                opened = False
            if not opened:
                raise _Skip(ENCRYPTED_PDF)
        pages = [page.extract_text() or "" for page in reader.pages]
    if not reader.pages:
        raise _Skip(CORRUPT_PDF)
    return "\n\n".join(pages)


def _read_docx(data: bytes) -> str:
    import docx

    document = docx.Document(io.BytesIO(data))
    parts = [p.text for p in document.paragraphs]
    for table in document.tables:
        for row in table.rows:
            cells = [c.text.strip() for c in row.cells]
            parts.append(" | ".join(c for c in cells if c))
    return "\n\n".join(p for p in parts if p.strip())


def _read_json(data: bytes) -> str:
    try:
        value = json.loads(_decode_bytes(data))
    except ValueError:
        raise _Skip(CORRUPT_JSON) from None
    return "\n\n".join(_record_text(item) for item in _top_items(value))


def _read_jsonl(data: bytes) -> str:
    records: list[str] = []
    parsed = 0
    for line in _decode_bytes(data).splitlines():
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError:
            continue  # one bad line should not lose the others
        parsed += 1
        records.append(_record_text(value))
    if not parsed:
        raise _Skip(CORRUPT_JSON)
    return "\n\n".join(records)


def _top_items(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _record_text(value: Any) -> str:
    """A record's text: its "text" field when present, else all its string values."""
    return "\n".join(s for s in _strings(value) if s.strip())


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        text = value.get("text")
        if isinstance(text, str):
            yield text
            return
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _read_csv(data: bytes, delimiter: str = ",") -> str:
    text = _decode_bytes(data)
    rows = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    lines = []
    for row in rows:
        cells = [cell.strip() for cell in row if cell.strip()]
        if cells:
            lines.append(", ".join(cells))
    return "\n".join(lines)


def _read_tsv(data: bytes) -> str:
    return _read_csv(data, delimiter="\t")


class _HtmlText(HTMLParser):
    """Visible text of an HTML page: no tags, scripts or styles; blocks become paragraphs."""

    _HIDDEN = {"script", "style", "noscript", "template"}
    _PARAGRAPH = {"p", "div", "section", "article", "header", "footer", "main", "nav",
                  "aside", "blockquote", "pre", "table", "ul", "ol", "dl", "form",
                  "h1", "h2", "h3", "h4", "h5", "h6", "title", "hr", "figure"}
    _LINE = {"br", "li", "tr", "dt", "dd", "td", "th", "caption", "option"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self._parts: list[str] = []
        self._hidden_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._HIDDEN:
            self._hidden_depth += 1
        self._break(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in self._HIDDEN and self._hidden_depth:
            self._hidden_depth -= 1
        self._break(tag)

    def handle_data(self, data: str) -> None:
        if not self._hidden_depth:
            self._parts.append(data)

    def _break(self, tag: str) -> None:
        if tag in self._PARAGRAPH:
            self._parts.append("\n\n")
        elif tag in self._LINE:
            self._parts.append("\n")

    def text(self) -> str:
        # HTML whitespace is not significant: collapse it within each line.
        lines = ("".join(self._parts)).split("\n")
        return "\n".join(" ".join(line.split()) for line in lines)


_TEXT_SUFFIXES = {
    ".txt", ".text", ".md", ".markdown", ".rst", ".adoc", ".org", ".tex", ".log",
    ".py", ".pyi", ".js", ".mjs", ".cjs", ".jsx", ".ts", ".tsx", ".go", ".c", ".h", ".cc",
    ".cpp", ".cxx", ".hpp", ".hh", ".java", ".kt", ".kts", ".scala", ".rs", ".rb", ".php",
    ".pl", ".pm", ".lua", ".r", ".jl", ".swift", ".m", ".mm", ".cs", ".fs", ".vb", ".dart",
    ".hs", ".ml", ".ex", ".exs", ".erl", ".clj", ".sh", ".bash", ".zsh", ".fish", ".ps1",
    ".bat", ".cmd", ".sql", ".yaml", ".yml", ".toml", ".ini", ".cfg", ".conf", ".properties",
    ".env", ".xml", ".xsd", ".gradle", ".cmake", ".mk", ".dockerfile", ".proto", ".graphql",
    ".css", ".scss", ".less", ".vue", ".svelte", ".tf", ".hcl",
}

_READERS: dict[str, tuple[Callable[[bytes], str], str]] = {
    **{suffix: (_read_plain, UNDECODABLE) for suffix in _TEXT_SUFFIXES},
    ".html": (_read_html, CORRUPT_HTML),
    ".htm": (_read_html, CORRUPT_HTML),
    ".xhtml": (_read_html, CORRUPT_HTML),
    ".svg": (_read_html, CORRUPT_HTML),  # only its <text> content is worth reading
    ".pdf": (_read_pdf, CORRUPT_PDF),
    ".docx": (_read_docx, CORRUPT_DOCX),
    ".json": (_read_json, CORRUPT_JSON),
    ".ipynb": (_read_json, CORRUPT_JSON),
    ".jsonl": (_read_jsonl, CORRUPT_JSON),
    ".ndjson": (_read_jsonl, CORRUPT_JSON),
    ".csv": (_read_csv, CORRUPT_CSV),
    ".tsv": (_read_tsv, CORRUPT_CSV),
}

_BINARY_SUFFIXES = {
    ".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ico", ".heic",
    ".mp3", ".wav", ".flac", ".ogg", ".m4a", ".mp4", ".mov", ".avi", ".mkv", ".webm",
    ".zip", ".gz", ".tgz", ".bz2", ".xz", ".zst", ".7z", ".rar", ".tar", ".jar", ".whl",
    ".exe", ".dll", ".so", ".dylib", ".o", ".a", ".bin", ".pyc", ".class", ".wasm",
    ".ttf", ".otf", ".woff", ".woff2", ".sqlite", ".db", ".parquet", ".npy", ".npz",
    ".pt", ".pth", ".safetensors", ".onnx", ".gguf", ".soe", ".iso", ".dmg",
}

# Office formats that need readers this SDK does not ship.
_UNSUPPORTED_SUFFIXES = {".doc", ".xls", ".xlsx", ".ppt", ".pptx", ".odt", ".ods", ".odp",
                         ".rtf", ".pages", ".key", ".numbers", ".epub"}


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    old = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old)


# ---------------------------------------------------------------- decoding

_BOMS = (  # UTF-32 first: its little-endian BOM starts with UTF-16's
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)


def _bom_codec(data: bytes) -> tuple[bytes, str] | None:
    for bom, codec in _BOMS:
        if data.startswith(bom):
            return bom, codec
    return None


def _decode_bytes(data: bytes) -> str:
    """Decode file bytes: BOM if any, then UTF-8, then charset-normalizer's best guess.

    Raises _Skip(BINARY) for bytes that decode only to control characters, and
    _Skip(UNDECODABLE) for bytes no encoding explains.
    """
    found = _bom_codec(data)
    if found:
        bom, codec = found
        try:
            text = data[len(bom):].decode(codec)
        except UnicodeDecodeError:
            raise _Skip(UNDECODABLE) from None
    else:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = _guess_decode(data)
    if _looks_binary(text):
        raise _Skip(BINARY)
    return text


def _guess_decode(data: bytes) -> str:
    import charset_normalizer

    matches = list(charset_normalizer.from_bytes(data))
    if not matches:
        raise _Skip(BINARY if _bytes_look_binary(data) else UNDECODABLE)
    best = matches[0]
    # Short texts fit many single-byte code pages equally well; among the equally good
    # guesses prefer Windows-1252, by far the most common legacy encoding of documents.
    for match in matches:
        if (match.chaos, match.coherence) != (best.chaos, best.coherence):
            break
        if "cp1252" in match.could_be_from_charset:
            try:
                return data.decode("cp1252")
            except UnicodeDecodeError:
                break
    return str(best)


_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1a\x1c-\x1f\ufffd]")


def _looks_binary(text: str) -> bool:
    sample = text[:8192]
    if "\x00" in sample:
        return True
    return len(_CONTROL.findall(sample)) > 0.05 * max(len(sample), 1)


def _bytes_look_binary(data: bytes) -> bool:
    sample = data[:8192]
    if b"\x00" in sample:
        return True
    controls = sum(1 for b in sample if b < 32 and b not in (9, 10, 12, 13, 27))
    return controls > 0.05 * max(len(sample), 1)


def _normalise(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\ufeff", "")
    return text.replace("\x00", "")


# ---------------------------------------------------------------- chunking

# Coarsest first: paragraphs, lines, sentences, words (spaces, then tabs).
_SEPARATORS = ("\n\n", "\n", ". ", " ", "\t")
_BLANK_LINES = re.compile(r"\n[ \t]*(?:\n[ \t]*)+")


def chunk_text(text: str, chunk_chars: int = 1000) -> list[str]:
    """Split text into chunks of at most `chunk_chars` characters, on the coarsest boundary
    that fits (paragraph, line, sentence, word); a single word longer than that is cut.
    Chunks are stripped and empty ones dropped."""
    _check_positive_int("chunk_chars", chunk_chars)
    text = _BLANK_LINES.sub("\n\n", text.replace("\r\n", "\n").replace("\r", "\n")).strip()
    if not text:
        return []
    pieces = _split(text, chunk_chars, 0)
    return [c for c in (p.strip() for p in pieces) if c]


def _split(text: str, size: int, level: int) -> list[str]:
    """Pieces of at most `size` characters that, joined back, give `text`."""
    if len(text) <= size:
        return [text]
    if level == len(_SEPARATORS):
        return [text[i:i + size] for i in range(0, len(text), size)]
    sep = _SEPARATORS[level]
    out: list[str] = []
    current: list[str] = []  # parts of the piece being filled, to be joined by sep
    current_len = 0
    for part in text.split(sep):
        subs = [part] if len(part) <= size else _split(part, size, level + 1)
        first = subs[0]
        # Merge across a `sep` boundary only; consecutive subs are already packed.
        if current and current_len + len(sep) + len(first) <= size:
            current.append(first)
            current_len += len(sep) + len(first)
        else:
            if current:
                out.append(sep.join(current))
            current, current_len = [first], len(first)
        for sub in subs[1:]:
            out.append(sep.join(current))
            current, current_len = [sub], len(sub)
    if current:
        out.append(sep.join(current))
    return out


def _chunk_hash(chunk: str) -> str:
    return hashlib.sha256(" ".join(chunk.split()).encode("utf-8")).hexdigest()


# ---------------------------------------------------------------- small helpers

def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise DocumentsError(f"{name}: must be a positive integer, got {value!r}")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _count_reasons(skipped: list[SkippedFile]) -> dict[str, int]:
    counts = Counter(s.reason for s in skipped)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _why_empty(result: DocumentSet) -> str:
    if not result.skipped:
        if result.from_texts:
            return "no texts given"
        return "no files found"
    unit = "text" if result.from_texts else "file"
    reasons = ", ".join(f"{r} {n}" for r, n in _count_reasons(result.skipped).items())
    return f"{_plural(len(result.skipped), unit)} skipped: {reasons}"
