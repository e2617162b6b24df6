"""Shared fixtures: tiny real soups written to real archives."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from soe_sdk.config import EmbedderSpec, ModelConfig, RouterConfig, SoupConfig  # noqa: E402
from soe_sdk.soup import init_soup, write_soup  # noqa: E402

TINY_MODEL = ModelConfig(vocab_size=96, max_seq_len=32, d_model=32, n_layers=2, n_heads=2, d_mlp=64)


def tiny_tokenizer_json(vocab_size: int = 96) -> str:
    """A real byte-level BPE tokenizer trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["the quick brown fox jumps over the lazy dog", "SELECT name FROM users WHERE id = 1",
            "def main(): return 0", "le fichier de configuration est lu au démarrage"] * 20
    tok.train_from_iterator(text, trainer)
    return tok.to_str()


def make_soup_tensors(config: SoupConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """init_soup plus noise on every tensor, so no expert or LayerNorm is trivially zero/one."""
    tensors = init_soup(config, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    return {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in tensors.items()}


def write_tiny_soup(path: Path, *, n: int = 3, k: int = 4, rank: int = 0, seed: int = 0,
                    storage_dtype: torch.dtype = torch.float32, dim: int = 384) -> SoupConfig:
    config = SoupConfig(TINY_MODEL, RouterConfig(k=k, n=n, hidden=8), expert_rank=rank)
    gen = torch.Generator().manual_seed(seed)
    centroids = torch.nn.functional.normalize(torch.randn(k, dim, generator=gen), dim=1)
    write_soup(path, make_soup_tensors(config, seed), config, centroids=centroids,
               h_generic=torch.full((k,), 1.0 / k), embedder=EmbedderSpec(dim=dim),
               tokenizer_json=tiny_tokenizer_json(TINY_MODEL.vocab_size),
               provenance={"corpus": "test", "steps": 0, "tokens": 0}, storage_dtype=storage_dtype)
    return config


@pytest.fixture()
def tiny_soup_path(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.soe"
    write_tiny_soup(path)
    return path
