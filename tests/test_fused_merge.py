"""The compiled fused merge kernel against torch, on every instruction set this CPU has."""
from __future__ import annotations

import math
import os
import sys
import threading
from pathlib import Path

import pytest
import torch

import soe_sdk
from soe_sdk import fused

from .conftest import write_tiny_soup

if not fused.available():
    if os.environ.get("CI"):  # CI installs with a compiler: a missing kernel there is a build failure
        raise RuntimeError("soe_sdk._merge_kernel was not built; merges would fall back to torch")
    pytest.skip("the fused merge kernel is not built (no C compiler at install time)", allow_module_level=True)


def _instruction_sets() -> list[str]:
    names = []
    for name in ("avx512", "avx2", "scalar"):
        try:
            fused.use_instruction_set(name)
            names.append(name)
        except ValueError:
            pass
    fused.use_instruction_set("best")
    return names


INSTRUCTION_SETS = _instruction_sets()


@pytest.fixture(params=INSTRUCTION_SETS)
def isa(request: pytest.FixtureRequest):
    yield fused.use_instruction_set(request.param)
    fused.use_instruction_set("best")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [0, 1, 3, 4, 5, 16])
@pytest.mark.parametrize("q", [1, 15, 17, 16384, 16401])
def test_combination_equals_torch_on_strided_rows(isa: str, dtype: torch.dtype, m: int, q: int) -> None:
    gen = torch.Generator().manual_seed(m * 100_003 + q)
    bank = torch.randn(m + 2, q + 7, generator=gen).to(dtype)
    rows = bank[1:1 + m, 3:3 + q]  # strided rows, as a column block of a bank is
    shared = torch.randn(q, generator=gen).to(dtype)
    alpha = torch.randn(m, generator=gen)
    out = torch.empty(q)
    assert fused.fused_combination(shared, alpha, rows, out)
    expected = shared.double() + alpha.double() @ rows.double()
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    again = out.clone()
    assert fused.fused_combination(None, alpha, rows, again)  # no base: accumulate into out
    torch.testing.assert_close(again.double(), expected + alpha.double() @ rows.double(), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_16_bit_pattern_widens_exactly(isa: str, dtype: torch.dtype) -> None:
    patterns = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)  # subnormals, inf, nan
    out = torch.empty(patterns.numel())
    assert fused.fused_combination(patterns, torch.zeros(0), torch.zeros(0, patterns.numel(), dtype=dtype), out)
    expected = patterns.float()
    finite = ~expected.isnan()
    assert torch.equal(out[finite], expected[finite])
    assert out[~finite].isnan().all()


def test_a_padded_last_group_adds_nothing_to_infinite_rows(isa: str) -> None:
    rows = torch.tensor([[float("inf"), 1.0]] * 5, dtype=torch.float16)  # 5 rows: the second group is padded
    out = torch.empty(2)
    assert fused.fused_combination(torch.zeros(2), torch.ones(5), rows, out)
    assert out.tolist() == [float("inf"), 5.0]


def test_tensors_the_kernel_cannot_take_are_declined_untouched() -> None:
    rows = torch.randn(3, 8)
    out16 = torch.full((8,), 7.0, dtype=torch.float16)
    assert not fused.fused_combination(None, torch.ones(3), rows, out16)  # fp16 output
    out = torch.full((8,), 7.0)
    assert not fused.fused_combination(None, torch.ones(3), torch.randn(8, 3).t(), out)  # columns not unit-stride
    assert not fused.fused_combination(None, torch.ones(2), rows, out)  # alpha of the wrong length
    assert torch.equal(out, torch.full((8,), 7.0))


@pytest.mark.parametrize("storage", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("low_memory", [False, True])
def test_instantiate_with_the_kernel_equals_instantiate_through_torch(tmp_path: Path, storage: torch.dtype,
                                                                     low_memory: bool) -> None:
    path = tmp_path / "soup.soe"
    write_tiny_soup(path, n=6, storage_dtype=storage)
    alpha = torch.tensor([0.5, -1.25, 2.0, 0.0, 0.75, -0.3])  # α_4 = 0: the kept rows are not consecutive
    for keep_all in (alpha, alpha + 0.1):
        with_kernel = soe_sdk.load(path, low_memory=low_memory).instantiate(keep_all)
        previous = fused.set_enabled(False)
        try:
            with_torch = soe_sdk.load(path, low_memory=low_memory).instantiate(keep_all)
        finally:
            fused.set_enabled(previous)
        assert with_kernel.keys() == with_torch.keys()
        for name in with_kernel:
            assert with_kernel[name].dtype == torch.float32
            torch.testing.assert_close(with_kernel[name], with_torch[name], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("storage", [torch.float32, torch.float16, torch.bfloat16])
def test_a_parameter_wider_than_one_block_merges_through_the_kernel_like_torch(storage: torch.dtype) -> None:
    """A parameter merged in one kernel call (float32 rows included) equals torch's GEMM and the exact sum."""
    from soe_sdk.soup import block_width, merge_dense

    gen = torch.Generator().manual_seed(11)
    q = 2 * block_width(6, torch.float32) + 77
    shared, bank = torch.randn(q, generator=gen).to(storage), torch.randn(6, q, generator=gen).to(storage)
    alpha = torch.tensor([0.5, -1.25, 2.0, 0.3, 0.75, -0.3])
    with_kernel = merge_dense(shared, bank, range(6), alpha)
    previous = fused.set_enabled(False)
    try:
        with_torch = merge_dense(shared, bank, range(6), alpha)
    finally:
        fused.set_enabled(previous)
    expected = shared.double() + alpha.double() @ bank.double()
    torch.testing.assert_close(with_kernel.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(with_kernel, with_torch, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_large_combination_split_across_threads_equals_torch(monkeypatch: pytest.MonkeyPatch,
                                                               dtype: torch.dtype) -> None:
    monkeypatch.setattr(fused, "PARALLEL_ELEMENTS", 1)  # split whatever spans more than one column range
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        gen = torch.Generator().manual_seed(7)
        q = 3 * 16384 + 123  # three aligned ranges, the last one short
        bank = torch.randn(7, q + 5, generator=gen).to(dtype)
        rows, shared, alpha = bank[1:6, 2:2 + q], torch.randn(q, generator=gen).to(dtype), torch.randn(5, generator=gen)
        out = torch.empty(q)
        assert fused.fused_combination(shared, alpha, rows, out)
        expected = shared.double() + alpha.double() @ rows.double()
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
        bound = fused.bind(shared, rows)
        assert bound is not None
        torch.testing.assert_close(bound(alpha, torch.empty(q)).double(), expected, atol=1e-5, rtol=1e-5)
    finally:
        torch.set_num_threads(threads)


def test_run_parallel_runs_every_task_once_and_reraises_after_the_others_finished() -> None:
    seen: list[int] = []
    fused.run_parallel([lambda i=i: seen.append(i) for i in range(50)], threads=3)
    assert sorted(seen) == list(range(50))
    done: list[int] = []

    def fail() -> None:
        raise ValueError("task 7 failed")

    tasks = [lambda i=i: done.append(i) for i in range(20)]
    tasks[7] = fail
    with pytest.raises(ValueError, match="task 7 failed"):
        fused.run_parallel(tasks, threads=3)
    assert sorted(done) == [i for i in range(20) if i != 7]  # nothing still running, nothing skipped


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_small_combinations_merged_side_by_side_equal_each_merged_alone(dtype: torch.dtype) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        gen = torch.Generator().manual_seed(3)
        alpha = torch.randn(5, generator=gen)
        pairs = []
        for q in (1, 17, 4096, 16384 + 5, 300):
            bank = torch.randn(5, q, generator=gen).to(dtype)
            pairs.append((fused.bind(torch.randn(q, generator=gen).to(dtype), bank), bank, q))
        outs = [torch.full((q,), float("nan")) for _, _, q in pairs]
        fused.combine_all([(bound, out) for (bound, _, _), out in zip(pairs, outs)], alpha)
        for (bound, bank, q), out in zip(pairs, outs):
            alone = bound(alpha, torch.empty(q))
            assert torch.equal(out, alone)
            expected = bound.base.double() + alpha.double() @ bank.double()
            torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_merges_with_its_own_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fused, "PARALLEL_ELEMENTS", 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rows, alpha = torch.ones(2, 2 * 16384, dtype=torch.float16), torch.tensor([1.0, 2.0])
        out = torch.empty(2 * 16384)
        assert fused.fused_combination(None, alpha, rows, out.zero_())  # the parent's pool exists now
        pid = os.fork()
        if pid == 0:  # child: the parent's pool threads do not exist here
            child = torch.zeros(2 * 16384)
            ok = fused.fused_combination(None, alpha, rows, child) and bool((child == 3).all())
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        assert bool((out == 3).all())
    finally:
        torch.set_num_threads(threads)


def test_one_soup_switched_between_kernel_and_torch_gives_the_same_model(tmp_path: Path) -> None:
    path = tmp_path / "soup.soe"
    write_tiny_soup(path, n=4, storage_dtype=torch.float16)
    soup = soe_sdk.load(path)
    alpha = torch.tensor([0.3, -1.1, 0.8, 2.0])
    first = soup.instantiate(alpha)  # plans made with the kernel bind it
    previous = fused.set_enabled(False)
    try:
        through_torch = soup.instantiate(alpha)  # the same Soup: its plans must not reuse the kernel
    finally:
        fused.set_enabled(previous)
    again = soup.instantiate(alpha)
    for name in first:
        torch.testing.assert_close(first[name], through_torch[name], atol=1e-6, rtol=1e-6)
        assert torch.equal(first[name], again[name])


def _mapped_mb(mapping: tuple[int, int]) -> float:
    """Resident size of the one mapping that starts at mapping[0], from /proc/self/smaps."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if "-" in line.split(" ", 1)[0] and not line.startswith(("Rss", "Pss")):
            inside = int(line.split("-", 1)[0], 16) == mapping[0]
        elif inside and line.startswith("Rss:"):
            return int(line.split()[1]) / 1024
    pytest.skip("this mapping has no Rss line in /proc/self/smaps")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page release uses Linux madvise")
@pytest.mark.parametrize("storage", [torch.float32, torch.float16])
@pytest.mark.parametrize("row_mb", [4.0, 2.7])  # rows that all enter a new 2 MB granule together, and staggered
@pytest.mark.parametrize("threads", [1, 3])  # rows split between threads: one partial block, or two, added in
@pytest.mark.parametrize("streamed", [32, 4])  # every row in one pass, or passes of 4 rows
def test_the_releasing_kernel_reads_each_row_once_and_keeps_one_granule_per_row(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, storage: torch.dtype, row_mb: float, threads: int,
        streamed: int) -> None:
    from soe_sdk import soup as soup_module
    from soe_sdk.archive import Archive, write_archive
    from soe_sdk.soup import _MappedPages, merge_dense

    monkeypatch.setattr(soup_module, "STREAMED_ROWS", streamed)

    m = 9  # two groups of four rows and a padded one
    q = int(row_mb * 2**20) // (4 if storage == torch.float32 else 2)
    gen = torch.Generator().manual_seed(11)
    shared, bank = torch.randn(q, generator=gen).to(storage), torch.randn(m, q, generator=gen).to(storage)
    path = tmp_path / "big.soe"
    write_archive(path, {"shared": shared, "bank": bank}, {})
    alpha = torch.randn(m, generator=gen)
    expected = shared.double() + alpha.double() @ bank.double()
    with Archive(path) as archive:
        s_view, b_view = archive.tensor("shared", verify=False), archive.tensor("bank", verify=False)
        pages = _MappedPages(path)
        mapping = pages.mapping_of(s_view, b_view)
        assert mapping is not None and pages.mapping_of(shared) is None  # in-memory tensors are not the file's
        pages.release_all()
        assert _mapped_mb(mapping) == 0
        samples: list[float] = []
        done = threading.Event()

        def sample() -> None:  # the file pages mapped while the kernel runs (it releases the GIL)
            while True:
                samples.append(_mapped_mb(mapping))
                if done.is_set():
                    break

        sampler = threading.Thread(target=sample)
        sampler.start()
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            merged = merge_dense(s_view, b_view, range(m), alpha, release=pages, mapping=mapping)
        finally:
            torch.set_num_threads(previous)
            done.set()
            sampler.join()
        torch.testing.assert_close(merged.double(), expected, atol=1e-5, rtol=1e-5)
        # every page it read was handed back, and at no point more than one 2 MB granule per row
        # of a pass (plus one being faulted in) was mapped, of a file of (m + 1) · row_mb MB
        assert _mapped_mb(mapping) == 0
        assert samples and max(samples) <= 2 * (min(m, streamed) + 1) + 2
        assert torch.equal(s_view, shared)  # the data comes back from the page cache
        assert _mapped_mb(mapping) >= row_mb / 2


def test_the_releasing_kernel_declines_what_it_cannot_take() -> None:
    rows, out = torch.randn(3, 8), torch.full((8,), 7.0)
    assert not fused.releasing_combination(torch.zeros(8), torch.ones(3), torch.randn(8, 3).t(), out, (0, 1))
    assert not fused.releasing_combination(torch.zeros(4), torch.ones(3), rows, out, (0, 1))  # base of wrong size
    assert torch.equal(out, torch.full((8,), 7.0))


@pytest.mark.parametrize("storage", [torch.float32, torch.float16])
def test_a_low_memory_soup_with_parameters_of_many_blocks_merges_like_a_mapped_one(
        tmp_path: Path, storage: torch.dtype) -> None:
    from soe_sdk.config import EmbedderSpec, ModelConfig, RouterConfig, SoupConfig
    from soe_sdk.soup import block_width, write_soup

    from .conftest import make_soup_tensors, tiny_tokenizer_json

    model = ModelConfig(vocab_size=1024, max_seq_len=32, d_model=640, n_layers=1, n_heads=2, d_mlp=64)
    config = SoupConfig(model, RouterConfig(k=4, n=5, hidden=8))
    assert math.prod(model.parameter_shapes()["wte.weight"]) > 2 * block_width(5, torch.float32)
    path = tmp_path / "wide.soe"
    write_soup(path, make_soup_tensors(config), config, centroids=torch.eye(4, 384), h_generic=torch.full((4,), 0.25),
               embedder=EmbedderSpec(), tokenizer_json=tiny_tokenizer_json(model.vocab_size),
               provenance={"corpus": "test"}, storage_dtype=storage)
    alpha = torch.tensor([0.5, -1.0, 2.0, 0.25, -0.75])
    lean, mapped = soe_sdk.load(path, low_memory=True), soe_sdk.load(path, low_memory=False)
    for _ in range(2):  # the second merge reads pages the first one handed back
        expected, merged = mapped.instantiate(alpha), lean.instantiate(alpha)
        for name in expected:
            torch.testing.assert_close(merged[name], expected[name], atol=1e-6, rtol=1e-6)
