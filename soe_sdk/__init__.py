"""soe-sdk: turn one pretrained Soup-of-Experts into small stand-alone specialist models.

Data flow: documents → embeddings → domain weights h → α = φ(h) → Θ = S + Σ α_j E_j → export.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .config import EmbedderSpec, ModelConfig, RouterConfig, SoupConfig  # noqa: E402
from .errors import ArchiveError, DocumentsError, ExportError, SoeError  # noqa: E402
from .soup import Soup, load  # noqa: E402
from .specialist import Specialist, default_soup_path, specialize  # noqa: E402

__all__ = ["__version__", "load", "Soup", "specialize", "Specialist", "default_soup_path", "ModelConfig", "RouterConfig", "SoupConfig", "EmbedderSpec",
           "SoeError", "ArchiveError", "DocumentsError", "ExportError"]
