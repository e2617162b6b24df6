"""Train and load the byte-level BPE tokenizer shared by the soup and every exported specialist."""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from soe_sdk.errors import SoeError

EOT = "<|endoftext|>"
EOT_ID = 0
_N_BYTES = 256  # byte-level BPE needs one token per byte before any merge


def _configure(tok: Tokenizer) -> Tokenizer:
    # a literal "<|endoftext|>" inside a document is text, not a document boundary
    tok.encode_special_tokens = True
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, progress: bool = False) -> Tokenizer:
    """A byte-level BPE tokenizer with `vocab_size` tokens, `EOT` as id 0, lossless on any text."""
    if vocab_size < _N_BYTES + 1:
        raise SoeError(f"vocab_size={vocab_size}: must be at least {_N_BYTES + 1} (256 bytes + {EOT})")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],  # listed first → id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=progress,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.token_to_id(EOT) != EOT_ID:
        raise SoeError(f"tokenizer: {EOT} did not get id {EOT_ID}")
    return _configure(tok)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer.json written by `train_tokenizer` (or any HF tokenizer with `EOT`)."""
    path = Path(path)
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for both I/O and parse errors
        raise SoeError(f"{path}: not a readable tokenizer.json ({str(exc).splitlines()[0]})") from None
    if tok.token_to_id(EOT) is None:
        raise SoeError(f"{path}: tokenizer has no {EOT} token")
    return _configure(tok)
