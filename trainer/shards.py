"""Tokenized per-domain shards: one flat token file per domain plus an index (the data of mix(h))."""
from __future__ import annotations

import json
import os
import shutil
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from soe_sdk.errors import SoeError

from .tokenizer import EOT, EOT_ID

DOMAINS_DIR = "domains"
INDEX_FILE = "index.json"
_ENCODE_BATCH_DOCS = 256
_MAX_OPEN_MAPS = 256
_FLUSH_TOKENS = 1 << 25  # tokens buffered (all domains together) before they are written out


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def _batches(items: Iterable, size: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def encode_documents(tokenizer: Tokenizer, texts: Iterable[str]) -> Iterator[list[int]]:
    """Token ids of each text followed by the end-of-text id."""
    eot = tokenizer.token_to_id(EOT)
    if eot is None:
        raise SoeError(f"tokenizer has no {EOT} token")
    # encode_batch_fast skips offset tracking, which we never use (tokenizers >= 0.21)
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    for batch in _batches(texts, _ENCODE_BATCH_DOCS):
        for enc in encode(batch, add_special_tokens=False):
            ids = enc.ids
            ids.append(eot)
            yield ids


def write_token_file(tokenizer: Tokenizer, texts: Iterable[str], path: str | os.PathLike,
                     *, progress: bool = False, desc: str = "tokenize") -> int:
    """Write all texts (each + EOT) as one flat token file, atomically; returns the token count."""
    path = Path(path)
    dtype = token_dtype(tokenizer.get_vocab_size())
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "wb") as fh, tqdm(desc=desc, unit="doc", disable=not progress) as bar:
        for ids in encode_documents(tokenizer, texts):
            fh.write(np.asarray(ids, dtype=dtype).tobytes())
            n += len(ids)
            bar.update(1)
    os.replace(tmp, path)
    return n


def write_domain_shards(tokenizer: Tokenizer, texts: Iterable[str], assignments: Sequence[int] | np.ndarray,
                        k: int, workdir: str | os.PathLike, *, progress: bool = True) -> dict:
    """Tokenize the i-th text into domain `assignments[i]`; write WORKDIR/domains/ atomically.

    Returns the index: k, dtype, vocab_size, per-domain token and document counts.
    """
    workdir = Path(workdir)
    assignments = np.asarray(assignments, dtype=np.int64)
    if assignments.size and (assignments.min() < 0 or assignments.max() >= k):
        raise SoeError(f"domain assignments outside [0, {k})")
    vocab_size = tokenizer.get_vocab_size()
    dtype = token_dtype(vocab_size)
    final = workdir / DOMAINS_DIR
    tmp = workdir / (DOMAINS_DIR + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)

    counts = np.zeros(k, dtype=np.int64)
    docs = np.zeros(k, dtype=np.int64)
    buffers: list[list[np.ndarray]] = [[] for _ in range(k)]
    buffered = 0
    n_docs = 0

    def flush() -> None:
        # append-and-close: at k = 4096 domains, one open file per domain would exceed the fd limit
        for d in range(k):
            if buffers[d]:
                with open(tmp / f"{d:04d}.bin", "ab") as fh:
                    fh.write(np.concatenate(buffers[d]).tobytes())
                buffers[d] = []

    for d in range(k):
        (tmp / f"{d:04d}.bin").touch()
    with tqdm(total=len(assignments), desc="shards", unit="doc", disable=not progress) as bar:
        for ids in encode_documents(tokenizer, texts):
            if n_docs >= len(assignments):
                shutil.rmtree(tmp)
                raise SoeError(f"corpus has more than {len(assignments)} documents, the number of domain "
                               "assignments (corpus changed?)")
            d = int(assignments[n_docs])
            arr = np.asarray(ids, dtype=dtype)
            buffers[d].append(arr)
            buffered += arr.size
            counts[d] += arr.size
            docs[d] += 1
            n_docs += 1
            if buffered >= _FLUSH_TOKENS:
                flush()
                buffered = 0
            bar.update(1)
    flush()
    if n_docs != len(assignments):
        shutil.rmtree(tmp)
        raise SoeError(f"corpus has {n_docs} documents but {len(assignments)} domain assignments (corpus changed?)")

    index = {"k": k, "dtype": dtype.name, "vocab_size": vocab_size,
             "counts": counts.tolist(), "docs": docs.tolist()}
    (tmp / INDEX_FILE).write_text(json.dumps(index, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return index


class DomainShards:
    """Read-only access to WORKDIR/domains: token counts, h_generic and one memmap per domain."""

    def __init__(self, root: Path, index: dict) -> None:
        self.root = root
        self.k: int = int(index["k"])
        self.dtype = np.dtype(index["dtype"])
        self.vocab_size: int = int(index.get("vocab_size", 0))
        self.counts = np.asarray(index["counts"], dtype=np.int64)
        self.docs = np.asarray(index.get("docs", [0] * self.k), dtype=np.int64)
        if self.counts.shape != (self.k,):
            raise SoeError(f"{root / INDEX_FILE}: expected {self.k} token counts, got {self.counts.size}")
        self._maps: OrderedDict[int, np.ndarray] = OrderedDict()

    @classmethod
    def open(cls, workdir: str | os.PathLike) -> "DomainShards":
        root = Path(workdir) / DOMAINS_DIR
        path = root / INDEX_FILE
        try:
            index = json.loads(path.read_text())
        except FileNotFoundError:
            raise SoeError(f"{path}: not found (run `soe-train prepare` first)") from None
        except json.JSONDecodeError:
            raise SoeError(f"{path}: not valid JSON") from None
        return cls(root, index)

    @property
    def h_generic(self) -> np.ndarray:
        """Each domain's share of all tokens (float64, sums to 1): the generic mixture."""
        total = self.counts.sum()
        if total == 0:
            raise SoeError(f"{self.root}: all domains are empty")
        return self.counts.astype(np.float64) / float(total)

    def domain(self, i: int) -> np.ndarray:
        """The tokens of domain i as a read-only memmap (an empty array for an empty domain)."""
        if not 0 <= i < self.k:
            raise IndexError(f"domain {i} outside [0, {self.k})")
        if i in self._maps:
            self._maps.move_to_end(i)
            return self._maps[i]
        path = self.root / f"{i:04d}.bin"
        if self.counts[i] == 0:
            arr = np.zeros(0, dtype=self.dtype)  # np.memmap refuses empty files
        else:
            try:
                size = path.stat().st_size // self.dtype.itemsize
            except FileNotFoundError:
                raise SoeError(f"{path}: missing (re-run `soe-train prepare`)") from None
            if size != self.counts[i]:
                raise SoeError(f"{path}: holds {size} tokens, index says {self.counts[i]}")
            arr = np.memmap(path, dtype=self.dtype, mode="r", shape=(size,))
        self._maps[i] = arr
        if len(self._maps) > _MAX_OPEN_MAPS:  # each memmap holds a file descriptor
            self._maps.popitem(last=False)
        return arr
