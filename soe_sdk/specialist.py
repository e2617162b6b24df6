"""docs → embeddings → h → α → Θ: `specialize()` and the `Specialist` it returns."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .config import ModelConfig
from .documents import DocumentSet, load_documents
from .errors import SoeError
from .model import generate, next_token_loss
from .refine import FitResult, finetune as finetune_params, refine_alpha
from .soup import Soup, load
from .tokens import split_heldout, windows

SPECIALIST_FORMAT_VERSION = 1
ASSETS = Path(__file__).parent / "assets"


def default_soup_path() -> Path:
    """The demo soup bundled with the package."""
    return ASSETS / "demo-soup.soe"


def _resolve_soup(soup: Soup | str | Path | None, device: str | torch.device | None) -> Soup:
    if isinstance(soup, Soup):
        return soup
    path = Path(soup) if soup is not None else default_soup_path()
    if soup is None and not path.exists():
        raise SoeError(f"{path}: the bundled demo soup is missing from this install; pass soup=PATH (or --soup)")
    return load(path, device)


@dataclass
class Specialist:
    """A stand-alone specialist model Θ = S + Σ α_j E_j, with where it came from."""

    params: dict[str, Tensor]
    config: ModelConfig
    tokenizer_json: str
    domain_weights: np.ndarray
    alpha: Tensor
    soup_sha256: str
    soup_name: str
    documents: dict[str, Any]
    refined: bool = False
    finetuned: bool = False
    losses: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    fits: dict[str, FitResult] = field(default_factory=dict)
    top_domains: list[tuple[int, float]] = field(default_factory=list)

    @property
    def tokenizer(self):
        """The HF `tokenizers.Tokenizer` the model was trained with."""
        from tokenizers import Tokenizer
        return Tokenizer.from_str(self.tokenizer_json)

    def loss(self, texts: list[str] | str) -> float:
        """Mean next-token cross-entropy (nats/token) of the specialist on `texts`."""
        batch = windows(self.tokenizer, [texts] if isinstance(texts, str) else list(texts), self.config.max_seq_len)
        if len(batch) == 0:
            raise SoeError("loss: the texts hold fewer than two tokens")
        with torch.no_grad():
            total = sum(float(next_token_loss(self.params, self.config, batch[i:i + 16])) * batch[i:i + 16].numel()
                        for i in range(0, len(batch), 16))
        return total / batch.numel()

    def generate(self, prompt: str, max_new_tokens: int = 50, *, temperature: float = 0.0,
                 top_k: int | None = None, seed: int | None = None) -> str:
        """Continue `prompt` (greedy when temperature is 0); returns only the new text."""
        tok = self.tokenizer
        ids = tok.encode(prompt).ids[-(self.config.max_seq_len - 1):] or [tok.token_to_id("<|endoftext|>") or 0]
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        device = next(iter(self.params.values())).device
        out = generate(self.params, self.config, torch.tensor([ids], device=device), max_new_tokens,
                       temperature=temperature, top_k=top_k, generator=gen,
                       eos_token_id=tok.token_to_id("<|endoftext|>"))
        return tok.decode(out[0, len(ids):].tolist())

    def card(self) -> dict[str, Any]:
        """The `specialist.json` content every export folder carries."""
        from . import __version__
        return {
            "format_version": SPECIALIST_FORMAT_VERSION, "sdk_version": __version__,
            "soup": self.soup_name, "soup_sha256": self.soup_sha256,
            "domain_weights": [round(float(x), 6) for x in self.domain_weights],
            "top_domains": [[int(i), round(float(w), 4)] for i, w in self.top_domains],
            "alpha": [round(float(x), 6) for x in self.alpha], "model_config": self.config.to_dict(),
            "docs": self.documents, "refined": self.refined, "finetuned": self.finetuned,
            "losses": self.losses,
        }

    def export(self, path: str | Path, format: str = "onnx") -> Any:
        """Write the specialist as `format` (onnx, onnx-int8, onnx-int4, hf, gguf, safetensors) into folder `path`."""
        from exporters import export
        return export({k: v.detach().cpu() for k, v in self.params.items()}, self.config, self.tokenizer_json,
                      Path(path), format, metadata=self.card())

    def save(self, path: str | Path) -> Any:
        """Save as a safetensors folder (model.safetensors, config.json, tokenizer.json, specialist.json)."""
        return self.export(path, "safetensors")


def _heldout_loss(params: dict[str, Tensor], config: ModelConfig, val: Tensor) -> float:
    with torch.no_grad():
        val = val.to(next(iter(params.values())).device)
        return sum(float(next_token_loss(params, config, val[i:i + 16])) * val[i:i + 16].numel()
                   for i in range(0, len(val), 16)) / max(val.numel(), 1)


SoupLike = Soup | str | Path | None


def specialize(docs: str | Path | list[str] | DocumentSet, soup: SoupLike | list[SoupLike] = None,
               refine: bool = False, device: str | torch.device | None = None, *,
               assignment: str = "hard", temperature: float = 0.05, max_docs: int | None = None,
               seed: int = 0, heldout_fraction: float = 0.2, max_heldout_windows: int = 64,
               refine_steps: int = 60, refine_seconds: float = 45.0, finetune: int | None = None,
               tolerance: float = 0.0, max_embedded_chunks: int | None = 256, progress: bool = False) -> Specialist:
    """Build a specialist for `docs` (a folder, a file, a list of texts, or a DocumentSet).

    soup=None uses the bundled demo soup. h comes from the documents' nearest centroids
    (paper Algorithm 3; `assignment="soft"` uses a softmax over distances instead), α = φ(h);
    `refine=True` then tunes α by gradient descent on the documents and `finetune=N` tunes
    all parameters on up to N tokens, both with early stopping on a held-out slice of the
    chunks (fine-tuning tries four learning rates and keeps the best on that slice). The
    same inputs and seed give the same specialist.

    `soup` may also be a list of archives (e.g. the "domain experts" baseline: one plain
    model per pretraining cluster); each is instantiated for the documents and the one with
    the lowest loss on the training chunks is kept (`losses["candidates"]` lists them all).

    h is estimated from at most `max_embedded_chunks` training chunks, drawn at random with
    `seed` (None: all): embedding is the slow step, and on the bundled soup h from 100
    documents already gives a specialist within 0.1 % of the 1000-document one
    (benchmarks/results/main_table.md). Refinement and fine-tuning use every chunk.
    """
    from .domains import domain_histogram, top_domains
    from .embedding import Embedder

    if max_embedded_chunks is not None and max_embedded_chunks < 1:
        raise SoeError(f"max_embedded_chunks must be at least 1 (or None for all), got {max_embedded_chunks}")
    torch.manual_seed(seed)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    candidates = [_resolve_soup(c, device) for c in (soup if isinstance(soup, (list, tuple)) else [soup])]
    if not candidates:
        raise SoeError("soup: the list of candidate archives is empty")
    doc_set = docs if isinstance(docs, DocumentSet) else load_documents(docs, max_chunks=max_docs, progress=progress)
    train_chunks, heldout_chunks = split_heldout(doc_set.chunks, heldout_fraction)
    if not heldout_chunks:  # a single chunk: score on what we have
        heldout_chunks = train_chunks
    timings["read"] = time.perf_counter() - t

    vectors_by_spec: dict[Any, np.ndarray] = {}
    timings["embed"] = timings["assign"] = 0.0
    embedded_chunks = train_chunks
    if max_embedded_chunks is not None and len(train_chunks) > max_embedded_chunks:
        pick = np.random.default_rng(seed).choice(len(train_chunks), size=max_embedded_chunks, replace=False)
        embedded_chunks = [train_chunks[i] for i in sorted(pick)]

    def weights_for(candidate: Soup) -> tuple[np.ndarray, Tensor]:
        """h and α = φ(h) of `candidate` for the training chunks (embedding once per embedder)."""
        if candidate.n == 0:  # a plain model ignores h: skip the embedder (its load alone takes seconds)
            return np.asarray(candidate.h_generic, dtype=np.float64), torch.zeros(0)
        t = time.perf_counter()
        if candidate.embedder not in vectors_by_spec:
            embedder = Embedder.from_spec(candidate.embedder, device=None if device is None else str(device))
            vectors_by_spec[candidate.embedder] = embedder.encode(embedded_chunks, progress=progress)
        t_assign = time.perf_counter()
        timings["embed"] += t_assign - t
        h = domain_histogram(vectors_by_spec[candidate.embedder], candidate.centroids, mode=assignment,
                             temperature=temperature)
        alpha = candidate.coefficients(h).cpu()
        timings["assign"] += time.perf_counter() - t_assign
        return h, alpha

    candidate_losses: dict[str, float] = {}
    if len(candidates) > 1:
        best = None
        for candidate in candidates:
            h_c, alpha_c = weights_for(candidate)
            score = windows(candidate.tokenizer(), train_chunks, candidate.model_config.max_seq_len, max_heldout_windows)
            loss = _heldout_loss(candidate.instantiate(alpha_c), candidate.model_config, score)
            candidate_losses[candidate.archive.path.name] = loss
            if best is None or loss < best[0]:
                best = (loss, candidate)
        soup = best[1]
    else:
        soup = candidates[0]
    h, alpha = weights_for(soup)

    tok = soup.tokenizer()
    seq = soup.model_config.max_seq_len
    val = windows(tok, heldout_chunks, seq, max_heldout_windows)
    fits: dict[str, FitResult] = {}
    if refine and soup.n:
        t = time.perf_counter()
        train = windows(tok, train_chunks, seq)
        alpha, fits["refine"] = refine_alpha(soup, alpha, train, val, max_steps=refine_steps,
                                             max_seconds=refine_seconds, seed=seed, progress=progress)
        timings["refine"] = time.perf_counter() - t

    t = time.perf_counter()
    params = soup.instantiate(alpha, tolerance=tolerance)
    timings["merge"] = time.perf_counter() - t
    if finetune:
        t = time.perf_counter()
        params, fits["finetune"] = finetune_params(params, soup.model_config, windows(tok, train_chunks, seq), val,
                                                   max_tokens=finetune, seed=seed, progress=progress)
        timings["finetune"] = time.perf_counter() - t

    t = time.perf_counter()
    generic = soup.instantiate(soup.coefficients(soup.h_generic))
    losses = {"heldout_specialist": _heldout_loss(params, soup.model_config, val),
              "heldout_generic_soup": _heldout_loss(generic, soup.model_config, val)}
    timings["score"] = time.perf_counter() - t
    if candidate_losses:
        losses["candidates"] = candidate_losses  # type: ignore[assignment]
    documents = {"count": len(doc_set.chunks), "train_chunks": len(train_chunks), "heldout_chunks": len(heldout_chunks),
                 "embedded_chunks": len(embedded_chunks) if soup.n else 0,
                 "fingerprint": doc_set.fingerprint, "files_read": doc_set.files_read,
                 "skipped": doc_set.skipped_by_reason(), "duplicates_dropped": doc_set.duplicates_dropped,
                 "summary": doc_set.summary()}
    return Specialist(params=params, config=soup.model_config, tokenizer_json=soup.tokenizer_json,
                      domain_weights=np.asarray(h, dtype=np.float64), alpha=alpha.detach().cpu(),
                      soup_sha256=soup.archive.file_sha256(), soup_name=soup.archive.path.name, documents=documents,
                      refined="refine" in fits, finetuned="finetune" in fits, losses=losses, timings=timings,
                      fits=fits, top_domains=top_domains(h, top=5))
