"""The .soe archive: bit-exact round trip, lazy verified reads, and clear rejection of corruption."""
from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import soe_sdk
from soe_sdk.archive import Archive, write_archive
from soe_sdk.errors import ArchiveError, SoeError

from .conftest import make_soup_tensors, write_tiny_soup


def _rewrite_header(path: Path, edit) -> None:
    """Apply `edit(header_dict)` and write the file back with a correct length prefix."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + length:])


def _expect_rejected(path: Path, pattern: str) -> None:
    with pytest.raises(SoeError, match=pattern) as info:
        soup = soe_sdk.load(path)
        soup.archive.verify_all()
    message = str(info.value)
    assert str(path) in message and "\n" not in message


def test_round_trip_is_bit_exact(tmp_path: Path) -> None:
    path = tmp_path / "soup.soe"
    config = write_tiny_soup(path, n=3, seed=5)
    original = make_soup_tensors(config, 5)
    with Archive(path) as archive:
        for name, tensor in original.items():
            assert torch.equal(archive.tensor(name), tensor), name
        assert archive.verify_all() == len(archive.names())
    # any safetensors reader opens it, and sees the same bytes
    with safe_open(str(path), framework="pt") as handle:
        assert torch.equal(handle.get_tensor("experts.h.1.attn.qkv.weight"), original["experts.h.1.attn.qkv.weight"])
        assert handle.metadata()["format"] == "soe-archive"


def test_metadata_is_complete(tiny_soup_path: Path) -> None:
    meta = soe_sdk.load(tiny_soup_path).metadata
    for key in ("soup_config", "embedder", "tokenizer", "provenance", "checksums", "sdk_version", "storage_dtype"):
        assert key in meta
    assert meta["soup_config"]["router"] == {"k": 4, "n": 3, "hidden": 8}
    assert json.loads(meta["tokenizer"])["model"]["type"] == "BPE"


def test_tensors_are_read_lazily(tiny_soup_path: Path) -> None:
    archive = Archive(tiny_soup_path)
    assert archive._verified == set()  # opening reads only the header
    archive.tensor("shared.wte.weight")
    assert archive._verified == {"shared.wte.weight"}


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "a.soe"
    write_tiny_soup(path, seed=1)
    before = path.read_bytes()

    class Boom(Exception):
        pass

    def failing():
        yield "x", torch.zeros(3)
        raise Boom()

    with pytest.raises(Boom):
        write_archive(path, failing(), {})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.soe"]


def test_unwritable_destination_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ArchiveError, match="cannot write|Not a directory|File exists"):
        write_tiny_soup(blocker / "soup.soe")


def test_truncated_archives_are_rejected(tiny_soup_path: Path, tmp_path: Path) -> None:
    raw = tiny_soup_path.read_bytes()
    for cut in (0, 5, 8, 100, len(raw) // 2, len(raw) - 1):
        bad = tmp_path / f"cut{cut}.soe"
        bad.write_bytes(raw[:cut])
        _expect_rejected(bad, "truncated|not a .soe archive|only")


def test_bit_flips_in_tensor_data_are_caught(tiny_soup_path: Path, tmp_path: Path) -> None:
    raw = bytearray(tiny_soup_path.read_bytes())
    (length,) = struct.unpack("<Q", raw[:8])
    for offset in (8 + length, 8 + length + 777, len(raw) - 3):
        flipped = bytearray(raw)
        flipped[offset] ^= 0x10
        bad = tmp_path / f"flip{offset}.soe"
        bad.write_bytes(bytes(flipped))
        _expect_rejected(bad, "checksum mismatch")


def test_tampered_metadata_is_caught(tiny_soup_path: Path) -> None:
    def edit(header):
        soe = json.loads(header["__metadata__"]["soe"])
        soe["soup_config"]["router"]["n"] = 2
        header["__metadata__"]["soe"] = json.dumps(soe)
    _rewrite_header(tiny_soup_path, edit)
    _expect_rejected(tiny_soup_path, "metadata checksum mismatch")


def test_wrong_version_is_rejected_with_advice(tiny_soup_path: Path) -> None:
    _rewrite_header(tiny_soup_path, lambda h: h["__metadata__"].update(format_version="99"))
    _expect_rejected(tiny_soup_path, "version '99' is not supported.*upgrade")


def test_non_archives_are_rejected(tmp_path: Path) -> None:
    text = tmp_path / "notes.soe"
    text.write_text("hello world, this is not an archive at all")
    _expect_rejected(text, "not a .soe archive")
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    _expect_rejected(plain, "not a .soe archive")
    _expect_rejected(tmp_path, "is a directory")
    _expect_rejected(tmp_path / "missing.soe", "no such file")


def test_forged_header_length_is_rejected(tiny_soup_path: Path) -> None:
    raw = bytearray(tiny_soup_path.read_bytes())
    raw[:8] = struct.pack("<Q", 2**62)
    tiny_soup_path.write_bytes(bytes(raw))
    _expect_rejected(tiny_soup_path, "implausible header length")


def test_wrong_shape_and_missing_tensor_are_rejected(tiny_soup_path: Path, tmp_path: Path) -> None:
    def shrink(header):
        entry = header["shared.ln_f.bias"]
        entry["shape"] = [entry["shape"][0] // 2]
    _rewrite_header(tiny_soup_path, shrink)
    _expect_rejected(tiny_soup_path, "size does not match its shape")

    other = tmp_path / "missing.soe"
    write_tiny_soup(other)
    source = Archive(other)
    tensors = {name: source.tensor(name).clone() for name in source.names() if name != "experts.h.0.mlp.fc.bias"}
    meta = dict(source.metadata)
    meta.pop("checksums")
    write_archive(other, tensors, meta)
    _expect_rejected(other, "tensor 'experts.h.0.mlp.fc.bias' is missing")


def test_soe_info_summarises_and_verifies(tiny_soup_path: Path, tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "soe_sdk.cli", "info", str(tiny_soup_path)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "n=3 experts" in out.stdout and "k=4 domains" in out.stdout and "tensors verified" in out.stdout
    data = json.loads(subprocess.run([sys.executable, "-m", "soe_sdk.cli", "info", "--json", str(tiny_soup_path)],
                                     capture_output=True, text=True, check=True).stdout)
    assert data["parameters"]["instantiated"] == soe_sdk.load(tiny_soup_path).model_config.num_parameters()
    from soe_sdk import fused
    assert data["merge_kernel"] == fused.instruction_set() and "merge      " in out.stdout
    bad = tmp_path / "bad.soe"
    raw = bytearray(tiny_soup_path.read_bytes())
    raw[-2] ^= 1
    bad.write_bytes(bytes(raw))
    failed = subprocess.run([sys.executable, "-m", "soe_sdk.cli", "info", str(bad)], capture_output=True, text=True)
    assert failed.returncode == 1
    assert failed.stderr.strip().count("\n") == 0 and "checksum mismatch" in failed.stderr
    assert "Traceback" not in failed.stderr
