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

TINY_MODEL = ModelConfig(vocab_size=300, max_seq_len=32, d_model=32, n_layers=2, n_heads=2, d_mlp=64)


def tiny_tokenizer_json(vocab_size: int = 300) -> str:
    """A real byte-level BPE tokenizer trained on a few sentences."""
    from trainer.tokenizer import train_tokenizer

    text = ["the quick brown fox jumps over the lazy dog", "SELECT name FROM users WHERE id = 1",
            "def main(): return 0", "le fichier de configuration est lu au démarrage"] * 20
    return train_tokenizer(text, vocab_size).to_str()


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


DOMAIN_TEXTS = {
    "prose": ["The river ran slowly past the old mill, and the miller watched the water turn the wheel.",
              "In the evening the village gathered in the square to hear the news from the city.",
              "She wrote letters every week, describing the weather, the harvest and the neighbours."],
    "python": ["def load(path):\n    with open(path) as handle:\n        return handle.read()\n",
               "for index, value in enumerate(values):\n    if value is None:\n        continue\n    total += value\n",
               "class Counter:\n    def __init__(self):\n        self.count = 0\n\n    def step(self):\n        self.count += 1\n"],
    "french": ["Le fichier de configuration est lu au démarrage du service et chaque option est vérifiée.",
               "La commande affiche la liste des paquets installés ainsi que leur version exacte.",
               "Cette page de manuel décrit les options disponibles et les valeurs par défaut."],
    "sql": ["SELECT name, email FROM users WHERE active = true ORDER BY name;",
            "CREATE INDEX users_email_idx ON users (email);",
            "UPDATE orders SET status = 'shipped' WHERE id IN (SELECT order_id FROM shipments);"],
}


def domain_documents(docs_per_domain: int = 30, seed: int = 0) -> tuple[list[str], list[int]]:
    """Small multi-domain documents (shuffled sentences of each domain) and their domain ids."""
    import random

    rng = random.Random(seed)
    texts, labels = [], []
    for label, sentences in enumerate(DOMAIN_TEXTS.values()):
        for _ in range(docs_per_domain):
            texts.append("\n".join(rng.choice(sentences) for _ in range(8)))
            labels.append(label)
    return texts, labels


def make_workdir(root: Path, vocab_size: int = 300) -> Path:
    """A trainer workdir (tokenizer, 4 domain shards, a generic eval set) built without embeddings."""
    import numpy as np

    from trainer.shards import write_domain_shards, write_token_file
    from trainer.tokenizer import train_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    texts, labels = domain_documents()
    tokenizer = train_tokenizer(texts, vocab_size)
    (root / "tokenizer.json").write_text(tokenizer.to_str())
    write_domain_shards(tokenizer, texts, labels, 4, root, progress=False)
    (root / "eval").mkdir(exist_ok=True)
    eval_texts, _ = domain_documents(3, seed=1)
    write_token_file(tokenizer, eval_texts, root / "eval" / "generic.bin")
    np.save(root / "centroids.npy", np.random.default_rng(0).standard_normal((4, 384)).astype(np.float32))
    (root / "prepare.json").write_text('{"corpus": "tests", "embedder": {}}')
    return root
