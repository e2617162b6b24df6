"""Document ingestion under hostile input: it never crashes, never reads outside the root,
keeps memory bounded, and reports every file it skips with a reason.

Extends tests/test_documents.py (which covers each format, the basic skip reasons, a FIFO,
a 1 TiB sparse file, chmod 0 and the simple symlink cases) with property tests over random
trees, odd names, chained/relative/device symlinks proven by an audit hook, sparse files
with an RSS bound, over-long paths and unreadable folders.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from soe_sdk import documents as D
from soe_sdk.documents import DocumentSet, chunk_text, extract_text, load_documents
from soe_sdk.errors import DocumentsError

from .conftest import subprocess_env

REASONS = {D.BINARY, D.UNDECODABLE, D.CORRUPT_PDF, D.ENCRYPTED_PDF, D.CORRUPT_DOCX, D.CORRUPT_JSON,
           D.CORRUPT_HTML, D.CORRUPT_CSV, D.UNSUPPORTED, D.PERMISSION_DENIED, D.BROKEN_SYMLINK,
           D.SYMLINK_LOOP, D.OUTSIDE_ROOT, D.TOO_LARGE, D.EMPTY, D.NO_TEXT, D.HIDDEN, D.DUPLICATE_PATH,
           D.NOT_REGULAR, D.UNREADABLE}
SUFFIXES = ["", ".txt", ".md", ".json", ".jsonl", ".csv", ".tsv", ".html", ".svg", ".pdf", ".docx", ".py",
            ".ipynb", ".dat", ".png", ".xlsx", ".TXT", ".weird"]
ENCODINGS = ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "latin-1", "cp1252",
             "shift_jis", "koi8-r", "gb18030", "euc-kr", "cp437", "mac_roman"]
CHUNK = 200


def _inside(path: str, root: Path) -> bool:
    return os.path.commonpath([os.path.realpath(path), os.path.realpath(root)]) == os.path.realpath(root)


def check_invariants(ds: DocumentSet, root: Path) -> None:
    """What must hold of any result, whatever the input."""
    assert len(ds.chunks) == len(ds.sources) and ds.chunks
    assert all(0 < len(c) <= CHUNK and c == c.strip() for c in ds.chunks)
    normalised = [" ".join(c.split()) for c in ds.chunks]
    assert len(set(normalised)) == len(normalised)  # exact duplicates dropped
    assert all(_inside(s, root) for s in ds.sources)
    for skipped in ds.skipped:
        assert skipped.reason in REASONS, skipped
        assert os.path.commonpath([skipped.path, str(root)]) == str(root), skipped
    assert "\n" not in ds.summary()


# ---------------------------------------------------------------- random trees (hypothesis)

name_chars = st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00")
names = st.text(name_chars, min_size=1, max_size=24).filter(
    lambda n: n not in (".", "..") and len(n.encode("utf-8")) <= 120)


@st.composite
def file_content(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["bytes", "text", "json", "empty"]))
    if kind == "bytes":
        return draw(st.binary(max_size=1500))
    if kind == "empty":
        return b""
    text = draw(st.text(max_size=600))
    if kind == "json":
        text = json.dumps({"text": text, "n": draw(st.integers())})
    return text.encode(draw(st.sampled_from(ENCODINGS)), errors="replace")


tree_entries = st.lists(
    st.tuples(st.lists(names, max_size=3), names, st.sampled_from(SUFFIXES), file_content()),
    min_size=1, max_size=12)


def build_tree(root: Path, entries: list) -> int:
    """Create the files; return how many entries load_documents must account for.

    A hidden folder or file counts once (it is skipped as a whole); a path that collides
    with an earlier file or folder is simply not created.
    """
    created: set[Path] = set()
    for folders, stem, suffix, data in entries:
        path = root.joinpath(*folders, stem + suffix)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists() or path.is_symlink():
                continue
            path.write_bytes(data)
        except OSError:  # a folder name already used by a file, or a name too long
            continue
        created.add(path.relative_to(root))
    accounted: set[tuple[str, ...]] = set()
    for rel in created:
        parts = rel.parts
        hidden = next((i for i, part in enumerate(parts) if part.startswith(".")), None)
        accounted.add(parts if hidden is None else parts[:hidden + 1])
    return len(accounted)


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(entries=tree_entries)
def test_random_trees_never_crash_and_account_for_every_file(entries: list) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "docs"
        root.mkdir()
        expected = build_tree(root, entries)
        try:
            ds = load_documents(root, chunk_chars=CHUNK)
        except DocumentsError as exc:
            message = str(exc)
            assert message.startswith(str(root)) and "\n" not in message
            return
        check_invariants(ds, root)
        assert ds.files_read + len(ds.skipped) == expected


@pytest.mark.slow
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(entries=tree_entries)
def test_random_trees_long(entries: list) -> None:
    test_random_trees_never_crash_and_account_for_every_file.hypothesis.inner_test(entries)


text_without_controls = st.text(
    st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters="\ufffd\ufeff") | st.sampled_from("\n\t\r"),
    min_size=1, max_size=400).filter(lambda t: t.strip())


@settings(max_examples=60, deadline=None, derandomize=True)
@given(text=text_without_controls, encoding=st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-32"]),
       suffix=st.sampled_from([".txt", ".md", ".weird", ""]))
def test_unicode_encodings_round_trip(text: str, encoding: str, suffix: str) -> None:
    """UTF-8 (with or without BOM) and BOM-marked UTF-16/32 come back exactly (newlines normalised)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"doc{suffix}"
        path.write_bytes(text.encode(encoding))
        expected = text.replace("\r\n", "\n").replace("\r", "\n")
        assert extract_text(path) == expected
        # chunking keeps every non-space character, in order
        assert "".join("".join(chunk_text(expected, 50)).split()) == "".join(expected.split())


@settings(max_examples=60, deadline=None, derandomize=True)
@given(data=st.binary(min_size=1, max_size=3000), suffix=st.sampled_from(SUFFIXES))
def test_extract_text_on_random_bytes_is_text_or_a_reason(data: bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"blob{suffix}"
        path.write_bytes(data)
        try:
            text = extract_text(path)
        except DocumentsError as exc:
            message = str(exc)
            assert "\n" not in message and message.startswith(str(path))
            assert message[len(str(path)) + 2:] in REASONS
        else:
            assert isinstance(text, str) and "\x00" not in text


# ---------------------------------------------------------------- odd names, odd files

def test_odd_file_names_are_read(tmp_path: Path) -> None:
    root = tmp_path / "docs"
    root.mkdir()
    odd = ["with space.txt", "new\nline.txt", "tab\there.md", "-leading-dash.txt", "back\\slash.txt",
           "日本語のファイル.txt", "emoji 🚀.md", "é" * 120 + ".txt", "a" * 251 + ".txt", "dots...txt",
           "NUL-like \u2400.txt", "rtl \u202e.txt", "CON.txt", "semi;colon'quote\".txt"]
    for i, name in enumerate(odd):
        (root / name).write_text(f"document number {i} reads fine")
    nested = root.joinpath("sub dir", "ünïcode", "deeper\nstill")
    nested.mkdir(parents=True)
    (nested / "inner.txt").write_text("nested document")
    raw_name = os.fsencode(str(root)) + b"/latin1-\xe9t\xe9-\xff.txt"  # not valid UTF-8
    with open(raw_name, "wb") as handle:
        handle.write(b"undecodable name, readable text")

    ds = load_documents(root, chunk_chars=CHUNK)
    check_invariants(ds, root)
    assert ds.skipped == []
    assert ds.files_read == len(odd) + 2
    assert sorted(Path(s).name for s in ds.sources) == sorted(odd + ["inner.txt", os.fsdecode(raw_name).rsplit("/", 1)[1]])
    assert "undecodable name, readable text" in ds.chunks


def test_empty_files_of_every_format_are_reported(tmp_path: Path) -> None:
    root = tmp_path / "docs"
    root.mkdir()
    for suffix in SUFFIXES:
        (root / f"empty{suffix}").write_bytes(b"")
    (root / "ok.txt").write_text("something")
    (root / "empty dir").mkdir()
    ds = load_documents(root)
    assert {Path(s.path).name: s.reason for s in ds.skipped} == {f"empty{x}": D.EMPTY for x in SUFFIXES}
    assert ds.chunks == ["something"]


def test_sockets_and_devices_are_never_opened(tmp_path: Path) -> None:
    root = Path(tempfile.mkdtemp(prefix="soe", dir="/tmp"))  # short: a socket path is ≤ 108 bytes
    try:
        (root / "ok.txt").write_text("fine")
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(root / "sock"))
        os.mkfifo(root / "fifo.txt")
        (root / "zero").symlink_to("/dev/zero")
        (root / "null").symlink_to("/dev/null")
        ds = load_documents(root, follow_symlinks_outside=True)
        server.close()
        assert {Path(s.path).name: s.reason for s in ds.skipped} == {
            "sock": D.NOT_REGULAR, "fifo.txt": D.NOT_REGULAR, "zero": D.NOT_REGULAR, "null": D.NOT_REGULAR}
    finally:
        shutil.rmtree(root)


def test_paths_longer_than_the_os_allows_are_skipped(tmp_path: Path) -> None:
    """A tree deeper than PATH_MAX (built with dir_fd) is walked until the OS refuses, then skipped."""
    root = tmp_path / "docs"
    root.mkdir()
    (root / "top.txt").write_text("top level text")
    fd = os.open(root, os.O_RDONLY)
    try:
        for _ in range(120):  # 120 × 41 bytes > PATH_MAX (4096)
            os.mkdir("d" * 40, dir_fd=fd)
            child = os.open("d" * 40, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = child
        leaf = os.open("deep.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(leaf, b"too deep to name")
        os.close(leaf)
    finally:
        os.close(fd)
    ds = load_documents(root)
    assert ds.chunks == ["top level text"]
    assert len(ds.skipped) == 1 and ds.skipped[0].reason == D.UNREADABLE
    assert len(os.fsencode(ds.skipped[0].path)) > 4000


# ---------------------------------------------------------------- symlinks (proved by an audit hook)

_AUDIT_PROBE = r"""
import json, os, sys
outside = [os.path.realpath(p) for p in json.loads(sys.argv[3])]
touched = []
def audit(event, args):
    if event in ("open", "os.scandir", "os.listdir") and args and isinstance(args[0], (str, bytes, os.PathLike)):
        real = os.path.realpath(os.fsdecode(args[0]))
        if any(real == o or real.startswith(o + os.sep) for o in outside):
            touched.append([event, real])
from soe_sdk.documents import load_documents
import pypdf, docx, charset_normalizer  # lazily imported readers: import them before the hook
sys.addaudithook(audit)
ds = load_documents(sys.argv[1], follow_symlinks_outside=sys.argv[2] == "follow")
print(json.dumps({"touched": touched, "chunks": ds.chunks,
                  "skipped": {os.path.relpath(s.path, sys.argv[1]): s.reason for s in ds.skipped}}))
"""


def _audited_load(root: Path, outside: list[str], follow: bool) -> dict:
    done = subprocess.run([sys.executable, "-c", _AUDIT_PROBE, str(root), "follow" if follow else "stay",
                           json.dumps(outside)], capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_symlinks_never_lead_outside_the_root(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "nested").mkdir(parents=True)
    (outside / "secret.txt").write_text("OUTSIDE SECRET")
    (outside / "nested" / "deep.txt").write_text("OUTSIDE DEEP SECRET")
    root = tmp_path / "docs"
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "inside.txt").write_text("inside text")
    (root / "chain1").symlink_to("chain2")  # link → link → outside file
    (root / "chain2").symlink_to(outside / "secret.txt")
    (root / "relative.txt").symlink_to("../outside/secret.txt")
    (root / "a" / "dotdot").symlink_to("../../outside/nested")
    (root / "ancestor").symlink_to(tmp_path)  # contains the root itself
    (root / "slash").symlink_to("/")
    (root / "environ").symlink_to("/proc/self/environ")
    (root / "zero").symlink_to("/dev/zero")
    (root / "a" / "b" / "c" / "loop").symlink_to(root / "a")  # deep loop back up
    (root / "ping").symlink_to("pong")  # mutual file links: ELOOP
    (root / "pong").symlink_to("ping")
    (root / "inside-alias").symlink_to("a/b/../../inside.txt")  # stays inside

    result = _audited_load(root, [str(outside), "/proc/self/environ", "/dev/zero", "/etc", "/root"], follow=False)
    assert result["touched"] == []
    assert result["chunks"] == ["inside text"]
    assert result["skipped"] == {
        "a/b/c/loop": D.SYMLINK_LOOP, "a/dotdot": D.OUTSIDE_ROOT, "ancestor": D.OUTSIDE_ROOT,
        "chain1": D.OUTSIDE_ROOT, "chain2": D.OUTSIDE_ROOT, "environ": D.OUTSIDE_ROOT, "inside.txt": D.DUPLICATE_PATH,
        "ping": D.SYMLINK_LOOP, "pong": D.SYMLINK_LOOP, "relative.txt": D.OUTSIDE_ROOT, "slash": D.OUTSIDE_ROOT,
        "zero": D.OUTSIDE_ROOT}


def test_following_links_outside_still_never_opens_special_files(tmp_path: Path) -> None:
    root = tmp_path / "docs"
    root.mkdir()
    (root / "inside.txt").write_text("inside text")
    (root / "environ").symlink_to("/proc/self/environ")  # size 0 on procfs: skipped from its stat
    (root / "zero").symlink_to("/dev/zero")
    (root / "random").symlink_to("/dev/urandom")
    result = _audited_load(root, ["/proc/self/environ", "/dev/zero", "/dev/urandom"], follow=True)
    assert result["touched"] == []
    assert result["skipped"] == {"environ": D.EMPTY, "random": D.NOT_REGULAR, "zero": D.NOT_REGULAR}


# ---------------------------------------------------------------- sparse files and memory

_RSS_PROBE = r"""
import json, resource, sys
from soe_sdk.documents import load_documents
import pypdf, docx, charset_normalizer  # count the readers' code as baseline, not as growth
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
before = peak()
ds = load_documents(sys.argv[1])
print(json.dumps({"growth_mb": peak() - before, "chunks": ds.chunks,
                  "skipped": {s.path.rsplit("/", 1)[1]: s.reason for s in ds.skipped}}))
"""


def test_sparse_files_keep_memory_bounded(tmp_path: Path) -> None:
    """A 6 GB sparse file is refused from its size; 40 MB ones (under the 50 MB default limit)
    are read once and rejected, with peak RSS growth a small multiple of one file."""
    root = tmp_path / "docs"
    root.mkdir()
    (root / "ok.txt").write_text("the one real document")
    with open(root / "huge.txt", "wb") as handle:
        handle.truncate(6 << 30)  # never written: no disk used
    for suffix in (".log", ".json", ".pdf", ".docx", ".csv", ".html"):
        with open(root / f"zeros{suffix}", "wb") as handle:
            handle.truncate(40 << 20)
    done = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(root)], capture_output=True, text=True,
                          env=subprocess_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["chunks"] == ["the one real document"]
    assert result["skipped"] == {"huge.txt": D.TOO_LARGE, "zeros.csv": D.BINARY, "zeros.docx": D.CORRUPT_DOCX,
                                 "zeros.html": D.BINARY, "zeros.json": D.BINARY, "zeros.log": D.BINARY,
                                 "zeros.pdf": D.CORRUPT_PDF}
    assert result["growth_mb"] < 4 * 40 + 40, result  # ~3 copies of one 40 MB file at most


# ---------------------------------------------------------------- unreadable files (as a non-root user)

_UNREADABLE_PROBE = r"""
import json, sys
from soe_sdk.documents import load_documents
ds = load_documents(sys.argv[1])
print(json.dumps({"chunks": ds.chunks, "skipped": sorted([s.path.rsplit("/", 1)[1], s.reason] for s in ds.skipped)}))
"""


def test_unreadable_files_and_folders_are_skipped(tmp_path: Path) -> None:
    root = tmp_path / "docs"
    for sub in ("list-only", "enter-only", "closed"):
        (root / sub).mkdir(parents=True)
        (root / sub / f"in-{sub}.txt").write_text(f"inside {sub}")
    (root / "ok.txt").write_text("readable")
    (root / "write-only.txt").write_text("cannot be read")
    (root / "via-link.txt").symlink_to(root / "closed" / "in-closed.txt")
    (root / "write-only.txt").chmod(0o200)
    (root / "list-only").chmod(0o444)  # names visible, entries cannot be stat-ed
    (root / "enter-only").chmod(0o111)  # entries reachable by name, not listable
    (root / "closed").chmod(0)
    command = [sys.executable, "-c", _UNREADABLE_PROBE, str(root)]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: file permissions cannot be tested")
        command = ["setpriv", "--inh-caps=-all", "--bounding-set=-all", *command]  # drop CAP_DAC_OVERRIDE
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(), timeout=120)
    finally:
        for sub in ("list-only", "enter-only", "closed"):
            (root / sub).chmod(0o700)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["chunks"] == ["readable"]
    assert result["skipped"] == [["closed", D.PERMISSION_DENIED], ["enter-only", D.PERMISSION_DENIED],
                                 ["in-list-only.txt", D.PERMISSION_DENIED], ["via-link.txt", D.PERMISSION_DENIED],
                                 ["write-only.txt", D.PERMISSION_DENIED]]
