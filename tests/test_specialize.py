"""docs → h → α → Θ through the public API and the soe-export CLI, on a tiny real soup."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import soe_sdk
from soe_sdk.config import EmbedderSpec, RouterConfig, SoupConfig
from soe_sdk.embedding import Embedder
from soe_sdk.errors import SoeError
from soe_sdk.refine import _val_loss, finetune, refine_alpha
from soe_sdk.soup import write_soup
from soe_sdk.specialist import specialize
from soe_sdk.tokens import split_heldout, windows

from .conftest import DOMAIN_TEXTS, TINY_MODEL, domain_documents, make_soup_tensors, tiny_tokenizer_json


@pytest.fixture(scope="module")
def soup_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny soup whose 4 centroids are real MiniLM embeddings of the 4 test domains."""
    embedder = Embedder.from_spec(EmbedderSpec())
    centroids = np.stack([embedder.encode(sentences).mean(axis=0) for sentences in DOMAIN_TEXTS.values()])
    config = SoupConfig(TINY_MODEL, RouterConfig(k=4, n=3, hidden=8))
    path = tmp_path_factory.mktemp("soup") / "tiny.soe"
    write_soup(path, make_soup_tensors(config, 3), config, centroids=centroids, h_generic=np.full(4, 0.25),
               embedder=EmbedderSpec(), tokenizer_json=tiny_tokenizer_json(TINY_MODEL.vocab_size),
               provenance={"corpus": "test"})
    return path


def _docs_folder(root: Path, domain: int, count: int = 6) -> Path:
    texts, labels = domain_documents(10, seed=2)
    root.mkdir(parents=True, exist_ok=True)
    picked = [t for t, label in zip(texts, labels) if label == domain][:count]
    for i, text in enumerate(picked):
        (root / f"doc{i}.txt").write_text(text)
    return root


def test_h_puts_mass_on_the_documents_domain(soup_path: Path, tmp_path: Path) -> None:
    for domain in (1, 3):
        spec = specialize(_docs_folder(tmp_path / f"d{domain}", domain), soup=soup_path)
        assert spec.domain_weights.sum() == pytest.approx(1.0)
        assert int(np.argmax(spec.domain_weights)) == domain
        torch.testing.assert_close(spec.alpha, soe_sdk.load(soup_path).coefficients(spec.domain_weights))
        assert spec.top_domains[0][0] == domain


def test_specialist_api(soup_path: Path, tmp_path: Path) -> None:
    spec = specialize(_docs_folder(tmp_path / "docs", 0), soup=soup_path, seed=1)
    assert set(spec.params) == set(TINY_MODEL.parameter_shapes())
    assert spec.config == TINY_MODEL and spec.tokenizer.get_vocab_size() <= TINY_MODEL.vocab_size
    assert np.isfinite(spec.loss(["The river ran past the mill."]))
    text = spec.generate("The river", max_new_tokens=5)
    assert isinstance(text, str)
    assert spec.generate("The river", max_new_tokens=5, temperature=1.0, seed=3) == \
        spec.generate("The river", max_new_tokens=5, temperature=1.0, seed=3)
    again = specialize(_docs_folder(tmp_path / "docs", 0), soup=soup_path, seed=1)
    for name in spec.params:  # same inputs and seed → same specialist
        assert torch.equal(spec.params[name], again.params[name])


def _train_val_windows(soup: soe_sdk.Soup, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and held-out token windows of mixed-domain test documents."""
    texts, _ = domain_documents(8, seed=seed)
    train_texts, val_texts = split_heldout(texts, 0.25)
    tok = soup.tokenizer()
    return windows(tok, train_texts, TINY_MODEL.max_seq_len), windows(tok, val_texts, TINY_MODEL.max_seq_len)


def test_refinement_never_ends_worse_than_it_started(soup_path: Path) -> None:
    soup = soe_sdk.load(soup_path)
    train, val = _train_val_windows(soup, seed=4)
    alpha0 = soup.coefficients([0.25] * 4)
    for lr in (0.05, 5.0):  # a sane and a wild learning rate
        alpha, fit = refine_alpha(soup, alpha0, train, val, max_steps=20, lr=lr, eval_every=2)
        assert fit.val_after <= fit.val_before
        assert np.isfinite(alpha.numpy()).all()


def test_finetuning_keeps_the_learning_rate_with_the_best_held_out_loss(soup_path: Path) -> None:
    soup = soe_sdk.load(soup_path)
    train, val = _train_val_windows(soup, seed=5)
    start = soup.instantiate(soup.coefficients([0.25] * 4))
    rates = (1e-4, 3e-3, 10.0)  # too small, sane, wild
    tuned, fit = finetune(start, TINY_MODEL, train, val, max_tokens=4000, lr=rates, eval_every=2)
    assert set(fit.tried) == set(rates)
    assert fit.val_after == min(fit.tried.values()) and fit.tried[fit.lr] == fit.val_after
    assert fit.val_after <= fit.val_before and fit.tried[3e-3] < fit.val_before  # a sane rate does learn
    assert _val_loss(tuned, TINY_MODEL, val) == pytest.approx(fit.val_after)  # what is returned is what won
    for name, value in start.items():  # the starting Θ is left alone
        assert torch.equal(value, soup.instantiate(soup.coefficients([0.25] * 4))[name])
    one, single = finetune(start, TINY_MODEL, train, val, max_tokens=4000, lr=3e-3, eval_every=2)
    assert single.lr == 3e-3 and single.val_after == fit.tried[3e-3]  # same batches whatever else is tried
    for name in one:
        if fit.lr == 3e-3:
            assert torch.equal(one[name], tuned[name])


def _export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "soe_sdk.cli", "export", "--quiet", *args],
                          capture_output=True, text=True)


def test_soe_export_writes_the_folder_contract(soup_path: Path, tmp_path: Path) -> None:
    docs = _docs_folder(tmp_path / "docs", 2)
    (docs / "broken.pdf").write_bytes(b"%PDF-1.4 truncated")
    out = tmp_path / "out"
    result = _export("--docs", str(docs), "--format", "safetensors", "--out", str(out), "--soup", str(soup_path),
                     "--refine")
    assert result.returncode == 0, result.stderr
    assert "corrupt pdf: 1" in result.stdout and "held-out" in result.stdout
    for name in ("model.safetensors", "tokenizer.json", "specialist.json", "report.json", "domain_weights.png",
                 "README.md", "config.json"):
        assert (out / name).exists(), name
    card = json.loads((out / "specialist.json").read_text())
    for key in ("format_version", "soup_sha256", "domain_weights", "alpha", "model_config", "docs", "refined",
                "sdk_version"):
        assert key in card
    assert card["refined"] is True and card["model_config"]["vocab_size"] == TINY_MODEL.vocab_size
    assert card["docs"]["count"] == 6 and len(card["docs"]["fingerprint"]) == 64
    assert card["soup_sha256"] == soe_sdk.load(soup_path).archive.file_sha256()
    report = json.loads((out / "report.json").read_text())
    assert {"read", "embed", "assign", "merge", "export"} <= set(report["timings_s"])


def test_soe_export_finetunes_and_reports_the_learning_rate(soup_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = _export("--docs", str(_docs_folder(tmp_path / "docs", 1)), "--format", "safetensors", "--out", str(out),
                     "--soup", str(soup_path), "--finetune-tokens", "3000")
    assert result.returncode == 0, result.stderr
    card = json.loads((out / "specialist.json").read_text())
    assert card["finetuned"] is True
    fit = json.loads((out / "report.json").read_text())["fits"]["finetune"]
    assert len(fit["tried"]) == 4 and fit["val_after"] == min(fit["tried"].values()) <= fit["val_before"]
    assert fit["tried"][str(fit["lr"])] == fit["val_after"]
    assert f"lr {fit['lr']:g} of 4 tried" in result.stdout


@pytest.mark.parametrize("case", ["no-docs", "empty-docs", "missing-soup", "unwritable-out", "bad-format"])
def test_soe_export_bad_invocations_fail_cleanly(soup_path: Path, tmp_path: Path, case: str) -> None:
    docs = _docs_folder(tmp_path / "docs", 0, 2)
    out = tmp_path / "out"
    args = {"--docs": str(docs), "--format": "safetensors", "--out": str(out), "--soup": str(soup_path)}
    if case == "no-docs":
        args["--docs"] = str(tmp_path / "nowhere")
    elif case == "empty-docs":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "blank.txt").write_text("   \n")
        args["--docs"] = str(tmp_path / "empty")
    elif case == "missing-soup":
        args["--soup"] = str(tmp_path / "missing.soe")
    elif case == "unwritable-out":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "out"
        args["--out"] = str(out)
    else:
        args["--format"] = "pickle"
    result = _export(*[x for kv in args.items() for x in kv])
    assert result.returncode != 0
    message = result.stderr.strip()
    assert message.startswith("error:") and "\n" not in message and "Traceback" not in message
    assert not out.exists()


def test_missing_default_soup_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from soe_sdk import specialist as module
    monkeypatch.setattr(module, "ASSETS", tmp_path)
    with pytest.raises(SoeError, match="bundled demo soup is missing"):
        specialize(["some text"])


def test_several_archives_the_documents_pick_the_best(soup_path: Path, tmp_path: Path) -> None:
    """The domain-experts baseline: plain models per cluster, chosen by loss on the documents."""
    other = tmp_path / "other.soe"
    from .conftest import write_tiny_soup
    write_tiny_soup(other, n=0, seed=11)
    spec = specialize(_docs_folder(tmp_path / "docs", 1), soup=[soup_path, other])
    scores = spec.losses["candidates"]
    assert set(scores) == {soup_path.name, other.name}
    assert spec.soup_name == min(scores, key=scores.get)


def test_h_is_estimated_from_a_seeded_sample_of_the_chunks(soup_path: Path) -> None:
    texts = [f"Document number {i}: the firewall blocks packets on port {i}." for i in range(40)]
    full = specialize(texts, soup=soup_path, max_embedded_chunks=None)
    sampled = specialize(texts, soup=soup_path, max_embedded_chunks=10, seed=3)
    again = specialize(texts, soup=soup_path, max_embedded_chunks=10, seed=3)
    assert full.documents["embedded_chunks"] == full.documents["train_chunks"] > 10
    assert sampled.documents["embedded_chunks"] == 10
    np.testing.assert_array_equal(sampled.domain_weights, again.domain_weights)
    assert abs(sampled.domain_weights.sum() - 1) < 1e-9
    with pytest.raises(SoeError, match="max_embedded_chunks"):
        specialize(texts, soup=soup_path, max_embedded_chunks=0)


def test_a_plain_model_is_exported_without_embedding(tmp_path: Path) -> None:
    """n = 0 (e.g. the generic baseline): h cannot change Θ, so nothing is embedded."""
    from soe_sdk.report import summary_text

    from .conftest import write_tiny_soup
    plain = tmp_path / "plain.soe"
    write_tiny_soup(plain, n=0, seed=5)
    texts = [f"Line {i}: the scheduler retries failed jobs after {i} seconds." for i in range(12)]
    spec = specialize(texts, soup=plain)
    soup = soe_sdk.load(plain)
    assert spec.documents["embedded_chunks"] == 0 and spec.timings["embed"] == 0.0
    np.testing.assert_array_equal(spec.domain_weights, soup.h_generic)
    expected = soup.instantiate(torch.zeros(0))
    assert set(spec.params) == set(expected)
    assert all(torch.equal(spec.params[name], expected[name]) for name in expected)
    assert "not estimated" in summary_text(spec)
