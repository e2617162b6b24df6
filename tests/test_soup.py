"""Soup math: linearity of instantiate, the router, tolerance skipping, low-rank experts."""
from __future__ import annotations

import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import soe_sdk
from soe_sdk.errors import SoeError
from soe_sdk.model import forward
from soe_sdk.soup import MERGE_PLANS_KEPT, block_width, combine_parameter, merge_dense

from .conftest import write_tiny_soup


def test_instantiate_is_linear_in_alpha(tiny_soup_path: Path) -> None:
    soup = soe_sdk.load(tiny_soup_path)
    zero = soup.instantiate(torch.zeros(soup.n))
    for name in soup.model_config.parameter_shapes():
        assert torch.equal(zero[name], soup.archive.tensor(f"shared.{name}"))
    for j in range(soup.n):
        onehot = torch.zeros(soup.n)
        onehot[j] = 1.0
        theta = soup.instantiate(onehot)
        for name in soup.model_config.parameter_shapes():
            expected = soup.archive.tensor(f"shared.{name}") + soup.archive.tensor(f"experts.{name}")[j]
            assert torch.equal(theta[name], expected), name


def test_coefficients_follow_the_router(tiny_soup_path: Path) -> None:
    soup = soe_sdk.load(tiny_soup_path)
    h = np.array([0.5, 0.5, 0.0, 0.0])
    r = soup.router_params()
    hidden = torch.nn.functional.gelu(r["router.fc1.weight"] @ torch.tensor(h, dtype=torch.float32) + r["router.fc1.bias"])
    expected = r["router.fc2.weight"] @ hidden + r["router.fc2.bias"]
    torch.testing.assert_close(soup.coefficients(h), expected)
    # unnormalised histograms are renormalised, so counts work as well as weights
    torch.testing.assert_close(soup.coefficients(h * 10), expected)


@pytest.mark.parametrize("bad", [[1, 0, 0], [-1, 1, 1, 1], [0, 0, 0, 0], [float("nan"), 1, 0, 0]])
def test_bad_domain_weights_are_rejected(tiny_soup_path: Path, bad: list[float]) -> None:
    with pytest.raises(SoeError, match="domain weights"):
        soe_sdk.load(tiny_soup_path).coefficients(bad)


def test_bad_alpha_is_rejected(tiny_soup_path: Path) -> None:
    soup = soe_sdk.load(tiny_soup_path)
    with pytest.raises(SoeError, match="n=3"):
        soup.instantiate([1.0])
    with pytest.raises(SoeError, match="NaN"):
        soup.instantiate([float("nan"), 0, 0])


def test_tolerance_skips_small_experts_within_the_reported_bound(tiny_soup_path: Path) -> None:
    soup = soe_sdk.load(tiny_soup_path)
    alpha = torch.tensor([0.8, 0.01, -0.6])
    exact = soup.instantiate(alpha)
    approx = soup.instantiate(alpha, tolerance=0.05)
    bound = soup.skipped_error_bound(alpha, 0.05)
    worst = max(float((exact[k] - approx[k]).abs().max()) for k in exact)
    assert 0 < worst <= bound + 1e-7
    # exact zeros are skipped by default and change nothing
    sparse = torch.tensor([0.8, 0.0, -0.6])
    dropped = {k: v for k, v in soup.instantiate(sparse).items()}
    manual = {k: soup.archive.tensor(f"shared.{k}") + 0.8 * soup.archive.tensor(f"experts.{k}")[0]
              - 0.6 * soup.archive.tensor(f"experts.{k}")[2] for k in dropped}
    for k in dropped:
        torch.testing.assert_close(dropped[k], manual[k], rtol=1e-6, atol=1e-6)


def test_plain_model_soup_with_no_experts(tmp_path: Path) -> None:
    path = tmp_path / "generic.soe"
    write_tiny_soup(path, n=0)
    soup = soe_sdk.load(path)
    assert soup.n == 0 and soup.coefficients([1, 1, 1, 1]).numel() == 0
    theta = soup.instantiate(torch.zeros(0))
    logits, _ = forward(theta, soup.model_config, torch.zeros(1, 5, dtype=torch.long))
    assert torch.isfinite(logits).all()


def test_low_rank_experts_merge_without_materialising_each_expert(tmp_path: Path) -> None:
    path = tmp_path / "lowrank.soe"
    write_tiny_soup(path, n=4, rank=2)
    soup = soe_sdk.load(path)
    alpha = torch.tensor([0.3, -1.2, 0.0, 0.7])
    theta = soup.instantiate(alpha)
    name = "h.0.mlp.fc.weight"
    a, b = soup.archive.tensor(f"experts.{name}.A"), soup.archive.tensor(f"experts.{name}.B")
    expected = soup.archive.tensor(f"shared.{name}") + sum(alpha[j] * a[j] @ b[j].T for j in range(4))
    torch.testing.assert_close(theta[name], expected, rtol=1e-5, atol=1e-6)
    assert torch.linalg.matrix_rank(theta[name] - soup.archive.tensor(f"shared.{name}")) <= 2 * 3


def test_combine_parameter_is_differentiable() -> None:
    shared = torch.randn(4, 5, requires_grad=True)
    bank = torch.randn(3, 4, 5, requires_grad=True)
    alpha = torch.randn(3, requires_grad=True)
    combine_parameter(shared, bank, alpha).sum().backward()
    torch.testing.assert_close(alpha.grad, bank.detach().sum(dim=(1, 2)))
    torch.testing.assert_close(bank.grad[1], alpha.detach()[1] * torch.ones(4, 5))


def test_half_precision_storage_computes_in_fp32(tmp_path: Path) -> None:
    path = tmp_path / "half.soe"
    write_tiny_soup(path, storage_dtype=torch.float16)
    soup = soe_sdk.load(path)
    assert soup.archive.tensor("shared.wte.weight").dtype == torch.float16
    theta = soup.instantiate(soup.coefficients(soup.h_generic))
    assert all(v.dtype == torch.float32 for v in theta.values())
    assert soup.parameter_counts()["instantiated"] == soup.model_config.num_parameters()


@pytest.mark.parametrize("storage", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("keep", [[0, 1, 2, 3, 4], [1, 2, 3], [0, 2, 4], [3], []])
def test_blockwise_merge_equals_the_plain_merge(storage: torch.dtype, keep: list[int]) -> None:
    gen = torch.Generator().manual_seed(3)
    shared = torch.randn(37, 11, generator=gen).to(storage)
    bank = torch.randn(5, 37, 11, generator=gen).to(storage)
    alpha = torch.randn(len(keep), generator=gen)
    expected = combine_parameter(shared.float(), bank[keep].float() if keep else None, alpha)
    for block_bytes in (1, 60, 1000, 1 << 20):  # one column per block … everything in one block
        released = [torch.zeros(shared.numel(), dtype=torch.bool), torch.zeros(bank.numel(), dtype=torch.bool)]

        def release(view: torch.Tensor) -> None:  # marks which elements of S / E were handed back
            for base, mask in zip((shared, bank), released):
                start = (view.data_ptr() - base.data_ptr()) // base.element_size()
                if 0 <= start < base.numel():
                    mask[start:start + view.numel()] = True

        merged = merge_dense(shared, bank, keep, alpha, block_bytes=block_bytes, release=release)
        assert merged.dtype == torch.float32 and merged.shape == shared.shape
        torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-6)
        scratch = torch.full((5 * shared.numel(),), float("nan"))  # a reused buffer's old contents never leak in
        torch.testing.assert_close(merge_dense(shared, bank, keep, alpha, block_bytes=block_bytes, scratch=scratch),
                                   expected, rtol=1e-5, atol=1e-6)
        # a parameter spanning several blocks releases S and every kept expert once used
        several = shared.numel() > block_width(len(keep), torch.float32, block_bytes)
        assert bool(released[0].all()) == several
        assert not keep or bool(released[1].view(5, -1)[keep].all()) == several


def test_instantiate_matches_the_plain_merge_for_stored_half_precision(tmp_path: Path) -> None:
    path = tmp_path / "half.soe"
    write_tiny_soup(path, n=5, storage_dtype=torch.float16)
    soup = soe_sdk.load(path)
    alpha = torch.tensor([0.4, 0.0, -0.7, 0.0, 1.1])
    theta = soup.instantiate(alpha)
    for name in soup.model_config.parameter_shapes():
        bank = soup.archive.tensor(f"experts.{name}").float()
        expected = combine_parameter(soup.archive.tensor(f"shared.{name}").float(), bank, alpha)
        torch.testing.assert_close(theta[name], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("storage", [torch.float32, torch.float16])
def test_merge_plans_are_reused_across_alphas_and_dtypes(tmp_path: Path, storage: torch.dtype) -> None:
    path = tmp_path / "soup.soe"
    write_tiny_soup(path, n=5, storage_dtype=storage)
    soup = soe_sdk.load(path)
    alphas = [torch.tensor([0.4, -0.2, 0.7, 0.3, 1.1]), torch.tensor([0.0, 0.5, -0.7, 0.2, 0.0]),
              torch.tensor([-0.9, 0.0, 0.3, 0.0, 0.6]), torch.tensor([0.4, -0.2, 0.7, 0.3, 1.1]) * 3]
    for dtype in (torch.float32, torch.float64):
        for alpha in alphas:  # consecutive experts (one GEMV or convert-then-GEMV) and scattered ones
            theta = soup.instantiate(alpha, dtype=dtype)
            for name in soup.model_config.parameter_shapes():
                bank = soup.archive.tensor(f"experts.{name}").to(torch.float64)
                expected = combine_parameter(soup.archive.tensor(f"shared.{name}").to(torch.float64), bank,
                                             alpha.to(torch.float64))
                assert theta[name].dtype == dtype
                torch.testing.assert_close(theta[name].to(torch.float64), expected, rtol=1e-5, atol=1e-6)
    assert len(soup._plans) == 2 * 3  # one plan per (kept experts, dtype), whatever the α values
    for j in range(5):  # many different keep-sets: the cache stays bounded, results stay right
        alpha = torch.zeros(5)
        alpha[j] = 0.5
        theta = soup.instantiate(alpha)
        name = "h.0.mlp.fc.weight"
        shared, bank = (soup.archive.tensor(f"{part}.{name}").double() for part in ("shared", "experts"))
        expected = shared + 0.5 * bank[j]
        torch.testing.assert_close(theta[name].double(), expected, rtol=1e-5, atol=1e-6)
    assert len(soup._plans) == MERGE_PLANS_KEPT


def test_theta_owns_its_memory(tiny_soup_path: Path) -> None:
    soup = soe_sdk.load(tiny_soup_path)
    for alpha in (torch.zeros(soup.n), torch.ones(soup.n)):
        theta = soup.instantiate(alpha)
        before = {k: v.clone() for k, v in theta.items()}
        for value in theta.values():
            value.add_(1.0)  # would crash or corrupt the archive if Θ were a view of the file
        assert soup.instantiate(alpha).keys() == before.keys()
        for name, value in soup.instantiate(alpha).items():
            assert torch.equal(value, before[name]), name


def test_instantiate_rejects_corrupted_expert_data(tiny_soup_path: Path, tmp_path: Path) -> None:
    from soe_sdk.archive import Archive
    from soe_sdk.errors import ArchiveError

    raw = bytearray(tiny_soup_path.read_bytes())
    (header,) = struct.unpack("<Q", raw[:8])
    with Archive(tiny_soup_path) as archive:  # the first tensor starts the data section
        bank = archive.tensor("experts.h.1.mlp.fc.weight")
        middle = bank.data_ptr() - archive.tensor(archive.names()[0]).data_ptr() + bank.numel() * 2
    raw[8 + header + middle] ^= 0x40
    bad = tmp_path / "bad.soe"
    bad.write_bytes(bytes(raw))
    soup = soe_sdk.load(bad)
    names = []
    with pytest.raises(ArchiveError, match=r"bad.soe: corrupted archive \(checksum mismatch in tensor "
                                           r"'experts.h.1.mlp.fc.weight'\)"):
        for name, _ in soup.iter_instantiate(torch.ones(soup.n), list(range(soup.n))):
            names.append(name)
    assert "h.1.mlp.fc.weight" not in names and "h.0.mlp.fc.weight" in names
    # an α that skips every expert never reads the bank, so the shared weights still merge
    assert soup.instantiate(torch.zeros(soup.n)).keys() == set(soup.model_config.parameter_shapes())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page release uses Linux madvise")
def test_page_release_frees_file_pages_and_never_touches_other_memory(tmp_path: Path) -> None:
    from soe_sdk.archive import Archive, write_archive
    from soe_sdk.soup import _MappedPages

    path = tmp_path / "big.soe"
    values = torch.randn(1 << 21, generator=torch.Generator().manual_seed(0))  # 8 MB
    write_archive(path, {"w": values}, {})
    with Archive(path) as archive:
        release = _MappedPages(path)  # sees the mappings that exist when it is made
        view = archive.tensor("w", verify=False)
        before = _rss_file_kb()
        assert torch.equal(view, values)  # faults the file's pages in
        touched = _rss_file_kb()
        release(view)
        after = _rss_file_kb()
        assert touched - before > 4096 and touched - after > 4096
        assert torch.equal(view, values)  # the data comes back from the page cache
    anonymous = values.clone()
    release(anonymous)  # not a mapping of the file: left alone
    assert torch.equal(anonymous, values)


def _rss_file_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    pytest.skip("no RssFile in /proc/self/status")


def test_stopping_a_streamed_merge_early_leaves_no_helper_threads(tmp_path: Path) -> None:
    import threading

    path = tmp_path / "soup.soe"
    write_tiny_soup(path, n=4)
    soup = soe_sdk.load(path)
    stream = soup.iter_instantiate(torch.ones(4), [0, 1, 2, 3])
    name, first = next(stream)
    assert name == "wte.weight" and first.shape == soup.model_config.parameter_shapes()[name]
    stream.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("soe-verify")]
    # what was checked before stopping stays checked; the rest is checked on the next merge
    full = soup.instantiate(torch.ones(4))
    torch.testing.assert_close(full[name], first)


def test_low_memory_merge_gives_the_same_model(tmp_path: Path) -> None:
    path = tmp_path / "soup.soe"
    write_tiny_soup(path, n=4, storage_dtype=torch.float16)
    assert not soe_sdk.load(path).low_memory  # small archives keep their pages mapped by default
    alpha = torch.tensor([0.5, 0.0, -1.5, 2.0])
    lean, plain = soe_sdk.load(path, low_memory=True), soe_sdk.load(path, low_memory=False)
    assert lean.low_memory
    for _ in range(2):  # the second merge reads pages the first one handed back
        expected, merged = plain.instantiate(alpha), lean.instantiate(alpha)
        for name in expected:
            assert torch.equal(merged[name], expected[name]), name
