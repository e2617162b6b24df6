"""The `.soe` archive: one safetensors file holding a whole soup, read lazily and verified.

Layout (any safetensors reader can open it; nothing is ever unpickled):

    8-byte little-endian header length N | N bytes of JSON header | tensor bytes

The header's `__metadata__` carries `format` = "soe-archive", `format_version`, `soe` (a JSON
document: configs, embedder, tokenizer, provenance, per-tensor SHA-256) and `soe_sha256`
(the digest of that JSON text, so tampered metadata is caught too). Tensors are
memory-mapped and each one's digest is checked the first time it is read. Every problem
is an `ArchiveError` whose one-line message names the file.

Writing streams the tensors into a temporary file beside the target, fsyncs it and renames
it into place, so a reader never sees a half-written archive.
"""
from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import struct
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import ArchiveError

FORMAT_NAME = "soe-archive"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024 * 1024  # a header larger than this is corrupt, not a big soup

_DTYPES: dict[str, tuple[torch.dtype, np.dtype]] = {
    "F32": (torch.float32, np.dtype("<f4")),
    "F16": (torch.float16, np.dtype("<f2")),
    "BF16": (torch.bfloat16, np.dtype("<u2")),  # NumPy has no bfloat16: read raw, view in torch
    "I64": (torch.int64, np.dtype("<i8")),
    "I32": (torch.int32, np.dtype("<i4")),
    "U8": (torch.uint8, np.dtype("u1")),
}
_TORCH_TO_CODE = {torch_dtype: code for code, (torch_dtype, _) in _DTYPES.items()}


def _sha256(data: bytes | memoryview | np.ndarray) -> str:
    return hashlib.sha256(memoryview(data).cast("B") if not isinstance(data, bytes) else data).hexdigest()


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    tensor = tensor.detach().to("cpu").contiguous()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.uint16) if hasattr(torch, "uint16") else tensor.view(torch.int16)
    return tensor.numpy().tobytes()


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def write_archive(path: str | Path, tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                  metadata: Mapping[str, Any]) -> str:
    """Write tensors and metadata to `path` atomically; return the file's SHA-256.

    `metadata` must be JSON-serialisable; per-tensor checksums are added to it here.
    """
    path = Path(path)
    items = list(tensors.items()) if isinstance(tensors, Mapping) else list(tensors)
    header: dict[str, Any] = {}
    checksums: dict[str, str] = {}
    blobs: list[bytes] = []
    offset = 0
    for name, tensor in items:
        if tensor.dtype not in _TORCH_TO_CODE:
            raise ArchiveError(f"{path}: tensor {name} has unsupported dtype {tensor.dtype}")
        blob = _tensor_bytes(tensor)
        header[name] = {"dtype": _TORCH_TO_CODE[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        checksums[name] = _sha256(blob)
        blobs.append(blob)
        offset += len(blob)
    document = dict(metadata)
    document["checksums"] = checksums
    # dtype and shape live in the unsigned header: sign them here so a forged header is caught.
    document["layout"] = {name: [entry["dtype"], entry["shape"]] for name, entry in header.items()}
    soe_text = json.dumps(document, sort_keys=True, separators=(",", ":"))
    header["__metadata__"] = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION),
                              "soe": soe_text, "soe_sha256": hashlib.sha256(soe_text.encode()).hexdigest()}
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # safetensors aligns the data to 8 bytes

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise ArchiveError(f"{path}: cannot write archive ({exc.strerror or exc})") from None
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as handle:
            for chunk in (struct.pack("<Q", len(header_bytes)), header_bytes, *blobs):
                handle.write(chunk)
                digest.update(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o666 & ~_umask())  # mkstemp makes 0600; an archive is meant to be shared
        os.replace(tmp_name, path)
    except OSError as exc:
        Path(tmp_name).unlink(missing_ok=True)
        raise ArchiveError(f"{path}: cannot write archive ({exc.strerror or exc})") from None
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return digest.hexdigest()


class Archive:
    """A read-only, memory-mapped `.soe` file. Tensors are read (and verified) on demand."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._verified: set[str] = set()
        self._file = self._open()
        try:
            self._size = os.fstat(self._file.fileno()).st_size
            self._header, self._data_start = self._read_header()
            self.metadata: dict[str, Any] = self._read_metadata()
            self._entries = self._check_entries()
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if self._size else None
        except BaseException:
            self._file.close()
            raise

    # -- opening and structural validation -------------------------------------------------
    def _fail(self, problem: str) -> ArchiveError:
        return ArchiveError(f"{self.path}: {problem}")

    def _open(self):
        try:
            if self.path.is_dir():
                raise self._fail("is a directory, not a .soe archive")
            return open(self.path, "rb")
        except FileNotFoundError:
            raise self._fail("no such file") from None
        except PermissionError:
            raise self._fail("permission denied") from None
        except OSError as exc:
            raise self._fail(f"cannot open ({exc.strerror or exc})") from None

    def _read_header(self) -> tuple[dict[str, Any], int]:
        if self._size < 8:
            raise self._fail(f"not a .soe archive (only {self._size} bytes)")
        (length,) = struct.unpack("<Q", self._file.read(8))
        if length == 0 or length > MAX_HEADER_BYTES:
            raise self._fail("not a .soe archive (implausible header length)")
        if 8 + length > self._size:
            raise self._fail(f"truncated archive (header needs {8 + length} bytes, file has {self._size})")
        raw = self._file.read(length)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):  # RecursionError: absurd nesting
            raise self._fail("not a .soe archive (header is not valid JSON)") from None
        if not isinstance(header, dict):
            raise self._fail("not a .soe archive (header is not a JSON object)")
        return header, 8 + length

    def _read_metadata(self) -> dict[str, Any]:
        meta = self._header.get("__metadata__")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            raise self._fail("not a .soe archive (safetensors file without soup metadata)"
                             if isinstance(meta, dict) or "__metadata__" not in self._header
                             else "not a .soe archive (bad metadata)")
        version = meta.get("format_version")
        if version != str(FORMAT_VERSION):
            raise self._fail(f"archive format version {version!r} is not supported by this SDK "
                             f"(it reads version {FORMAT_VERSION}); upgrade soe-sdk or re-pack the soup")
        soe_text = meta.get("soe")
        if not isinstance(soe_text, str) or hashlib.sha256(soe_text.encode()).hexdigest() != meta.get("soe_sha256"):
            raise self._fail("corrupted archive (metadata checksum mismatch)")
        try:
            document = json.loads(soe_text)
        except (json.JSONDecodeError, RecursionError):
            raise self._fail("corrupted archive (metadata is not valid JSON)") from None
        if not isinstance(document, dict) or not isinstance(document.get("checksums"), dict):
            raise self._fail("corrupted archive (metadata lacks tensor checksums)")
        return document

    def _check_entries(self) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
        entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        data_len = self._size - self._data_start
        spans: list[tuple[int, int]] = []
        for name, info in self._header.items():
            if name == "__metadata__":
                continue
            if not isinstance(info, dict):
                raise self._fail(f"corrupted archive (bad entry for tensor {name!r})")
            dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
            if not isinstance(dtype, str) or dtype not in _DTYPES:
                raise self._fail(f"corrupted archive (tensor {name!r} has unknown dtype {dtype!r})")
            if (not isinstance(shape, list) or not all(isinstance(s, int) and 0 <= s < 2**40 for s in shape)
                    or not isinstance(offsets, list) or len(offsets) != 2
                    or not all(isinstance(o, int) for o in offsets)):
                raise self._fail(f"corrupted archive (tensor {name!r} has a malformed shape or offsets)")
            begin, end = offsets
            count = math.prod(shape)  # exact: NumPy's int64 product would wrap for forged shapes
            if not 0 <= begin <= end or end - begin != count * _DTYPES[dtype][1].itemsize:
                raise self._fail(f"corrupted archive (tensor {name!r}: size does not match its shape)")
            if end > data_len:
                raise self._fail(f"truncated archive (tensor {name!r} ends past the end of the file)")
            entries[name] = (dtype, tuple(shape), begin, end)
            spans.append((begin, end))
        spans.sort()
        for (_, prev_end), (begin, _) in zip(spans, spans[1:]):
            if begin < prev_end:
                raise self._fail("corrupted archive (tensor data regions overlap)")
        used = spans[-1][1] if spans else 0
        if used != data_len:
            raise self._fail(f"corrupted archive ({data_len - used} unexpected bytes after the tensor data)")
        checksums = self.metadata["checksums"]
        if set(checksums) != set(entries):
            missing = sorted(set(checksums) - set(entries)) or sorted(set(entries) - set(checksums))
            raise self._fail(f"corrupted archive (tensor set does not match its checksums: {missing[0]!r})")
        layout = self.metadata.get("layout")  # absent in archives written before it was added
        if layout is not None:
            if not isinstance(layout, dict) or set(layout) != set(entries):
                raise self._fail("corrupted archive (the signed tensor layout does not match the header)")
            for name, (dtype, shape, _, _) in entries.items():
                if layout[name] != [dtype, list(shape)]:
                    raise self._fail(f"corrupted archive (tensor {name!r}: header dtype/shape {dtype} "
                                     f"{list(shape)} differ from the signed layout)")
        return entries

    # -- reading ------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def nbytes(self, name: str) -> int:
        _, _, begin, end = self._entries[name]
        return end - begin

    def tensor(self, name: str, verify: bool = True) -> torch.Tensor:
        """The named tensor as a read-only CPU view of the file (verified on first read)."""
        if name not in self._entries:
            raise self._fail(f"archive has no tensor {name!r}")
        dtype, shape, begin, end = self._entries[name]
        assert self._map is not None
        view = memoryview(self._map)[self._data_start + begin:self._data_start + end]
        if verify and name not in self._verified:
            if _sha256(view) != self.metadata["checksums"][name]:
                raise self._fail(f"corrupted archive (checksum mismatch in tensor {name!r})")
            self._verified.add(name)
        torch_dtype, np_dtype = _DTYPES[dtype]
        array = np.frombuffer(view, dtype=np_dtype).reshape(shape)
        # The map is read-only; torch warns about that but never writes through this view.
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            out = torch.from_numpy(array)
        return out.view(torch_dtype) if dtype == "BF16" else out

    def verify_all(self) -> int:
        """Check every tensor's checksum; return how many were checked."""
        for name in self._entries:
            self.tensor(name, verify=True)
        return len(self._entries)

    def file_sha256(self) -> str:
        digest = hashlib.sha256()
        if self._map is not None:
            digest.update(memoryview(self._map))
        return digest.hexdigest()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "Archive":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
