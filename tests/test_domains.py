"""Domain centroids and histograms on synthetic points with known clusters (real faiss)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from soe_sdk.domains import (domain_histogram, hierarchical_kmeans, kmeans, nearest_centroids,
                             top_domains)
from soe_sdk.errors import SoeError


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def blobs(counts: list[int], dim: int = 32, noise: float = 0.05, seed: int = 0):
    """Unit-norm points around random unit centres; returns (points, centres, labels)."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((len(counts), dim)))
    labels = np.repeat(np.arange(len(counts)), counts)
    points = unit(centres[labels] + noise * rng.standard_normal((labels.size, dim)))
    return points, centres, labels


def test_nearest_centroids_matches_brute_force() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((200, 16)).astype(np.float32)
    c = rng.standard_normal((12, 16)).astype(np.float32)
    expected = ((x[:, None, :] - c[None, :, :]) ** 2).sum(-1).argmin(1)
    got = nearest_centroids(x, c)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, expected)


def test_hard_histogram_counts_documents_per_centroid() -> None:
    counts = [7, 0, 3, 10]
    points, centres, _ = blobs(counts)
    h = domain_histogram(points, centres)
    assert h.dtype == np.float64
    np.testing.assert_allclose(h, np.array(counts) / sum(counts))


def test_soft_histogram_sums_to_one_and_tends_to_hard() -> None:
    points, centres, _ = blobs([5, 9, 6], noise=0.3, seed=2)
    hard = domain_histogram(points, centres, mode="hard")
    previous_gap = np.inf
    for temperature in (1.0, 0.1, 0.01, 1e-4):
        soft = domain_histogram(points, centres, mode="soft", temperature=temperature)
        assert soft.sum() == pytest.approx(1.0)
        assert (soft >= 0).all()
        gap = np.abs(soft - hard).sum()
        assert gap <= previous_gap + 1e-12
        previous_gap = gap
    assert previous_gap < 1e-6


def test_soft_histogram_matches_its_formula_and_is_stable() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((40, 8)).astype(np.float32)
    c = rng.standard_normal((5, 8)).astype(np.float32)
    d2 = ((x[:, None, :].astype(np.float64) - c[None, :, :]) ** 2).sum(-1)
    weights = np.exp(-d2 / 2.0)
    expected = (weights / weights.sum(1, keepdims=True)).mean(0)
    np.testing.assert_allclose(domain_histogram(x, c, mode="soft", temperature=2.0), expected, rtol=1e-6)
    # far-away points and a tiny temperature would overflow a naive exp
    tiny = domain_histogram(100 * x, c, mode="soft", temperature=1e-6)
    assert np.isfinite(tiny).all() and tiny.sum() == pytest.approx(1.0)


def test_soft_histogram_with_a_huge_temperature_is_nearly_uniform() -> None:
    points, centres, _ = blobs([10, 0, 0, 0], seed=4)
    soft = domain_histogram(points, centres, mode="soft", temperature=1e6)
    np.testing.assert_allclose(soft, 0.25, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 60), k=st.integers(1, 20), dim=st.integers(1, 12), seed=st.integers(0, 10_000))
def test_histograms_are_distributions(n: int, k: int, dim: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    c = rng.standard_normal((k, dim)).astype(np.float32)
    for mode in ("hard", "soft"):
        h = domain_histogram(x, c, mode=mode)
        assert h.shape == (k,) and (h >= 0).all() and h.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(domain_histogram(x, c), np.bincount(nearest_centroids(x, c), minlength=k) / n)


@pytest.mark.parametrize("x, c, message", [
    (np.zeros((3, 8)), np.zeros((2, 4)), "8-dim but the centroids are 4-dim"),
    (np.zeros((0, 8)), np.zeros((2, 8)), "empty"),
    (np.zeros(8), np.zeros((2, 8)), "2-D"),
    (np.full((2, 8), np.nan), np.zeros((2, 8)), "NaN"),
    (np.zeros((2, 8)), np.zeros((0, 8)), "centroids: is empty"),
])
def test_bad_inputs_give_one_line_errors(x: np.ndarray, c: np.ndarray, message: str) -> None:
    for call in (lambda: nearest_centroids(x, c), lambda: domain_histogram(x, c)):
        with pytest.raises(SoeError, match=message) as info:
            call()
        assert "\n" not in str(info.value)


def test_bad_mode_and_temperature() -> None:
    x, c = np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32)
    with pytest.raises(SoeError, match="mode"):
        domain_histogram(x, c, mode="fuzzy")
    for temperature in (0.0, -1.0, float("nan")):
        with pytest.raises(SoeError, match="temperature"):
            domain_histogram(x, c, mode="soft", temperature=temperature)


def test_top_domains_order_names_and_zeros() -> None:
    h = np.array([0.1, 0.0, 0.5, 0.25, 0.15])
    assert top_domains(h, top=3) == [(2, 0.5), (3, 0.25), (4, 0.15)]
    assert top_domains(h, names=list("abcde"), top=2) == [("c", 0.5), ("d", 0.25)]
    assert [i for i, _ in top_domains(h, top=10)] == [2, 3, 4, 0]  # the zero weight is left out
    with pytest.raises(SoeError, match="3 names for 5 domains"):
        top_domains(h, names=["a", "b", "c"])


def test_kmeans_finds_separated_clusters_deterministically() -> None:
    points, centres, _ = blobs([40, 40, 40, 40], seed=5)
    found = kmeans(points, 4, seed=0)
    assert found.shape == (4, 32) and found.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(found, axis=1), 1.0, atol=1e-5)  # spherical
    # every true centre has a found centroid right next to it
    assert (np.sort(nearest_centroids(centres, found)) == np.arange(4)).all()
    d2 = ((centres[:, None] - found[None]) ** 2).sum(-1).min(1)
    assert d2.max() < 0.01
    np.testing.assert_array_equal(found, kmeans(points, 4, seed=0))


def test_kmeans_validation_and_single_cluster() -> None:
    points, _, _ = blobs([5], seed=6)
    with pytest.raises(SoeError, match="5 points cannot make 8 clusters"):
        kmeans(points, 8)
    with pytest.raises(SoeError, match="k must be"):
        kmeans(points, 0)
    one = kmeans(points, 1)
    assert one.shape == (1, 32)
    assert nearest_centroids(points, one).max() == 0


def test_hierarchical_kmeans_shape_and_determinism() -> None:
    points, _, _ = blobs([60, 60, 60], noise=0.3, seed=7)
    centroids = hierarchical_kmeans(points, 3, 4, seed=1)
    assert centroids.shape == (12, 32) and centroids.dtype == np.float32
    np.testing.assert_array_equal(centroids, hierarchical_kmeans(points, 3, 4, seed=1))
    # each block of k2 rows refines one top cluster: a point's sub-centroid is in its top block
    blocks = nearest_centroids(points, centroids) // 4
    top = kmeans(points, 3, seed=1)
    np.testing.assert_array_equal(blocks, nearest_centroids(points, top))


def test_hierarchical_kmeans_pads_a_cluster_smaller_than_k2() -> None:
    points, _, _ = blobs([2, 3, 9, 2], seed=8)
    k1, k2 = 4, 5
    centroids = hierarchical_kmeans(points, k1, k2, seed=0)
    assert centroids.shape == (k1 * k2, 32)
    top = nearest_centroids(points, kmeans(points, k1, seed=0))  # the same first level as inside
    small = [i for i in range(k1) if 0 < (top == i).sum() < k2]
    assert small, "the data should give at least one top cluster smaller than k2"
    for i in small:
        members = points[top == i]
        block = centroids[i * k2:(i + 1) * k2]
        # its rows are its own points, repeated in order to fill the block
        np.testing.assert_array_equal(block, members[np.arange(k2) % len(members)])
        # each point lands on its own first copy; the repeats stay empty
        np.testing.assert_array_equal(nearest_centroids(members, centroids), i * k2 + np.arange(len(members)))
    h = domain_histogram(points, centroids)
    assert h.sum() == pytest.approx(1.0) and h.shape == (k1 * k2,)


def test_soft_histogram_is_the_same_when_computed_in_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    import soe_sdk.domains as domains

    points, centres, _ = blobs([13, 8, 11], noise=0.4, seed=9)
    whole = domain_histogram(points, centres, mode="soft", temperature=0.1)
    monkeypatch.setattr(domains, "_SOFT_BLOCK", 7)  # 2 rows per block at k = 3
    np.testing.assert_allclose(domain_histogram(points, centres, mode="soft", temperature=0.1), whole, rtol=1e-12)
