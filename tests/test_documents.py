"""Tests for soe_sdk.documents: real files of each format in tmp_path, real skips, chunking."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import docx
import pytest
from pypdf import PdfReader, PdfWriter

from soe_sdk.documents import DocumentSet, SkippedFile, chunk_text, extract_text, load_documents
from soe_sdk.errors import DocumentsError, SoeError


# ---------------------------------------------------------------- helpers

def write_pdf(path: Path, lines: list[str]) -> None:
    """A minimal valid one-page PDF showing `lines` in Helvetica, with a correct xref table."""
    ops = ["BT", "/F1 12 Tf", "14 TL", "72 720 Td"]
    for line in lines:
        escaped = line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        ops.append(f"({escaped}) Tj T*")
    ops.append("ET")
    stream = "\n".join(ops).encode("latin-1")
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
        b"/Resources << /Font << /F1 4 0 R >> >> /Contents 5 0 R >>",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref_at = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1, xref_at)
    path.write_bytes(bytes(out))


def write_docx(path: Path) -> None:
    document = docx.Document()
    document.add_heading("Quarterly maintenance plan", level=1)
    document.add_paragraph("The turbine inspection happens every ninety days.")
    table = document.add_table(rows=1, cols=2)
    table.rows[0].cells[0].text = "Valve"
    table.rows[0].cells[1].text = "Replace gasket"
    document.save(str(path))


def reasons_by_name(ds: DocumentSet) -> dict[str, str]:
    return {Path(s.path).name: s.reason for s in ds.skipped}


def all_text(ds: DocumentSet) -> str:
    return "\n".join(ds.chunks)


def text_of(ds: DocumentSet, name: str) -> str:
    return "\n".join(c for c, s in zip(ds.chunks, ds.sources) if Path(s).name == name)


# ---------------------------------------------------------------- each format is read

def test_reads_every_supported_format(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    (docs / "sub" / "deeper").mkdir(parents=True)
    (docs / "notes.txt").write_text("Plain text about pumps.\n", encoding="utf-8")
    (docs / "guide.md").write_text("# Guide\n\nMarkdown about valves.\n", encoding="utf-8")
    (docs / "spec.rst").write_text("Spec\n====\n\nRestructured text about seals.\n")
    (docs / "page.html").write_text(
        "<html><head><title>Page title</title><style>body{color:red}</style>"
        "<script>var secretScript = 1;</script></head>"
        "<body><p>Visible &amp; useful paragraph.</p><div>Second block</div></body></html>")
    (docs / "data.json").write_text(json.dumps(
        [{"id": 1, "text": "First JSON record."}, {"title": "Nested", "body": {"x": "deep string"}}]))
    (docs / "rows.jsonl").write_text(
        json.dumps({"text": "Line one text.", "meta": "ignored meta"}) + "\n"
        + "not json at all\n"
        + json.dumps({"a": "fallback string"}) + "\n")
    (docs / "table.csv").write_text("name,role\nAda,engineer\nLinus,maintainer\n")
    (docs / "sub" / "tool.py").write_text("def compressor_speed():\n    return 42\n")
    (docs / "sub" / "deeper" / "query.sql").write_text("SELECT * FROM flanges;\n")
    (docs / "sub" / "config.yaml").write_text("pressure: high\n")
    (docs / "README").write_text("A file without extension but with text.\n")
    (docs / "latin.txt").write_bytes(
        "Le café est très bon. Les élèves étudient à l'école, naïve façade.".encode("latin-1"))
    (docs / "wide.txt").write_text("UTF-16 text: Grüße aus München.", encoding="utf-16")
    (docs / "bom.txt").write_bytes("UTF-8 with a byte order mark.".encode("utf-8-sig"))
    write_pdf(docs / "report.pdf", ["Compressor maintenance report", "Check oil weekly"])
    write_docx(docs / "plan.docx")

    ds = load_documents(docs)

    assert ds.skipped == []
    assert ds.files_read == 16
    assert "Plain text about pumps." in text_of(ds, "notes.txt")
    assert "Markdown about valves." in text_of(ds, "guide.md")
    assert "Restructured text about seals." in text_of(ds, "spec.rst")
    html = text_of(ds, "page.html")
    assert "Visible & useful paragraph." in html and "Second block" in html
    assert "Page title" in html
    assert "secretScript" not in html and "color:red" not in html and "<p>" not in html
    data = text_of(ds, "data.json")
    assert "First JSON record." in data and "deep string" in data and "Nested" in data
    rows = text_of(ds, "rows.jsonl")
    assert "Line one text." in rows and "fallback string" in rows
    assert "ignored meta" not in rows and "not json" not in rows
    table = text_of(ds, "table.csv")
    assert "Ada, engineer" in table and "Linus, maintainer" in table
    assert "def compressor_speed" in text_of(ds, "tool.py")
    assert "SELECT * FROM flanges" in text_of(ds, "query.sql")
    assert "pressure: high" in text_of(ds, "config.yaml")
    assert "without extension" in text_of(ds, "README")
    assert "Le café est très bon" in text_of(ds, "latin.txt")
    assert "naïve façade" in text_of(ds, "latin.txt")
    assert "Grüße aus München" in text_of(ds, "wide.txt")
    assert text_of(ds, "bom.txt") == "UTF-8 with a byte order mark."
    pdf = text_of(ds, "report.pdf")
    assert "Compressor maintenance report" in pdf and "Check oil weekly" in pdf
    plan = text_of(ds, "plan.docx")
    assert "turbine inspection" in plan and "Quarterly maintenance plan" in plan
    assert "Valve" in plan and "Replace gasket" in plan
    assert len(ds.sources) == len(ds.chunks)
    assert "16 files" in ds.summary()


def test_hand_written_pdf_is_valid_for_pypdf(tmp_path: Path) -> None:
    # Guard for the helper itself: pypdf parses it without repairing anything.
    path = tmp_path / "a.pdf"
    write_pdf(path, ["Hello (PDF) world"])
    reader = PdfReader(str(path), strict=True)
    assert len(reader.pages) == 1
    assert "Hello (PDF) world" in reader.pages[0].extract_text()


def test_single_file_source_and_extract_text(tmp_path: Path) -> None:
    path = tmp_path / "one.md"
    path.write_text("Alpha paragraph.\n\nBeta paragraph.\n")
    ds = load_documents(path, chunk_chars=20)
    assert ds.chunks == ["Alpha paragraph.", "Beta paragraph."]
    assert ds.sources == [str(path), str(path)]
    assert ds.files_read == 1
    assert load_documents(str(path)).chunks == ["Alpha paragraph.\n\nBeta paragraph."]
    assert extract_text(path) == "Alpha paragraph.\n\nBeta paragraph.\n"
    binary = tmp_path / "blob.dat"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(DocumentsError, match=r"blob\.dat: binary"):
        extract_text(binary)


# ---------------------------------------------------------------- bad files are skipped

def test_encrypted_pdf(tmp_path: Path) -> None:
    plain = tmp_path / "plain.pdf"
    write_pdf(plain, ["Locked content here"])
    for name, user_password in (("locked.pdf", "secret"), ("open.pdf", "")):
        writer = PdfWriter(clone_from=str(plain))
        writer.encrypt(user_password=user_password, owner_password="owner", algorithm="RC4-128")
        writer.write(str(tmp_path / name))
    plain.unlink()
    ds = load_documents(tmp_path)
    # An empty user password opens the file; a real one cannot be guessed.
    assert ds.chunks == ["Locked content here"]
    assert reasons_by_name(ds) == {"locked.pdf": "encrypted pdf"}


def test_bad_files_are_skipped_with_reasons(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "good.txt").write_text("The only good document.")
    (docs / "blob.dat").write_bytes(b"\x00\x01\x02binary\x00\xff" * 50)
    (docs / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    (docs / "broken.pdf").write_bytes(b"%PDF-1.4\nthis is not really a pdf\n")
    (docs / "broken.docx").write_bytes(b"PK\x03\x04 not a zip archive")
    (docs / "broken.json").write_text("{ not: valid json,,, ")
    (docs / "empty.txt").write_bytes(b"")
    (docs / "blank.md").write_text("   \n\n\t\n")
    (docs / "big.txt").write_text("x" * 5000)
    (docs / "sheet.xlsx").write_bytes(b"PK\x03\x04whatever")
    (docs / ".env").write_text("SECRET=1")

    ds = load_documents(docs, max_file_bytes=4000)

    assert reasons_by_name(ds) == {
        "blob.dat": "binary",
        "photo.png": "binary",
        "broken.pdf": "corrupt pdf",
        "broken.docx": "corrupt docx",
        "broken.json": "corrupt json",
        "empty.txt": "empty",
        "blank.md": "no text",
        "big.txt": "too large",
        "sheet.xlsx": "unsupported format",
        ".env": "hidden",
    }
    assert ds.chunks == ["The only good document."]
    assert ds.files_read == 1
    assert ds.skipped_by_reason() == {
        "binary": 2, "corrupt docx": 1, "corrupt json": 1, "corrupt pdf": 1, "empty": 1,
        "hidden": 1, "no text": 1, "too large": 1, "unsupported format": 1}
    assert all(isinstance(s, SkippedFile) for s in ds.skipped)
    summary = ds.summary()
    assert summary.startswith("1 chunk from 1 file; skipped 10 (binary: 2, corrupt docx: 1")
    assert "\n" not in summary


def test_too_large_file_is_never_read(tmp_path: Path) -> None:
    # Both are refused from their stat alone: a FIFO would block a read forever, and a
    # sparse file of 1 TiB would be a disaster to read.
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "ok.txt").write_text("small")
    big = docs / "huge.txt"
    big.write_text("y" * 10_000)
    fifo = docs / "pipe"
    os.mkfifo(fifo)
    with open(docs / "sparse.txt", "wb") as fh:
        fh.truncate(1 << 40)
    ds = load_documents(docs, max_file_bytes=100)
    assert reasons_by_name(ds) == {
        "huge.txt": "too large", "pipe": "not a regular file", "sparse.txt": "too large"}
    assert load_documents(docs).skipped_by_reason() == {
        "not a regular file": 1, "too large": 1}


_PERMISSION_PROBE = """
import json, sys
from soe_sdk.documents import load_documents
ds = load_documents(sys.argv[1])
print(json.dumps({"chunks": ds.chunks, "skipped": [[s.path, s.reason] for s in ds.skipped]}))
"""


def _load_without_privileges(docs: Path) -> dict:
    """load_documents(docs) in a process that file permissions apply to, even under root."""
    if os.geteuid() != 0:
        command = [sys.executable, "-c", _PERMISSION_PROBE, str(docs)]
    elif shutil.which("setpriv"):
        # Root reads anything through CAP_DAC_OVERRIDE; drop every capability instead.
        command = ["setpriv", "--inh-caps=-all", "--bounding-set=-all",
                   sys.executable, "-c", _PERMISSION_PROBE, str(docs)]
    else:
        pytest.skip("running as root without setpriv: file permissions cannot be tested")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    if done.returncode != 0 and "setpriv" in done.stderr:
        pytest.skip(f"setpriv unavailable here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_permission_denied_is_skipped(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    (docs / "closed").mkdir(parents=True)
    (docs / "ok.txt").write_text("readable")
    (docs / "closed" / "inner.txt").write_text("behind a locked folder")
    locked = docs / "locked.txt"
    locked.write_text("secret")
    locked.chmod(0)
    (docs / "closed").chmod(0)
    try:
        result = _load_without_privileges(docs)
    finally:
        locked.chmod(0o600)
        (docs / "closed").chmod(0o700)
    assert result["chunks"] == ["readable"]
    assert sorted(result["skipped"]) == [
        [str(docs / "closed"), "permission denied"],
        [str(locked), "permission denied"],
    ]


def test_symlinks_broken_loop_and_outside_root(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("Outside secret text.")
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "real.txt").write_text("Inside text.")
    (docs / "broken").symlink_to(docs / "missing.txt")
    (docs / "self").symlink_to(docs / "self")  # a link to itself: ELOOP
    (docs / "sub" / "up").symlink_to(docs)  # a directory loop back to the root
    (docs / "leak.txt").symlink_to(outside / "secret.txt")
    (docs / "leakdir").symlink_to(outside)
    (docs / "alias.txt").symlink_to(docs / "real.txt")  # inside root: allowed, read once

    ds = load_documents(docs)
    assert reasons_by_name(ds) == {
        "broken": "broken symlink",
        "self": "symlink loop",
        "up": "symlink loop",
        "leak.txt": "outside root",
        "leakdir": "outside root",
        "real.txt": "duplicate path",  # alias.txt sorts first and reads the same file
    }
    assert ds.chunks == ["Inside text."]
    assert "Outside secret" not in all_text(ds)

    followed = load_documents(docs, follow_symlinks_outside=True)
    assert "Outside secret text." in followed.chunks
    # The same file reached through leak.txt and leakdir/secret.txt is read once.
    assert followed.chunks.count("Outside secret text.") == 1
    assert followed.skipped_by_reason()["duplicate path"] == 2


def test_root_given_as_symlink_is_walked(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (real / "a.txt").write_text("through the root link")
    link = tmp_path / "link"
    link.symlink_to(real)
    ds = load_documents(link)
    assert ds.chunks == ["through the root link"]
    assert ds.skipped == []


# ---------------------------------------------------------------- chunking

def test_chunks_respect_size_and_word_boundaries() -> None:
    rng = random.Random(7)
    vocabulary = ["pump", "valve", "seal", "turbine", "gasket", "flange", "rotor"]
    paragraphs = [" ".join(rng.choice(vocabulary) for _ in range(rng.randint(3, 300)))
                  for _ in range(30)]
    text = "\n\n".join(paragraphs)
    for size in (40, 200, 1000):
        chunks = chunk_text(text, size)
        assert all(0 < len(c) <= size for c in chunks)
        words = [w for c in chunks for w in c.split()]
        assert words == text.split()  # no word cut, none lost, order kept
    # Short paragraphs are packed together up to the size.
    assert chunk_text("one.\n\ntwo.\n\nthree.", 100) == ["one.\n\ntwo.\n\nthree."]
    assert chunk_text("one.\n\ntwo.\n\nthree.", 11) == ["one.\n\ntwo.", "three."]


def test_oversized_token_is_cut_and_blank_chunks_dropped() -> None:
    chunks = chunk_text("short " + "x" * 25 + " tail", 10)
    assert chunks == ["short", "xxxxxxxxxx", "xxxxxxxxxx", "xxxxx tail"]
    assert chunk_text(" \n\n \t \n", 10) == []
    with pytest.raises(DocumentsError, match="chunk_chars"):
        chunk_text("abc", 0)


def test_long_document_is_split_into_many_chunks(tmp_path: Path) -> None:
    path = tmp_path / "long.txt"
    lines = [f"Line number {i} describes maintenance step {i * 7}." for i in range(400)]
    path.write_text("\n".join(lines))
    ds = load_documents(path, chunk_chars=300)
    assert len(ds.chunks) > 40
    assert all(len(c) <= 300 for c in ds.chunks)
    assert "\n".join(ds.chunks).split("\n") == lines  # cut only at line ends


# ---------------------------------------------------------------- duplicates, order, caps

def test_duplicate_chunks_dropped_and_counted(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("Shared boilerplate footer.\n\nUnique to a.")
    (docs / "b.txt").write_text("Shared   boilerplate\nfooter.\n\nUnique to b.")  # same words
    (docs / "c.txt").write_text("Unique to a.")
    ds = load_documents(docs, chunk_chars=30)
    assert ds.chunks == ["Shared boilerplate footer.", "Unique to a.", "Unique to b."]
    assert ds.sources == [str(docs / "a.txt"), str(docs / "a.txt"), str(docs / "b.txt")]
    assert ds.duplicates_dropped == 2
    assert ds.files_read == 3
    assert ds.summary() == "3 chunks from 3 files; 2 duplicate chunks dropped"


def test_list_of_texts(tmp_path: Path) -> None:
    ds = load_documents(["First text.", "   ", "Second text.", "First text."])
    assert ds.chunks == ["First text.", "Second text."]
    assert ds.sources == ["<text 0>", "<text 2>"]
    assert ds.skipped == [SkippedFile("<text 1>", "empty")]
    assert ds.duplicates_dropped == 1
    assert ds.summary() == ("2 chunks from 3 texts; skipped 1 (empty: 1); "
                            "1 duplicate chunk dropped")
    assert load_documents(("tuple text",)).chunks == ["tuple text"]
    with pytest.raises(DocumentsError, match=r"texts\[1\]: expected a string.*not a list of paths"):
        load_documents(["ok", tmp_path])


def test_fingerprint_is_stable_and_order_independent(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    (docs / "z").mkdir(parents=True)
    for i in range(12):
        (docs / ("z" if i % 2 else ".") / f"f{i:02d}.txt").write_text(
            "\n\n".join(f"Document {i} paragraph {p}." for p in range(5)))
    first = load_documents(docs, chunk_chars=40)
    second = load_documents(docs, chunk_chars=40)
    assert first.chunks == second.chunks and first.sources == second.sources
    assert first.fingerprint == second.fingerprint
    assert len(first.fingerprint) == 64
    # Same chunks in another order give the same fingerprint; other chunks do not.
    assert load_documents(list(reversed(first.chunks))).fingerprint == first.fingerprint
    assert load_documents(first.chunks[:-1]).fingerprint != first.fingerprint
    assert load_documents(docs, chunk_chars=80).fingerprint != first.fingerprint
    # Sorted walk: root files first in name order, then sub-folders.
    names = [Path(s).name for s in dict.fromkeys(first.sources)]
    assert names == [f"f{i:02d}.txt" for i in range(0, 12, 2)] + [
        f"f{i:02d}.txt" for i in range(1, 12, 2)]


def test_max_chunks_keeps_first_chunks_and_stops_reading(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(5):
        (docs / f"doc{i}.txt").write_text(f"Alpha {i}.\n\nBeta {i}.")
    (docs / "zz.bin").write_bytes(b"\x00" * 10)  # after the cap: never looked at by read
    full = load_documents(docs, chunk_chars=10)
    capped = load_documents(docs, chunk_chars=10, max_chunks=3)
    assert capped.chunks == full.chunks[:3]
    assert capped.files_read == 2
    assert capped.skipped == []
    assert full.skipped_by_reason() == {"binary": 1}


# ---------------------------------------------------------------- errors

def test_missing_path_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DocumentsError, match=r"nope: no such file or directory$"):
        load_documents(missing)


def test_no_usable_text_error_names_reasons(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(3):
        (docs / f"b{i}.bin").write_bytes(bytes([0, 1, 2, 3]) * 10)
    (docs / "e.txt").write_bytes(b"")
    with pytest.raises(DocumentsError) as info:
        load_documents(docs)
    message = str(info.value)
    assert message == f"{docs}: no readable text (4 files skipped: binary 3, empty 1)"
    assert isinstance(info.value, SoeError)

    empty_dir = tmp_path / "void"
    empty_dir.mkdir()
    with pytest.raises(DocumentsError, match=r"void: no readable text \(no files found\)"):
        load_documents(empty_dir)
    with pytest.raises(DocumentsError, match=r"no readable text \(no texts given\)"):
        load_documents([])
    with pytest.raises(DocumentsError, match=r"1 text skipped: empty 1"):
        load_documents([""])


def test_bad_arguments_are_rejected(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("text")
    with pytest.raises(DocumentsError, match="max_file_bytes"):
        load_documents(tmp_path, max_file_bytes=0)
    with pytest.raises(DocumentsError, match="max_chunks"):
        load_documents(tmp_path, max_chunks=0)
    with pytest.raises(DocumentsError, match="source: expected"):
        load_documents(42)  # type: ignore[arg-type]


def test_progress_bar_does_not_change_result(tmp_path: Path, capsys) -> None:
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text(f"progress text {i}")
    quiet = load_documents(tmp_path)
    loud = load_documents(tmp_path, progress=True)
    assert loud.chunks == quiet.chunks
    assert "reading documents" in capsys.readouterr().err
